"""``unclip convert {diffusers,karlo,hf-clip,openai-clip} ...``: ``convert_main(argv)`` -> status.

  unclip convert diffusers DIR OUT [--image-encoder DIR | --clip PATH] [--prior-steps N ...]
      a saved diffusers UnCLIPPipeline -> a model dir usable by every subcommand (image-input
      subcommands need a CLIP image tower: DIR/image_encoder, an UnCLIPImageVariationPipeline
      dir via --image-encoder, or a HF / OpenAI CLIP via --clip).
  unclip convert karlo DIR OUT [--clip PATH] [--prior FILE --decoder FILE --sr FILE --stats FILE]
      [--overrides JSON]   Karlo release checkpoints -> a model dir.
  unclip convert hf-clip DIR OUT / openai-clip FILE OUT
      a CLIP checkpoint -> a CLIP dir (clip.json + params/ + tokenizer/), see ``save_clip_dir``.

Errors in the checkpoints (unknown / missing keys, shape mismatches, non-float tensors) are
reported by name (``CheckpointMismatchError``) and exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional, Sequence

CLIP_FORMAT = "unclip_jax.clip"


def save_clip_dir(params, config, out: str, tokenizer_dir: Optional[str] = None) -> str:
    """Write converted CLIP params as ``OUT/clip.json`` (format + CLIPConfig) + ``OUT/params``
    (orbax) + ``OUT/tokenizer``."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from unclip_jax.convert.diffusers_unclip import _tree_map
    from unclip_jax.models.tokenizer import DEFAULT_TOKENIZER_DIR

    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")
    os.makedirs(out, exist_ok=True)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(out, "params"), _tree_map(jnp.asarray, params))
    ck.wait_until_finished()
    shutil.copytree(tokenizer_dir or DEFAULT_TOKENIZER_DIR, os.path.join(out, "tokenizer"))
    with open(os.path.join(out, "clip.json"), "w") as f:
        json.dump({"format": CLIP_FORMAT, "format_version": 1, "config": config.to_dict()}, f,
                  indent=2, sort_keys=True)
    return out


def load_clip_dir(path: str):
    """``(params, CLIPConfig, tokenizer_dir)`` from a dir written by ``save_clip_dir``."""
    import jax
    import orbax.checkpoint as ocp

    from unclip_jax.models.clip import CLIPConfig

    with open(os.path.join(path, "clip.json")) as f:
        meta = json.load(f)
    if meta.get("format") != CLIP_FORMAT:
        raise ValueError(f"{path} is not a CLIP dir written by `unclip convert`")
    ckptr = ocp.StandardCheckpointer()
    params_dir = os.path.join(os.path.abspath(path), "params")
    stored = ckptr.metadata(params_dir)
    stored = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
    # restore onto this process's first device (the stored shardings name the saving machine's)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                          stored)
    params = ckptr.restore(params_dir, target)
    return params, CLIPConfig.from_dict(meta["config"]), os.path.join(path, "tokenizer")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unclip convert",
                                description="Convert PyTorch checkpoints to unclip_jax.")
    sub = p.add_subparsers(dest="source", required=True)
    steps = argparse.ArgumentParser(add_help=False)
    steps.add_argument("--prior-steps", type=int, default=25)
    steps.add_argument("--decoder-steps", type=int, default=25)
    steps.add_argument("--sr-steps", type=int, default=7)
    steps.add_argument("--prior-guidance", type=float, default=4.0)
    steps.add_argument("--decoder-guidance", type=float, default=8.0)

    d = sub.add_parser("diffusers", parents=[steps],
                       help="a saved diffusers UnCLIPPipeline -> model dir")
    d.add_argument("src", metavar="DIR")
    d.add_argument("out", metavar="OUT")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--image-encoder", metavar="DIR",
                   help="UnCLIPImageVariationPipeline dir (or its image_encoder/)")
    g.add_argument("--clip", metavar="PATH", help="HF CLIP dir or OpenAI CLIP file (vision tower)")

    k = sub.add_parser("karlo", parents=[steps], help="Karlo release checkpoints -> model dir")
    k.add_argument("src", metavar="DIR", help="folder of the Karlo release files")
    k.add_argument("out", metavar="OUT")
    for name in ("prior", "decoder", "sr", "stats", "clip"):
        k.add_argument(f"--{name}", metavar="PATH", help=f"override the {name} file")
    k.add_argument("--overrides", metavar="JSON",
                   help='structure overrides, e.g. \'{"prior": {"num_heads": 2}}\' or a .json file')

    for name, what in (("hf-clip", "HF CLIP dir"), ("openai-clip", "OpenAI CLIP file")):
        c = sub.add_parser(name, help=f"{what} -> CLIP dir")
        c.add_argument("src", metavar="DIR" if name == "hf-clip" else "FILE")
        c.add_argument("out", metavar="OUT")
    return p


def _overrides(text: Optional[str]):
    if not text:
        return None
    if os.path.isfile(text):
        with open(text) as f:
            return json.load(f)
    return json.loads(text)


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``unclip convert``; returns the exit status (0 ok, 1 conversion error)."""
    from unclip_jax.convert.diffusers_unclip import ConversionReport, UnsupportedConfigError
    from unclip_jax.convert.hf_clip import CheckpointMismatchError

    args = _parser().parse_args(list(argv) if argv is not None else None)
    report = ConversionReport()
    sampling = {}
    if args.source in ("diffusers", "karlo"):
        sampling = dict(prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
                        sr_steps=args.sr_steps, prior_guidance=args.prior_guidance,
                        decoder_guidance=args.decoder_guidance)
    try:
        if args.source == "diffusers":
            from unclip_jax.convert.diffusers_unclip import convert_diffusers_pipeline

            convert_diffusers_pipeline(args.src, args.out, image_encoder=args.image_encoder,
                                       clip=args.clip, report=report, **sampling)
        elif args.source == "karlo":
            from unclip_jax.convert.karlo import convert_karlo

            convert_karlo(args.src, args.out, prior=args.prior, decoder=args.decoder,
                          sr=args.sr, stats=args.stats, clip=args.clip,
                          overrides=_overrides(args.overrides), report=report, **sampling)
        elif args.source == "hf-clip":
            from unclip_jax.convert.hf_clip import load_hf_clip

            params, cfg = load_hf_clip(args.src)
            tok = args.src if os.path.isfile(os.path.join(args.src, "vocab.json")) else None
            save_clip_dir(params, cfg, args.out, tok)
        else:
            from unclip_jax.convert.openai_clip import load_openai_clip

            params, cfg = load_openai_clip(args.src)
            save_clip_dir(params, cfg, args.out)
    except (CheckpointMismatchError, UnsupportedConfigError, FileNotFoundError,
            FileExistsError) as e:
        print(f"unclip convert {args.source}: {e}", file=sys.stderr)
        return 1
    for note in report.notes[:20]:
        print(f"note: {note}", file=sys.stderr)
    if len(report.notes) > 20:
        print(f"note: ... and {len(report.notes) - 20} more", file=sys.stderr)
    extra = f" ({report.tensors} tensors -> {report.params} params)" if report.params else ""
    print(f"wrote {os.path.abspath(args.out)}{extra}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(convert_main())
