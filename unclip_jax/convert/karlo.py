"""Kakao Brain Karlo (v1.0.alpha) checkpoints -> an unclip_jax model dir.

Inputs (the names of the Karlo release; all in one folder by default):

  prior-ckpt-step=01000000-of-01000000.ckpt     ``{'state_dict': {'model.*': ...}}`` (prior)
  decoder-ckpt-step=01000000-of-01000000.ckpt   ``{'state_dict': {'model.*': ...}}`` PLMImUNet
  improved-sr-ckpt-step=1.2M.ckpt               ``{'state_dict': {'model_first_steps.*',
                                                 'model_last_step.*'}}`` two SuperResUNetModels
  ViT-L-14_stats.th                             ``(clip_mean [768], clip_std [768])``
  ViT-L-14.pt                                   OpenAI CLIP (or ``--clip`` a HF CLIP dir)

Structure comes from the Karlo configs (``prior_1B_vit_l.yaml``, ``decoder_900M_vit_l.yaml``,
``improved_sr_64_256_1.4B.yaml``), i.e. our presets ``PriorConfig.karlo()``,
``karlo_decoder_config()`` and ``karlo_sr_config()``; overrides (for other sizes) are keyword
dicts. Every tensor is mapped by name with the strict accounting of ``diffusers_unclip.Mapper``.

Karlo details handled here:
  * prior ``c_qkv`` is fused head-major (``split_fused_qkv``); the clip stats come from the
    separate stats file; the unconditional prior input is the CLIP encoding of the empty
    caption (``null_cond='buffer'``); x0 is clamped to +-10 (``diffusion.prior.clip_range``);
  * decoder ``clip_tok_proj`` is channel-major (``[B, D, 4]``): output units are permuted;
    ``cf_param`` is the learned null image embedding; the unconditional caption is the empty
    caption (``diffusion.decoder.uncond_caption='empty'``);
  * SR: ``model_first_steps`` -> ``sr[0]``, ``model_last_step`` -> ``sr_last['0']`` (used for
    the last of the 7 steps). Karlo resizes 64 -> 256 with torchvision bicubic (a = -0.75)
    outside the model; our upsampler resizes with jax bicubic (a = -0.5): pass a full-size
    ``low_res`` to the UNet for bit-level parity with Karlo's own resize.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from unclip_jax.convert.diffusers_unclip import (ConversionReport, Mapper, expected_shapes,
                                                 permute_clip_tokens, prior_from_sd, unet_blocks)
from unclip_jax.convert.hf_clip import CheckpointMismatchError

KARLO_FILES = dict(
    prior="prior-ckpt-step=01000000-of-01000000.ckpt",
    decoder="decoder-ckpt-step=01000000-of-01000000.ckpt",
    sr="improved-sr-ckpt-step=1.2M.ckpt",
    stats="ViT-L-14_stats.th",
    clip="ViT-L-14.pt",
)

KARLO_PRIOR_NAMES = dict(
    time1="time_embed.0", time2="time_embed.2", clip_img_proj="clip_img_proj",
    text_emb_proj="text_emb_proj", text_enc_proj="text_enc_proj", pos="positional_embedding",
    prd="prd_emb", final_ln="final_ln", out_proj="out_proj", block="transformer.resblocks.{i}.",
    ln1="ln_1", ln2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj", qkv="attn.c_qkv",
    attn_out="attn.c_proj", mean="clip_mean", std="clip_std")


def strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict:
    """Keys starting with ``prefix`` without it (others dropped)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def read_karlo_checkpoint(path: str) -> dict:
    """A Karlo ``.ckpt`` (Lightning: ``{'state_dict': ...}``) -> name -> numpy."""
    import torch

    from unclip_jax.convert.hf_clip import _to_numpy

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path}: not a state dict checkpoint ({type(obj).__name__})")
    return {k: _to_numpy(v) for k, v in obj.items()}


def read_karlo_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from unclip_jax.convert.hf_clip import _to_numpy

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        obj = (obj["clip_mean"], obj["clip_std"])
    mean, std = obj
    return _to_numpy(mean).reshape(-1), _to_numpy(std).reshape(-1)


# ----------------------------------------------------------------------------- models


def convert_karlo_prior(sd: Mapping[str, Any], cfg, stats: tuple,
                        report: Optional[ConversionReport] = None) -> tuple[dict, dict]:
    """Karlo ``PriorTransformer`` state dict (without the ``model.`` prefix) + (mean, std) ->
    ``(params, buffers)``."""
    return prior_from_sd(sd, cfg, KARLO_PRIOR_NAMES, fused_qkv=True, what="Karlo prior",
                         report=report, stats=stats)


def _karlo_res(m: Mapper, dst: tuple, src: str):
    m.norm(dst + ("in_norm",), src + ".in_layers.0")
    m.conv(dst + ("in_conv",), src + ".in_layers.2")
    m.linear(dst + ("emb_proj",), src + ".emb_layers.1")
    m.norm(dst + ("out_norm",), src + ".out_layers.0")
    m.conv(dst + ("out_conv",), src + ".out_layers.3")
    if m.has(src + ".skip_connection.weight"):
        m.conv(dst + ("skip",), src + ".skip_connection")


def _karlo_attn(m: Mapper, dst: tuple, src: str):
    m.norm(dst + ("norm",), src + ".norm")
    m.linear(dst + ("qkv",), src + ".qkv")  # conv1d [3C, C, 1], (heads, 3, dh) units: as ours
    if m.has(src + ".encoder_kv.weight"):
        m.linear(dst + ("encoder_kv",), src + ".encoder_kv")
    m.linear(dst + ("proj_out",), src + ".proj_out")


def convert_karlo_unet(sd: Mapping[str, Any], cfg, what: str = "Karlo UNet",
                       report: Optional[ConversionReport] = None) -> dict:
    """Karlo ``PLMImUNet`` / ``SuperResUNetModel`` state dict (no prefix) -> our UNet params."""
    from unclip_jax.models.unet import abstract_params

    m = Mapper(sd, expected_shapes(abstract_params(cfg)), what, report)
    m.linear(("time_embed_0",), "time_embed.0")
    m.linear(("time_embed_1",), "time_embed.2")
    m.conv(("conv_in",), "input_blocks.0.0")
    for name, kind, pos in unet_blocks(cfg):
        section, _, _, idx, sub = pos
        src = {"down": f"input_blocks.{idx}.{sub}", "mid": f"middle_block.{sub}",
               "up": f"output_blocks.{idx}.{sub}"}[section]
        if kind == "attn":
            _karlo_attn(m, (name,), src)
        elif kind == "down" and not cfg.resblock_updown:
            m.conv((name, "op"), src + ".op")
        elif kind == "up" and not cfg.resblock_updown:
            m.conv((name, "conv"), src + ".conv")
        else:
            _karlo_res(m, (name,), src)
    m.norm(("out_norm",), "out.0")
    m.conv(("out_conv",), "out.2")
    if cfg.clip_dim:
        m.linear(("clip_cond", "to_time"), "clip_emb")
        w, b = m.get("clip_tok_proj.weight"), m.get("clip_tok_proj.bias")
        if w is not None and b is not None:
            k, b = permute_clip_tokens(w.T, b, cfg.clip_emb_mult)
            m.put(("clip_cond", "to_tokens", "dense", "kernel"), k, "clip_tok_proj.weight")
            m.put(("clip_cond", "to_tokens", "dense", "bias"), b, "clip_tok_proj.bias")
        m.put(("clip_cond", "null_emb"), m.get("cf_param"), "cf_param")
    if cfg.text_encoder == "clip":
        m.linear(("caption", "states_proj"), "text_seq_proj.0")
        m.norm(("caption", "states_norm"), "text_seq_proj.1", ("ln",))
        m.linear(("caption", "to_time"), "text_feat_proj")
    return m.finish()


# ----------------------------------------------------------------------------- whole model


def karlo_configs(overrides: Optional[Mapping[str, Mapping]] = None):
    """(PriorConfig, decoder UNetConfig, SR UNetConfig) of Karlo, with per-section overrides
    ``{'prior': {...}, 'decoder': {...}, 'sr': {...}}``."""
    from unclip_jax.models import unet as unet_lib
    from unclip_jax.models.prior import PriorConfig

    o = {k: dict(v) for k, v in (overrides or {}).items()}
    unknown = set(o) - {"prior", "decoder", "sr"}
    if unknown:
        raise ValueError(f"unknown override sections {sorted(unknown)} (prior, decoder, sr)")
    tup = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # noqa
    prior = PriorConfig.karlo(**tup(o.get("prior", {})))
    dec = unet_lib.karlo_decoder_config(**{"dropout": 0.0, **tup(o.get("decoder", {}))})
    sr = unet_lib.karlo_sr_config(**tup(o.get("sr", {})))
    return prior, dec, sr


def karlo_diffusion(prior_steps=25, decoder_steps=25, sr_steps=7, prior_guidance=4.0,
                    decoder_guidance=8.0) -> dict:
    """Karlo's sampling settings ("fast": 25 / 25 / 7 steps, guidance 4 / 8)."""
    base = dict(steps=1000, schedule="cosine", sampler="ddpm")
    return {
        "prior": dict(base, model_output="x0", model_var_type="fixed_small",
                      sample_steps=str(prior_steps), guidance=float(prior_guidance),
                      num_candidates=1, clip_range=10.0),
        "decoder": dict(base, model_output="eps", model_var_type="learned_range",
                        sample_steps=str(decoder_steps), guidance=float(decoder_guidance),
                        uncond_caption="empty"),
        "sr": dict(base, model_output="eps", model_var_type="fixed_small",
                   sample_steps=str(sr_steps)),
    }


def convert_karlo(src: Optional[str] = None, out: Optional[str] = None, *,
                  prior: Optional[str] = None, decoder: Optional[str] = None,
                  sr: Optional[str] = None, stats: Optional[str] = None,
                  clip: Optional[str] = None, tokenizer_dir: Optional[str] = None,
                  overrides: Optional[Mapping[str, Mapping]] = None,
                  report: Optional[ConversionReport] = None, **sampling):
    """Karlo release files (in ``src``, or given one by one) -> ``UnCLIP`` (saved to ``out``
    when given). ``clip``: OpenAI CLIP file (``ViT-L-14.pt``) or HF CLIP dir; ``sampling``:
    ``karlo_diffusion`` keywords. Returns the ``UnCLIP``."""
    import jax.numpy as jnp

    from unclip_jax.convert.diffusers_unclip import (_prior_variables, _tree_map, build_config,
                                                     empty_caption_condition)
    from unclip_jax.models.tokenizer import DEFAULT_TOKENIZER_DIR
    from unclip_jax.pipelines import model as model_lib

    report = report if report is not None else ConversionReport()

    def path(name, given):
        p = given or (os.path.join(src, KARLO_FILES[name]) if src else None)
        if p is None or not os.path.exists(p):
            raise FileNotFoundError(f"Karlo {name} file not found: {p} (give the folder of the "
                                    f"Karlo release or --{name} PATH)")
        return p

    prior_cfg, dec_cfg, sr_cfg = karlo_configs(overrides)
    clip_path = path("clip", clip)
    if os.path.isdir(clip_path):
        from unclip_jax.convert.hf_clip import load_hf_clip

        clip_params, clip_cfg = load_hf_clip(clip_path)
    else:
        from unclip_jax.convert.openai_clip import load_openai_clip

        clip_params, clip_cfg = load_openai_clip(clip_path)
    clip_params = _tree_map(np.asarray, clip_params)
    if clip_cfg.projection_dim != prior_cfg.clip_dim:
        raise CheckpointMismatchError(f"CLIP projects to {clip_cfg.projection_dim}, the prior "
                                      f"expects {prior_cfg.clip_dim}")
    tok_dir = tokenizer_dir or DEFAULT_TOKENIZER_DIR

    psd = strip_prefix(read_karlo_checkpoint(path("prior", prior)), "model.")
    p_params, p_buf = convert_karlo_prior(psd, prior_cfg, read_karlo_stats(path("stats", stats)),
                                          report)
    null = empty_caption_condition(clip_params, clip_cfg, tok_dir, prior_cfg.num_text_tokens)
    prior_vars = _prior_variables(p_params, p_buf, prior_cfg, null)
    dsd = strip_prefix(read_karlo_checkpoint(path("decoder", decoder)), "model.")
    dec_params = convert_karlo_unet(dsd, dec_cfg, "Karlo decoder", report)
    ssd = read_karlo_checkpoint(path("sr", sr))
    first, last = strip_prefix(ssd, "model_first_steps."), strip_prefix(ssd, "model_last_step.")
    other = sorted(k for k in ssd if not k.startswith(("model_first_steps.", "model_last_step.")))
    if other:
        raise CheckpointMismatchError(f"Karlo SR checkpoint: unknown keys {other}")
    sr_params = convert_karlo_unet(first, sr_cfg, "Karlo SR model_first_steps", report)
    sr_last = convert_karlo_unet(last, sr_cfg, "Karlo SR model_last_step", report)
    config = build_config("karlo", clip_cfg, prior_cfg, dec_cfg, [sr_cfg],
                          karlo_diffusion(**sampling), sr_last=[0])
    to_j = lambda t: _tree_map(jnp.asarray, t)  # noqa: E731
    params = {"clip": to_j(clip_params), "prior": to_j(prior_vars), "decoder": to_j(dec_params),
              "sr": [to_j(sr_params)], "sr_last": {"0": to_j(sr_last)}}
    model = model_lib.UnCLIP(config, params, tokenizer_dir=tok_dir, random_weights=False,
                             source=os.path.abspath(src or os.path.dirname(clip_path)))
    if out is not None:
        model_lib.save(model, out)
    return model


__all__ = ["convert_karlo", "convert_karlo_prior", "convert_karlo_unet", "karlo_configs",
           "karlo_diffusion", "read_karlo_checkpoint", "read_karlo_stats", "KARLO_FILES"]
