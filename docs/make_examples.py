"""Make the README's example outputs: every `unclip` command run on real emoji with the shipped
model (issue "4 of 6" / "5 of 6").

    python docs/make_examples.py [--data-dir /work/data_cache/tfds] [--model DIR]

Input images are Twitter-style emoji of *train* concepts taken from the emoji tfds dataset (the
commands below never saw them as inputs, but the model was trained on these concepts); they are
written to docs/examples/inputs/ with a mask for inpainting. Each command is printed and run as
the README shows it, with its default steps and guidance, and writes docs/examples/NAME.png.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "examples")
INPUTS = os.path.join(OUT, "inputs")
# input name -> first caption of the emoji (its Twitter style, no skin tone, is used)
PICK = {"pizza": "pizza", "cat": "cat face", "dog": "dog face", "grinning": "grinning face",
        "rocket": "rocket", "apple": "red apple"}


def export_inputs(data_dir: str) -> None:
    from unclip_jax.data.pipeline import load_source

    src = load_source("emoji_dataset", "train", data_dir)
    want = {v: k for k, v in PICK.items()}
    os.makedirs(INPUTS, exist_ok=True)
    for i in range(len(src)):
        e = src[i]
        cap = e["captions"][0]
        cap = cap.decode() if isinstance(cap, bytes) else str(cap)
        style = e["style"].decode() if isinstance(e["style"], bytes) else str(e["style"])
        if cap in want and style == "twitter" and not e["skin_tone"]:
            Image.fromarray(np.asarray(e["image"], np.uint8)).save(
                os.path.join(INPUTS, f"{want.pop(cap)}.png"))
    if want:
        raise SystemExit(f"not found in the train split: {sorted(want)}")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 28:60] = 255  # white = regenerate: the upper right of the face
    Image.fromarray(mask).save(os.path.join(INPUTS, "mask.png"))


def commands(model: str | None) -> list[list[str]]:
    i = lambda n: os.path.join("docs", "examples", "inputs", f"{n}.png")  # noqa: E731
    o = lambda n: os.path.join("docs", "examples", f"{n}.png")  # noqa: E731
    cmds = [
        ["sample", "a red heart", "--num", "4", "--out", o("sample")],
        ["sample", "a red heart", "--num", "4", "--stop-after", "decoder",
         "--out", o("sample_decoder")],
        ["vary", i("pizza"), "--num", "4", "--out", o("vary")],
        ["vary", i("pizza"), "--num", "4", "--invert", "--eta", "0.3", "--out", o("vary_invert")],
        ["interpolate", i("cat"), i("dog"), "--frames", "7", "--out", o("interpolate")],
        ["textdiff", i("cat"), "--from", "cat face", "--to", "dog face", "--frames", "5",
         "--out", o("textdiff")],
        ["inpaint", i("grinning"), "--mask", i("mask"), "--prompt", "a flamingo", "--num", "4",
         "--out", o("inpaint")],
        ["pca", i("rocket"), "--dims", "1,2,4,8,16,32,64,192", "--out", o("pca")],
        ["ablate", "a red apple", "--num", "4", "--out", o("ablate")],
        ["probe", i("apple"), "--labels", "a red apple,a pizza,a red heart", "--num", "3",
         "--out", o("probe")],
    ]
    extra = ["--model", model] if model else []
    return [["unclip", *c, *extra] for c in cmds]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="/work/data_cache/tfds")
    ap.add_argument("--model", default=None, help="default: the shipped model")
    args = ap.parse_args(argv)
    export_inputs(args.data_dir)
    root = os.path.dirname(HERE)
    for cmd in commands(args.model):
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd + ["--no-progress"], cwd=root, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
