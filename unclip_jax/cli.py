"""The ``unclip`` command.

Every subcommand that generates writes PNGs (a grid when several). Bad input gets one line on
stderr saying what to do and exit code 2, never a traceback; warnings (a truncated prompt, a
mask of another size) are printed and the command goes on.

Subcommands: sample, vary, interpolate, textdiff, inpaint, pca, pca-fit, ablate, probe.
Mask convention (inpaint): white (>= 128) in MASK.png = the region to regenerate, black = keep.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Optional, Sequence

EXIT_USAGE = 2
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SHIPPED_MODEL = os.path.join(PACKAGE_DIR, "assets", "emoji_model")
TINY_CONFIG = os.path.join(os.path.dirname(PACKAGE_DIR), "experiments", "tiny.py")
RANDOM_PREFIX = "random:"


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------ helpers


class _ParseError(Exception):
    """argparse's complaint, raised instead of printing usage + exiting (one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # noqa: D102  (argparse API)
        raise _ParseError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def _user_errors() -> tuple:
    from unclip_jax.config import ConfigError
    from unclip_jax.pipelines.model import BasisFileError, ModelDirError

    errors = [UsageError, ConfigError, ModelDirError, BasisFileError]
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


_MODELS: dict = {}  # in-process cache: repeated main() calls (tests, studio) reuse the model


def load_model(spec: Optional[str], seed: int = 0):
    """``--model`` value -> UnCLIP. ``random:tiny`` (or ``random:PATH.py``) builds a randomly
    initialised model from an experiments config; anything else is a model dir. Loaded models
    are kept for the life of the process (keyed by path and the dir's modification time), so
    their compiled samplers are reused."""
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
        key = ("random", os.path.abspath(path), os.path.getmtime(path))
        if key not in _MODELS:
            _MODELS[key] = model_lib.init_random(cfg_lib.load_config_file(path), seed=0)
        return _MODELS[key]
    model_lib.read_meta(spec)  # says what is wrong with a dir that is not ours
    path = os.path.abspath(spec)
    key = ("dir", path, os.path.getmtime(os.path.join(path, model_lib.META_FILE)))
    if key not in _MODELS:
        _MODELS[key] = model_lib.load(path)
    return _MODELS[key]


def _positive_int(name: str, minimum: int = 1):
    def parse(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if i < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {i}")
        return i
    return parse


def _nonneg_float(name: str, maximum: Optional[float] = None):
    def parse(v: str) -> float:
        try:
            f = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}") from None
        if not f >= 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {f}")
        if maximum is not None and f > maximum:
            raise argparse.ArgumentTypeError(f"{name} must be <= {maximum}, got {f}")
        return f
    return parse


def _int_list(name: str):
    def parse(v: str) -> list:
        try:
            out = [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be comma-separated integers like 1,2,4,8, got {v!r}") from None
        if not out or min(out) < 1:
            raise argparse.ArgumentTypeError(f"{name} must list integers >= 1, got {v!r}")
        return out
    return parse


def check_prompt(prompt: str, what: str = "prompt") -> str:
    if prompt is None or not prompt.strip():
        raise UsageError(f"the {what} is empty; give some text, e.g. unclip sample \"a red heart\"")
    return prompt.strip()


def warn_long_prompts(model, texts: Sequence[str]) -> None:
    """Print a warning for each text over the model's token context (it is truncated)."""
    from unclip_jax.pipelines.stages import tokenize

    toks = tokenize(model, list(texts))
    for text, n, cut in zip(texts, toks.lengths, toks.truncated):
        if cut:
            short = text if len(text) <= 40 else text[:37] + "..."
            print(f"WARNING: \"{short}\" has {int(n)} tokens, more than the model's "
                  f"{toks.ids.shape[1]}-token context; it was truncated", file=sys.stderr)


def read_image(path: str, what: str = "image"):
    """uint8 ``[H, W, 3]`` or UsageError (missing / unreadable file)."""
    from unclip_jax.utils.images import load_image

    try:
        return load_image(path)
    except ValueError as e:
        raise UsageError(f"{e}; give the path of a PNG or JPEG {what}") from None


MASK_TOLERANCE = 10  # grey levels within this of 0 / 255 count as black / white


def read_mask(path: str, shape):
    """MASK.png -> bool ``[H, W]`` (True = regenerate: white), resized (nearest, with a
    warning) to the image ``shape``; UsageError if unreadable, not black-and-white, or marking
    nothing / everything."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)),
                                           im.convert("RGBA"))
            arr = np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise UsageError(f"mask file not found: {path}; give a black-and-white PNG "
                         "(white = regenerate)") from None
    except (OSError, SyntaxError) as e:
        raise UsageError(f"cannot read mask {path}: {e}; give a black-and-white PNG") from None
    grey = (arr > MASK_TOLERANCE) & (arr < 255 - MASK_TOLERANCE)
    if grey.any():
        raise UsageError(
            f"mask {path} is not binary: {100 * grey.mean():.1f}% of its pixels are grey "
            f"(e.g. value {int(arr[grey][0])}); use pure black (keep) and white (regenerate)")
    mask = arr >= 128
    h, w = shape[:2]
    if mask.shape != (h, w):
        print(f"WARNING: mask {path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
              f"{w}x{h}; resizing the mask (nearest)", file=sys.stderr)
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (w, h), Image.NEAREST)) >= 128
    if not mask.any():
        raise UsageError(f"mask {path} is all black (nothing to regenerate); paint the region "
                         "to regenerate white")
    if mask.all():
        raise UsageError(f"mask {path} is all white (nothing kept); paint the region to keep "
                         "black, or use `unclip sample` for a new image")
    return mask


def add_common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--model", default=None,
                   help="model dir (default: the shipped model; 'random:tiny' for an "
                        "untrained tiny model)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p.add_argument("--out", default=out_default, help="output PNG path")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--step-progress", action="store_true",
                   help="per-step bars inside the sampling loops (the loops are then compiled "
                        "anew in every run: JAX cannot cache loops with host callbacks)")


def add_steps(p: argparse.ArgumentParser, prior: bool = True) -> None:
    if prior:
        p.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion",
                       help="diffusion prior, or the autoregressive prior (if the model has one)")
        p.add_argument("--prior-steps", type=_positive_int("--prior-steps"), default=None,
                       help="prior sampling steps (default: the model's)")
        p.add_argument("--prior-guidance", type=_nonneg_float("--prior-guidance"), default=None,
                       help="prior classifier-free guidance scale (default: the model's)")
    p.add_argument("--decoder-steps", type=_positive_int("--decoder-steps"), default=None,
                   help="decoder sampling steps (default: the model's)")
    p.add_argument("--decoder-guidance", type=_nonneg_float("--decoder-guidance"), default=None,
                   help="decoder guidance scale on CLIP emb + caption (default: the model's)")
    p.add_argument("--sr-steps", type=_positive_int("--sr-steps"), default=None,
                   help="upsampler steps (default: the model's)")


def _check_prior(model, args) -> None:
    if getattr(args, "prior", "diffusion") == "ar" and not model.has_ar_prior:
        raise UsageError("this model has no autoregressive prior (no ar_prior in its config); "
                         "use --prior diffusion")


def _key(args):
    import jax

    return jax.random.key(args.seed)


def _to_png(images, path: str, ncols: Optional[int] = None) -> str:
    import numpy as np

    from unclip_jax.utils.images import save_grid, to_uint8

    x = np.asarray(images)
    return save_grid(x if x.dtype == np.uint8 else to_uint8(x), path, ncols=ncols)


def _wrote(path: str, images, t0: float, what: str = "image(s)") -> None:
    n, h, w = images.shape[:3]
    print(f"wrote {path} ({n} {what} of {w}x{h}, {time.perf_counter() - t0:.1f} s)")


def _decode_args(args) -> dict:
    return dict(decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance,
                sr_steps=args.sr_steps, progress=not args.no_progress)


# ------------------------------------------------------------------------------ subcommands


def cmd_sample(args) -> int:
    import numpy as np

    from unclip_jax.pipelines.text_to_image import text_to_image

    prompt = check_prompt(args.prompt)
    model = load_model(args.model)
    _check_prior(model, args)
    warn_long_prompts(model, [prompt])
    t0 = time.perf_counter()
    out = text_to_image(
        model, [prompt], _key(args), num_per_prompt=args.num, prior=args.prior,
        prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
        sr_steps=args.sr_steps, prior_guidance=args.prior_guidance,
        decoder_guidance=args.decoder_guidance, num_candidates=args.candidates,
        decoder_candidates=args.decoder_candidates, stop_after=args.stop_after,
        progress=not args.no_progress)
    if args.stop_after == "prior":
        path = os.path.splitext(args.out)[0] + ".npy"
        np.save(path, np.asarray(out["image_emb"]))
        print(f"wrote {path} (prior image embeddings {tuple(out['image_emb'].shape)})")
        return 0
    path = _to_png(out["images"], args.out)
    _wrote(path, out["images"], t0)
    return 0


def cmd_vary(args) -> int:
    from unclip_jax.pipelines.variations import variations

    image = read_image(args.image)
    model = load_model(args.model)
    t0 = time.perf_counter()
    out = variations(model, image, _key(args), num=args.num, invert=args.invert, eta=args.eta,
                     **_decode_args(args))
    path = _to_png(out["images"], args.out)
    _wrote(path, out["images"], t0, "variation(s)")
    return 0


def cmd_interpolate(args) -> int:
    import numpy as np

    from unclip_jax.pipelines.interpolate import interpolate
    from unclip_jax.utils.images import save_gif, to_uint8

    a, b = read_image(args.image_a), read_image(args.image_b)
    model = load_model(args.model)
    t0 = time.perf_counter()
    out = interpolate(model, a, b, _key(args), frames=args.frames, invert=args.invert,
                      **_decode_args(args))
    frames = to_uint8(np.asarray(out["images"]))
    path = _to_png(frames, args.out, ncols=len(frames))
    gif = args.gif or os.path.splitext(args.out)[0] + ".gif"
    save_gif(list(frames) + list(frames[-2:0:-1]), gif, duration_ms=args.frame_ms)
    _wrote(path, frames, t0, "frame(s)")
    print(f"wrote {gif}")
    return 0


def cmd_textdiff(args) -> int:
    from unclip_jax.pipelines.text_diff import text_diff, text_direction

    src = check_prompt(args.from_text, "--from text")
    dst = check_prompt(args.to_text, "--to text")
    image = read_image(args.image)
    model = load_model(args.model)
    warn_long_prompts(model, [src, dst])
    try:
        text_direction(model, src, dst)
    except ValueError as e:
        raise UsageError(str(e)) from None
    t0 = time.perf_counter()
    out = text_diff(model, image, src, dst, _key(args), frames=args.frames,
                    max_theta=args.max_theta, invert=args.invert, **_decode_args(args))
    path = _to_png(out["images"], args.out, ncols=args.frames)
    _wrote(path, out["images"], t0, "frame(s)")
    return 0


def cmd_inpaint(args) -> int:
    from unclip_jax.pipelines.inpaint import inpaint

    prompt = check_prompt(args.prompt)
    image = read_image(args.image)
    mask = read_mask(args.mask, image.shape)
    model = load_model(args.model)
    _check_prior(model, args)
    warn_long_prompts(model, [prompt])
    t0 = time.perf_counter()
    out = inpaint(model, image, mask, prompt, _key(args), num=args.num,
                  keep_style=args.keep_style, prior=args.prior, prior_steps=args.prior_steps,
                  prior_guidance=args.prior_guidance, jumps=args.jumps, feather=args.feather,
                  inpaint_decoder=False if (args.replacement or args.jumps) else None,
                  **_decode_args(args))
    path = _to_png(out["images"], args.out)
    _wrote(path, out["images"], t0)
    return 0


def _basis(model, path: Optional[str]):
    from unclip_jax.pipelines.model import load_pca

    if path:
        return load_pca(path)
    if model.pca is not None:
        return model.pca
    if model.has_ar_prior:
        print("NOTE: using the AR prior's PCA basis "
              f"({model.ar_components()[0].num_components} components)", file=sys.stderr)
        return model.ar_components()[0]
    raise UsageError("this model ships no PCA basis; make one with `unclip pca-fit "
                     "IMAGE_FOLDER --out basis.npz` and pass --basis basis.npz")


def cmd_pca(args) -> int:
    from unclip_jax.pipelines.pca import default_dims, pca_strip

    image = read_image(args.image)
    model = load_model(args.model)
    basis = _basis(model, args.basis)
    k, d = basis.num_components, model.clip_config.projection_dim
    if basis.mean.shape[0] != d:
        raise UsageError(f"the basis is for {basis.mean.shape[0]}-d embeddings but this "
                         f"model's CLIP makes {d}-d ones; fit one with `unclip pca-fit`")
    dims = args.dims or default_dims(k)
    if max(dims) > k:
        raise UsageError(f"--dims {max(dims)} exceeds the basis's {k} components; use "
                         f"values from 1 to {k}")
    t0 = time.perf_counter()
    out = pca_strip(model, image, basis, dims, _key(args), **_decode_args(args))
    path = _to_png(out["images"], args.out, ncols=len(dims))
    _wrote(path, out["images"], t0, f"reconstruction(s) (dims {dims})")
    return 0


def cmd_pca_fit(args) -> int:
    import numpy as np

    from unclip_jax.pipelines.model import save_pca
    from unclip_jax.pipelines.pca import embed_files, fit_basis, list_images

    src = args.dataset
    t0 = time.perf_counter()
    if os.path.isfile(src) and src.endswith(".npy"):
        try:
            emb = np.load(src)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read embeddings {src}: {e}") from None
        if emb.ndim != 2:
            raise UsageError(f"{src} must hold [N, D] embeddings, got shape {emb.shape}")
    elif os.path.isdir(src):
        files = list_images(src)
        if args.max_images:
            files = files[:args.max_images]
        if len(files) < 2:
            raise UsageError(f"{src} has {len(files)} image file(s); PCA needs at least 2 "
                             "(more than the embedding size for a full basis)")
        model = load_model(args.model)
        try:
            emb = embed_files(model, files, batch_size=args.batch_size,
                              progress=not args.no_progress)
        except ValueError as e:  # an unreadable image
            raise UsageError(str(e)) from None
    else:
        raise UsageError(f"{src} is neither a folder of images nor a .npy file of [N, D] "
                         "CLIP image embeddings")
    n, d = emb.shape
    k = min(n, d) if args.components is None else args.components
    if k > min(n, d):
        raise UsageError(f"--components {k} > min(N={n}, D={d})")
    if n <= d:
        print(f"WARNING: {n} embeddings of {d} dims: the basis spans only the data "
              f"(fewer than {d + 1} samples); new images will not reconstruct exactly",
              file=sys.stderr)
    basis = fit_basis(emb, k)
    path = save_pca(basis, args.out)
    ratio = float(np.sum(np.asarray(basis.explained_variance_ratio)))
    print(f"wrote {path} ({k} components of {d}-d embeddings from {n} samples, "
          f"{100 * ratio:.1f}% of the variance, {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_ablate(args) -> int:
    from unclip_jax.pipelines.text_to_image import conditioning_ablation

    prompt = check_prompt(args.prompt)
    model = load_model(args.model)
    _check_prior(model, args)
    warn_long_prompts(model, [prompt])
    t0 = time.perf_counter()
    out = conditioning_ablation(model, prompt, _key(args), num=args.num, prior=args.prior,
                                prior_steps=args.prior_steps,
                                prior_guidance=args.prior_guidance, **_decode_args(args))
    path = _to_png(out["images"], args.out, ncols=args.num)
    _wrote(path, out["images"], t0)
    for i, name in enumerate(out["rows"]):
        print(f"  row {i + 1}: {name}")
    return 0


def cmd_probe(args) -> int:
    from unclip_jax.pipelines.probes import probe
    from unclip_jax.utils.images import save_png

    labels = [x.strip() for x in (args.labels or "").split(",")]
    if len(labels) < 2 or not all(labels):
        raise UsageError("--labels needs at least two non-empty comma-separated labels, e.g. "
                         "--labels \"an apple,an iPod,a pizza\"")
    image = read_image(args.image)
    model = load_model(args.model)
    warn_long_prompts(model, labels)
    t0 = time.perf_counter()
    out = probe(model, image, labels, _key(args), num=args.num, **_decode_args(args))
    path = save_png(out["panel"], args.out)
    print(f"wrote {path} (image, {args.num} variation(s) and label probabilities, "
          f"{time.perf_counter() - t0:.1f} s)")
    for lab, p in zip(labels, out["probs"]):
        print(f"  {100 * float(p):5.1f}%  {lab}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unclip", description="unCLIP (DALL-E 2) in JAX: sample, edit and train.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    num = lambda p, d=4: p.add_argument(  # noqa: E731
        "--num", type=_positive_int("--num"), default=d, help="images to draw")
    frames = lambda p, d: p.add_argument(  # noqa: E731
        "--frames", type=_positive_int("--frames", 2), default=d, help="frames (>= 2)")
    invert = lambda p: p.add_argument(  # noqa: E731
        "--invert", action="store_true",
        help="start from the DDIM-inverted latent of the image (stays closer to it)")

    p = sub.add_parser("sample", help="text -> images")
    p.add_argument("prompt", help="the caption")
    num(p)
    p.add_argument("--candidates", type=_positive_int("--candidates"), default=None,
                   help="prior samples per image; the one closest to the caption is kept")
    p.add_argument("--decoder-candidates", type=_positive_int("--decoder-candidates"),
                   default=None,
                   help="decoder samples per image; the one the model's own CLIP finds closest "
                        "to the caption is kept (default: the model's, 1 unless it sets one)")
    p.add_argument("--stop-after", choices=("prior", "decoder", "sr1", "sr2"), default=None,
                   help="end early: 'prior' writes the embeddings as .npy, 'decoder' the 64px "
                        "images, 'sr1' after the first upsampler")
    add_steps(p)
    add_common(p, "samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("vary", help="variations of an image")
    p.add_argument("image", help="input image (PNG / JPEG)")
    num(p)
    invert(p)
    p.add_argument("--eta", type=_nonneg_float("--eta"), default=None,
                   help="DDIM eta with --invert (default 0.3; larger varies more)")
    add_steps(p, prior=False)
    add_common(p, "variations.png")
    p.set_defaults(func=cmd_vary)

    p = sub.add_parser("interpolate", help="slerp between two images (strip + GIF)")
    p.add_argument("image_a", metavar="A")
    p.add_argument("image_b", metavar="B")
    frames(p, 7)
    invert(p)
    p.add_argument("--gif", default=None, help="GIF path (default: OUT with .gif)")
    p.add_argument("--frame-ms", type=_positive_int("--frame-ms"), default=200)
    add_steps(p, prior=False)
    add_common(p, "interpolation.png")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("textdiff", help="edit an image along a text difference")
    p.add_argument("image")
    p.add_argument("--from", dest="from_text", required=True, help="caption of the image now")
    p.add_argument("--to", dest="to_text", required=True, help="caption of the edited image")
    frames(p, 5)
    p.add_argument("--max-theta", type=_nonneg_float("--max-theta", 1.0), default=0.5,
                   help="last slerp weight toward the text diff (paper: 0.5)")
    invert(p)
    add_steps(p, prior=False)
    add_common(p, "textdiff.png")
    p.set_defaults(func=cmd_textdiff)

    p = sub.add_parser("inpaint", help="regenerate a masked region from a prompt")
    p.add_argument("image")
    p.add_argument("--mask", required=True,
                   help="black-and-white PNG: white = regenerate, black = keep")
    p.add_argument("--prompt", required=True, help="what the masked region should show")
    num(p)
    p.add_argument("--keep-style", type=_nonneg_float("--keep-style", 1.0), default=0.0,
                   metavar="THETA", help="slerp the prompt's embedding toward the image's "
                                         "own by THETA in [0, 1] (0 = prompt only)")
    p.add_argument("--jumps", type=_positive_int("--jumps", 0), default=0,
                   help="RePaint resampling jumps (implies --replacement)")
    p.add_argument("--replacement", action="store_true",
                   help="masked replacement sampling with the plain decoder even when the "
                        "model has an inpainting decoder")
    p.add_argument("--feather", type=_positive_int("--feather", 0), default=0, metavar="PX",
                   help="blend the seam over PX pixels inside the mask")
    add_steps(p)
    add_common(p, "inpaint.png")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("pca", help="decode an image's embedding from its top-k PCA components")
    p.add_argument("image")
    p.add_argument("--dims", type=_int_list("--dims"), default=None,
                   help="comma-separated component counts (default 1,2,4,... up to all)")
    p.add_argument("--basis", default=None,
                   help="PCA basis .npz from `unclip pca-fit` (default: the model's)")
    add_steps(p, prior=False)
    add_common(p, "pca.png")
    p.set_defaults(func=cmd_pca)

    p = sub.add_parser("pca-fit", help="fit the PCA basis of CLIP image embeddings")
    p.add_argument("dataset", help="folder of images, or .npy of [N, D] CLIP image embeddings")
    p.add_argument("--components", type=_positive_int("--components"), default=None,
                   help="components kept (default min(N, D))")
    p.add_argument("--max-images", type=_positive_int("--max-images"), default=None)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64)
    add_common(p, "pca.npz")
    p.set_defaults(func=cmd_pca_fit)

    p = sub.add_parser("ablate", help="decoder conditioning comparison (3 rows)")
    p.add_argument("prompt")
    num(p)
    add_steps(p)
    add_common(p, "ablate.png")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("probe", help="CLIP zero-shot label probabilities beside variations")
    p.add_argument("image")
    p.add_argument("--labels", required=True, help="comma-separated labels")
    num(p)
    add_steps(p, prior=False)
    add_common(p, "probe.png")
    p.set_defaults(func=cmd_probe)
    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # parsed by its own module
    return parser


# Subcommands with their own argument parsers: `unclip NAME ...` -> module:function(argv).
DELEGATED = {
    "train": ("unclip_jax.train.cli", "train_main",
              "train a stage: unclip train STAGE --config experiments/X.py --workdir DIR"),
    "embed": ("unclip_jax.train.cli", "embed_main",
              "precompute CLIP embeddings of a dataset for prior / decoder training"),
    "export": ("unclip_jax.train.cli", "export_main",
               "write a model dir from trained stages (EMA weights; bfloat16 storage optional)"),
    "convert": ("unclip_jax.convert.cli", "convert_main",
                "convert diffusers / Karlo unCLIP or HF / OpenAI CLIP weights to a model dir"),
    "plan": ("unclip_jax.parallel.plan", "plan_main",
             "compile a sharded train step for a TPU topology and report memory / FLOPs"),
    "studio": ("unclip_jax.studio", "studio_main",
               "the editing studio in the browser (needs the [studio] extra)"),
}


def run_delegated(name: str, argv: Sequence[str]) -> int:
    """Run a delegated subcommand; user errors -> one line + exit 2."""
    import importlib

    from unclip_jax.utils.compile_cache import enable_compilation_cache

    module, func, _ = DELEGATED[name]
    enable_compilation_cache()
    try:
        fn = getattr(importlib.import_module(module), func)
    except ImportError as e:
        print(f"unclip {name}: error: {e}. Install the extra it needs "
              f"(e.g. pip install -e \".[studio]\" for the studio)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(fn(list(argv)) or 0)
    except _user_errors() as e:
        print(f"unclip {name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return run_delegated(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ParseError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from unclip_jax.models.tokenizer import PromptTruncatedWarning
    from unclip_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    from unclip_jax.pipelines import progress as progress_lib

    progress_lib.set_step_progress(getattr(args, "step_progress", False))
    try:
        with warnings.catch_warnings():
            # the CLI prints its own one-line warning for long prompts
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"unclip {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
