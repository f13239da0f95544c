"""Autoregressive prior: CLIP text -> quantised PCA codes of the CLIP image embedding.

unCLIP's AR prior (Ramesh et al. 2022, sec. 2.1): the image embedding ``z_i [D]`` is reduced to
its first ``k`` principal components (paper: 319 of 1024), each quantised into ``n`` buckets
(paper: 1024; see :mod:`unclip_jax.models.pca`), and a causal transformer predicts the ``k``
codes left to right. The sequence is::

    [caption token states (T, projected), CLIP text emb (projected), dot token, c_0 .. c_{k-2}]
     positions 0 .. T-1                    T                         T + 1      T + 2 .. T + k

length ``T + k + 1``. The output at the text-embedding position predicts the *dot token* (the
quantised cosine similarity ``<z_i, z_t> / |z_i| |z_t|``); the output at position ``T + 1 + j``
predicts code ``c_j``. Training is cross-entropy over the ``k + 1`` predicted tokens; the dot
token is teacher-forced from the data. At sampling the dot token is drawn from the model's own
predicted distribution restricted to its upper half (buckets at or above the predicted median),
as the paper conditions on "the top half" of dot products, then the codes are drawn with
temperature / top-p in one jitted ``lax.scan`` over the ``k`` positions (the full sequence is
recomputed every step, no KV cache: fine for small models, O(k^2) for large ones), and decoded
through the bucket centres and the PCA basis.

Classifier-free guidance: ``drop [B]`` replaces the caption states / text embedding by learned
null params (all null tokens attendable); ``guidance_scale`` in the sampler mixes logits
``l_u + s (l_c - l_u)``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.layers import Dense, LayerNorm, Transformer, causal_mask, partitioned
from unclip_jax.models.pca import (
    PCA,
    Quantizer,
    dequantize,
    fit_quantizer,
    project,
    quantize,
    reconstruct,
)

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class ARPriorConfig:
    """Autoregressive prior hyper-parameters.

    Attributes:
      clip_dim: pooled CLIP text embedding width (input).
      text_states_dim: caption token-state width (``None``: ``clip_dim``).
      num_text_tokens: caption length T.
      pca_dims: number of PCA components k predicted (paper 319).
      num_buckets: buckets per component n (paper 1024).
      dot_buckets: buckets of the text-image cosine similarity token.
      width, num_layers, num_heads, mlp_ratio, dropout, final_ln, ln_epsilon: transformer.
      dtype: compute dtype; param_dtype: storage dtype.
    """

    clip_dim: int = 1024
    text_states_dim: Optional[int] = None
    num_text_tokens: int = 77
    pca_dims: int = 319
    num_buckets: int = 1024
    dot_buckets: int = 64
    width: int = 2048
    num_layers: int = 20
    num_heads: int = 32
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    final_ln: bool = True
    ln_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def states_dim(self) -> int:
        return self.text_states_dim or self.clip_dim

    @property
    def seq_len(self) -> int:
        return self.num_text_tokens + self.pca_dims + 1

    @classmethod
    def tiny(cls, **kw) -> "ARPriorConfig":
        base = dict(clip_dim=16, num_text_tokens=4, pca_dims=6, num_buckets=16, dot_buckets=8,
                    width=32, num_layers=2, num_heads=2)
        return cls(**{**base, **kw})

    @classmethod
    def paper(cls, **kw) -> "ARPriorConfig":
        """unCLIP paper AR prior (~1B; ViT-H/16 D=1024; 319 x 1024 codes). Depth estimated."""
        base = dict(clip_dim=1024, num_text_tokens=77, pca_dims=319, num_buckets=1024,
                    dot_buckets=64, width=2048, num_layers=20, num_heads=32)
        return cls(**{**base, **kw})

    @classmethod
    def emoji(cls, **kw) -> "ARPriorConfig":
        """Suggested emoji-model AR prior (5.1M params) for a small CLIP (D=256)."""
        base = dict(clip_dim=256, text_states_dim=256, num_text_tokens=32, pca_dims=64,
                    num_buckets=256, dot_buckets=32, width=256, num_layers=6, num_heads=4,
                    dropout=0.1)
        return cls(**{**base, **kw})


class ARPrior(nn.Module):
    """Causal transformer over ``[caption states, text emb, dot token, codes]``.

    ``__call__(codes [B, k] int, dot [B] int, text_emb [B, D], text_states [B, T, Ds],
    text_mask [B, T] bool | None, drop [B] bool | None, deterministic=True)
    -> (dot_logits [B, dot_buckets], code_logits [B, k, num_buckets])``, float32.
    ``code_logits[:, j]`` depends only on the text, ``dot`` and ``codes[:, :j]``.
    """

    config: ARPriorConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        w = cfg.width
        emb_init = partitioned(nn.initializers.normal(0.02), ("vocab", "embed"))
        self.text_enc_proj = Dense(w, ("null", "embed"), **kw)
        self.text_emb_proj = Dense(w, ("null", "embed"), **kw)
        self.code_embed = nn.Embed(cfg.num_buckets, w, embedding_init=emb_init, **kw)
        self.dot_embed = nn.Embed(cfg.dot_buckets, w, embedding_init=emb_init, **kw)
        self.positional_embedding = self.param(
            "positional_embedding", partitioned(nn.initializers.normal(0.01), ("length", "embed")),
            (cfg.seq_len, w), cfg.param_dtype)
        self.null_text_emb = self.param(
            "null_text_emb", partitioned(nn.initializers.normal(0.02), ("null",)),
            (cfg.clip_dim,), cfg.param_dtype)
        self.null_text_states = self.param(
            "null_text_states", partitioned(nn.initializers.normal(0.02), ("length", "null")),
            (cfg.num_text_tokens, cfg.states_dim), cfg.param_dtype)
        self.transformer = Transformer(
            cfg.num_layers, cfg.num_heads, cfg.mlp_ratio, "gelu", cfg.ln_epsilon,
            dropout=cfg.dropout, **kw)
        if cfg.final_ln:
            self.final_ln = LayerNorm(cfg.ln_epsilon, **kw)
        self.code_head = Dense(cfg.num_buckets, ("embed", "vocab"), **kw)
        self.dot_head = Dense(cfg.dot_buckets, ("embed", "vocab"), **kw)

    def __call__(
        self,
        codes: Array,
        dot: Array,
        text_emb: Array,
        text_states: Array,
        text_mask: Optional[Array] = None,
        drop: Optional[Array] = None,
        deterministic: bool = True,
    ):
        cfg = self.config
        b, nt, k = codes.shape[0], cfg.num_text_tokens, cfg.pca_dims
        if codes.shape[1] != k:
            raise ValueError(f"codes must be [B, {k}], got {codes.shape}")
        if text_mask is None:
            text_mask = jnp.ones((b, nt), bool)
        text_mask = text_mask.astype(bool)
        if drop is not None:
            drop = jnp.asarray(drop, bool)
            text_emb = jnp.where(drop[:, None], self.null_text_emb[None].astype(text_emb.dtype),
                                 text_emb)
            text_states = jnp.where(drop[:, None, None],
                                    self.null_text_states[None].astype(text_states.dtype),
                                    text_states)
            text_mask = text_mask | drop[:, None]
        seq = jnp.concatenate(
            [
                self.text_enc_proj(text_states),
                self.text_emb_proj(text_emb)[:, None],
                self.dot_embed(dot)[:, None],
                self.code_embed(codes[:, :-1]),
            ],
            axis=1,
        ).astype(cfg.dtype)
        seq = seq + self.positional_embedding.astype(cfg.dtype)[None]
        keys_valid = jnp.concatenate([text_mask, jnp.ones((b, k + 1), bool)], axis=1)
        mask = causal_mask(cfg.seq_len) & keys_valid[:, None, None, :]
        h = self.transformer(seq, mask, deterministic)
        if cfg.final_ln:
            h = self.final_ln(h)
        dot_logits = self.dot_head(h[:, nt]).astype(jnp.float32)
        code_logits = self.code_head(h[:, nt + 1:]).astype(jnp.float32)
        return dot_logits, code_logits


def init_ar_prior(config: ARPriorConfig, rng: Array, batch_size: int = 1):
    """Initialise ``{'params'}`` (logically boxed); wrap in ``jax.eval_shape`` for abstract init."""
    b = batch_size
    return ARPrior(config).init(
        rng,
        jnp.zeros((b, config.pca_dims), jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, config.clip_dim), jnp.float32),
        jnp.zeros((b, config.num_text_tokens, config.states_dim), jnp.float32),
        jnp.ones((b, config.num_text_tokens), bool),
        jnp.zeros((b,), bool),
    )


# ---- targets and loss -----------------------------------------------------------------------

def cosine_similarity(a: Array, b: Array) -> Array:
    """``[..., D] x [..., D] -> [...]``."""
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return jnp.sum(a * b, axis=-1)


def fit_dot_quantizer(image_emb, text_emb, num_buckets: int, method: str = "quantile"
                      ) -> Quantizer:
    """1-d quantiser of the cosine similarities of paired ``image_emb [N, D]``, ``text_emb``."""
    sims = cosine_similarity(jnp.asarray(image_emb), jnp.asarray(text_emb))
    return fit_quantizer(jnp.asarray(sims)[:, None], num_buckets, method=method)


def encode_targets(pca: PCA, quantizer: Quantizer, dot_quantizer: Quantizer,
                   image_emb: Array, text_emb: Array) -> tuple[Array, Array]:
    """Training targets: ``(codes [B, k] int32, dot [B] int32)`` from ``image_emb [B, D]`` and
    ``text_emb [B, D]`` (``k = quantizer.num_dims``)."""
    coeffs = project(pca, image_emb, quantizer.num_dims)
    codes = quantize(quantizer, coeffs)
    dot = quantize(dot_quantizer, cosine_similarity(image_emb, text_emb)[:, None])[:, 0]
    return codes, dot


def decode_codes(pca: PCA, quantizer: Quantizer, codes: Array) -> Array:
    """``codes [B, k] -> image embedding [B, D]`` (bucket centres through the PCA basis)."""
    return reconstruct(pca, dequantize(quantizer, codes))


def ar_prior_loss(dot_logits: Array, code_logits: Array, dot: Array, codes: Array):
    """Mean cross-entropy over the ``k + 1`` predicted tokens (dot token + k codes).

    Returns ``(loss, {'loss', 'code_ce', 'dot_ce', 'code_acc'})``.
    """
    code_ce = -jnp.take_along_axis(jax.nn.log_softmax(code_logits), codes[..., None], -1)[..., 0]
    dot_ce = -jnp.take_along_axis(jax.nn.log_softmax(dot_logits), dot[:, None], -1)[:, 0]
    k = codes.shape[1]
    loss = jnp.mean((code_ce.sum(axis=1) + dot_ce) / (k + 1))
    acc = jnp.mean(jnp.argmax(code_logits, -1) == codes)
    return loss, {"loss": loss, "code_ce": code_ce.mean(), "dot_ce": dot_ce.mean(),
                  "code_acc": acc}


# ---- sampling -------------------------------------------------------------------------------

def top_p_filter(logits: Array, top_p: float) -> Array:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p`` (the most likely
    token always survives; ties at the cut survive); the rest get ``-inf``. ``[..., V]``."""
    if isinstance(top_p, (int, float)) and top_p >= 1.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_p = jnp.sort(probs, axis=-1)[..., ::-1]
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each sorted token
    keep_sorted = before < top_p
    # smallest kept probability = cut-off
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_p, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= cutoff, logits, -jnp.inf)


def top_half_mask(logits: Array) -> Array:
    """``[..., V]`` bool: buckets at or above the median of ``softmax(logits)`` (buckets ordered
    by value), i.e. where the CDF reaches 1/2."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    return cdf >= 0.5 - 1e-6


def sample_logits(rng: Array, logits: Array, temperature: float = 1.0, top_p: float = 1.0
                  ) -> Array:
    """Sample ``[B]`` int32 tokens from ``logits [B, V]`` with ``temperature`` and nucleus
    ``top_p`` (both may be traced); ``temperature == 0`` is argmax."""
    if isinstance(temperature, (int, float)) and temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.asarray(temperature, jnp.float32)
    scaled = top_p_filter(logits / jnp.maximum(temperature, 1e-30), top_p)
    sampled = jax.random.categorical(rng, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("model", "guidance_scale", "dot_top_half"))
def ar_sample(
    model: ARPrior,
    variables,
    rng: Array,
    text_emb: Array,
    text_states: Array,
    text_mask: Optional[Array] = None,
    dot: Optional[Array] = None,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    guidance_scale: float = 1.0,
    dot_top_half: bool = True,
) -> tuple[Array, Array]:
    """Sample ``(codes [B, k] int32, dot [B] int32)``; one jitted ``lax.scan`` over the codes.

    Args:
      model: an :class:`ARPrior` (static).
      variables: ``{'params': ...}``.
      rng: PRNG key.
      text_emb: ``[B, D]``; text_states: ``[B, T, Ds]``; text_mask: ``[B, T]`` bool or None.
      dot: ``[B]`` dot tokens to condition on; None samples them from the model (top half of
        the predicted distribution when ``dot_top_half``).
      temperature: 0 gives greedy decoding. top_p: nucleus mass (both traced: changing them
        does not recompile). guidance_scale (static): 1 = no classifier-free guidance (no
        unconditional pass).
    """
    cfg = model.config
    b, k = text_emb.shape[0], cfg.pca_dims
    if text_mask is None:
        text_mask = jnp.ones((b, cfg.num_text_tokens), bool)
    guided = guidance_scale != 1.0

    def logits_fn(codes, dot_tok):
        if not guided:
            return model.apply(variables, codes, dot_tok, text_emb, text_states, text_mask)
        two = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
        drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
        dl, cl = model.apply(variables, two(codes), two(dot_tok), two(text_emb),
                             two(text_states), two(text_mask), drop)
        mix = lambda x: x[b:] + guidance_scale * (x[:b] - x[b:])  # noqa: E731
        return mix(dl), mix(cl)

    rng_dot, rng_codes = jax.random.split(rng)
    codes = jnp.zeros((b, k), jnp.int32)
    if dot is None:
        dot_logits, _ = logits_fn(codes, jnp.zeros((b,), jnp.int32))
        if dot_top_half:
            dot_logits = jnp.where(top_half_mask(dot_logits), dot_logits, -jnp.inf)
        dot = sample_logits(rng_dot, dot_logits, temperature, top_p)
    dot = jnp.asarray(dot, jnp.int32)

    def step(codes, xs):
        j, key = xs
        _, code_logits = logits_fn(codes, dot)
        logits_j = jax.lax.dynamic_index_in_dim(code_logits, j, axis=1, keepdims=False)
        tok = sample_logits(key, logits_j, temperature, top_p)
        return jax.lax.dynamic_update_index_in_dim(codes, tok, j, axis=1), None

    codes, _ = jax.lax.scan(step, codes, (jnp.arange(k), jax.random.split(rng_codes, k)))
    return codes, dot
