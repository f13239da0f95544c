"""Diffusion prior: CLIP text (caption token states + pooled embedding) -> CLIP image embedding.

A causal decoder-only transformer over the sequence (Karlo / diffusers ``PriorTransformer`` order)::

    [caption token states (T, projected), CLIP text emb (projected), timestep emb,
     noised image emb (projected), learned query ("prd")]            length T + 4

The output at the final (query) position, after the final LayerNorm and ``out_proj``, is the
prediction of the *clean*, normalised image embedding (x0 prediction). A learned positional
embedding covers all ``T + 4`` positions. Attention is causal, and padded caption tokens
(``text_mask == False``) are masked out as keys (as Karlo does; diffusers adds -1e4 instead of
-inf, which is the same after softmax).

Classifier-free guidance: ``drop [B] bool`` replaces the text conditioning of the marked rows
(caption token states, pooled text embedding and caption mask) by a null condition, either

* ``null_cond="learned"``: learned params ``null_text_emb [clip_dim]``,
  ``null_text_states [T, text_states_dim]`` (all ``T`` positions attendable); or
* ``null_cond="buffer"``: fixed arrays in the ``"buffers"`` collection, meant to hold the CLIP
  encoding of the empty caption (what Karlo and diffusers feed as the unconditional half):
  ``null_text_emb``, ``null_text_states``, ``null_text_mask``; set them with
  :func:`set_null_condition`. This mode adds no params, so the Karlo / diffusers prior maps 1:1.

Embedding normalisation (Karlo's ``ViT-L-14_stats.th``, diffusers' ``clip_mean``/``clip_std``)
lives in the non-trainable ``"buffers"`` collection (``clip_mean [D]``, ``clip_std [D]``) so an
optimizer never touches it: ``normalize(x) = (x - mean) / std``, ``denormalize`` the inverse. The
model consumes and predicts *normalised* image embeddings; the text inputs are raw CLIP outputs.
``apply`` always needs both collections: ``model.apply({'params': p, 'buffers': b}, ...)``
(differentiate w.r.t. ``params`` only).

Parameter map for converters (ours -> Karlo ``model.*`` -> diffusers ``PriorTransformer``);
every Karlo / diffusers tensor maps to exactly one of ours with the same number of elements
(PyTorch Linear weights are ``[out, in]``: transpose; ours ``Dense`` are ``[in, out]``):

=====================================  ==============================  ==========================
ours (params)                          Karlo                           diffusers
=====================================  ==============================  ==========================
time_embed/fc1/dense                   time_embed.0                    time_embedding.linear_1
time_embed/fc2/dense                   time_embed.2                    time_embedding.linear_2
clip_img_proj/dense                    clip_img_proj                   proj_in
text_emb_proj/dense                    text_emb_proj                   embedding_proj
text_enc_proj/dense                    text_enc_proj                   encoder_hidden_states_proj
positional_embedding [L, W]            positional_embedding [1,L,W]    positional_embedding
prd_emb [W]                            prd_emb [1,1,W]                 prd_embedding
transformer/layers_i/ln1               transformer.resblocks.i.ln_1    transformer_blocks.i.norm1
transformer/layers_i/attn/query|key|   ...attn.c_qkv (fused, split     ...attn1.to_q|to_k|to_v
  value  kernel [W, H, Dh], bias [H,Dh]  head-major, see below)
transformer/layers_i/attn/out          ...attn.c_proj                  ...attn1.to_out.0
  kernel [H, Dh, W]
transformer/layers_i/ln2               ...ln_2                         ...norm3
transformer/layers_i/mlp/fc1|fc2       ...mlp.c_fc|c_proj              ...ff.net.0.proj|ff.net.2
final_ln                               final_ln                        norm_out
out_proj/dense                         out_proj                        proj_to_clip_embeddings
(buffers) clip_mean, clip_std [D]      clip_mean/std (stats file)      clip_mean, clip_std [1,D]
=====================================  ==============================  ==========================

Karlo's fused ``c_qkv`` weight ``[3W, W]`` is laid out head-major: output row
``h * 3 * Dh + s * Dh + c`` for ``s`` in (q, k, v), i.e. ``w.reshape(H, 3, Dh, W)``; so
``q_kernel = w.reshape(H, 3, Dh, W)[:, 0].transpose(2, 0, 1)`` (``[W, H, Dh]``) and
``q_bias = b.reshape(H, 3, Dh)[:, 0]`` (:func:`split_fused_qkv`). diffusers' ``to_q`` weight ``[W, W]`` is
``w.reshape(H, Dh, W).transpose(2, 0, 1)``; ``to_out.0`` weight ``[W, W]`` ->
``w.T.reshape(H, Dh, W)``. Karlo's attention scale ``(Dh^-1/4)^2`` equals our ``Dh^-1/2``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.layers import (
    MLP,
    Dense,
    LayerNorm,
    Transformer,
    causal_mask,
    partitioned,
    timestep_embedding,
)

Array = jax.Array
Dtype = Any

NUM_EXTRA_TOKENS = 4  # text emb, timestep emb, noised image emb, query


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Diffusion prior hyper-parameters.

    Attributes:
      clip_dim: CLIP embedding width D (image and pooled text embeddings; output width).
      width: transformer width W (= heads * head_dim).
      num_layers: transformer depth.
      num_heads: attention heads.
      num_text_tokens: caption length T (CLIP context, 77).
      text_states_dim: width of the caption token states (CLIP text transformer width);
        ``None`` means ``clip_dim`` (Karlo / diffusers ViT-L: both 768).
      mlp_ratio: MLP hidden width / W.
      dropout: residual dropout inside the transformer blocks (Karlo / diffusers: 0).
      final_ln: LayerNorm before ``out_proj`` (Karlo ``xf_final_ln: true``; diffusers always).
      null_cond: ``"learned"`` (null text params) or ``"buffer"`` (fixed empty-caption encoding in
        the ``"buffers"`` collection; no extra params; use for Karlo / diffusers weights).
      ln_epsilon: LayerNorm epsilon (1e-5 in Karlo and diffusers).
      dtype: compute dtype; param_dtype: storage dtype.
    """

    clip_dim: int = 768
    width: int = 2048
    num_layers: int = 20
    num_heads: int = 32
    num_text_tokens: int = 77
    text_states_dim: Optional[int] = None
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    final_ln: bool = True
    null_cond: str = "learned"
    ln_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def seq_len(self) -> int:
        return self.num_text_tokens + NUM_EXTRA_TOKENS

    @property
    def states_dim(self) -> int:
        return self.text_states_dim or self.clip_dim

    # ---- presets (see the report / experiments/*.py) --------------------------------------
    @classmethod
    def tiny(cls, **kw) -> "PriorConfig":
        """CPU test size: 30k params."""
        base = dict(clip_dim=16, width=32, num_layers=2, num_heads=2, num_text_tokens=8)
        return cls(**{**base, **kw})

    @classmethod
    def karlo(cls, **kw) -> "PriorConfig":
        """Karlo v1.0.alpha prior (configs/prior_1B_vit_l.yaml) = diffusers PriorTransformer()."""
        base = dict(clip_dim=768, width=2048, num_layers=20, num_heads=32, num_text_tokens=77,
                    null_cond="buffer")
        return cls(**{**base, **kw})

    @classmethod
    def paper(cls, **kw) -> "PriorConfig":
        """unCLIP paper prior (~1B params; ViT-H/16 CLIP, D=1024). Depth/width estimated."""
        base = dict(clip_dim=1024, width=2048, num_layers=20, num_heads=32, num_text_tokens=77,
                    text_states_dim=1024)
        return cls(**{**base, **kw})

    @classmethod
    def emoji(cls, **kw) -> "PriorConfig":
        """Suggested emoji-model prior (5.2M params) for a small CLIP (D=256, text width 256)."""
        base = dict(clip_dim=256, width=256, num_layers=6, num_heads=4,
                    num_text_tokens=32, text_states_dim=256, dropout=0.1)
        return cls(**{**base, **kw})


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class DiffusionPrior(nn.Module):
    """unCLIP / Karlo diffusion prior (x0 prediction).

    ``__call__(x_t [B, D], t [B], text_emb [B, D], text_states [B, T, Ds], text_mask [B, T] bool
    | None, drop [B] bool | None, deterministic=True, return_hidden=False) -> [B, D] float32``
    (and ``[B, T + 4, W]`` hidden states after the final LN when ``return_hidden``).
    ``x_t`` is the noised *normalised* image embedding; ``t`` the (respaced -> original) integer
    or fractional timestep; ``text_mask`` True marks real caption tokens (None: all real).
    """

    config: PriorConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        w = cfg.width
        self.time_embed = MLP(w, activation="silu", **kw)  # fc1: W->W, silu, fc2: W->W
        self.clip_img_proj = Dense(w, ("null", "embed"), **kw)
        self.text_emb_proj = Dense(w, ("null", "embed"), **kw)
        self.text_enc_proj = Dense(w, ("null", "embed"), **kw)
        self.positional_embedding = self.param(
            "positional_embedding", partitioned(_normal(0.01), ("length", "embed")),
            (cfg.seq_len, w), cfg.param_dtype)
        self.prd_emb = self.param(
            "prd_emb", partitioned(_normal(0.01), ("embed",)), (w,), cfg.param_dtype)
        self.transformer = Transformer(
            cfg.num_layers, cfg.num_heads, cfg.mlp_ratio, "gelu", cfg.ln_epsilon,
            dropout=cfg.dropout, **kw)
        if cfg.final_ln:
            self.final_ln = LayerNorm(cfg.ln_epsilon, **kw)
        self.out_proj = Dense(cfg.clip_dim, ("embed", "null"), **kw)

        d, t, ds = cfg.clip_dim, cfg.num_text_tokens, cfg.states_dim
        self.clip_mean = self.variable(
            "buffers", "clip_mean", partitioned(nn.initializers.zeros, ("null",)), None, (d,),
            jnp.float32)
        self.clip_std = self.variable(
            "buffers", "clip_std", partitioned(nn.initializers.ones, ("null",)), None, (d,),
            jnp.float32)
        if cfg.null_cond == "learned":
            self.null_text_emb = self.param(
                "null_text_emb", partitioned(_normal(0.02), ("null",)), (d,), cfg.param_dtype)
            self.null_text_states = self.param(
                "null_text_states", partitioned(_normal(0.02), ("length", "null")), (t, ds),
                cfg.param_dtype)
        elif cfg.null_cond == "buffer":
            self.null_text_emb = self.variable(
                "buffers", "null_text_emb", partitioned(nn.initializers.zeros, ("null",)), None,
                (d,), jnp.float32).value
            self.null_text_states = self.variable(
                "buffers", "null_text_states",
                partitioned(nn.initializers.zeros, ("length", "null")), None, (t, ds),
                jnp.float32).value
            self._null_mask = self.variable(
                "buffers", "null_text_mask", partitioned(_ones_bool, ("length",)), None, (t,),
                jnp.bool_)
        else:
            raise ValueError(f"null_cond must be 'learned' or 'buffer', got {cfg.null_cond!r}")

    # ---- normalisation ---------------------------------------------------------------------
    def normalize(self, x: Array) -> Array:
        """``[..., D]`` raw CLIP image embedding -> normalised."""
        return (x - self.clip_mean.value) / self.clip_std.value

    def denormalize(self, x: Array) -> Array:
        """``[..., D]`` normalised -> raw CLIP image embedding."""
        return x * self.clip_std.value + self.clip_mean.value

    def null_condition(self) -> tuple[Array, Array, Array]:
        """``(text_emb [D], text_states [T, Ds], text_mask [T] bool)`` used for dropped rows."""
        t = self.config.num_text_tokens
        if self.config.null_cond == "learned":
            return self.null_text_emb, self.null_text_states, jnp.ones((t,), bool)
        return self.null_text_emb, self.null_text_states, self._null_mask.value

    # ---- forward ---------------------------------------------------------------------------
    def __call__(
        self,
        x_t: Array,
        t: Array,
        text_emb: Array,
        text_states: Array,
        text_mask: Optional[Array] = None,
        drop: Optional[Array] = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ):
        cfg = self.config
        b = x_t.shape[0]
        nt = cfg.num_text_tokens
        if text_states.shape[1:] != (nt, cfg.states_dim):
            raise ValueError(f"text_states must be [B, {nt}, {cfg.states_dim}], "
                             f"got {text_states.shape}")
        if text_mask is None:
            text_mask = jnp.ones((b, nt), bool)
        text_mask = text_mask.astype(bool)
        null_emb, null_states, null_mask = self.null_condition()
        if drop is not None:
            drop = jnp.asarray(drop, bool)
            text_emb = jnp.where(drop[:, None], null_emb[None].astype(text_emb.dtype), text_emb)
            text_states = jnp.where(drop[:, None, None],
                                    null_states[None].astype(text_states.dtype), text_states)
            text_mask = jnp.where(drop[:, None], null_mask[None], text_mask)

        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        t_emb = self.time_embed(timestep_embedding(t, cfg.width).astype(cfg.dtype))
        seq = jnp.concatenate(
            [
                self.text_enc_proj(text_states),
                self.text_emb_proj(text_emb)[:, None],
                t_emb[:, None],
                self.clip_img_proj(x_t)[:, None],
                jnp.broadcast_to(self.prd_emb.astype(cfg.dtype), (b, 1, cfg.width)),
            ],
            axis=1,
        ).astype(cfg.dtype)
        seq = seq + self.positional_embedding.astype(cfg.dtype)[None]

        keys_valid = jnp.concatenate([text_mask, jnp.ones((b, NUM_EXTRA_TOKENS), bool)], axis=1)
        mask = causal_mask(cfg.seq_len) & keys_valid[:, None, None, :]  # [B, 1, L, L]
        h = self.transformer(seq, mask, deterministic)
        if cfg.final_ln:
            h = self.final_ln(h)
        out = self.out_proj(h[:, -1]).astype(jnp.float32)
        if return_hidden:
            return out, h
        return out


def _ones_bool(key, shape, dtype=jnp.bool_):
    del key
    return jnp.ones(shape, dtype)


# ---- helpers on variable pytrees ------------------------------------------------------------

def init_prior(config: PriorConfig, rng: Array, batch_size: int = 1):
    """Initialise the prior's variables ``{'params', 'buffers'}`` (logically boxed).

    Wrap in ``jax.eval_shape`` for abstract (sharded) initialisation.
    """
    b, d, t = batch_size, config.clip_dim, config.num_text_tokens
    return DiffusionPrior(config).init(
        rng,
        jnp.zeros((b, d), jnp.float32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, d), jnp.float32),
        jnp.zeros((b, t, config.states_dim), jnp.float32),
        jnp.ones((b, t), bool),
        jnp.zeros((b,), bool),
    )


def _unbox(tree):
    return nn.meta.unbox(tree)


def normalize(buffers, x: Array) -> Array:
    """``(x [..., D] - clip_mean) / clip_std`` with ``buffers = variables['buffers']``."""
    buffers = _unbox(buffers)
    return (x - buffers["clip_mean"]) / buffers["clip_std"]


def denormalize(buffers, x: Array) -> Array:
    """``x [..., D] * clip_std + clip_mean`` with ``buffers = variables['buffers']``."""
    buffers = _unbox(buffers)
    return x * buffers["clip_std"] + buffers["clip_mean"]


def _replace_buffer(variables, name: str, value):
    """Return ``variables`` with ``buffers[name]`` replaced (keeps a logical-axis box if any)."""
    buffers = dict(variables["buffers"])
    old = buffers[name]
    value = jnp.asarray(value, dtype=nn.meta.unbox(old).dtype)
    if value.shape != nn.meta.unbox(old).shape:
        raise ValueError(f"buffer {name}: expected shape {nn.meta.unbox(old).shape}, "
                         f"got {value.shape}")
    buffers[name] = old.replace_boxed(value) if isinstance(old, nn.meta.AxisMetadata) else value
    out = dict(variables)
    out["buffers"] = buffers
    return out


def set_clip_stats(variables, mean: Array, std: Array):
    """Store the image-embedding normalisation ``mean [D]``, ``std [D]`` (returns new variables)."""
    variables = _replace_buffer(variables, "clip_mean", jnp.reshape(mean, (-1,)))
    return _replace_buffer(variables, "clip_std", jnp.reshape(std, (-1,)))


def set_null_condition(variables, text_emb: Array, text_states: Array, text_mask: Array):
    """Store the empty-caption encoding (``null_cond='buffer'``): ``text_emb [D]``,
    ``text_states [T, Ds]``, ``text_mask [T]`` (returns new variables)."""
    variables = _replace_buffer(variables, "null_text_emb", jnp.reshape(text_emb, (-1,)))
    variables = _replace_buffer(variables, "null_text_states", text_states)
    return _replace_buffer(variables, "null_text_mask", jnp.asarray(text_mask, bool))


def count_params(tree) -> int:
    """Number of scalars in a (possibly abstract / boxed) pytree."""
    leaves = jax.tree_util.tree_leaves(_unbox(tree))
    return int(sum(math.prod(x.shape) for x in leaves))


# ---- sampling helpers -----------------------------------------------------------------------

def select_best(candidates: Array, text_emb: Array, cosine: bool = False) -> Array:
    """Keep, per row, the candidate with the highest dot product with the text embedding.

    Args:
      candidates: ``[B, K, D]`` image embeddings (paper: K = 2 prior samples).
      text_emb: ``[B, D]`` CLIP text embeddings.
      cosine: compare L2-normalised embeddings instead of raw dot products.
    Returns:
      ``[B, D]``.
    """
    c, tx = candidates, text_emb
    if cosine:
        c = c / jnp.linalg.norm(c, axis=-1, keepdims=True)
        tx = tx / jnp.linalg.norm(tx, axis=-1, keepdims=True)
    scores = jnp.einsum("bkd,bd->bk", c.astype(jnp.float32), tx.astype(jnp.float32))
    idx = jnp.argmax(scores, axis=-1)
    return jnp.take_along_axis(candidates, idx[:, None, None], axis=1)[:, 0]


def split_fused_qkv(weight, bias, num_heads: int) -> dict:
    """Split a Karlo / GLIDE-xf fused ``c_qkv`` (PyTorch Linear ``weight [3W, W]``,
    ``bias [3W]``) into our ``{'query'|'key'|'value': {'kernel' [W, H, Dh], 'bias' [H, Dh]}}``.

    The fused output is viewed as ``[..., H, 3 * Dh]`` and split into q, k, v along the last
    axis (head-major), so row ``h * 3 * Dh + s * Dh + c`` belongs to head ``h``, part ``s``.
    numpy in, numpy out.
    """
    import numpy as np

    weight, bias = np.asarray(weight), np.asarray(bias)
    three_w, w = weight.shape
    dh = w // num_heads
    if three_w != 3 * w or dh * num_heads != w:
        raise ValueError(f"expected weight [3W, W] with W divisible by {num_heads}, "
                         f"got {weight.shape}")
    wr = weight.reshape(num_heads, 3, dh, w)
    br = bias.reshape(num_heads, 3, dh)
    return {name: {"kernel": wr[:, s].transpose(2, 0, 1), "bias": br[:, s]}
            for s, name in enumerate(("query", "key", "value"))}


def drop_mask(rng: Array, batch_size: int, p: float) -> Array:
    """``[B]`` bool, True with probability ``p`` (text dropped for classifier-free guidance)."""
    return jax.random.bernoulli(rng, p, (batch_size,))
