"""Text diffs (the paper's language-guided image manipulation): move an image's CLIP embedding
toward the *difference* of two caption embeddings.

``z_d = normalize(z_t(to) - z_t(from))`` scaled to ``|z_i|`` (our embeddings are unnormalised;
equal norms keep the slerp on the sphere of the image embedding), then
``z_theta = slerp(z_i, z_d, theta)`` for theta in [0, max_theta] (paper: 0 .. 0.5), each decoded
image-only with DDIM(eta=0) from one fixed latent (or the image's DDIM-inverted latent with
``invert=True``), so theta = 0 is exactly the plain variation with that noise.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from unclip_jax.pipelines import stages
from unclip_jax.pipelines.model import UnCLIP
from unclip_jax.pipelines.progress import stage as progress_stage
from unclip_jax.pipelines.variations import as_batch, decode_embeddings, invert_images


def text_direction(model: UnCLIP, source_text: str, target_text: str) -> jax.Array:
    """``[D]`` unit vector normalize(text(target) - text(source)); ValueError if they encode to
    the same embedding."""
    e = stages.encode_text(model, [source_text, target_text]).emb
    d = e[1] - e[0]
    n = float(jnp.linalg.norm(d))
    if not n > 1e-8:
        raise ValueError("the two captions have the same CLIP text embedding; give different "
                         "--from and --to texts")
    return d / n


def text_diff(model: UnCLIP, image, source_text: str, target_text: str, key, *,
              frames: int = 5, max_theta: float = 0.5, invert: bool = False,
              decoder_steps=None, decoder_guidance: Optional[float] = None, sr_steps=None,
              stop_after: Optional[str] = None, progress: bool = False) -> dict:
    """Returns ``{'theta' [F], 'direction' [D], 'image_emb' [F, D], 'x_T', 'decoder', ...,
    'images'}`` for a uint8 image ``[H, W, 3]``."""
    if frames < 2:
        raise ValueError("frames must be >= 2")
    img = as_batch(image)
    with progress_stage("clip", progress):
        z_i = stages.embed_images(model, img)  # [1, D]
        d = text_direction(model, source_text, target_text)
    z_d = d[None] * jnp.linalg.norm(z_i, axis=-1, keepdims=True)
    theta = jnp.linspace(0.0, float(max_theta), frames)
    z = stages.slerp(z_i, z_d, theta)
    s = model.decoder_size
    k_noise, k_dec = jax.random.split(key)
    if invert:
        x1 = invert_images(model, img, z_i, steps=decoder_steps, progress=progress)
    else:
        x1 = stages.fixed_noise(k_noise, (1, s, s, 3))
    x_T = jnp.broadcast_to(x1, (frames, s, s, 3))
    out = {"theta": theta, "direction": d, "image_emb": z, "x_T": x_T}
    out.update(decode_embeddings(model, k_dec, z, x_T, decoder_steps=decoder_steps,
                                 decoder_guidance=decoder_guidance, sr_steps=sr_steps,
                                 stop_after=stop_after, progress=progress))
    return out
