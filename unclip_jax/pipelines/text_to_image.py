"""Text -> image: CLIP text encoding -> prior (K candidates, best by dot product; diffusion or
autoregressive) -> decoder (guidance on CLIP emb + caption) -> upsampler(s); and the paper's
conditioning ablation for one decoder."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from unclip_jax.pipelines import stages
from unclip_jax.pipelines.model import UnCLIP
from unclip_jax.pipelines.progress import stage as progress_stage
from unclip_jax.pipelines.stages import STOP_AFTER, ready as _ready

PRIORS = ("diffusion", "ar")


def text_to_image(model: UnCLIP, prompts: Sequence[str], key, *, num_per_prompt: int = 1,
                  prior: str = "diffusion", prior_steps=None, decoder_steps=None, sr_steps=None,
                  prior_guidance: Optional[float] = None,
                  decoder_guidance: Optional[float] = None,
                  num_candidates: Optional[int] = None, stop_after: Optional[str] = None,
                  prior_sampler: Optional[str] = None, decoder_sampler: Optional[str] = None,
                  decoder_candidates: Optional[int] = None, progress: bool = False) -> dict:
    """Sample ``num_per_prompt`` images per prompt.

    ``num_candidates``: prior samples per image, the one closest to the caption kept (the
    paper's K = 2); ``decoder_candidates``: decoder samples per image, the one the model's own
    CLIP finds closest to the caption kept (default: ``diffusion.decoder.num_candidates`` or 1).

    ``prior``: 'diffusion' or 'ar' (the autoregressive prior; the model must have one).
    Returns a dict with ``image_emb [N, D]`` and, per stage run, ``decoder [N, s, s, 3]``,
    ``sr1``, ``sr2`` (images in [-1, 1]); ``images`` is the last stage's output
    (N = len(prompts) * num_per_prompt, prompts repeated in order).
    """
    if stop_after is not None and stop_after not in STOP_AFTER:
        raise ValueError(f"stop_after must be one of {STOP_AFTER}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}")
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    k_prior, k_rest = jax.random.split(key)
    out: dict = {}
    with progress_stage("clip", progress):
        text = stages.encode_text(model, prompts)
    with progress_stage("prior" if prior == "diffusion" else "ar prior", progress):
        out["image_emb"] = _ready(stages.sample_image_emb(
            model, k_prior, text, prior=prior, num_candidates=num_candidates, steps=prior_steps,
            guidance=prior_guidance, sampler=prior_sampler, progress=progress), progress)
    if stop_after == "prior":
        return out
    out.update(stages.decode_and_upsample(
        model, k_rest, out["image_emb"], text, decoder_steps=decoder_steps,
        decoder_guidance=decoder_guidance, decoder_sampler=decoder_sampler, sr_steps=sr_steps,
        stop_after=stop_after, num_candidates=stages.decoder_candidates(model, decoder_candidates),
        progress=progress))
    return out


ABLATION_ROWS = ("caption only", "caption + CLIP text emb", "caption + prior image emb")


def conditioning_ablation(model: UnCLIP, prompt: str, key, *, num: int = 4,
                          prior: str = "diffusion", prior_steps=None,
                          prior_guidance: Optional[float] = None, decoder_steps=None,
                          decoder_guidance: Optional[float] = None, sr_steps=None,
                          progress: bool = False) -> dict:
    """The paper's conditioning comparison (Fig. "caption / text emb / image emb") for one
    decoder, ``num`` samples per row, the same decoder and upsampler noise in every row:

    1. caption only: the CLIP image embedding is dropped (the decoder's null embedding, what
       it was trained on for a missing / zeroed embedding);
    2. caption + the CLIP *text* embedding fed where the image embedding goes;
    3. caption + the prior's image embedding (the full unCLIP stack).

    Returns ``{'rows': ABLATION_ROWS, 'image_emb' [num, D], 'images' [3 * num, S, S, 3]}``
    (row-major: row r is images[r * num:(r + 1) * num]).
    """
    k_prior, k_dec = jax.random.split(key)
    with progress_stage("clip", progress):
        text = stages.encode_text(model, [prompt] * num)
    with progress_stage("prior" if prior == "diffusion" else "ar prior", progress):
        z = _ready(stages.sample_image_emb(model, k_prior, text, prior=prior, steps=prior_steps,
                                           guidance=prior_guidance, progress=progress), progress)
    rows = [(jnp.zeros_like(z), True), (text.emb, False), (z, False)]
    images = []
    for emb, drop in rows:
        images.append(stages.decode_and_upsample(
            model, k_dec, emb, text, decoder_steps=decoder_steps,
            decoder_guidance=decoder_guidance, drop_clip_cond=drop, sr_steps=sr_steps,
            progress=progress)["images"])
    return {"rows": ABLATION_ROWS, "image_emb": z, "images": jnp.concatenate(images, axis=0)}
