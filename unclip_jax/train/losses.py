"""Per-stage training losses: ``loss_fn(params, batch, rng) -> (loss, aux)``.

Stages and what their batch carries (numpy / jax arrays, leading batch dim B):

  clip      image [B, H, W, 3] in [-1, 1] (any size; resized to the CLIP image size in-graph),
            input_ids [B, L] int32, attention_mask [B, L] int32 (from ``Stage.prepare``, which
            tokenises ``caption`` strings). Symmetric InfoNCE with CLIP's learned temperature.
  prior     image_emb [B, D], text_emb [B, D], text_states [B, L, W], text_mask [B, L] (from
            ``unclip embed``). x0-MSE on the *normalised* image embedding (prior buffers
            ``clip_mean`` / ``clip_std``); the text condition is dropped with probability
            ``config.diffusion.prior.cfg_drop_text``.
  decoder   image [B, H, W, 3] in [-1, 1] (resized to the decoder size) + image_emb, text_emb,
            text_states, text_mask. Hybrid loss L_simple + 0.001 L_vlb (learned sigma); CLIP
            embedding dropped with ``cfg_drop_clip``, caption with ``cfg_drop_text``
            (``config.diffusion.decoder``), via ``draw_cfg_drop_masks``.
  sr        image [B, H, W, 3] in [-1, 1]. The image is resized to the upsampler size and a
            random ``crop_size`` crop is taken; the low-res conditioning [B, c / f, c / f, 3]
            depends on ``train.sr.corruption`` (one value, or one per upsampler index):
            ``'blur'`` (default): that crop downsampled by the upsampler factor f, then Gaussian
            blur (sigma ~ U(blur_sigma) per example, ``blur_kernel`` taps), in-graph;
            ``'bsr'``: ``Stage.prepare`` adds ``low_res`` [B, H / f, H / f, 3], the image
            BSR-lite degraded on the host (``data.augment.bsr_degrade``, options from
            ``train.sr.bsr``), and the loss takes aligned crops of both.
  inpaint   as decoder, plus random rectangular keep-masks; the UNet is the decoder config with
            ``inpaint=True`` (4 extra input channels). ``inpaint_params_from_decoder`` starts it
            from trained decoder params (new input channels zero-initialised).

Image augmentation (clip, decoder, inpaint, sr; off unless set): ``train.<stage>.resized_crop_scale
= (min, max)`` area fraction turns on a random resized crop of the training images
(``data.augment.random_resized_crop``, aspect range ``resized_crop_ratio``, no flips), drawn
in-graph from a key split off the loss rng (so the default path's randomness is unchanged).
All crops and blurs come from ``unclip_jax.data.augment``.

Parameters that get no gradient by design (documented exceptions, see the tests):
  * at initialisation every layer feeding a zero-initialised output conv (UNet ``out_conv`` and
    each ResBlock's ``out_conv``) has zero gradient; the tests randomise params first;
  * null embeddings (decoder ``clip_cond/null_emb``, prior ``null_text_*``) only get gradient from
    dropped rows, so a batch without a drop leaves them untouched;
  * the prior's ``buffers`` (normalisation stats, buffer-mode null condition) are not trainable.

``build_stage(stage, config)`` bundles what the loop needs: the init of the trainable params,
the frozen (non-trainable) variables, the loss built on them and the host-side batch preparation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import config as cfg_lib
from unclip_jax.data import augment
from unclip_jax.diffusion import create_gaussian_diffusion, training_losses
from unclip_jax.models import clip as clip_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.models.conditioning import draw_cfg_drop_masks

PyTree = Any
LossFn = Callable[[PyTree, dict, jax.Array], tuple[jax.Array, dict]]

STAGES = ("clip", "prior", "decoder", "sr", "inpaint")
# The diffusion section each diffusion stage uses.
DIFFUSION_SECTION = {"prior": "prior", "decoder": "decoder", "sr": "sr", "inpaint": "decoder"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBED_KEYS = ("image_emb", "text_emb", "text_states", "text_mask")
HOST_ONLY_KEYS = ("index", "caption")  # reader bookkeeping / strings: not sent to devices
SR_CORRUPTIONS = ("blur", "bsr")
RESIZED_CROP_STAGES = ("clip", "decoder", "inpaint", "sr")
HASH_STRIDE = 7  # pixel stride of the image subsample hashed for the host rng of 'bsr'


class MissingBatchKeyError(KeyError):
    """A batch lacks what a stage needs (e.g. prior data without precomputed embeddings)."""


# ------------------------------------------------------------------------------ helpers


def stage_diffusion(config, stage: str):
    """The training diffusion (no respacing) of a diffusion stage."""
    o = config.diffusion[DIFFUSION_SECTION[stage]]
    return create_gaussian_diffusion(steps=o.steps, noise_schedule=o.schedule,
                                     timestep_respacing="", model_output=o.model_output,
                                     model_var_type=o.model_var_type)


def _opt(section, key: str, default):
    return section[key] if key in section else default


def _stage_train(config, stage: str):
    train = config.get("train", None)
    if train is None or stage not in train:
        return {}
    return train[stage]


def resize_images(x: jax.Array, size: int) -> jax.Array:
    """``[B, h, w, C]`` -> ``[B, size, size, C]`` (antialiased linear; identity if equal)."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    return jax.image.resize(x.astype(jnp.float32), (x.shape[0], size, size, x.shape[-1]),
                            method="linear", antialias=True)


def clip_pixels(images: jax.Array, size: int) -> jax.Array:
    """Images in [-1, 1] ``[B, H, W, 3]`` -> CLIP-normalised ``[B, size, size, 3]`` (in-graph; the
    same function feeds CLIP training and ``unclip embed``)."""
    x = resize_images(jnp.asarray(images, jnp.float32), size)
    x = (x + 1.0) * 0.5
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def resized_crop_settings(config, stage: str) -> Optional[dict]:
    """``{'scale', 'ratio'}`` for ``augment.random_resized_crop`` from
    ``train.<stage>.resized_crop_scale`` / ``resized_crop_ratio``; ``None`` (off) when the scale
    is absent or empty (the shipped configs)."""
    t = _stage_train(config, stage)
    scale = _opt(t, "resized_crop_scale", None)
    if not scale:
        return None
    if stage not in RESIZED_CROP_STAGES:
        raise cfg_lib.ConfigError(f"train.{stage}.resized_crop_scale: stage {stage!r} trains on "
                                  f"no images; only {list(RESIZED_CROP_STAGES)} take it")
    scale = tuple(float(x) for x in scale)
    ratio = tuple(float(x) for x in _opt(t, "resized_crop_ratio", augment.CROP_RATIO))
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise cfg_lib.ConfigError(f"train.{stage}.resized_crop_scale must be (min, max) area "
                                  f"fractions with 0 < min <= max <= 1, got {scale}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise cfg_lib.ConfigError(f"train.{stage}.resized_crop_ratio must be (min, max) aspect "
                                  f"ratios with 0 < min <= max, got {ratio}")
    return dict(scale=scale, ratio=ratio)


def train_images(images, size: int, crop: Optional[dict], rng: Optional[jax.Array]) -> jax.Array:
    """Training images ``[B, H, W, C]`` -> float32 ``[B, size, size, C]``: a random resized crop
    with ``crop`` settings (``resized_crop_settings``) or, when ``crop`` is None, a plain
    resize."""
    x = jnp.asarray(images, jnp.float32)
    if crop is None:
        return resize_images(x, size)
    return augment.random_resized_crop(rng, x, size, **crop)


def random_box_masks(rng: jax.Array, batch: int, size: int, min_frac: float = 0.25,
                     max_frac: float = 0.75, p_keep_all: float = 0.0) -> jax.Array:
    """Keep-masks ``[B, size, size, 1]`` float (1 = keep, 0 = region to inpaint): one random
    axis-aligned box per example with sides in ``[min_frac, max_frac] * size``; with probability
    ``p_keep_all`` nothing is masked."""
    ks = jax.random.split(rng, 5)
    lo, hi = max(1, int(round(min_frac * size))), max(1, int(round(max_frac * size)))
    bh = jax.random.randint(ks[0], (batch,), lo, hi + 1)
    bw = jax.random.randint(ks[1], (batch,), lo, hi + 1)
    y0 = jnp.floor(jax.random.uniform(ks[2], (batch,)) * (size - bh + 1)).astype(jnp.int32)
    x0 = jnp.floor(jax.random.uniform(ks[3], (batch,)) * (size - bw + 1)).astype(jnp.int32)
    r = jnp.arange(size)
    in_y = (r[None] >= y0[:, None]) & (r[None] < (y0 + bh)[:, None])
    in_x = (r[None] >= x0[:, None]) & (r[None] < (x0 + bw)[:, None])
    hole = in_y[:, :, None] & in_x[:, None, :]
    keep_all = jax.random.uniform(ks[4], (batch,)) < p_keep_all
    hole = hole & ~keep_all[:, None, None]
    return (~hole).astype(jnp.float32)[..., None]


def _need(batch: dict, keys, stage: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        hint = (" Precompute CLIP embeddings with `unclip embed` and train on that dataset."
                if any(k in EMBED_KEYS for k in missing) else "")
        raise MissingBatchKeyError(
            f"stage {stage!r}: the batch has no {missing} (it has {sorted(batch)}).{hint}")


def _timesteps_and_noise(rng, diffusion, x):
    kt, kn = jax.random.split(rng)
    t = jax.random.randint(kt, (x.shape[0],), 0, diffusion.num_timesteps)
    return t, jax.random.normal(kn, x.shape, jnp.float32)


# ------------------------------------------------------------------------------ losses


def clip_loss_fn(config) -> LossFn:
    """Contrastive CLIP loss with the learned temperature (``logit_scale``; clamped at 100 as in
    CLIP). aux: ``logit_scale``, ``accuracy`` (image->text top-1 within the batch)."""
    ccfg = cfg_lib.clip_config(config)
    model = clip_lib.CLIP(ccfg, dtype=cfg_lib.compute_dtype(config))
    size = ccfg.vision_config.image_size
    crop = resized_crop_settings(config, "clip")

    def loss_fn(params, batch, rng):
        _need(batch, ("image", "input_ids"), "clip")
        images = batch["image"] if crop is None else train_images(batch["image"], size, crop, rng)
        out = model.apply({"params": params}, input_ids=batch["input_ids"],
                          pixel_values=clip_pixels(images, size),
                          attention_mask=batch.get("attention_mask"))
        scale = jnp.minimum(out["logit_scale"], 100.0)
        loss = clip_lib.contrastive_loss(out["text_embeds"], out["image_embeds"], scale)
        _, logits_per_image = clip_lib.clip_logits(out["text_embeds"], out["image_embeds"], scale)
        acc = jnp.mean(jnp.argmax(logits_per_image, -1) == jnp.arange(logits_per_image.shape[0]))
        return loss, {"logit_scale": scale, "accuracy": acc}

    return loss_fn


def prior_loss_fn(config, buffers: PyTree) -> LossFn:
    """x0-MSE of the diffusion prior. ``params`` is the prior's ``'params'`` collection;
    ``buffers`` (``clip_mean`` / ``clip_std`` / buffer-mode null condition) are constants.
    aux: ``mse``, ``drop_text_frac``."""
    pcfg = cfg_lib.prior_config(config)
    model = prior_lib.DiffusionPrior(pcfg)
    diffusion = stage_diffusion(config, "prior")
    p_drop = float(_opt(config.diffusion.prior, "cfg_drop_text", 0.1))
    buffers = nn.meta.unbox(buffers)
    train = pcfg.dropout > 0

    def loss_fn(params, batch, rng):
        _need(batch, EMBED_KEYS, "prior")
        k_drop, k_diff, k_dropout = jax.random.split(rng, 3)
        x0 = prior_lib.normalize(buffers, jnp.asarray(batch["image_emb"], jnp.float32))
        b = x0.shape[0]
        drop = prior_lib.drop_mask(k_drop, b, p_drop)
        t, noise = _timesteps_and_noise(k_diff, diffusion, x0)

        def model_fn(x_t, tt):
            return model.apply({"params": params, "buffers": buffers}, x_t, tt,
                               batch["text_emb"], batch["text_states"],
                               batch["text_mask"].astype(bool), drop, deterministic=not train,
                               rngs={"dropout": k_dropout} if train else None)

        terms = training_losses(diffusion, model_fn, x0, t, noise, loss_type="mse")
        loss = jnp.mean(terms["loss"])
        return loss, {"mse": jnp.mean(terms["mse"]), "drop_text_frac": jnp.mean(drop)}

    return loss_fn


def _unet_kwargs(cfg: unet_lib.UNetConfig, batch: dict) -> dict:
    kw = {}
    if cfg.clip_dim:
        kw["clip_emb"] = jnp.asarray(batch["image_emb"], jnp.float32)
    if cfg.text_encoder == "clip":
        kw.update(text_states=batch["text_states"], text_emb=batch["text_emb"],
                  text_mask=batch["text_mask"].astype(bool))
    elif cfg.text_encoder == "transformer":
        kw.update(text_tokens=batch["input_ids"], text_mask=batch["text_mask"].astype(bool))
    return kw


def _decoder_like_loss(config, stage: str, ucfg: unet_lib.UNetConfig) -> LossFn:
    model = unet_lib.UNet(ucfg)
    diffusion = stage_diffusion(config, stage)
    dcfg = config.diffusion.decoder
    p_clip = float(_opt(dcfg, "cfg_drop_clip", 0.1))
    p_text = float(_opt(dcfg, "cfg_drop_text", 0.5))
    tcfg = _stage_train(config, stage)
    vlb_weight = float(_opt(tcfg, "vlb_weight", 0.001))
    snr_gamma = float(_opt(tcfg, "snr_gamma", 0.0))
    if snr_gamma < 0:
        raise cfg_lib.ConfigError(
            f"train.{stage}.snr_gamma must be >= 0 (0: off), got {snr_gamma}")
    loss_type = "hybrid" if diffusion.learned_variance else "mse"
    needs = ["image"]
    if ucfg.clip_dim:
        needs.append("image_emb")
    if ucfg.text_encoder == "clip":
        needs += ["text_emb", "text_states", "text_mask"]
    elif ucfg.text_encoder == "transformer":
        needs += ["input_ids", "text_mask"]
    mask_cfg = dict(min_frac=float(_opt(tcfg, "mask_min_frac", 0.25)),
                    max_frac=float(_opt(tcfg, "mask_max_frac", 0.75)),
                    p_keep_all=float(_opt(tcfg, "mask_p_keep_all", 0.0)))
    crop = resized_crop_settings(config, stage)

    def loss_fn(params, batch, rng):
        _need(batch, needs, stage)
        k_aug = None
        if crop is not None:  # split only when on: the default path draws as it always did
            rng, k_aug = jax.random.split(rng)
        k_drop, k_diff, k_dropout, k_mask = jax.random.split(rng, 4)
        x0 = train_images(batch["image"], ucfg.image_size, crop, k_aug)
        b = x0.shape[0]
        kw = _unet_kwargs(ucfg, batch)
        aux = {}
        if ucfg.clip_dim or ucfg.text_encoder != "none":
            drop_clip, drop_text = draw_cfg_drop_masks(k_drop, b, p_clip, p_text)
            if ucfg.clip_dim and ucfg.use_clip_null:
                kw["drop_clip"] = drop_clip
                aux["drop_clip_frac"] = jnp.mean(drop_clip)
            if ucfg.text_encoder != "none":
                kw["drop_text"] = drop_text
                aux["drop_text_frac"] = jnp.mean(drop_text)
        if ucfg.inpaint:
            keep = random_box_masks(k_mask, b, ucfg.image_size, **mask_cfg)
            kw.update(inpaint_image=x0, inpaint_mask=keep)
            aux["masked_frac"] = 1.0 - jnp.mean(keep)
        t, noise = _timesteps_and_noise(k_diff, diffusion, x0)

        def model_fn(x_t, tt, **kwargs):
            return model.apply({"params": params}, x_t, tt, train=True,
                               rngs={"dropout": k_dropout}, **kwargs)

        terms = training_losses(diffusion, model_fn, x0, t, noise, kw, loss_type=loss_type,
                                vlb_weight=vlb_weight, snr_gamma=snr_gamma)
        aux["mse"] = jnp.mean(terms["mse"])
        if "vb" in terms:
            aux["vb"] = jnp.mean(terms["vb"])
        return jnp.mean(terms["loss"]), aux

    return loss_fn


def decoder_loss_fn(config) -> LossFn:
    """Decoder loss: hybrid (L_simple + ``vlb_weight`` L_vlb) with learned sigma, else MSE.
    aux: ``mse``, ``vb``, ``drop_clip_frac``, ``drop_text_frac``."""
    return _decoder_like_loss(config, "decoder", cfg_lib.decoder_config(config))


def inpaint_loss_fn(config) -> LossFn:
    """Inpainting decoder loss: the decoder loss with random box keep-masks as extra input.
    aux: as decoder + ``masked_frac``."""
    return _decoder_like_loss(config, "inpaint", cfg_lib.inpaint_decoder_config(config))


def sr_settings(config, index: int = 0) -> dict:
    """Upsampler training settings: ``low_res`` size (the previous stage's output size),
    ``crop`` (high-res crop side; the UNet is fully convolutional), ``corruption`` ('blur' or
    'bsr') with its blur sigma range / kernel or BSR-lite options, the resized crop (or None)."""
    srs = cfg_lib.sr_configs(config)
    if index >= len(srs):
        raise cfg_lib.ConfigError(f"config has {len(srs)} upsampler(s); no sr[{index}]")
    high = srs[index].image_size
    low = cfg_lib.decoder_config(config).image_size if index == 0 else srs[index - 1].image_size
    if high % low:
        raise cfg_lib.ConfigError(f"sr[{index}]: size {high} is not a multiple of {low}")
    t = _stage_train(config, "sr")
    crop = int(_opt(t, "crop_size", 0)) or high
    factor = high // low
    if crop > high or crop % factor:
        raise cfg_lib.ConfigError(
            f"train.sr.crop_size={crop} must be <= {high} and a multiple of the upsampling "
            f"factor {factor}")
    sig = tuple(float(s) for s in _opt(t, "blur_sigma", (0.4, 0.6)))
    if len(sig) != 2 or sig[0] < 0 or sig[1] < sig[0]:
        raise cfg_lib.ConfigError(f"train.sr.blur_sigma must be (min, max), got {sig}")
    kernel = int(_opt(t, "blur_kernel", 3))
    corruption = _sr_corruption(_opt(t, "corruption", "blur"), index, len(srs))
    bsr = _bsr_options(_opt(t, "bsr", None))
    resized = resized_crop_settings(config, "sr")
    if resized is not None and corruption == "bsr":
        raise cfg_lib.ConfigError(
            "train.sr.resized_crop_scale does not combine with corruption='bsr' (its low-res "
            "input is made on the host from the uncropped image); leave resized_crop_scale "
            "unset for this upsampler (it trains on random crop_size crops already)")
    return dict(high=high, low=low, factor=factor, crop=crop, blur_sigma=sig,
                blur_kernel=kernel, corruption=corruption, bsr=bsr, resized_crop=resized,
                config=srs[index])


def _sr_corruption(value, index: int, n_sr: int) -> str:
    """``train.sr.corruption``: one name for every upsampler, or one per upsampler index."""
    if not isinstance(value, str):
        names = [str(v) for v in value]
        if len(names) != n_sr:
            raise cfg_lib.ConfigError(
                f"train.sr.corruption: give one of {list(SR_CORRUPTIONS)} or one per upsampler "
                f"({n_sr}), got {names}")
        value = names[index]
    if value not in SR_CORRUPTIONS:
        raise cfg_lib.ConfigError(f"train.sr.corruption={value!r}: choose one of "
                                  f"{list(SR_CORRUPTIONS)}")
    return value


def _bsr_options(value) -> dict:
    """``train.sr.bsr``: keyword arguments of ``augment.bsr_degrade`` (default: its defaults)."""
    import inspect

    opts = dict(cfg_lib._plain(value)) if value else {}
    known = set(inspect.signature(augment.bsr_degrade).parameters) - {"rng", "image", "out_size"}
    bad = sorted(set(opts) - known)
    if bad:
        raise cfg_lib.ConfigError(f"unknown key(s) {bad} in train.sr.bsr; valid keys: "
                                  f"{sorted(known)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def sr_conditioning(rng, images, settings: dict, low_res=None):
    """``(x0, low_res, sigma)``: the high-res training crop ``[B, c, c, 3]`` and its low-res
    conditioning ``[B, c / f, c / f, 3]`` from images in [-1, 1] of any size.

    ``corruption='blur'``: the crop downsampled and blurred (``augment.blur_corrupt``; sigma
    ``[B]``). ``'bsr'``: aligned crops (``augment.paired_random_crop``) of the images resized to
    the upsampler size and of ``low_res [B, H / f, H / f, 3]``, the host-degraded images that
    the stage's ``prepare`` adds (sigma None)."""
    s = settings
    hi = resize_images(jnp.asarray(images, jnp.float32), s["high"])
    if s["corruption"] == "bsr":
        if low_res is None:
            raise MissingBatchKeyError(
                "stage 'sr' with train.sr.corruption='bsr' needs 'low_res' in the batch: it is "
                "made on the host by the stage's prepare (build_stage('sr', config).prepare)")
        lo, hi = augment.paired_random_crop(rng, jnp.asarray(low_res, jnp.float32), hi,
                                            s["crop"])
        return hi, lo, None
    k_crop, k_sig = jax.random.split(rng)
    hi = augment.random_crop(k_crop, hi, s["crop"], align=s["factor"])
    lo = resize_images(hi, s["crop"] // s["factor"])
    lo, sigma = augment.blur_corrupt(k_sig, lo, s["blur_sigma"], kernel_size=s["blur_kernel"],
                                     return_sigma=True)
    return hi, lo, sigma


def _content_rng(seed: int, images: np.ndarray) -> np.random.Generator:
    """A host rng drawn from ``seed`` and a hash of (a subsample of) the batch's images: a pure
    function of the batch, so a resumed run degrades each batch as the unbroken run did."""
    import hashlib

    sample = np.ascontiguousarray(np.asarray(images)[:, ::HASH_STRIDE, ::HASH_STRIDE])
    digest = hashlib.blake2b(sample.tobytes(), digest_size=16).digest()
    return np.random.default_rng([int(seed), *np.frombuffer(digest, np.uint32).tolist()])


def _sr_bsr_prepare(settings: dict, seed: int) -> Callable[[dict], dict]:
    """Host-side batch preparation of an upsampler with ``corruption='bsr'``: adds ``low_res``,
    float32 ``[B, low, low, 3]`` in [-1, 1], the images BSR-lite degraded to the low-res size."""
    def prepare(batch):
        out = _numeric(batch)
        _need(out, ("image",), "sr")
        out["low_res"] = augment.bsr_degrade_batch(_content_rng(seed, out["image"]),
                                                   out["image"], settings["low"],
                                                   **settings["bsr"])
        return out

    return prepare


def sr_loss_fn(config, index: int = 0) -> LossFn:
    """Upsampler loss (MSE, or hybrid with learned sigma) on random crops with a corrupted
    low-res conditioning (see ``sr_conditioning``). aux: ``mse``, ``blur_sigma`` (blur)."""
    s = sr_settings(config, index)
    ucfg = s["config"]
    model = unet_lib.UNet(ucfg)
    diffusion = stage_diffusion(config, "sr")
    loss_type = "hybrid" if diffusion.learned_variance else "mse"
    needs = ("image", "low_res") if s["corruption"] == "bsr" else ("image",)

    def loss_fn(params, batch, rng):
        _need(batch, needs, "sr")
        images = batch["image"]
        if s["resized_crop"] is not None:  # split only when on (default path unchanged)
            rng, k_aug = jax.random.split(rng)
            images = train_images(images, s["high"], s["resized_crop"], k_aug)
        k_cond, k_diff, k_dropout = jax.random.split(rng, 3)
        x0, lo, sigma = sr_conditioning(k_cond, images, s, batch.get("low_res"))
        t, noise = _timesteps_and_noise(k_diff, diffusion, x0)

        def model_fn(x_t, tt, low_res):
            return model.apply({"params": params}, x_t, tt, low_res=low_res, train=True,
                               rngs={"dropout": k_dropout})

        terms = training_losses(diffusion, model_fn, x0, t, noise, {"low_res": lo},
                                loss_type=loss_type)
        aux = {"mse": jnp.mean(terms["mse"])}
        if sigma is not None:
            aux["blur_sigma"] = jnp.mean(sigma)
        return jnp.mean(terms["loss"]), aux

    return loss_fn


# ------------------------------------------------------------------------------ inpaint init


def inpaint_params_from_decoder(decoder_params: PyTree, inpaint_params: PyTree) -> PyTree:
    """Inpainting-UNet params started from decoder params: every decoder leaf is copied; the
    first conv's kernel gets the decoder kernel on the x_t input channels and zeros on the new
    ones (``image * keep``, ``keep``), so the model starts out as exactly the decoder.
    ``inpaint_params`` gives the target structure / shapes (arrays or ShapeDtypeStructs)."""
    dec = nn.meta.unbox(decoder_params)
    tgt = nn.meta.unbox(inpaint_params)

    def one(path, t):
        src = dec
        for p in path:
            src = src[p.key]
        src = jnp.asarray(src)
        if src.shape == t.shape:
            return src.astype(t.dtype)
        if len(src.shape) == 4 and src.shape[:2] == t.shape[:2] and src.shape[3] == t.shape[3] \
                and src.shape[2] < t.shape[2]:
            out = jnp.zeros(t.shape, t.dtype)
            return out.at[:, :, :src.shape[2], :].set(src.astype(t.dtype))
        raise ValueError(f"decoder param {jax.tree_util.keystr(path)} has shape {src.shape}; "
                         f"the inpainting UNet needs {t.shape}")

    return jax.tree_util.tree_map_with_path(one, tgt)


# ------------------------------------------------------------------------------ stages


@dataclasses.dataclass
class Stage:
    """What the loop needs for one stage.

    init(rng) -> boxed trainable params (for ``sharded_init``); frozen: non-trainable variables
    (checkpointed beside the train state; the prior's buffers, else ``{}``);
    make_loss(frozen) -> loss_fn; prepare(host_batch) -> dict of numpy arrays (tokenises
    captions, drops strings; an upsampler with ``corruption='bsr'`` adds ``low_res``);
    model_sections: config sections that define the model (stored with checkpoints and compared
    on restore / export).
    """

    name: str
    init: Callable[[jax.Array], PyTree]
    frozen: PyTree
    make_loss: Callable[[PyTree], LossFn]
    prepare: Callable[[dict], dict]
    model_sections: tuple[str, ...]


def _numeric(batch: dict) -> dict:
    out = {}
    for k, v in batch.items():
        if k in HOST_ONLY_KEYS:
            continue
        a = np.asarray(v)
        if a.dtype.kind in "biuf":
            out[k] = a
    return out


def _clip_prepare(config):
    ccfg = cfg_lib.clip_config(config)
    length = ccfg.text_config.max_position_embeddings

    tok_dir = cfg_lib.tokenizer_dir(config)

    def prepare(batch):
        from unclip_jax.models.tokenizer import load_tokenizer, tokenize_with_info

        out = _numeric(batch)
        if "input_ids" not in out:
            if "caption" not in batch:
                raise MissingBatchKeyError("stage 'clip' needs 'caption' strings or 'input_ids'")
            toks = tokenize_with_info([str(c) for c in batch["caption"]], length,
                                      tokenizer=load_tokenizer(tok_dir, length))
            out["input_ids"], out["attention_mask"] = toks.ids, toks.mask
        return out

    return prepare


def build_stage(stage: str, config, *, sr_index: int = 0) -> Stage:
    """The ``Stage`` for ``stage`` in ``STAGES`` under ``config``."""
    if stage not in STAGES:
        raise cfg_lib.ConfigError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    if stage == "clip":
        ccfg = cfg_lib.clip_config(config)
        def clip_init(rng):
            return clip_lib.CLIP(ccfg).init(rng, **_clip_dummy(ccfg))["params"]

        return Stage("clip", clip_init, {}, lambda frozen: clip_loss_fn(config),
                     _clip_prepare(config), ("clip",))
    if stage == "prior":
        pcfg = cfg_lib.prior_config(config)
        buffers = _initial_buffers(pcfg)
        return Stage("prior", lambda rng: prior_lib.init_prior(pcfg, rng)["params"],
                     {"buffers": buffers}, lambda frozen: prior_loss_fn(config, frozen["buffers"]),
                     _numeric, ("prior",))
    if stage == "decoder":
        dcfg = cfg_lib.decoder_config(config)
        return Stage("decoder", lambda rng: unet_lib.init_unet(dcfg, rng)["params"], {},
                     lambda frozen: decoder_loss_fn(config), _numeric, ("decoder",))
    if stage == "inpaint":
        icfg = cfg_lib.inpaint_decoder_config(config)
        return Stage("inpaint", lambda rng: unet_lib.init_unet(icfg, rng)["params"], {},
                     lambda frozen: inpaint_loss_fn(config), _numeric, ("decoder",))
    s = sr_settings(config, sr_index)
    prepare = (_sr_bsr_prepare(s, int(_opt(_stage_train(config, "sr"), "seed", 0)))
               if s["corruption"] == "bsr" else _numeric)
    return Stage("sr", lambda rng: unet_lib.init_unet(s["config"], rng)["params"], {},
                 lambda frozen: sr_loss_fn(config, sr_index), prepare, ("decoder", "sr"))


def _initial_buffers(pcfg) -> dict:
    """The prior's initial ``buffers`` without compiling an init: ``clip_std`` and
    ``null_text_mask`` ones, everything else zeros (what ``DiffusionPrior`` initialises)."""
    abstract = nn.meta.unbox(jax.eval_shape(
        lambda k: prior_lib.init_prior(pcfg, k), jax.random.PRNGKey(0))["buffers"])
    ones = ("clip_std", "null_text_mask")
    return {k: (np.ones if k in ones else np.zeros)(v.shape, v.dtype)
            for k, v in abstract.items()}


def _clip_dummy(ccfg) -> dict:
    v = ccfg.vision_config
    return dict(input_ids=jnp.zeros((1, ccfg.text_config.max_position_embeddings), jnp.int32),
                pixel_values=jnp.zeros((1, v.image_size, v.image_size, v.num_channels)))


def make_loss_fn(stage: str, config, frozen: Optional[PyTree] = None) -> LossFn:
    """``loss_fn(params, batch, rng) -> (loss, aux)`` for ``stage`` (frozen: the stage's
    non-trainable variables; default: their init)."""
    st = build_stage(stage, config)
    return st.make_loss(st.frozen if frozen is None else frozen)


__all__ = [
    "STAGES", "Stage", "build_stage", "make_loss_fn", "clip_loss_fn", "prior_loss_fn",
    "decoder_loss_fn", "sr_loss_fn", "inpaint_loss_fn",
    "inpaint_params_from_decoder", "sr_conditioning", "sr_settings", "resized_crop_settings",
    "train_images", "random_box_masks", "clip_pixels", "resize_images", "stage_diffusion",
    "MissingBatchKeyError",
]
