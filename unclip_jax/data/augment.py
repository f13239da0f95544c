"""Augmentations and corruptions for training.

JAX, jit-friendly (run inside train steps; images float [B, H, W, C] in [-1, 1]):

* :func:`random_resized_crop` - crop a random box (area fraction in ``scale``, aspect in
  ``ratio``) and resize it back; horizontal flips only when asked (``flip_prob``; off by default
  because flipped text and arrows are wrong).
* :func:`gaussian_blur` / :func:`blur_corrupt` - separable Gaussian blur with a per-example sigma;
  the upsamplers' default conditioning corruption (``train.sr.corruption='blur'``; sigma range
  and kernel size from the config).
* :func:`random_crop` - one random window per example, offsets on a grid (the upsampler's
  training crop, taken before its low-res conditioning is made from it).
* :func:`paired_random_crop` - aligned random crops of a low-res / high-res pair (the upsampler's
  training crop when the low-res conditioning was made on the host, ``corruption='bsr'``).

numpy, host side (run in the input pipeline; ``rng`` is a ``np.random.Generator``):

* :func:`bsr_degrade` / :func:`bsr_degrade_batch` - BSR-lite degradation for the second
  upsampler (``train.sr.corruption='bsr'``, run by the sr stage's ``prepare``): random blur,
  downsampling with a random interpolation, Gaussian noise, JPEG at a random quality (PIL).
* :func:`random_inpaint_masks` - keep-masks for inpainting training: boxes, brush strokes and
  outpainting-style borders; float32 [B, H, W, 1], 1 = keep, 0 = fill in.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# default random-resized-crop ranges: area fraction kept (milder than torchvision's 0.08), aspect
# ratio w / h (torchvision's)
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

# ----------------------------------------------------------------------------- JAX: crops


def _crop_boxes(rng, batch: int, height: int, width: int, scale, ratio):
    """Per-example boxes (y0, x0, h, w) with area fraction in ``scale`` and aspect w/h in
    ``ratio``, clipped to the image (torchvision-style, but one draw, no retries)."""
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    area = jax.random.uniform(k1, (batch,), minval=scale[0], maxval=scale[1]) * height * width
    log_r = jax.random.uniform(k2, (batch,), minval=math.log(ratio[0]),
                               maxval=math.log(ratio[1]))
    r = jnp.exp(log_r)
    w = jnp.clip(jnp.sqrt(area * r), 1.0, width)
    h = jnp.clip(jnp.sqrt(area / r), 1.0, height)
    y0 = jax.random.uniform(k3, (batch,)) * (height - h)
    x0 = jax.random.uniform(k4, (batch,)) * (width - w)
    return y0, x0, h, w


def random_resized_crop(rng: jax.Array, images: jax.Array, out_size: int | None = None,
                        scale: Sequence[float] = CROP_SCALE,
                        ratio: Sequence[float] = CROP_RATIO, flip_prob: float = 0.0,
                        method: str = "linear") -> jax.Array:
    """Random resized crop of ``[B, H, W, C]`` to ``[B, S, S, C]`` (``S = out_size`` or H).

    Resampling is antialiased (``jax.image.scale_and_translate``). ``flip_prob`` > 0 also flips
    horizontally with that probability (off by default: text!)."""
    b, h, w, c = images.shape
    s = out_size or h
    k_box, k_flip = jax.random.split(rng)
    y0, x0, bh, bw = _crop_boxes(k_box, b, h, w, scale, ratio)
    sy, sx = s / bh, s / bw

    def one(img, y0, x0, sy, sx):
        return jax.image.scale_and_translate(
            img, (s, s, c), (0, 1), jnp.stack([sy, sx]), jnp.stack([-y0 * sy, -x0 * sx]),
            method=method, antialias=True)

    out = jax.vmap(one)(images.astype(jnp.float32), y0, x0, sy, sx).astype(images.dtype)
    if flip_prob > 0:
        flip = jax.random.bernoulli(k_flip, flip_prob, (b,))
        out = jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)
    return out


def random_crop(rng: jax.Array, images: jax.Array, crop: int, align: int = 1) -> jax.Array:
    """A random ``crop x crop`` window per example of ``[B, H, W, C]`` -> ``[B, crop, crop, C]``,
    offsets multiples of ``align`` (so a downsampled crop lines up with the low-res pixel grid).
    ``crop`` >= H and W returns the images as they are."""
    b, h, w, c = images.shape
    if crop >= h and crop >= w:
        return images
    ky, kx = jax.random.split(rng)
    oy = jax.random.randint(ky, (b,), 0, (h - crop) // align + 1) * align
    ox = jax.random.randint(kx, (b,), 0, (w - crop) // align + 1) * align
    one = lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (crop, crop, c))  # noqa: E731
    return jax.vmap(one)(images, oy, ox)


def paired_random_crop(rng: jax.Array, low: jax.Array, high: jax.Array,
                       crop_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Aligned random crops of a low-res ``[B, h, w, C]`` / high-res ``[B, H, W, C]`` pair.

    ``crop_size`` is the high-res crop side (default ``H // 4``: quarter-size crops); it must be
    a multiple of the scale factor ``H // h``. The low-res crop is ``crop_size // factor`` at the
    matching position (the high-res offset is the low-res offset times the factor)."""
    b, lh, lw, _ = low.shape
    _, hh, hw, _ = high.shape
    factor = hh // lh
    if factor * lh != hh or factor * lw != hw:
        raise ValueError(f"high-res {high.shape} is not an integer multiple of {low.shape}")
    crop_size = crop_size or hh // 4
    if crop_size % factor:
        raise ValueError(f"crop_size {crop_size} is not a multiple of the factor {factor}")
    lc = crop_size // factor
    ky, kx = jax.random.split(rng)
    oy = jax.random.randint(ky, (b,), 0, lh - lc + 1)
    ox = jax.random.randint(kx, (b,), 0, lw - lc + 1)

    def one(lo, hi, y, x):
        lo_c = jax.lax.dynamic_slice(lo, (y, x, 0), (lc, lc, lo.shape[-1]))
        hi_c = jax.lax.dynamic_slice(hi, (y * factor, x * factor, 0),
                                     (crop_size, crop_size, hi.shape[-1]))
        return lo_c, hi_c

    return jax.vmap(one)(low, high, oy, ox)


# ----------------------------------------------------------------------------- JAX: blur

def gaussian_kernel1d(sigma: jax.Array, radius: int) -> jax.Array:
    """Normalised Gaussian taps ``[..., 2 radius + 1]`` for (batched) ``sigma``."""
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)[..., None]
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    return k / jnp.sum(k, axis=-1, keepdims=True)


def _blur_axis(x: jax.Array, taps: jax.Array, axis: int, radius: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    xp = jnp.pad(x, pad, mode="reflect" if x.shape[axis] > radius else "edge")
    n = x.shape[axis]
    out = jnp.zeros_like(x)
    for i in range(2 * radius + 1):  # static unroll: 2r+1 shifted multiply-adds (fused by XLA)
        out = out + taps[:, i, None, None, None] * jax.lax.slice_in_dim(xp, i, i + n, axis=axis)
    return out


def gaussian_blur(images: jax.Array, sigma, max_sigma: float | None = None,
                  kernel_size: int | None = None) -> jax.Array:
    """Separable Gaussian blur of ``[B, H, W, C]`` with per-example ``sigma`` (scalar or [B]).

    The kernel has ``kernel_size`` taps (odd) when given, else radius ``ceil(3 * max_sigma)``
    (static; ``max_sigma`` default: ``sigma`` if it is a Python number, else 3); reflect padding,
    so the image size is kept. ``sigma`` near 0 leaves the image as it is (to float precision)."""
    b = images.shape[0]
    if kernel_size is not None:
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"blur kernel_size must be a positive odd number, got {kernel_size}")
        radius = kernel_size // 2
    else:
        if max_sigma is None:
            max_sigma = float(sigma) if isinstance(sigma, (int, float)) else 3.0
        radius = max(1, int(math.ceil(3.0 * max_sigma)))
    taps = gaussian_kernel1d(jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,)), radius)
    x = images.astype(jnp.float32)
    x = _blur_axis(x, taps, 1, radius)
    x = _blur_axis(x, taps, 2, radius)
    return x.astype(images.dtype)


def blur_corrupt(rng: jax.Array, images: jax.Array,
                 sigma_range: Sequence[float] = (0.4, 0.6), kernel_size: int | None = None,
                 return_sigma: bool = False):
    """Gaussian-blur corruption of upsampler conditioning images ``[B, h, w, C]``: one sigma per
    example drawn uniformly from ``sigma_range`` (from the config), ``kernel_size`` taps (default
    from the largest sigma). A range up to 0 leaves the images as they are. Returns the images,
    or ``(images, sigma [B])`` with ``return_sigma``."""
    lo, hi = float(sigma_range[0]), float(sigma_range[1])
    sigma = jax.random.uniform(rng, (images.shape[0],), minval=lo, maxval=hi)
    out = gaussian_blur(images, sigma, max_sigma=hi, kernel_size=kernel_size) if hi > 0 else images
    return (out, sigma) if return_sigma else out


# ----------------------------------------------------------------------------- numpy: BSR-lite

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR,
                  "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "box": Image.BOX}


def _as_uint8(images) -> tuple[np.ndarray, bool]:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x, False
    return np.clip(np.round((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8), True


def bsr_degrade(rng: np.random.Generator, image: np.ndarray, out_size: int,
                blur_prob: float = 0.9, blur_sigma: Sequence[float] = (0.2, 2.0),
                interpolations: Sequence[str] = ("nearest", "bilinear", "bicubic", "lanczos",
                                                 "box"),
                noise_prob: float = 0.8, noise_std: Sequence[float] = (1.0, 12.0),
                jpeg_prob: float = 0.9, jpeg_quality: Sequence[int] = (30, 95)) -> np.ndarray:
    """BSR-lite degradation of one uint8 ``[H, W, 3]`` image to uint8 ``[S, S, 3]``:
    blur (prob, sigma range) -> downsample (random interpolation) -> Gaussian noise (prob, std in
    0-255 units) -> JPEG (prob, quality range)."""
    im = Image.fromarray(np.asarray(image, np.uint8))
    if rng.random() < blur_prob:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(*blur_sigma))))
    method = INTERPOLATIONS[interpolations[int(rng.integers(len(interpolations)))]]
    if im.size != (out_size, out_size):
        im = im.resize((out_size, out_size), method)
    x = np.asarray(im, np.float32)
    if rng.random() < noise_prob:
        x = x + rng.normal(0.0, float(rng.uniform(*noise_std)), x.shape)
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    if rng.random() < jpeg_prob:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="JPEG",
                                quality=int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)))
        with Image.open(io.BytesIO(buf.getvalue())) as j:
            x = np.asarray(j.convert("RGB"), np.uint8)
    return x


def bsr_degrade_batch(rng: np.random.Generator, images, out_size: int, **kwargs) -> np.ndarray:
    """:func:`bsr_degrade` over ``[B, H, W, 3]``; uint8 in -> uint8 out, float [-1, 1] in ->
    float32 [-1, 1] out."""
    x, was_float = _as_uint8(images)
    out = np.stack([bsr_degrade(rng, im, out_size, **kwargs) for im in x])
    return out.astype(np.float32) / np.float32(127.5) - np.float32(1.0) if was_float else out


# ----------------------------------------------------------------------------- numpy: masks

def _box_mask(rng, h, w, min_frac, max_frac):
    m = np.ones((h, w), np.float32)
    bh = max(1, int(round(h * rng.uniform(min_frac, max_frac))))
    bw = max(1, int(round(w * rng.uniform(min_frac, max_frac))))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    m[y:y + bh, x:x + bw] = 0
    return m


def _brush_mask(rng, h, w, max_strokes=4, max_vertices=8):
    im = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(im)
    size = min(h, w)
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        width = max(1, int(size * rng.uniform(0.04, 0.12)))
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h)))]
        for _ in range(int(rng.integers(2, max_vertices + 1))):
            ang = rng.uniform(0, 2 * np.pi)
            step = size * rng.uniform(0.05, 0.3)
            x = float(np.clip(pts[-1][0] + step * np.cos(ang), 0, w - 1))
            y = float(np.clip(pts[-1][1] + step * np.sin(ang), 0, h - 1))
            pts.append((x, y))
        draw.line(pts, fill=0, width=width, joint="curve")
        r = width / 2
        for x, y in pts:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=0)
    return (np.asarray(im) > 127).astype(np.float32)


def _outpaint_mask(rng, h, w, min_keep=0.4, max_keep=0.8):
    """Keep a centre or side region; fill in the border (outpainting)."""
    m = np.zeros((h, w), np.float32)
    if rng.random() < 0.5:  # keep one side (extend left/right/up/down)
        side = int(rng.integers(4))
        if side < 2:
            k = max(1, int(round(w * rng.uniform(min_keep, max_keep))))
            m[:, :k] = 1
        else:
            k = max(1, int(round(h * rng.uniform(min_keep, max_keep))))
            m[:k] = 1
        if side % 2:
            m = m[::-1, ::-1].copy()
    else:  # keep a centred box (extend on all sides)
        kh = max(1, int(round(h * rng.uniform(min_keep, max_keep))))
        kw = max(1, int(round(w * rng.uniform(min_keep, max_keep))))
        y, x = (h - kh) // 2, (w - kw) // 2
        m[y:y + kh, x:x + kw] = 1
    return m


def random_inpaint_masks(rng: np.random.Generator, batch: int, height: int, width: int,
                         kinds: Sequence[str] = ("box", "brush", "outpaint"),
                         probs: Sequence[float] | None = None,
                         box_frac: Sequence[float] = (0.2, 0.6)) -> np.ndarray:
    """Keep-masks for inpainting training, float32 ``[B, H, W, 1]``: 1 = keep, 0 = fill in.
    Each mask is one of ``kinds`` (box, brush strokes, outpainting border), drawn with
    ``probs``; every mask has both kept and masked pixels."""
    makers = {"box": lambda: _box_mask(rng, height, width, *box_frac),
              "brush": lambda: _brush_mask(rng, height, width),
              "outpaint": lambda: _outpaint_mask(rng, height, width)}
    unknown = set(kinds) - set(makers)
    if unknown:
        raise ValueError(f"unknown mask kinds {sorted(unknown)}; have {sorted(makers)}")
    p = None if probs is None else np.asarray(probs, np.float64) / np.sum(probs)
    out = np.empty((batch, height, width, 1), np.float32)
    for i in range(batch):
        for _ in range(10):
            m = makers[kinds[int(rng.choice(len(kinds), p=p))]]()
            if 0 < m.sum() < m.size:
                break
        else:  # degenerate tiny images: fall back to masking one pixel
            m = np.ones((height, width), np.float32)
            m[int(rng.integers(height)), int(rng.integers(width))] = 0
        out[i, ..., 0] = m
    return out
