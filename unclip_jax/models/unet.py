"""One ADM / GLIDE UNet for the unCLIP decoder, the inpainting decoder and the upsamplers (NHWC).

Architecture (guided-diffusion / GLIDE / Karlo): a conv in; per resolution level
``num_res_blocks`` residual blocks (GroupNorm + SiLU, timestep-embedding injection as
scale-shift or add, dropout, zero-initialised output conv), each optionally followed by an
attention block; a downsampling step between levels (a down-sampling residual block with
``resblock_updown``, else a strided conv); a middle ``res, attn, res``; a mirrored decoder path
with skip connections (``num_res_blocks + 1`` blocks per level) and upsampling; GroupNorm + SiLU +
zero-initialised conv out (``2 * out_channels`` with a learned sigma).

Conditioning (see ``conditioning.py``):
  * decoder: CLIP image embedding -> time embedding term + ``clip_emb_mult`` context tokens; the
    caption (CLIP token states, Karlo; or a GLIDE caption transformer, paper) -> context tokens +
    time embedding term. Every attention block attends over its own spatial tokens plus the
    context tokens as extra keys / values (GLIDE ``encoder_kv``); padded caption tokens are masked.
    ``drop_clip`` / ``drop_text`` substitute the learned null image embedding / an empty caption.
  * inpainting: input channels ``[x_t, image * keep, keep]``.
  * upsamplers: the low-res image is resized to the output size and concatenated on channels.

Parameter structure (for converters; Karlo ``UNetModel`` / ``PLMImUNet`` / ``SuperResUNetModel``
name -> ours; torch conv ``[out, in, kh, kw]`` -> flax ``[kh, kw, in, out]``; torch linear / conv1d
``[out, in(, 1)]`` -> ``[in, out]``; every Karlo tensor maps to exactly one of ours, same size):
  time_embed.0 / .2          -> time_embed_0 / time_embed_1
  input_blocks.0.0           -> conv_in
  input_blocks.i.0           -> input_blocks_{i}_res   (or input_blocks_{i}_down when it is the
                                down-sampling block of a level: a ResBlock with resblock_updown,
                                else a Downsample with ``op``)
  input_blocks.i.1           -> input_blocks_{i}_attn
  middle_block.0 / .1 / .2   -> middle_res_0 / middle_attn / middle_res_1
                                (no middle_attn when use_middle_attention=False: .1 -> middle_res_1)
  output_blocks.i.0          -> output_blocks_{i}_res
  output_blocks.i.1          -> output_blocks_{i}_attn (or _up when the level has no attention)
  output_blocks.i.2          -> output_blocks_{i}_up
  out.0 / out.2              -> out_norm / out_conv
  ResBlock: in_layers.0 -> in_norm, in_layers.2 -> in_conv, emb_layers.1 -> emb_proj,
            out_layers.0 -> out_norm, out_layers.3 -> out_conv, skip_connection -> skip
            (emb_proj output = [scale | shift] as Karlo's chunk(2)).
  AttentionBlock: norm -> norm, qkv -> qkv, encoder_kv -> encoder_kv, proj_out -> proj_out.
            The qkv output units are laid out (heads, 3, head_dim) and encoder_kv (heads, 2,
            head_dim), exactly Karlo's / GLIDE's legacy QKVAttention order, so those kernels only
            need ``w[:, :, 0].T``. diffusers splits them (to_q/to_k/to_v, add_k_proj/add_v_proj,
            via the head-chunked split of the conversion script): re-interleave per head.
  clip_emb, clip_tok_proj, cf_param, text_seq_proj, text_feat_proj -> see conditioning.py
            (``clip_cond/...``, ``caption/...``; mind the channel-major token trap).
Shapes: images ``[B, H, W, C]``, timesteps ``[B]``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.conditioning import (
    CaptionTransformer,
    ClipCaptionConditioning,
    ClipEmbConditioning,
    apply_text_drop,
)
from unclip_jax.models.layers import (
    ATTENTION_IMPLS,
    Dense,
    dot_product_attention,
    partitioned,
    timestep_embedding,
)

Array = jax.Array
Dtype = Any

CONV_AXES = ("spatial", "spatial", "conv_in", "conv_out")
# torch's default Conv / Linear init (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), ..).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the ADM / GLIDE UNet (names as in guided-diffusion / Karlo).

    Channels: ``in_channels`` / ``out_channels`` are *image* channels (3). The first conv sees
    ``in_channels`` (x_t) + ``in_channels`` (the low-res image, if ``low_res_cond``) +
    ``in_channels + 1`` (``image * keep`` and ``keep``, if ``inpaint``); the output has
    ``out_channels * (2 if learn_sigma else 1)`` channels ([eps | variance interpolation v]).
    ``attention_resolutions`` are feature-map sizes in pixels (Karlo's "32,16,8" at 64x64).
    Caption: ``text_encoder`` is ``'none'``, ``'clip'`` (Karlo: CLIP token states
    ``[B, L, text_states_dim]`` + pooled CLIP text emb ``[B, text_emb_dim]``) or ``'transformer'``
    (GLIDE: token ids through ``CaptionTransformer`` of width ``context_dim``). ``context_dim`` is
    the width of the context tokens each attention block sees (Karlo ``xf_width``); 0 = none.
    """

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    num_head_channels: int = 64  # > 0: heads = channels // num_head_channels; else use num_heads
    num_heads: int = 1
    use_middle_attention: bool = True
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True  # (without resblock_updown) learned conv for up/down-sampling
    learn_sigma: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # CLIP image embedding conditioning (decoder); 0 = off.
    clip_dim: int = 0
    clip_emb_mult: int = 4  # number of extra context tokens from the CLIP image embedding
    use_clip_null: bool = True  # learned null image embedding (Karlo cf_param) for cfg
    # Caption conditioning.
    text_encoder: str = "none"  # 'none' | 'clip' | 'transformer'
    context_dim: int = 0  # width of context tokens (Karlo xf_width); 0 = no encoder_kv
    text_ctx: int = 77
    text_states_dim: int = 768  # 'clip': CLIP text token-state width
    text_emb_dim: int = 768  # 'clip': pooled CLIP text embedding width
    xf_layers: int = 0  # 'transformer': caption transformer depth / heads / vocab
    xf_heads: int = 0
    vocab_size: int = 0
    xf_final_ln: bool = True
    xf_padding: bool = True
    # Upsampler / inpainting inputs.
    low_res_cond: bool = False
    # jax.image.resize method used when low_res is smaller than x ('bilinear', 'bicubic', ..).
    # Karlo resizes *outside* the model with torchvision bicubic (a=-0.75; jax's is a=-0.5): for
    # parity with converted Karlo SR weights, pass low_res already at [B, H, W, C] (used as is).
    low_res_resize_method: str = "bilinear"
    inpaint: bool = False
    remat: bool = False  # rematerialise res / attention blocks (saves activation memory)
    # attention kernel: 'einsum' (fp32 logits), 'xla' / 'cudnn' / 'auto' (jax.nn's fused op)
    attention_impl: str = "einsum"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                             f"{self.attention_impl!r}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def conv_in_channels(self) -> int:
        c = self.in_channels
        if self.low_res_cond:
            c += self.in_channels
        if self.inpaint:
            c += self.in_channels + 1
        return c

    @property
    def output_channels(self) -> int:
        return self.out_channels * (2 if self.learn_sigma else 1)

    @property
    def has_context(self) -> bool:
        return self.context_dim > 0 and (self.clip_dim > 0 or self.text_encoder != "none")

    def replace(self, **kw) -> "UNetConfig":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- building blocks


def conv(features: int, kernel: int, cfg: UNetConfig, name: str, stride: int = 1,
         zero: bool = False) -> nn.Conv:
    """Same-padded 2-D conv, torch-style padding ``kernel // 2`` (so stride 2 matches torch)."""
    pad = kernel // 2
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        kernel_init=partitioned(nn.initializers.zeros if zero else torch_default_init, CONV_AXES),
        bias_init=partitioned(nn.initializers.zeros, ("conv_out",)),
    )


def group_norm(cfg: UNetConfig, name: str) -> nn.GroupNorm:
    """GroupNorm(norm_groups); statistics in fp32; scale / bias ``[C]`` on ``conv_out``."""
    return nn.GroupNorm(
        num_groups=cfg.norm_groups, epsilon=cfg.norm_eps, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name=name,
        scale_init=partitioned(nn.initializers.ones, ("conv_out",)),
        bias_init=partitioned(nn.initializers.zeros, ("conv_out",)),
    )


def dense(features: int, cfg: UNetConfig, name: str, axes=("embed", "mlp"),
          zero: bool = False) -> Dense:
    return Dense(features, axes, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                 kernel_init=nn.initializers.zeros if zero else torch_default_init)


def upsample_nearest(x: Array) -> Array:
    """``[B, H, W, C] -> [B, 2H, 2W, C]`` nearest neighbour."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: Array) -> Array:
    """``[B, H, W, C] -> [B, H/2, W/2, C]`` 2x2 average pooling."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


class ResBlock(nn.Module):
    """Residual block with timestep embedding, optional up / down sampling.

    ``__call__(x [B, H, W, C_in], emb [B, T], train) -> [B, H', W', out_channels]``.
    """

    cfg: UNetConfig
    out_channels: int
    up: bool = False
    down: bool = False

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        cfg = self.cfg
        h = nn.silu(group_norm(cfg, "in_norm")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = conv(self.out_channels, 3, cfg, "in_conv")(h)
        n_emb = 2 * self.out_channels if cfg.use_scale_shift_norm else self.out_channels
        emb_out = dense(n_emb, cfg, "emb_proj", axes=("embed", "conv_out"))(nn.silu(emb))
        emb_out = emb_out[:, None, None, :].astype(h.dtype)
        out_norm = group_norm(cfg, "out_norm")
        if cfg.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = nn.silu(out_norm(h) * (1 + scale) + shift)
        else:
            h = nn.silu(out_norm(h + emb_out))
        h = nn.Dropout(cfg.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, 3, cfg, "out_conv", zero=True)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, cfg, "skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over the ``H*W`` spatial tokens plus optional context tokens (keys/values).

    ``__call__(x [B, H, W, C], context [B, S, context_dim] | None, context_mask [B, S] bool |
    None) -> [B, H, W, C]``. Parameters: ``norm`` (GroupNorm), ``qkv [C, 3C]`` (units laid out
    (heads, 3, head_dim)), ``encoder_kv [context_dim, 2C]`` ((heads, 2, head_dim)),
    ``proj_out [C, C]`` (zero init).
    """

    cfg: UNetConfig
    num_heads: int
    use_context: bool = False

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array] = None,
                 context_mask: Optional[Array] = None) -> Array:
        cfg = self.cfg
        b, hgt, wid, c = x.shape
        heads = self.num_heads
        dh = c // heads
        length = hgt * wid
        h = group_norm(cfg, "norm")(x).reshape(b, length, c)
        qkv = dense(3 * c, cfg, "qkv", axes=("embed", "heads"))(h).reshape(b, length, heads, 3, dh)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        mask = None
        if self.use_context:
            if context is None:
                raise ValueError("this attention block expects context tokens")
            s = context.shape[1]
            ekv = dense(2 * c, cfg, "encoder_kv", axes=("embed", "heads"))(context)
            ekv = ekv.reshape(b, s, heads, 2, dh)
            k = jnp.concatenate([ekv[..., 0, :], k], axis=1)
            v = jnp.concatenate([ekv[..., 1, :], v], axis=1)
            if context_mask is not None:
                mask = jnp.concatenate(
                    [context_mask.astype(bool), jnp.ones((b, length), bool)], axis=1
                )[:, None, None, :]
        out = dot_product_attention(q, k, v, mask=mask, dtype=cfg.dtype, impl=cfg.attention_impl)
        out = out.reshape(b, length, c)
        out = dense(c, cfg, "proj_out", axes=("heads", "embed"), zero=True)(out)
        return x + out.reshape(b, hgt, wid, c).astype(x.dtype)


class Downsample(nn.Module):
    """Strided 3x3 conv (``conv_resample``) or 2x2 average pooling. ``[B,H,W,C] -> [B,H/2,W/2,C]``."""

    cfg: UNetConfig
    out_channels: int

    @nn.compact
    def __call__(self, x: Array, emb: Array = None, train: bool = False) -> Array:
        if self.cfg.conv_resample:
            return conv(self.out_channels, 3, self.cfg, "op", stride=2)(x)
        return avg_pool2(x)


class Upsample(nn.Module):
    """Nearest 2x then (``conv_resample``) a 3x3 conv. ``[B,H,W,C] -> [B,2H,2W,C]``."""

    cfg: UNetConfig
    out_channels: int

    @nn.compact
    def __call__(self, x: Array, emb: Array = None, train: bool = False) -> Array:
        x = upsample_nearest(x)
        if self.cfg.conv_resample:
            x = conv(self.out_channels, 3, self.cfg, "conv")(x)
        return x


# ----------------------------------------------------------------------------- the UNet


class UNet(nn.Module):
    """ADM / GLIDE UNet (decoder, inpainting decoder, upsampler), configured by ``UNetConfig``.

    ``__call__(x, t, *, clip_emb=None, text_states=None, text_emb=None, text_tokens=None,
    text_mask=None, low_res=None, inpaint_image=None, inpaint_mask=None, drop_clip=None,
    drop_text=None, train=False) -> [B, H, W, output_channels]`` (float32).

    Args:
      x: ``[B, H, W, in_channels]`` noised image x_t.
      t: ``[B]`` timesteps (int or float).
      clip_emb: ``[B, clip_dim]`` CLIP image embedding (decoder, ``clip_dim > 0``).
      text_states: ``[B, L, text_states_dim]`` CLIP text token states (``text_encoder='clip'``).
      text_emb: ``[B, text_emb_dim]`` pooled, projected CLIP text embedding (``'clip'``).
      text_tokens: ``[B, L]`` int token ids (``text_encoder='transformer'``).
      text_mask: ``[B, L]`` bool, True = real caption token (padding is masked in attention).
      low_res: ``[B, h, w, in_channels]`` low-res image (upsamplers), resized to ``H, W``.
      inpaint_image: ``[B, H, W, in_channels]`` source image; inpaint_mask: ``[B, H, W, 1]``
        (1 = keep). Input becomes ``[x, image * keep, keep]``.
      drop_clip: ``[B]`` bool: use the learned null image embedding (classifier-free guidance).
      drop_text: ``[B]`` bool: use an empty caption.
      train: enables dropout (needs a ``'dropout'`` rng).
    """

    config: UNetConfig

    def _heads(self, ch: int) -> int:
        cfg = self.config
        if cfg.num_head_channels > 0:
            if ch % cfg.num_head_channels:
                raise ValueError(f"{ch} channels not divisible by {cfg.num_head_channels}")
            return ch // cfg.num_head_channels
        return cfg.num_heads

    def _conditioning(self, batch, clip_emb, text_states, text_emb, text_tokens, text_mask,
                      drop_clip, drop_text):
        """Returns (time-embedding terms [B, T] list, context [B, S, D] | None, mask [B, S])."""
        cfg = self.config
        terms, ctx, masks = [], [], []
        if cfg.clip_dim:
            if clip_emb is None:
                raise ValueError("this UNet is CLIP-conditioned: pass clip_emb [B, clip_dim]")
            clip_mod = ClipEmbConditioning(
                cfg.clip_dim, cfg.time_embed_dim, cfg.context_dim, cfg.clip_emb_mult,
                use_null=cfg.use_clip_null, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                name="clip_cond")
            term, tokens = clip_mod(clip_emb, drop_clip)
            terms.append(term)
            if tokens is not None:
                ctx.append(tokens)
                masks.append(jnp.ones((batch, cfg.clip_emb_mult), bool))
        if cfg.text_encoder == "clip":
            cap = ClipCaptionConditioning(
                cfg.text_states_dim, cfg.text_emb_dim, cfg.time_embed_dim, cfg.context_dim,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="caption")
            term, tokens = cap(text_states, text_emb, drop_text)
            if term is not None:
                terms.append(term)
            if tokens is not None:
                ctx.append(tokens)
                masks.append(apply_text_drop(text_mask, drop_text, batch, tokens.shape[1]))
        elif cfg.text_encoder == "transformer":
            if text_tokens is None:
                raise ValueError("text_encoder='transformer' needs text_tokens [B, L]")
            mask = apply_text_drop(text_mask, drop_text, batch, text_tokens.shape[1])
            cap = CaptionTransformer(
                cfg.vocab_size, cfg.text_ctx, cfg.context_dim, cfg.xf_layers, cfg.xf_heads,
                cfg.time_embed_dim, final_ln=cfg.xf_final_ln, padding=cfg.xf_padding,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="caption")
            term, tokens = cap(text_tokens, mask)
            terms.append(term)
            ctx.append(tokens)
            masks.append(mask)
        elif cfg.text_encoder != "none":
            raise ValueError(f"unknown text_encoder {cfg.text_encoder!r}")
        if not cfg.context_dim or not ctx:
            return terms, None, None
        context = jnp.concatenate([c.astype(cfg.dtype) for c in ctx], axis=1)
        return terms, context, jnp.concatenate(masks, axis=1)

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        *,
        clip_emb: Optional[Array] = None,
        text_states: Optional[Array] = None,
        text_emb: Optional[Array] = None,
        text_tokens: Optional[Array] = None,
        text_mask: Optional[Array] = None,
        low_res: Optional[Array] = None,
        inpaint_image: Optional[Array] = None,
        inpaint_mask: Optional[Array] = None,
        drop_clip: Optional[Array] = None,
        drop_text: Optional[Array] = None,
        train: bool = False,
    ) -> Array:
        cfg = self.config
        b, hgt, wid, _ = x.shape
        mc = cfg.model_channels
        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if cfg.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if cfg.remat else AttentionBlock

        # --- inputs
        parts = [x]
        if cfg.low_res_cond:
            if low_res is None:
                raise ValueError("upsampler: pass low_res [B, h, w, C]")
            if low_res.shape[1:3] != (hgt, wid):
                low_res = jax.image.resize(
                    low_res.astype(jnp.float32), (b, hgt, wid, low_res.shape[-1]),
                    method=cfg.low_res_resize_method)
            parts.append(low_res)
        if cfg.inpaint:
            if inpaint_image is None or inpaint_mask is None:
                raise ValueError("inpainting UNet: pass inpaint_image and inpaint_mask")
            keep = inpaint_mask.astype(jnp.float32)
            parts += [inpaint_image * keep, keep]
        h = jnp.concatenate([p.astype(cfg.dtype) for p in parts], axis=-1)

        # --- timestep embedding + conditioning terms
        temb = timestep_embedding(t, mc).astype(cfg.dtype)
        emb = dense(cfg.time_embed_dim, cfg, "time_embed_0")(temb)
        emb = dense(cfg.time_embed_dim, cfg, "time_embed_1")(nn.silu(emb))
        terms, context, context_mask = self._conditioning(
            b, clip_emb, text_states, text_emb, text_tokens, text_mask, drop_clip, drop_text)
        for term in terms:
            emb = emb + term.astype(emb.dtype)
        use_ctx = context is not None

        def attention(name, ch, h):
            return attn_cls(cfg, self._heads(ch), use_context=use_ctx, name=name)(
                h, context, context_mask)

        # --- encoder
        ch = mc * cfg.channel_mult[0]
        h = conv(ch, 3, cfg, "conv_in")(h)
        hs = [h]
        chans = [ch]
        res = cfg.image_size
        idx = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                ch = mc * mult
                h = res_cls(cfg, ch, name=f"input_blocks_{idx}_res")(h, emb, train)
                if res in cfg.attention_resolutions:
                    h = attention(f"input_blocks_{idx}_attn", ch, h)
                hs.append(h)
                chans.append(ch)
                idx += 1
            if level != len(cfg.channel_mult) - 1:
                name = f"input_blocks_{idx}_down"
                if cfg.resblock_updown:
                    h = res_cls(cfg, ch, down=True, name=name)(h, emb, train)
                else:
                    h = Downsample(cfg, ch, name=name)(h)
                hs.append(h)
                chans.append(ch)
                res //= 2
                idx += 1

        # --- middle
        h = res_cls(cfg, ch, name="middle_res_0")(h, emb, train)
        if cfg.use_middle_attention:
            h = attention("middle_attn", ch, h)
        h = res_cls(cfg, ch, name="middle_res_1")(h, emb, train)

        # --- decoder
        idx = 0
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                chans.pop()
                ch = mc * mult
                h = res_cls(cfg, ch, name=f"output_blocks_{idx}_res")(h, emb, train)
                if res in cfg.attention_resolutions:
                    h = attention(f"output_blocks_{idx}_attn", ch, h)
                if level and i == cfg.num_res_blocks:
                    name = f"output_blocks_{idx}_up"
                    if cfg.resblock_updown:
                        h = res_cls(cfg, ch, up=True, name=name)(h, emb, train)
                    else:
                        h = Upsample(cfg, ch, name=name)(h)
                    res *= 2
                idx += 1

        h = nn.silu(group_norm(cfg, "out_norm")(h))
        h = conv(cfg.output_channels, 3, cfg, "out_conv", zero=True)(h)
        return h.astype(jnp.float32)


# ----------------------------------------------------------------------------- helpers


def dummy_inputs(cfg: UNetConfig, batch: int = 1, text_len: Optional[int] = None) -> dict:
    """Zero inputs of the right shapes for ``init`` / ``eval_shape``: ``(x, t)`` + kwargs."""
    f32 = jnp.float32
    n = cfg.image_size
    kw: dict[str, Any] = dict(x=jnp.zeros((batch, n, n, cfg.in_channels), f32),
                              t=jnp.zeros((batch,), jnp.int32))
    L = cfg.text_ctx if text_len is None else text_len
    if cfg.clip_dim:
        kw["clip_emb"] = jnp.zeros((batch, cfg.clip_dim), f32)
    if cfg.text_encoder == "clip":
        kw["text_states"] = jnp.zeros((batch, L, cfg.text_states_dim), f32)
        kw["text_emb"] = jnp.zeros((batch, cfg.text_emb_dim), f32)
        kw["text_mask"] = jnp.ones((batch, L), bool)
    elif cfg.text_encoder == "transformer":
        kw["text_tokens"] = jnp.zeros((batch, L), jnp.int32)
        kw["text_mask"] = jnp.ones((batch, L), bool)
    if cfg.low_res_cond:
        kw["low_res"] = jnp.zeros((batch, n // 4, n // 4, cfg.in_channels), f32)
    if cfg.inpaint:
        kw["inpaint_image"] = jnp.zeros((batch, n, n, cfg.in_channels), f32)
        kw["inpaint_mask"] = jnp.ones((batch, n, n, 1), f32)
    return kw


def init_unet(cfg: UNetConfig, key: Array, batch: int = 1):
    """``UNet(cfg).init`` on dummy inputs; returns the (boxed, logically partitioned) variables."""
    kw = dummy_inputs(cfg, batch)
    x, t = kw.pop("x"), kw.pop("t")
    return UNet(cfg).init({"params": key}, x, t, **kw)


def abstract_params(cfg: UNetConfig):
    """Parameter shapes without allocating memory (``jax.eval_shape`` of ``init``)."""
    return jax.eval_shape(lambda k: init_unet(cfg, k)["params"], jax.random.key(0))


def count_params(params) -> int:
    """Total number of elements of a (possibly boxed / abstract) parameter tree."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
    return int(sum(math.prod(p.shape) for p in leaves))


# ----------------------------------------------------------------------------- reference configs


def tiny_config(**kw) -> UNetConfig:
    """CPU-test decoder: 16x16, 2 levels, CLIP + caption (Karlo style) conditioning."""
    base = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), num_head_channels=16, norm_groups=8,
                use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True, dropout=0.0,
                clip_dim=16, clip_emb_mult=4, text_encoder="clip", context_dim=32, text_ctx=8,
                text_states_dim=24, text_emb_dim=16)
    base.update(kw)
    return UNetConfig(**base)


def karlo_decoder_config(**kw) -> UNetConfig:
    """Karlo decoder_900M_vit_l (64x64; 893,318,086 params)."""
    base = dict(image_size=64, in_channels=3, out_channels=3, model_channels=320,
                channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(32, 16, 8),
                num_head_channels=64, use_middle_attention=True, dropout=0.1,
                use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
                clip_dim=768, clip_emb_mult=4, use_clip_null=True, text_encoder="clip",
                context_dim=1536, text_ctx=77, text_states_dim=768, text_emb_dim=768)
    base.update(kw)
    return UNetConfig(**base)


def karlo_sr_config(**kw) -> UNetConfig:
    """Karlo improved_sr_64_256 (both super_res_first and super_res_last; 691,579,523 each)."""
    base = dict(image_size=256, in_channels=3, out_channels=3, model_channels=320,
                channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(),
                use_middle_attention=False, dropout=0.0, use_scale_shift_norm=False,
                resblock_updown=True, learn_sigma=False, low_res_cond=True,
                low_res_resize_method="bicubic")
    base.update(kw)
    return UNetConfig(**base)


def paper_decoder_config(**kw) -> UNetConfig:
    """unCLIP paper decoder (3.5B): GLIDE 64x64 UNet (512 ch) + GLIDE caption transformer
    (width 2048, 24 layers, 32 heads, 256 tokens, GPT-2 BPE vocab 50257) + 4 CLIP tokens."""
    base = dict(image_size=64, model_channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
                clip_dim=1024, clip_emb_mult=4, text_encoder="transformer", context_dim=2048,
                text_ctx=256, xf_layers=24, xf_heads=32, vocab_size=50257, xf_final_ln=True,
                xf_padding=True)
    base.update(kw)
    return UNetConfig(**base)


def paper_sr1_config(**kw) -> UNetConfig:
    """unCLIP paper 64->256 upsampler (~700M, no attention)."""
    base = dict(image_size=256, model_channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                attention_resolutions=(), use_middle_attention=False, dropout=0.0,
                use_scale_shift_norm=True, resblock_updown=True, learn_sigma=False,
                low_res_cond=True, low_res_resize_method="bilinear")
    base.update(kw)
    return UNetConfig(**base)


def paper_sr2_config(**kw) -> UNetConfig:
    """unCLIP paper 256->1024 upsampler (~300M, no attention)."""
    base = dict(image_size=1024, model_channels=192, channel_mult=(1, 1, 2, 2, 4, 4),
                num_res_blocks=2, attention_resolutions=(), use_middle_attention=False,
                dropout=0.0, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=False,
                low_res_cond=True, low_res_resize_method="bilinear")
    base.update(kw)
    return UNetConfig(**base)


def emoji_decoder_config(**kw) -> UNetConfig:
    """Suggested emoji decoder: 32x32, 5.5M params, CLIP(dim 256)-conditioned, Karlo-style caption
    (CLIP text token states of width 256). ``model_channels=64`` gives 9.2M."""
    base = dict(image_size=32, model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=2,
                attention_resolutions=(16, 8), num_head_channels=24, norm_groups=16, dropout=0.1,
                use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
                clip_dim=256, clip_emb_mult=4, text_encoder="clip", context_dim=256, text_ctx=32,
                text_states_dim=256, text_emb_dim=256)
    base.update(kw)
    return UNetConfig(**base)


def emoji_upsampler_config(**kw) -> UNetConfig:
    """Suggested emoji upsampler 32->64 (4.5M, no attention, no text); being fully convolutional
    it can train on random 32x32 crops of the 64x64 target (pass a 16x16 low_res crop)."""
    base = dict(image_size=64, model_channels=48, channel_mult=(1, 2, 3), num_res_blocks=1,
                attention_resolutions=(), use_middle_attention=False, dropout=0.0,
                use_scale_shift_norm=True, resblock_updown=True, learn_sigma=False,
                low_res_cond=True, low_res_resize_method="bilinear", norm_groups=16)
    base.update(kw)
    return UNetConfig(**base)


PRESETS: dict[str, Callable[..., UNetConfig]] = {
    "tiny": tiny_config,
    "karlo_decoder": karlo_decoder_config,
    "karlo_sr": karlo_sr_config,
    "paper_decoder": paper_decoder_config,
    "paper_sr1": paper_sr1_config,
    "paper_sr2": paper_sr2_config,
    "emoji_decoder": emoji_decoder_config,
    "emoji_upsampler": emoji_upsampler_config,
}
