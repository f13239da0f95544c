"""Text-guided inpainting.

Mask convention: ``mask`` is 1 / True where the image is to be **regenerated** (white in a mask
PNG), 0 where it is kept; internally the samplers take ``keep = 1 - mask``.

The masked region is regenerated to follow the prompt: the decoder is conditioned on the caption
and on the prior's image embedding for it, optionally slerped toward the source image's own
embedding (``keep_style``: the new object takes the picture's style). The model's inpainting
decoder is used when it has one (``UnCLIP.has_inpaint_decoder``, or a decoder config with
``inpaint``; ``inpaint_decoder=False`` opts out), else masked replacement sampling
(known region <- q_sample(source, t) every step; RePaint resampling with ``jumps`` > 0). The
upsamplers also run with masked replacement. Finally the result is resized to the input's size
and the source is pasted back outside the mask (``feather`` px of blending *inside* the mask),
so every pixel outside the mask equals the input exactly.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax.pipelines import stages
from unclip_jax.pipelines.model import UnCLIP
from unclip_jax.pipelines.progress import stage as progress_stage
from unclip_jax.utils.images import from_uint8, to_uint8


def resize_mask(mask, size: int) -> np.ndarray:
    """Regenerate-mask ``[H, W]`` (bool / {0, 1}) -> ``[size, size]`` float {0, 1}: a cell is
    regenerated when any part of it is (so small regions survive downsizing)."""
    m = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    return (np.asarray(m.resize((size, size), Image.BOX)) > 0).astype(np.float32)


def feather_alpha(mask, feather: int = 0) -> np.ndarray:
    """``[H, W]`` blend weight of the generated image: 0 outside the mask (source kept
    exactly), rising from ``1/feather`` at the mask's edge to 1 at ``feather`` px inside."""
    m = (np.asarray(mask) > 0).astype(np.float32)
    if feather <= 0:
        return m
    acc, cur = np.zeros_like(m), m
    for _ in range(int(feather)):
        acc += cur
        p = np.pad(cur, 1, mode="edge")  # the image border is not a seam
        cur = np.min(np.stack([p[i:i + m.shape[0], j:j + m.shape[1]]
                               for i in range(3) for j in range(3)]), axis=0)
    return acc / float(feather)


def paste(source_uint8, generated_uint8, alpha) -> np.ndarray:
    """Blend ``generated [B, H, W, 3]`` into ``source [H, W, 3]`` with ``alpha [H, W]``;
    pixels with alpha 0 are the source's, bit for bit."""
    src = np.asarray(source_uint8, np.uint8)[None]
    gen = np.asarray(generated_uint8, np.uint8)
    a = np.asarray(alpha, np.float32)[None, :, :, None]
    blend = np.round(a * gen + (1.0 - a) * src).clip(0, 255).astype(np.uint8)
    return np.where(a > 0, blend, src)


def inpaint(model: UnCLIP, image, mask, prompt: str, key, *, num: int = 4,
            keep_style: float = 0.0, prior: str = "diffusion", prior_steps=None,
            prior_guidance: Optional[float] = None, decoder_steps=None,
            decoder_guidance: Optional[float] = None, jumps: int = 0, feather: int = 0,
            sr_steps=None, inpaint_decoder: Optional[bool] = None,
            progress: bool = False) -> dict:
    """Inpaint uint8 ``image [H, W, 3]`` where ``mask [H, W]`` is 1 (regenerate), ``num``
    times.

    Returns ``{'image_emb' [num, D], 'mask', 'alpha' [H, W], 'decoder', 'sr1', ...,
    'generated' (last stage, [-1, 1]), 'images' uint8 [num, H, W, 3] (source pasted back)}``.
    """
    img = np.asarray(image, np.uint8)
    m = (np.asarray(mask) > 0)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask {m.shape} and image {img.shape[:2]} differ in size")
    if not m.any() or m.all():
        raise ValueError("the mask must mark some but not all pixels")
    k_prior, k_dec, k_sr = jax.random.split(key, 3)
    with progress_stage("clip", progress):
        text = stages.encode_text(model, [prompt] * num)
    with progress_stage("prior" if prior == "diffusion" else "ar prior", progress):
        z = stages.ready(stages.sample_image_emb(model, k_prior, text, prior=prior,
                                                 steps=prior_steps, guidance=prior_guidance,
                                                 progress=progress), progress)
    if keep_style > 0:
        z = stages.slerp(z, stages.embed_images(model, img[None]), float(keep_style))

    def known(size):
        src = jnp.asarray(from_uint8(stages.resize_uint8(img[None], size)))
        keep = jnp.asarray(1.0 - resize_mask(m, size))[None, :, :, None]
        return jnp.repeat(src, num, 0), jnp.repeat(keep, num, 0)

    out: dict = {"image_emb": z, "mask": m}
    src, keep = known(model.decoder_size)
    with progress_stage("decoder", progress):
        out["decoder"] = x = stages.ready(stages.sample_decoder(
            model, k_dec, z, text, steps=decoder_steps, guidance=decoder_guidance,
            source=src, mask=keep, jumps=jumps, inpaint_decoder=inpaint_decoder,
            progress=progress), progress)
    for i, k in enumerate(jax.random.split(k_sr, len(model.upsamplers))):
        src, keep = known(model.sr_config[i].image_size)
        with progress_stage(f"sr{i + 1}", progress):
            out[f"sr{i + 1}"] = x = stages.ready(stages.upsample(
                model, k, x, i, steps=sr_steps, source=src, mask=keep, progress=progress),
                progress)
    out["generated"] = x
    h, w = img.shape[:2]
    gen = np.stack([g if g.shape[:2] == (h, w) else
                    np.asarray(Image.fromarray(g).resize((w, h), Image.BICUBIC))
                    for g in to_uint8(np.asarray(x))])
    out["alpha"] = alpha = feather_alpha(m, feather)
    out["images"] = paste(img, gen, alpha)
    return out
