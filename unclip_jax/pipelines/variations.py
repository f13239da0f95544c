"""Image variations: CLIP image embedding -> decoder with fresh noise, or (``invert=True``)
around the image's own DDIM-inverted latent (the paper's bipartite latent (z_i, x_T)).

Image-only conditioning: the caption is the decoder's null caption in both guidance halves, so
guidance acts on the CLIP image embedding alone.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.pipelines import stages
from unclip_jax.pipelines.model import UnCLIP
from unclip_jax.pipelines.progress import stage as progress_stage

INVERT_ETA = 0.3  # DDIM eta around an inverted latent: > 0 varies, small stays close


def as_batch(image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` or ``[1, H, W, 3]`` -> ``[1, H, W, 3]``."""
    x = np.asarray(image, np.uint8)
    return x[None] if x.ndim == 3 else x


def invert_images(model: UnCLIP, images_uint8, image_emb, *, steps=None,
                  progress: bool = False) -> jax.Array:
    """DDIM-invert uint8 ``[B, H, W, 3]`` images (resized to the decoder size) conditioned on
    their CLIP embeddings ``[B, D]`` (caption dropped) -> latents x_T ``[B, s, s, 3]``."""
    x0 = stages.decoder_pixels(model, images_uint8)
    text = stages.empty_text(model, x0.shape[0])
    with progress_stage("invert", progress):
        return stages.ready(stages.invert_decoder(model, x0, image_emb, text, steps=steps,
                                                  drop_text_cond=True, progress=progress),
                            progress)


def variations(model: UnCLIP, image, key, *, num: int = 4, decoder_steps=None,
               decoder_guidance: Optional[float] = None, sampler: Optional[str] = None,
               eta: Optional[float] = None, invert: bool = False, x_T=None, sr_steps=None,
               stop_after: Optional[str] = None, progress: bool = False) -> dict:
    """``num`` variations of one uint8 image ``[H, W, 3]``.

    Fresh noise by default (the decoder's configured sampler). ``invert=True``: the image is
    first DDIM-inverted conditioned on its embedding, then every variation starts from that
    latent and samples with DDIM(``eta``, default ``INVERT_ETA``), so they stay close to the
    input. ``x_T`` ([1 or num, s, s, 3]) gives the start noise explicitly (with
    ``sampler='ddim'``, ``eta=0`` the output is a deterministic function of it).
    Returns ``{'image_emb' [num, D], 'x_T' (when fixed), 'decoder', 'sr1', ..., 'images'}``.
    """
    img = as_batch(image)
    with progress_stage("clip", progress):
        z1 = stages.embed_images(model, img)
    z = jnp.repeat(z1, num, axis=0)
    s = model.decoder_size
    if invert:
        x_T = invert_images(model, img, z1, steps=decoder_steps, progress=progress)
        sampler = "ddim"
        eta = INVERT_ETA if eta is None else eta
    if x_T is not None:
        x_T = jnp.broadcast_to(jnp.asarray(x_T, jnp.float32), (num, s, s, 3))
    out = {"image_emb": z}
    if x_T is not None:
        out["x_T"] = x_T
    out.update(stages.decode_and_upsample(
        model, key, z, stages.empty_text(model, num), decoder_steps=decoder_steps,
        decoder_guidance=decoder_guidance, decoder_sampler=sampler,
        eta=float(eta or 0.0), x_T=x_T, drop_text_cond=True, sr_steps=sr_steps,
        stop_after=stop_after, progress=progress))
    return out


def decode_embeddings(model: UnCLIP, key, image_emb, x_T, *, decoder_steps=None,
                      decoder_guidance: Optional[float] = None, sr_steps=None,
                      stop_after: Optional[str] = None, progress: bool = False) -> dict:
    """Decode embeddings ``[F, D]`` image-only with DDIM(eta=0) from the given latents
    ``x_T [F, s, s, 3]`` and shared upsampler noise: rows differ only through their inputs
    (interpolation strips, text diffs, PCA strips)."""
    f = image_emb.shape[0]
    return stages.decode_and_upsample(
        model, key, image_emb, stages.empty_text(model, f), decoder_steps=decoder_steps,
        decoder_guidance=decoder_guidance, decoder_sampler="ddim", eta=0.0, x_T=x_T,
        drop_text_cond=True, sr_steps=sr_steps, fixed_sr_noise=True, stop_after=stop_after,
        progress=progress)
