"""Text -> image: CLIP text encoding -> prior (K candidates, best by dot product) -> decoder
(guidance on CLIP emb + caption) -> upsampler(s)."""
from __future__ import annotations

from typing import Optional, Sequence

import jax

from unclip_jax.pipelines import stages
from unclip_jax.pipelines.model import UnCLIP
from unclip_jax.pipelines.progress import stage as progress_stage

STOP_AFTER = ("prior", "decoder", "sr1", "sr2")


def _ready(x, progress: bool):
    """Wait for a stage inside its progress bar (so the bar closes when the stage ends)."""
    return jax.block_until_ready(x) if progress else x


def text_to_image(model: UnCLIP, prompts: Sequence[str], key, *, num_per_prompt: int = 1,
                  prior_steps=None, decoder_steps=None, sr_steps=None,
                  prior_guidance: Optional[float] = None,
                  decoder_guidance: Optional[float] = None,
                  num_candidates: Optional[int] = None, stop_after: Optional[str] = None,
                  prior_sampler: Optional[str] = None, decoder_sampler: Optional[str] = None,
                  progress: bool = False) -> dict:
    """Sample ``num_per_prompt`` images per prompt.

    Returns a dict with ``image_emb [N, D]`` and, per stage run, ``decoder [N, s, s, 3]``,
    ``sr1``, ``sr2`` (images in [-1, 1]); ``images`` is the last stage's output
    (N = len(prompts) * num_per_prompt, prompts repeated in order).
    """
    if stop_after is not None and stop_after not in STOP_AFTER:
        raise ValueError(f"stop_after must be one of {STOP_AFTER}")
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    k_prior, k_dec, k_sr = jax.random.split(key, 3)
    out: dict = {}
    with progress_stage("clip", progress):
        text = stages.encode_text(model, prompts)
    with progress_stage("prior", progress):
        out["image_emb"] = _ready(stages.sample_prior(
            model, k_prior, text, num_candidates=num_candidates, steps=prior_steps,
            guidance=prior_guidance, sampler=prior_sampler, progress=progress), progress)
    if stop_after == "prior":
        return out
    with progress_stage("decoder", progress):
        out["decoder"] = out["images"] = _ready(stages.sample_decoder(
            model, k_dec, out["image_emb"], text, steps=decoder_steps,
            guidance=decoder_guidance, sampler=decoder_sampler, progress=progress), progress)
    if stop_after == "decoder":
        return out
    for i, k in enumerate(jax.random.split(k_sr, len(model.upsamplers))):
        name = f"sr{i + 1}"
        with progress_stage(name, progress):
            out[name] = out["images"] = _ready(stages.upsample(
                model, k, out["images"], i, steps=sr_steps, progress=progress), progress)
        if stop_after == name:
            break
    return out
