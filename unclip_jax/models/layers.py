"""Layers shared by every model: partitioned Dense / LayerNorm, timestep embedding, attention,
pre-LN transformer blocks.

Conventions: activations are ``[B, L, D]`` for sequences and ``[B, H, W, C]`` for images (NHWC).
Every parameter carries logical axis names (see ``unclip_jax/parallel/rules.py``); ``dtype`` is
the compute dtype (bf16 on accelerators), ``param_dtype`` the storage dtype (fp32).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.parallel.rules import check_logical_names

Dtype = Any
Array = jax.Array

default_kernel_init = nn.initializers.lecun_normal()


def partitioned(init: Callable, axes: Sequence[Optional[str]]) -> Callable:
    """Wrap an initializer with logical axis names (checked against the rules)."""
    check_logical_names(axes, where="a parameter annotation")
    return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
    """``nn.Dense`` whose kernel ``[in, out]`` and bias ``[out]`` carry logical axis names."""

    features: int
    kernel_axes: tuple[Optional[str], Optional[str]] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.Dense(
            self.features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(self.kernel_init, self.kernel_axes),
            bias_init=partitioned(nn.initializers.zeros, (self.kernel_axes[1],)),
            name="dense",
        )(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; scale/bias logical axis ``norm`` (replicated)."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.LayerNorm(
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=self.use_bias,
            use_scale=self.use_scale,
            scale_init=partitioned(nn.initializers.ones, ("norm",)),
            bias_init=partitioned(nn.initializers.zeros, ("norm",)),
            name="ln",
        )(x)


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal timestep embedding as in guided-diffusion: ``[cos, sin]``.

    Args:
      t: ``[B]`` timesteps (int or float; fractional allowed).
      dim: output width.
    Returns:
      ``[B, dim]`` float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def quick_gelu(x: Array) -> Array:
    """CLIP's activation: ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def causal_mask(length: int) -> Array:
    """``[1, 1, L, L]`` boolean mask, True where query i may attend key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention with separate q / k / v / out projections.

    ``__call__(x [B, L, D], mask [B|1, 1|H, L, L] bool (True = attend) or None) -> [B, L, D]``.
    Projection kernels are ``[D, heads, head_dim]`` (q/k/v) and ``[heads, head_dim, D]`` (out).
    """

    num_heads: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def proj(name):
            return nn.DenseGeneral(
                (self.num_heads, head_dim),
                axis=-1,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(self.kernel_init, ("embed", "heads", "kv")),
                bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")),
                name=name,
            )

        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # [B, L, H, Dh]
        out = dot_product_attention(q, k, v, mask=mask, dtype=self.dtype)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            use_bias=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(self.kernel_init, ("heads", "kv", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)


ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "auto")


def dot_product_attention(
    q: Array, k: Array, v: Array, mask: Optional[Array] = None, dtype: Dtype = jnp.float32,
    impl: str = "einsum",
) -> Array:
    """Softmax attention. ``q [B, L, H, Dh]``, ``k, v [B, S, H, Dh]``, ``mask`` broadcastable to
    ``[B, H, L, S]`` (True = attend). Returns ``[B, L, H, Dh]``.

    ``impl``: ``'einsum'`` (ours: fp32 logits ``[B, H, L, S]`` materialised, softmax in fp32),
    or ``jax.nn.dot_product_attention`` with ``implementation`` ``'xla'``, ``'cudnn'`` (fused
    flash attention on NVIDIA GPUs; needs bf16 / fp16 and ``Dh`` a multiple of 8 up to 128) or
    ``'auto'`` (JAX picks). Rows whose keys are all masked are undefined for every impl."""
    if impl == "einsum":
        scale = 1.0 / math.sqrt(q.shape[-1])
        logits = jnp.einsum("blhd,bshd->bhls", q, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
        return jnp.einsum("bhls,bshd->blhd", weights, v.astype(dtype))
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask,
        implementation=None if impl == "auto" else impl)


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``: ``[..., D] -> [..., D]`` with hidden width ``hidden``."""

    hidden: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        h = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc1")(x)
        h = get_activation(self.activation)(h)
        return Dense(width, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc2")(h)


class TransformerBlock(nn.Module):
    """Pre-LN residual block: ``x + attn(ln1(x)); x + mlp(ln2(x))`` (CLIP, GLIDE xf, Karlo prior).

    ``__call__(x [B, L, D], mask, deterministic=True) -> [B, L, D]``. ``dropout`` (default 0, off)
    is residual dropout on the attention and MLP outputs; it needs a ``'dropout'`` rng when
    ``deterministic=False``. The MLP is ``mlp_dim`` wide when given (HF CLIP's
    ``intermediate_size``, not always a multiple of the width), else ``mlp_ratio * width``.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    ln_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout: float = 0.0
    mlp_dim: Optional[int] = None

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None, deterministic: bool = True) -> Array:
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(self.dropout, deterministic=deterministic or self.dropout == 0.0)
        h = LayerNorm(self.ln_epsilon, name="ln1", **kw)(x)
        x = x + drop(MultiHeadAttention(self.num_heads, name="attn", **kw)(h, mask))
        h = LayerNorm(self.ln_epsilon, name="ln2", **kw)(x)
        hidden = self.mlp_dim or int(width * self.mlp_ratio)
        x = x + drop(MLP(hidden, self.activation, name="mlp", **kw)(h))
        return x


class Transformer(nn.Module):
    """A stack of ``TransformerBlock`` s.

    ``__call__(x [B, L, D], mask, deterministic=True) -> [B, L, D]``; ``dropout`` and
    ``mlp_dim`` as in the block.
    """

    num_layers: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    ln_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout: float = 0.0
    mlp_dim: Optional[int] = None

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None, deterministic: bool = True) -> Array:
        for i in range(self.num_layers):
            x = TransformerBlock(
                self.num_heads, self.mlp_ratio, self.activation, self.ln_epsilon,
                dtype=self.dtype, param_dtype=self.param_dtype, dropout=self.dropout,
                mlp_dim=self.mlp_dim, name=f"layers_{i}",
            )(x, mask, deterministic)
        return x
