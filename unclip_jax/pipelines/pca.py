"""PCA of CLIP image embeddings: fit a basis (from a folder of images or saved embeddings) and
decode an image's embedding reconstructed from its top-k principal components (the paper's
"how much of the embedding is needed" strip), all with the same DDIM noise.

Basis files are ``.npz`` (``unclip_jax.pipelines.model.save_pca`` / ``load_pca``); a model dir
may ship one as ``pca.npz``; an AR prior carries its own (truncated) basis.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models import pca as pca_lib
from unclip_jax.pipelines import stages
from unclip_jax.pipelines.model import UnCLIP, load_pca, save_pca  # noqa: F401
from unclip_jax.pipelines.progress import stage as progress_stage
from unclip_jax.pipelines.variations import as_batch, decode_embeddings

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted)."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(out)


def embed_files(model: UnCLIP, paths: Sequence[str], *, batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
    """CLIP image embeddings ``[N, D]`` of image files (batches of ``batch_size``; the last
    batch is padded so one compiled shape serves all)."""
    from unclip_jax.utils.images import load_image
    from unclip_jax.pipelines import progress as progress_lib

    size = model.clip_config.vision_config.image_size
    out = []
    with progress_stage("embed", progress):
        for i in range(0, len(paths), batch_size):
            chunk = [load_image(p, size) for p in paths[i:i + batch_size]]
            n = len(chunk)
            chunk += [chunk[-1]] * (min(batch_size, len(paths)) - n)
            out.append(np.asarray(stages.embed_images(model, np.stack(chunk)))[:n])
            if progress:
                progress_lib.report(min(i + batch_size, len(paths)), len(paths))
    return np.concatenate(out, 0)


def fit_basis(embeddings, k: Optional[int] = None) -> pca_lib.PCA:
    """PCA of ``embeddings [N, D]`` keeping ``k`` components (default ``min(N, D)``)."""
    return pca_lib.fit_pca(np.asarray(embeddings, np.float64), k)


def default_dims(num_components: int) -> list[int]:
    """1, 2, 4, ... below ``num_components``, then ``num_components``."""
    dims, d = [], 1
    while d < num_components:
        dims.append(d)
        d *= 2
    return dims + [num_components]


def reconstruct_dims(pca: pca_lib.PCA, z, dims: Sequence[int]) -> jax.Array:
    """``z [D]`` (or ``[1, D]``) -> ``[len(dims), D]``: z rebuilt from its top-``d``
    principal components for each ``d`` in ``dims``."""
    z = jnp.asarray(z, jnp.float32).reshape(1, -1)
    coeffs = pca_lib.project(pca, z)
    return jnp.concatenate([pca_lib.reconstruct(pca, coeffs, int(d)) for d in dims], 0)


def pca_strip(model: UnCLIP, image, pca: pca_lib.PCA, dims: Sequence[int], key, *,
              decoder_steps=None, decoder_guidance: Optional[float] = None, sr_steps=None,
              stop_after: Optional[str] = None, progress: bool = False) -> dict:
    """Decode the image's embedding reconstructed from the top-k components for each k in
    ``dims``, all from one DDIM latent. Returns ``{'dims', 'image_emb' [D],
    'z' [len(dims), D], 'x_T', 'decoder', ..., 'images'}``."""
    dims = [int(d) for d in dims]
    bad = [d for d in dims if not 1 <= d <= pca.num_components]
    if bad:
        raise ValueError(f"dims {bad} outside 1..{pca.num_components} (the basis has "
                         f"{pca.num_components} components)")
    if pca.mean.shape[0] != model.clip_config.projection_dim:
        raise ValueError(f"the basis is for {pca.mean.shape[0]}-d embeddings but this model's "
                         f"CLIP makes {model.clip_config.projection_dim}-d ones")
    with progress_stage("clip", progress):
        z_i = stages.embed_images(model, as_batch(image))[0]
    z = reconstruct_dims(pca, z_i, dims)
    s = model.decoder_size
    k_noise, k_dec = jax.random.split(key)
    x_T = stages.fixed_noise(k_noise, (len(dims), s, s, 3))
    out = {"dims": dims, "image_emb": z_i, "z": z, "x_T": x_T}
    out.update(decode_embeddings(model, k_dec, z, x_T, decoder_steps=decoder_steps,
                                 decoder_guidance=decoder_guidance, sr_steps=sr_steps,
                                 stop_after=stop_after, progress=progress))
    return out
