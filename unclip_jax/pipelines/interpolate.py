"""Interpolation between two images: slerp of their CLIP image embeddings, decoded with the
decoder noise fixed (or, ``invert=True``, with the slerp of their DDIM-inverted latents)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from unclip_jax.pipelines import stages
from unclip_jax.pipelines.model import UnCLIP
from unclip_jax.pipelines.progress import stage as progress_stage
from unclip_jax.pipelines.variations import as_batch, decode_embeddings, invert_images


def interpolate(model: UnCLIP, image_a, image_b, key, *, frames: int = 7, invert: bool = False,
                decoder_steps=None, decoder_guidance: Optional[float] = None, sr_steps=None,
                stop_after: Optional[str] = None, progress: bool = False) -> dict:
    """``frames`` images along slerp(z_a, z_b, t), t = 0 .. 1 (uint8 inputs ``[H, W, 3]``).

    Frame 0 uses exactly z_a and the last exactly z_b. Returns ``{'t' [F], 'image_emb' [F, D],
    'x_T' [F, s, s, 3], 'decoder', 'sr1', ..., 'images'}``.
    """
    if frames < 2:
        raise ValueError("frames must be >= 2")
    a, b = as_batch(image_a), as_batch(image_b)
    with progress_stage("clip", progress):
        z2 = stages.embed_images(model, [a[0], b[0]])
    t = jnp.linspace(0.0, 1.0, frames)
    z = stages.slerp(z2[0:1], z2[1:2], t)
    s = model.decoder_size
    k_noise, k_dec = jax.random.split(key)
    if invert:
        size = max(a.shape[1], b.shape[1])
        pair = stages.resize_uint8(a, size), stages.resize_uint8(b, size)
        lat = invert_images(model, jnp.concatenate(pair, 0), z2, steps=decoder_steps,
                            progress=progress).reshape(2, -1)
        x_T = stages.slerp(lat[0:1], lat[1:2], t).reshape(frames, s, s, 3)
    else:
        x_T = stages.fixed_noise(k_noise, (frames, s, s, 3))
    out = {"t": t, "image_emb": z, "x_T": x_T}
    out.update(decode_embeddings(model, k_dec, z, x_T, decoder_steps=decoder_steps,
                                 decoder_guidance=decoder_guidance, sr_steps=sr_steps,
                                 stop_after=stop_after, progress=progress))
    return out
