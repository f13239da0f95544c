"""The stages of unCLIP as jitted functions: CLIP text/image encoding, prior sampling (K
candidates, best by dot product), decoder sampling (classifier-free guidance on the CLIP image
embedding and the caption at once) and upsampling.

Every sampler is one jitted ``lax.scan`` (``unclip_jax.diffusion``); model functions are built
once per ``UnCLIP`` and take parameters and conditioning as arguments, so nothing recompiles
between calls with the same shapes. Shapes: embeddings ``[B, D]``, caption states
``[B, 77, W]``, images ``[B, H, W, 3]`` in [-1, 1] (NHWC).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import (classifier_free_guidance, ddim_invert, ddim_sample,
                                  ddpm_sample, repaint_sample)
from unclip_jax.models import prior as prior_lib
from unclip_jax.models.tokenizer import load_tokenizer, tokenize_with_info
from unclip_jax.pipelines import progress as progress_lib
from unclip_jax.pipelines.model import UnCLIP


class TextCondition(NamedTuple):
    """CLIP encoding of captions: ``emb [B, D]`` (projected, unnormalised), ``states
    [B, L, W]`` (last hidden state), ``mask [B, L]`` bool (True = real token)."""

    emb: jax.Array
    states: jax.Array
    mask: jax.Array


def _cached(model: UnCLIP, name: str, build):
    if name not in model._cache:
        model._cache[name] = build()
    return model._cache[name]


# ------------------------------------------------------------------------------ CLIP


def tokenize(model: UnCLIP, prompts: list[str]):
    """Prompts -> TokenizedBatch (ids, mask, lengths, truncated) with the model's tokenizer."""
    tok = load_tokenizer(model.tokenizer_dir)
    return tokenize_with_info(list(prompts), model.clip_config.text_config.max_position_embeddings,
                              tokenizer=tok)


def encode_text(model: UnCLIP, prompts: list[str]) -> TextCondition:
    """Prompts -> TextCondition (one jitted CLIP text forward)."""
    toks = tokenize(model, prompts)

    def build():
        @jax.jit
        def f(params, ids):
            return model.clip.apply({"params": params}, ids, method="encode_text_and_states")
        return f

    emb, states = _cached(model, "encode_text", build)(model.params["clip"], jnp.asarray(toks.ids))
    return TextCondition(emb, states, jnp.asarray(toks.mask, bool))


def encode_image(model: UnCLIP, pixels) -> jax.Array:
    """CLIP-normalised ``[B, S, S, 3]`` (S = the CLIP image size) -> ``[B, D]`` embeddings."""
    def build():
        return jax.jit(lambda p, x: model.clip.apply({"params": p}, x, method="encode_image"))
    return _cached(model, "encode_image", build)(model.params["clip"], jnp.asarray(pixels))


def images_to_clip_pixels(model: UnCLIP, images_uint8) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` images -> CLIP-preprocessed float32 ``[B, S, S, 3]``."""
    from unclip_jax.data.clip_preprocess import preprocess

    return preprocess(np.asarray(images_uint8), size=model.clip_config.vision_config.image_size)


# ------------------------------------------------------------------------------ samplers


def run_sampler(diffusion, model_fn, shape, key, model_kwargs, *, sampler: str = "ddpm",
                eta: float = 0.0, clip_denoised: bool = True, x_T=None, source=None, mask=None,
                jumps: int = 0, progress: bool = False):
    """Dispatch to the jitted DDPM / DDIM / RePaint loops of ``unclip_jax.diffusion``."""
    cb = progress_lib.callback(progress)
    shape = tuple(int(s) for s in shape)
    if jumps and source is not None:
        return repaint_sample(diffusion, model_fn, shape, key, model_kwargs, source=source,
                              mask=mask, jump_length=min(10, diffusion.num_timesteps),
                              jump_n_sample=int(jumps) + 1, x_T=x_T,
                              clip_denoised=clip_denoised, progress=cb)
    if sampler == "ddpm":
        return ddpm_sample(diffusion, model_fn, shape, key, model_kwargs, x_T=x_T, source=source,
                           mask=mask, clip_denoised=clip_denoised, progress=cb)
    if sampler == "ddim":
        return ddim_sample(diffusion, model_fn, shape, key, model_kwargs, eta=float(eta),
                           x_T=x_T, source=source, mask=mask, clip_denoised=clip_denoised,
                           progress=cb)
    raise ValueError(f"unknown sampler {sampler!r}; use 'ddpm' or 'ddim'")


def _prior_fn(model: UnCLIP):
    """Guided prior model fn: kwargs hold [2B] rows (conditional first, then dropped)."""
    def build():
        prior = model.prior

        def inner(x, t, variables, text_emb, text_states, text_mask, drop):
            return prior.apply(variables, x, t, text_emb, text_states, text_mask, drop)

        def fn(x, t, variables, text_emb, text_states, text_mask, drop, scale):
            guided = classifier_free_guidance(inner, scale)
            return guided(x, t, variables=variables, text_emb=text_emb, text_states=text_states,
                          text_mask=text_mask, drop=drop)
        return fn
    return _cached(model, "prior_fn", build)


def _twice(x):
    return jnp.concatenate([x, x], axis=0)


def sample_prior(model: UnCLIP, key, text: TextCondition, *, num_candidates: Optional[int] = None,
                 steps=None, guidance: Optional[float] = None, sampler: Optional[str] = None,
                 progress: bool = False) -> jax.Array:
    """Text condition [B] -> CLIP image embeddings ``[B, D]`` (unnormalised): draws K
    candidates per caption and keeps the one with the highest dot product with the text
    embedding (paper: K = 2)."""
    o = model.stage_options("prior")
    k = int(num_candidates or o.get("num_candidates", 1))
    scale = float(o.guidance if guidance is None else guidance)
    diffusion = model.diffusion("prior", steps if steps is not None else o.sample_steps)
    b = text.emb.shape[0]
    rep = lambda a: jnp.repeat(a, k, axis=0)  # noqa: E731  [B*K, ...], candidates adjacent
    emb, states, mask = rep(text.emb), rep(text.states), rep(text.mask)
    n = b * k
    kwargs = dict(variables=model.params["prior"], text_emb=_twice(emb),
                  text_states=_twice(states), text_mask=_twice(mask),
                  drop=jnp.concatenate([jnp.zeros((n,), bool), jnp.ones((n,), bool)]),
                  scale=jnp.float32(scale))
    z = run_sampler(diffusion, _prior_fn(model), (n, model.prior_config.clip_dim), key, kwargs,
                    sampler=sampler or o.sampler, clip_denoised=False, progress=progress)
    z = prior_lib.denormalize(model.params["prior"]["buffers"], z)
    return prior_lib.select_best(z.reshape(b, k, -1), text.emb)


def _decoder_fn(model: UnCLIP):
    def build():
        dec = model.decoder
        learned = model.decoder_config.learn_sigma

        def inner(x, t, params, **kw):
            return dec.apply({"params": params}, x, t, **kw)

        def fn(x, t, params, scale, **kw):
            guided = classifier_free_guidance(inner, scale, learned_variance=learned)
            return guided(x, t, params=params, **kw)
        return fn
    return _cached(model, "decoder_fn", build)


def decoder_kwargs(model: UnCLIP, clip_emb, text: Optional[TextCondition], scale: float,
                   drop_clip_cond: bool = False, drop_text_cond: bool = False,
                   inpaint_image=None, inpaint_mask=None) -> dict:
    """Model kwargs for the guided decoder: rows [conditional B | unconditional B]. The
    conditional half may itself drop the CLIP emb or the caption (ablations)."""
    b = clip_emb.shape[0]
    cfg = model.decoder_config
    kw = dict(params=model.params["decoder"], scale=jnp.float32(scale),
              clip_emb=_twice(jnp.asarray(clip_emb, jnp.float32)),
              drop_clip=jnp.concatenate([jnp.full((b,), drop_clip_cond), jnp.ones((b,), bool)]),
              drop_text=jnp.concatenate([jnp.full((b,), drop_text_cond), jnp.ones((b,), bool)]))
    if cfg.text_encoder == "clip":
        if text is None:
            raise ValueError("this decoder is caption-conditioned: pass the text condition")
        kw.update(text_emb=_twice(text.emb), text_states=_twice(text.states),
                  text_mask=_twice(text.mask))
    if cfg.inpaint:
        if inpaint_image is None:
            raise ValueError("inpainting decoder: pass inpaint_image and inpaint_mask")
        kw.update(inpaint_image=_twice(jnp.asarray(inpaint_image, jnp.float32)),
                  inpaint_mask=_twice(jnp.asarray(inpaint_mask, jnp.float32)))
    return kw


def sample_decoder(model: UnCLIP, key, clip_emb, text: Optional[TextCondition], *, steps=None,
                   guidance: Optional[float] = None, sampler: Optional[str] = None,
                   eta: float = 0.0, x_T=None, source=None, mask=None, jumps: int = 0,
                   drop_clip_cond: bool = False, drop_text_cond: bool = False,
                   progress: bool = False) -> jax.Array:
    """CLIP image embeddings ``[B, D]`` (+ captions) -> 64x64 (decoder size) images
    ``[B, S, S, 3]`` in [-1, 1]. ``source``/``mask`` ([B, S, S, 3] / [B, S, S, 1], 1 = keep)
    turn on inpainting: the inpainting decoder when the model has one, else masked replacement
    sampling (RePaint resampling with ``jumps`` > 0)."""
    o = model.stage_options("decoder")
    scale = float(o.guidance if guidance is None else guidance)
    diffusion = model.diffusion("decoder", steps if steps is not None else o.sample_steps)
    b, s = clip_emb.shape[0], model.decoder_size
    inpaint_model = model.decoder_config.inpaint
    kw = decoder_kwargs(model, clip_emb, text, scale, drop_clip_cond, drop_text_cond,
                        inpaint_image=source if inpaint_model else None,
                        inpaint_mask=mask if inpaint_model else None)
    replace = source is not None and not inpaint_model
    if replace:
        mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), (b, s, s, 3))
    return run_sampler(diffusion, _decoder_fn(model), (b, s, s, 3), key, kw,
                       sampler=sampler or o.sampler, eta=eta, x_T=x_T,
                       source=jnp.asarray(source, jnp.float32) if replace else None,
                       mask=mask if replace else None, jumps=jumps if replace else 0,
                       progress=progress)


def invert_decoder(model: UnCLIP, images, clip_emb, text: Optional[TextCondition], *, steps=None,
                   guidance: float = 1.0, progress: bool = False) -> jax.Array:
    """DDIM inversion of decoder-size images ``[B, S, S, 3]`` conditioned on their CLIP
    embedding -> the latent x_T ``[B, S, S, 3]`` that DDIM(eta=0) maps back to them."""
    o = model.stage_options("decoder")
    diffusion = model.diffusion("decoder", steps if steps is not None else o.sample_steps)
    kw = decoder_kwargs(model, clip_emb, text, guidance)
    return ddim_invert(diffusion, _decoder_fn(model), jnp.asarray(images, jnp.float32), kw,
                       progress=progress_lib.callback(progress))


def _sr_fn(model: UnCLIP, i: int):
    def build():
        net = model.upsamplers[i]

        def fn(x, t, params, low_res):
            return net.apply({"params": params}, x, t, low_res=low_res)
        return fn
    return _cached(model, f"sr_fn_{i}", build)


def upsample(model: UnCLIP, key, images, index: int = 0, *, steps=None,
             sampler: Optional[str] = None, progress: bool = False) -> jax.Array:
    """Upsampler ``index``: low-res images ``[B, s, s, 3]`` -> ``[B, S, S, 3]`` in [-1, 1]."""
    o = model.stage_options("sr")
    cfg = model.sr_config[index]
    diffusion = model.diffusion("sr", steps if steps is not None else o.sample_steps)
    b = images.shape[0]
    kw = dict(params=model.params["sr"][index], low_res=jnp.asarray(images, jnp.float32))
    return run_sampler(diffusion, _sr_fn(model, index), (b, cfg.image_size, cfg.image_size, 3),
                       key, kw, sampler=sampler or o.sampler, progress=progress)
