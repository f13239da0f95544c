"""The stages of unCLIP as jitted functions: CLIP text/image encoding, prior sampling (K
candidates, best by dot product), decoder sampling (classifier-free guidance on the CLIP image
embedding and the caption at once) and upsampling.

Every sampler is one jitted ``lax.scan`` (``unclip_jax.diffusion``); model functions are built
once per ``UnCLIP`` and take parameters and conditioning as arguments, so nothing recompiles
between calls with the same shapes. Shapes: embeddings ``[B, D]``, caption states
``[B, 77, W]``, images ``[B, H, W, 3]`` in [-1, 1] (NHWC).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import (classifier_free_guidance, ddim_invert, ddim_sample,
                                  ddpm_sample, repaint_sample)
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models.tokenizer import PromptTruncatedWarning, load_tokenizer, tokenize_with_info
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
    """Prompts -> TextCondition (one jitted CLIP text forward). Prompts longer than the
    context are truncated with a ``PromptTruncatedWarning``."""
    toks = tokenize(model, prompts)
    if toks.truncated.any():
        n = int(toks.truncated.sum())
        warnings.warn(f"{n} prompt(s) longer than {toks.ids.shape[1]} tokens were truncated "
                      f"(token counts {sorted(set(int(x) for x in toks.lengths[toks.truncated]))})",
                      PromptTruncatedWarning, stacklevel=2)

    def build():
        @jax.jit
        def f(params, ids):
            return model.clip.apply({"params": params}, ids, method="encode_text_and_states")
        return f

    emb, states = _cached(model, "encode_text", build)(model.params["clip"], jnp.asarray(toks.ids))
    return TextCondition(emb, states, jnp.asarray(toks.mask, bool))


def encode_image(model: UnCLIP, pixels) -> jax.Array:
    """CLIP-normalised ``[B, S, S, 3]`` (S = the CLIP image size) -> ``[B, D]`` embeddings."""
    if "vision_model" not in model.params["clip"]:
        from unclip_jax.pipelines.model import ModelDirError

        raise ModelDirError(
            f"the model {model.source or ''} has no CLIP image encoder (a text-to-image-only "
            "conversion); convert it again with --image-encoder DIR (an "
            "UnCLIPImageVariationPipeline) or --clip PATH (HF or OpenAI CLIP)")

    def build():
        return jax.jit(lambda p, x: model.clip.apply({"params": p}, x, method="encode_image"))
    return _cached(model, "encode_image", build)(model.params["clip"], jnp.asarray(pixels))


def images_to_clip_pixels(model: UnCLIP, images_uint8) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` images -> CLIP-preprocessed float32 ``[B, S, S, 3]``."""
    from unclip_jax.data.clip_preprocess import preprocess

    images = list(images_uint8) if isinstance(images_uint8, (list, tuple)) else \
        np.asarray(images_uint8)
    return preprocess(images, size=model.clip_config.vision_config.image_size)


def embed_images(model: UnCLIP, images_uint8) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` images (or a list of ``[H, W, 3]`` of any sizes) -> CLIP image
    embeddings ``[B, D]``."""
    return encode_image(model, images_to_clip_pixels(model, images_uint8))


def resize_uint8(images_uint8, size: int) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` -> ``[B, size, size, 3]`` (PIL bicubic; unchanged if already)."""
    from PIL import Image

    x = np.asarray(images_uint8, np.uint8)
    if x.shape[1:3] == (size, size):
        return x
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                     for im in x])


def decoder_pixels(model: UnCLIP, images_uint8) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` -> decoder-size float ``[B, s, s, 3]`` in [-1, 1]."""
    from unclip_jax.utils.images import from_uint8

    return jnp.asarray(from_uint8(resize_uint8(images_uint8, model.decoder_size)))


def empty_text(model: UnCLIP, n: int) -> TextCondition:
    """The empty caption for ``n`` rows (image-only conditioning: pass ``drop_text_cond=True``
    to the decoder so the caption is the model's null caption in both guidance halves)."""
    return encode_text(model, [""] * int(n))


def clip_logit_scale(model: UnCLIP) -> jax.Array:
    return model.clip.apply({"params": model.params["clip"]}, method="logit_scale")


def zero_shot_probs(model: UnCLIP, image_emb, label_emb) -> jax.Array:
    """CLIP zero-shot probabilities ``[B, L]``: softmax over labels of logit_scale * cosine."""
    from unclip_jax.models.clip import normalize

    logits = clip_logit_scale(model) * normalize(jnp.asarray(image_emb, jnp.float32)) @ \
        normalize(jnp.asarray(label_emb, jnp.float32)).T
    return jax.nn.softmax(logits, axis=-1)


# ------------------------------------------------------------------------------ embeddings


def slerp(a, b, t) -> jax.Array:
    """Spherical interpolation of (unnormalised) embeddings ``a``, ``b`` ``[..., D]`` at
    ``t`` (scalar or ``[...]``): ``sin((1-t) w) / sin w * a + sin(t w) / sin w * b`` with ``w``
    the angle between them (linear interpolation when they are nearly parallel). ``t = 0``
    gives exactly ``a`` and ``t = 1`` exactly ``b``; equal norms are preserved along the path."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    t = jnp.asarray(t, jnp.float32)[..., None]
    na = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    nb = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    cos = jnp.clip(jnp.sum(na * nb, axis=-1, keepdims=True), -1.0, 1.0)
    w = jnp.arccos(cos)
    sin_w = jnp.sin(w)
    near = sin_w < 1e-6
    safe = jnp.where(near, 1.0, sin_w)
    ca = jnp.where(near, 1.0 - t, jnp.sin((1.0 - t) * w) / safe)
    cb = jnp.where(near, t, jnp.sin(t * w) / safe)
    out = ca * a + cb * b
    return jnp.where(t == 0, a, jnp.where(t == 1, b, out))


def fixed_noise(key, shape) -> jax.Array:
    """One ``shape[1:]`` Gaussian draw tiled over the batch: the same decoder noise for every
    row (interpolations, PCA strips, text diffs)."""
    shape = tuple(int(s) for s in shape)
    return jnp.broadcast_to(jax.random.normal(key, (1,) + shape[1:], jnp.float32), shape)


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

        # diffusion.prior.clip_range (converted Karlo / diffusers priors): the guided x0
        # prediction is clipped to +-clip_range (diffusers 5, Karlo 10); 0 / absent: no clip.
        clip = float(model.stage_options("prior").get("clip_range", 0.0) or 0.0)

        def fn(x, t, variables, text_emb, text_states, text_mask, drop, scale):
            guided = classifier_free_guidance(inner, scale)
            out = guided(x, t, variables=variables, text_emb=text_emb, text_states=text_states,
                         text_mask=text_mask, drop=drop)
            return jnp.clip(out, -clip, clip) if clip > 0 else out
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


def sample_ar_prior(model: UnCLIP, key, text: TextCondition, *,
                    num_candidates: Optional[int] = None, guidance: Optional[float] = None,
                    temperature: Optional[float] = None, top_p: Optional[float] = None
                    ) -> jax.Array:
    """Autoregressive prior: text [B] -> CLIP image embeddings ``[B, D]`` (PCA codes sampled
    left to right, decoded through the bucket centres and the basis); K candidates per caption,
    best by dot product with the text embedding, as ``sample_prior``."""
    if not model.has_ar_prior:
        raise ValueError("this model has no autoregressive prior (config section ar_prior)")
    o = model.ar_sampling_options()
    k = int(num_candidates or o["num_candidates"])
    pca, quant, _ = model.ar_components()
    b = text.emb.shape[0]
    rep = lambda a: jnp.repeat(a, k, axis=0)  # noqa: E731
    codes, _ = ar_lib.ar_sample(
        model.ar_prior, {"params": model.params["ar_prior"]["params"]}, key, rep(text.emb),
        rep(text.states), rep(text.mask),
        temperature=float(o["temperature"] if temperature is None else temperature),
        top_p=float(o["top_p"] if top_p is None else top_p),
        guidance_scale=float(o["guidance"] if guidance is None else guidance))
    z = ar_lib.decode_codes(pca, quant, codes)
    return prior_lib.select_best(z.reshape(b, k, -1), text.emb)


def sample_image_emb(model: UnCLIP, key, text: TextCondition, *, prior: str = "diffusion",
                     num_candidates: Optional[int] = None, steps=None,
                     guidance: Optional[float] = None, sampler: Optional[str] = None,
                     progress: bool = False) -> jax.Array:
    """Either prior: ``prior='diffusion'`` (``sample_prior``) or ``'ar'`` (``sample_ar_prior``;
    ``steps`` / ``sampler`` do not apply)."""
    if prior == "ar":
        z = sample_ar_prior(model, key, text, num_candidates=num_candidates, guidance=guidance)
        if progress:
            progress_lib.report(1, 1)
        return z
    if prior != "diffusion":
        raise ValueError(f"prior must be 'diffusion' or 'ar', got {prior!r}")
    return sample_prior(model, key, text, num_candidates=num_candidates, steps=steps,
                        guidance=guidance, sampler=sampler, progress=progress)


def _decoder_fn(model: UnCLIP, inpaint: bool = False):
    """The guided decoder (``inpaint``: the model's separate inpainting decoder)."""
    def build():
        dec = model.inpaint_decoder if inpaint else model.decoder
        learned = model.decoder_config.learn_sigma

        def inner(x, t, params, **kw):
            return dec.apply({"params": params}, x, t, **kw)

        def fn(x, t, params, scale, **kw):
            guided = classifier_free_guidance(inner, scale, learned_variance=learned)
            return guided(x, t, params=params, **kw)
        return fn
    return _cached(model, "inpaint_decoder_fn" if inpaint else "decoder_fn", build)


def decoder_kwargs(model: UnCLIP, clip_emb, text: Optional[TextCondition], scale: float,
                   drop_clip_cond=False, drop_text_cond=False,
                   inpaint_image=None, inpaint_mask=None,
                   use_inpaint_decoder: bool = False) -> dict:
    """Model kwargs for the guided decoder: rows [conditional B | unconditional B]. The
    conditional half may itself drop the CLIP emb or the caption (ablations; bool or [B]).
    ``use_inpaint_decoder``: kwargs for the model's separate inpainting decoder."""
    b = clip_emb.shape[0]
    cfg = model.decoder_config
    takes_mask = cfg.inpaint or use_inpaint_decoder
    flags = lambda f: jnp.broadcast_to(jnp.asarray(f, bool), (b,))  # noqa: E731
    kw = dict(params=model.params["inpaint" if use_inpaint_decoder else "decoder"],
              scale=jnp.float32(scale),
              clip_emb=_twice(jnp.asarray(clip_emb, jnp.float32)),
              drop_clip=jnp.concatenate([flags(drop_clip_cond), jnp.ones((b,), bool)]),
              drop_text=jnp.concatenate([flags(drop_text_cond), jnp.ones((b,), bool)]))
    if cfg.text_encoder == "clip":
        if text is None:
            raise ValueError("this decoder is caption-conditioned: pass the text condition")
        kw.update(text_emb=_twice(text.emb), text_states=_twice(text.states),
                  text_mask=_twice(text.mask))
        if model.stage_options("decoder").get("uncond_caption", "drop") == "empty":
            # Karlo / diffusers: the unconditional half sees the CLIP encoding of "" (not a
            # masked-out caption); drop_text_cond rows of the conditional half do too.
            empty = empty_text(model, 1)
            rep = lambda a, n: jnp.broadcast_to(a[:1], (n,) + a.shape[1:])  # noqa: E731
            cond_drop = flags(drop_text_cond)[:, None]
            pick = lambda e, c: jnp.concatenate([  # noqa: E731
                jnp.where(cond_drop.reshape((b,) + (1,) * (c.ndim - 1)), rep(e, b), c),
                rep(e, b)]).astype(c.dtype)
            kw.update(text_emb=pick(empty.emb, text.emb),
                      text_states=pick(empty.states, text.states),
                      text_mask=pick(empty.mask, text.mask), drop_text=jnp.zeros((2 * b,), bool))
    if takes_mask:
        if inpaint_image is None:
            raise ValueError("inpainting decoder: pass inpaint_image and inpaint_mask")
        kw.update(inpaint_image=_twice(jnp.asarray(inpaint_image, jnp.float32)),
                  inpaint_mask=_twice(jnp.asarray(inpaint_mask, jnp.float32)))
    return kw


def sample_decoder(model: UnCLIP, key, clip_emb, text: Optional[TextCondition], *, steps=None,
                   guidance: Optional[float] = None, sampler: Optional[str] = None,
                   eta: float = 0.0, x_T=None, source=None, mask=None, jumps: int = 0,
                   drop_clip_cond: bool = False, drop_text_cond: bool = False,
                   inpaint_decoder: Optional[bool] = None, progress: bool = False) -> jax.Array:
    """CLIP image embeddings ``[B, D]`` (+ captions) -> decoder-size images ``[B, S, S, 3]``
    in [-1, 1]. ``source``/``mask`` ([B, S, S, 3] / [B, S, S, 1], 1 = keep) turn on
    inpainting: the inpainting decoder when the model has one (``inpaint_decoder=False``
    forces replacement sampling), else masked replacement sampling (RePaint resampling with
    ``jumps`` > 0)."""
    o = model.stage_options("decoder")
    scale = float(o.guidance if guidance is None else guidance)
    diffusion = model.diffusion("decoder", steps if steps is not None else o.sample_steps)
    b, s = clip_emb.shape[0], model.decoder_size
    separate = (source is not None and model.has_inpaint_decoder
                and inpaint_decoder is not False)
    if inpaint_decoder and source is not None and not separate:
        raise ValueError("this model has no inpainting decoder; leave inpaint_decoder unset "
                         "to use masked replacement sampling")
    inpaint_model = model.decoder_config.inpaint or separate
    kw = decoder_kwargs(model, clip_emb, text, scale, drop_clip_cond, drop_text_cond,
                        inpaint_image=source if inpaint_model else None,
                        inpaint_mask=mask if inpaint_model else None,
                        use_inpaint_decoder=separate)
    replace = source is not None and not inpaint_model
    if replace:
        mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), (b, s, s, 3))
    return run_sampler(diffusion, _decoder_fn(model, inpaint=separate), (b, s, s, 3), key, kw,
                       sampler=sampler or o.sampler, eta=eta, x_T=x_T,
                       source=jnp.asarray(source, jnp.float32) if replace else None,
                       mask=mask if replace else None, jumps=jumps if replace else 0,
                       progress=progress)


def invert_decoder(model: UnCLIP, images, clip_emb, text: Optional[TextCondition], *, steps=None,
                   guidance: float = 1.0, drop_text_cond=False,
                   progress: bool = False) -> jax.Array:
    """DDIM inversion of decoder-size images ``[B, S, S, 3]`` conditioned on their CLIP
    embedding -> the latent x_T ``[B, S, S, 3]`` that DDIM(eta=0) maps back to them."""
    o = model.stage_options("decoder")
    diffusion = model.diffusion("decoder", steps if steps is not None else o.sample_steps)
    kw = decoder_kwargs(model, clip_emb, text, guidance, drop_text_cond=drop_text_cond)
    return ddim_invert(diffusion, _decoder_fn(model), jnp.asarray(images, jnp.float32), kw,
                       progress=progress_lib.callback(progress))


def _sr_fn(model: UnCLIP, i: int):
    def build():
        net = model.upsamplers[i]

        def fn(x, t, params, low_res, params_last=None):
            if params_last is None:
                return net.apply({"params": params}, x, t, low_res=low_res)
            # Karlo's super_res_last runs the last step (original timestep 0)
            return jax.lax.cond(
                t[0] == 0, lambda: net.apply({"params": params_last}, x, t, low_res=low_res),
                lambda: net.apply({"params": params}, x, t, low_res=low_res))
        return fn
    return _cached(model, f"sr_fn_{i}", build)


def upsample(model: UnCLIP, key, images, index: int = 0, *, steps=None,
             sampler: Optional[str] = None, x_T=None, source=None, mask=None,
             progress: bool = False) -> jax.Array:
    """Upsampler ``index``: low-res images ``[B, s, s, 3]`` -> ``[B, S, S, 3]`` in [-1, 1].
    ``x_T``: start noise; ``source``/``mask`` (``[B, S, S, 3]`` / ``[B, S, S, 1]``, 1 = keep):
    masked replacement sampling (inpainting)."""
    o = model.stage_options("sr")
    cfg = model.sr_config[index]
    diffusion = model.diffusion("sr", steps if steps is not None else o.sample_steps)
    b = images.shape[0]
    shape = (b, cfg.image_size, cfg.image_size, 3)
    kw = dict(params=model.params["sr"][index], low_res=jnp.asarray(images, jnp.float32))
    if str(index) in (model.params.get("sr_last") or {}):
        kw["params_last"] = model.params["sr_last"][str(index)]
    if source is not None:
        source = jnp.asarray(source, jnp.float32)
        mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), shape)
    return run_sampler(diffusion, _sr_fn(model, index), shape, key, kw,
                       sampler=sampler or o.sampler, x_T=x_T, source=source, mask=mask,
                       progress=progress)


# ------------------------------------------------------------------------------ chains

STOP_AFTER = ("prior", "decoder", "sr1", "sr2")


def ready(x, progress: bool):
    """Wait for a stage inside its progress bar (so the bar closes when the stage ends)."""
    return jax.block_until_ready(x) if progress else x


def decoder_candidates(model: UnCLIP, num_candidates: Optional[int] = None) -> int:
    """Decoder samples drawn per image (``num_candidates``, else the model's
    ``diffusion.decoder.num_candidates``, else 1)."""
    k = num_candidates if num_candidates is not None else \
        model.stage_options("decoder").get("num_candidates", 1)
    if int(k) < 1:
        raise ValueError(f"decoder num_candidates must be >= 1, got {k}")
    return int(k)


def best_by_caption(model: UnCLIP, images, text_emb, k: int) -> jax.Array:
    """Index ``[B]`` of the best of each row's ``k`` adjacent candidates in ``images``
    (``[B*k, s, s, 3]`` in [-1, 1]): the highest cosine between the model's own CLIP image
    embedding of the candidate and the caption's CLIP text embedding ``text_emb [B, D]``."""
    from unclip_jax.utils.images import to_uint8

    img = embed_images(model, to_uint8(jax.device_get(images)))
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
    sim = jnp.einsum("bkd,bd->bk", img.reshape(txt.shape[0], k, -1), txt)
    return jnp.argmax(sim, axis=1)


def decode_and_upsample(model: UnCLIP, key, clip_emb, text: Optional[TextCondition], *,
                        decoder_steps=None, decoder_guidance: Optional[float] = None,
                        decoder_sampler: Optional[str] = None, eta: float = 0.0, x_T=None,
                        drop_clip_cond=False, drop_text_cond=False, sr_steps=None,
                        fixed_sr_noise: bool = False, stop_after: Optional[str] = None,
                        num_candidates: int = 1, progress: bool = False) -> dict:
    """Decoder then every upsampler, each stage in its own progress bar.

    ``fixed_sr_noise``: the upsamplers run DDIM(eta=0) from one noise shared by all rows, so
    rows that differ only in their embedding differ only through it (strips, GIFs).
    ``num_candidates`` K > 1: the decoder draws K samples per row and keeps the one its own
    CLIP finds closest to the caption (``best_by_caption``; needs ``text``, no ``x_T``); only
    the kept ones are upsampled. Returns ``{'decoder': [B, s, s, 3], 'sr1': ...,
    'images': last stage}`` in [-1, 1].
    """
    k_dec, k_sr = jax.random.split(key)
    out: dict = {}
    k = int(num_candidates)
    if k > 1 and (text is None or x_T is not None):
        raise ValueError("decoder num_candidates > 1 ranks candidates by their caption: pass "
                         "the text condition and no x_T")
    b = clip_emb.shape[0]
    if k > 1:
        rep = lambda a: a if np.ndim(a) == 0 else jnp.repeat(jnp.asarray(a), k, axis=0)  # noqa: E731
        dec_emb, dec_text = rep(clip_emb), TextCondition(*(rep(a) for a in text))
        drop_clip, drop_text = rep(drop_clip_cond), rep(drop_text_cond)
    else:
        dec_emb, dec_text, drop_clip, drop_text = clip_emb, text, drop_clip_cond, drop_text_cond
    with progress_lib.stage("decoder", progress):
        images = sample_decoder(
            model, k_dec, dec_emb, dec_text, steps=decoder_steps, guidance=decoder_guidance,
            sampler=decoder_sampler, eta=eta, x_T=x_T, drop_clip_cond=drop_clip,
            drop_text_cond=drop_text, progress=progress)
        if k > 1:
            best = best_by_caption(model, images, text.emb, k)
            images = images.reshape((b, k) + images.shape[1:])[jnp.arange(b), best]
        out["decoder"] = out["images"] = ready(images, progress)
    if stop_after == "decoder":
        return out
    for i, k in enumerate(jax.random.split(k_sr, len(model.upsamplers))):
        name = f"sr{i + 1}"
        size = model.sr_config[i].image_size
        b = out["images"].shape[0]
        noise = fixed_noise(k, (b, size, size, 3)) if fixed_sr_noise else None
        with progress_lib.stage(name, progress):
            out[name] = out["images"] = ready(upsample(
                model, k, out["images"], i, steps=sr_steps, x_T=noise,
                sampler="ddim" if fixed_sr_noise else None, progress=progress), progress)
        if stop_after == name:
            break
    return out
