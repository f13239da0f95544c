"""The ``unclip`` command.

Every subcommand that generates writes PNGs (a grid when several). Bad input gets one line on
stderr saying what to do and exit code 2, never a traceback; warnings (e.g. a truncated prompt)
are printed and the command goes on.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable, Optional, Sequence

EXIT_USAGE = 2
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SHIPPED_MODEL = os.path.join(PACKAGE_DIR, "assets", "emoji_model")
TINY_CONFIG = os.path.join(os.path.dirname(PACKAGE_DIR), "experiments", "tiny.py")
RANDOM_PREFIX = "random:"


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------ helpers


def _user_errors() -> tuple:
    from unclip_jax.config import ConfigError
    from unclip_jax.pipelines.model import ModelDirError

    errors = [UsageError, ConfigError, ModelDirError]
    try:
        from unclip_jax.convert.hf_clip import CheckpointMismatchError
        errors.append(CheckpointMismatchError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def default_model() -> str:
    """The shipped model when present, else the tiny random model (said on stderr)."""
    if os.path.isfile(os.path.join(SHIPPED_MODEL, "unclip.json")):
        return SHIPPED_MODEL
    return RANDOM_PREFIX + "tiny"


def load_model(spec: Optional[str], seed: int = 0):
    """``--model`` value -> UnCLIP. ``random:tiny`` (or ``random:PATH.py``) builds a randomly
    initialised model from an experiments config; anything else is a model dir."""
    from unclip_jax import config as cfg_lib
    from unclip_jax.pipelines import model as model_lib

    spec = spec or default_model()
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        path = TINY_CONFIG if name == "tiny" else name
        if not os.path.isfile(path):
            raise UsageError(f"--model {spec}: config {path} not found")
        print(f"NOTE: --model {spec}: a tiny randomly initialised unCLIP (untrained weights: "
              "the images are noise-like). Pass --model DIR for a trained model.",
              file=sys.stderr)
        return model_lib.init_random(cfg_lib.load_config_file(path), seed=0)
    return model_lib.load(spec)


def _positive_int(name: str):
    def parse(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if i < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {i}")
        return i
    return parse


def _nonneg_float(name: str):
    def parse(v: str) -> float:
        try:
            f = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}") from None
        if f < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {f}")
        return f
    return parse


def check_prompt(prompt: str, what: str = "prompt") -> str:
    if prompt is None or not prompt.strip():
        raise UsageError(f"the {what} is empty; give some text, e.g. unclip sample \"a red heart\"")
    return prompt.strip()


def add_common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--model", default=None,
                   help="model dir (default: the shipped model; 'random:tiny' for an "
                        "untrained tiny model)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p.add_argument("--out", default=out_default, help="output PNG path")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_steps(p: argparse.ArgumentParser, prior: bool = True) -> None:
    if prior:
        p.add_argument("--prior-steps", type=_positive_int("--prior-steps"), default=None)
        p.add_argument("--prior-guidance", type=_nonneg_float("--prior-guidance"), default=None)
    p.add_argument("--decoder-steps", type=_positive_int("--decoder-steps"), default=None)
    p.add_argument("--decoder-guidance", type=_nonneg_float("--decoder-guidance"), default=None)
    p.add_argument("--sr-steps", type=_positive_int("--sr-steps"), default=None)


def _to_png(images, path: str, ncols: Optional[int] = None) -> str:
    import numpy as np

    from unclip_jax.utils.images import save_grid, to_uint8

    return save_grid(to_uint8(np.asarray(images)), path, ncols=ncols)


# ------------------------------------------------------------------------------ subcommands


def cmd_sample(args) -> int:
    import jax

    from unclip_jax.models.tokenizer import PromptTruncatedWarning
    from unclip_jax.pipelines.text_to_image import text_to_image

    prompt = check_prompt(args.prompt)
    if args.prior != "diffusion":
        raise UsageError(f"--prior {args.prior}: only the diffusion prior is available in this "
                         "model")
    model = load_model(args.model)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        out = text_to_image(
            model, [prompt], jax.random.key(args.seed), num_per_prompt=args.num,
            prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
            sr_steps=args.sr_steps, prior_guidance=args.prior_guidance,
            decoder_guidance=args.decoder_guidance, num_candidates=args.candidates,
            stop_after=args.stop_after, progress=not args.no_progress)
    for w in caught:
        if issubclass(w.category, PromptTruncatedWarning):
            print(f"WARNING: the prompt is longer than the model's 77-token context and was "
                  f"truncated ({w.message})", file=sys.stderr)
    if args.stop_after == "prior":
        import numpy as np
        path = os.path.splitext(args.out)[0] + ".npy"
        np.save(path, np.asarray(out["image_emb"]))
        print(f"wrote {path} (prior image embeddings {tuple(out['image_emb'].shape)})")
        return 0
    path = _to_png(out["images"], args.out)
    dt = time.perf_counter() - t0
    print(f"wrote {path} ({args.num} image(s) of {out['images'].shape[1]}x"
          f"{out['images'].shape[2]}, {dt:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip", description="unCLIP (DALL-E 2) in JAX: sample, edit and train.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sample", help="text -> images")
    p.add_argument("prompt", help="the caption")
    p.add_argument("--num", type=_positive_int("--num"), default=4, help="images to draw")
    p.add_argument("--candidates", type=_positive_int("--candidates"), default=None,
                   help="prior samples per image; the one closest to the caption is kept")
    p.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion")
    p.add_argument("--stop-after", choices=("prior", "decoder", "sr1", "sr2"), default=None)
    add_steps(p)
    add_common(p, "samples.png")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from unclip_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"unclip {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
