"""Exponential moving average of parameters.

``ema <- decay * ema + (1 - decay) * params`` after every applied update. With constant params
``p`` and start value ``e0``, after ``n`` updates ``ema = p + decay**n * (e0 - p)``.
Optionally the decay warms up as ``min(decay, (1 + n) / (10 + n))`` (n = updates so far) so early
averages are not dominated by the random init.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp

from unclip_jax.train.optim import dataclass_from_config

PyTree = Any
DecayFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """decay: the EMA decay (paper-scale diffusion models use 0.9999). warmup: use
    ``min(decay, (1 + n) / (10 + n))``. enabled: keep an EMA copy at all."""

    decay: float = 0.9999
    warmup: bool = False
    enabled: bool = True

    @classmethod
    def from_config(cls, cfg: Union["EmaConfig", Mapping[str, Any], Any]) -> "EmaConfig":
        return dataclass_from_config(cls, cfg, "EMA")


def ema_decay_fn(cfg) -> Optional[DecayFn]:
    """``n -> decay`` for ``cfg`` (an ``EmaConfig``, mapping, float, or None = no EMA)."""
    if cfg is None:
        return None
    if isinstance(cfg, (int, float)):
        cfg = EmaConfig(decay=float(cfg))
    cfg = EmaConfig.from_config(cfg)
    if not cfg.enabled:
        return None
    decay = float(cfg.decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    if cfg.warmup:
        def fn(n):
            n = jnp.asarray(n, jnp.float32)
            return jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        return fn
    return lambda n: jnp.asarray(decay, jnp.float32)


def ema_update(ema_params: PyTree, params: PyTree, decay: Union[float, jax.Array]) -> PyTree:
    """``decay * ema + (1 - decay) * params``, leaf-wise, in each EMA leaf's dtype."""
    decay = jnp.asarray(decay, jnp.float32)

    def one(e, p):
        out = decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
        return out.astype(e.dtype)

    return jax.tree.map(one, ema_params, params)
