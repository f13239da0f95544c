"""Optimizers from a config: AdamW (or SGD) + warmup-cosine LR + global-norm clipping +
gradient accumulation.

``make_optimizer(cfg)`` builds::

    MultiSteps(                                   # only when accum_steps > 1
      inject_hyperparams(                         # the LR lives in the state -> metrics
        chain(clip_by_global_norm(clip), adamw(lr, b1, b2, eps, wd, mask=ndim>1))))

Under ``MultiSteps`` each call to the train step is one micro-batch; gradients are averaged
over ``accum_steps`` calls and the inner optimizer (clipping included, on the averaged gradient)
runs on every ``accum_steps``-th call. With equal-sized micro-batches and a mean loss this equals
one step on the concatenated batch.

``cfg`` may be an ``OptimizerConfig``, a dict or an ``ml_collections.ConfigDict`` with a subset
of its fields; unknown fields raise.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import optax


def dataclass_from_config(cls, cfg, what: str):
    """``cls`` from an instance, a mapping or an ``ml_collections.ConfigDict``; a key that is
    not a field of ``cls`` raises ``ValueError`` naming it (``what`` names the config)."""
    if isinstance(cfg, cls):
        return cfg
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    cfg = dict(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"unknown {what} config fields {unknown}; known: {sorted(fields)}")
    return cls(**cfg)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters.

    name: ``'adamw'`` or ``'sgd'`` (plain / momentum SGD; used by exactness tests).
    learning_rate: peak learning rate.
    schedule: ``'warmup_cosine'`` (linear warmup from ``init_lr_ratio * lr`` to ``lr`` over
      ``warmup_steps``, then cosine to ``end_lr_ratio * lr`` at ``total_steps``) or
      ``'constant'`` (linear warmup, then flat).
    warmup_steps, total_steps: in optimizer updates (not micro-batches; the trainer's
      ``TrainConfig.optimizer()`` converts its step counts: ``steps // accum_steps``).
    b1, b2, eps: Adam moments. weight_decay: decoupled (AdamW), applied to params with
      ``ndim > 1`` only unless ``decay_all_params``.
    momentum, nesterov: SGD only (momentum 0 = plain SGD).
    grad_clip_norm: global-norm clip of the (accumulated) gradient; None or <= 0 disables it.
    accum_steps: micro-batches per update (``optax.MultiSteps``); 1 disables accumulation.
    """

    name: str = "adamw"
    learning_rate: float = 1e-4
    schedule: str = "warmup_cosine"
    warmup_steps: int = 0
    total_steps: int = 100_000
    init_lr_ratio: float = 0.0
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_all_params: bool = False
    momentum: float = 0.0
    nesterov: bool = False
    grad_clip_norm: Optional[float] = 1.0
    accum_steps: int = 1

    @classmethod
    def from_config(cls, cfg: Union["OptimizerConfig", Mapping[str, Any], Any]
                    ) -> "OptimizerConfig":
        """From an ``OptimizerConfig``, a mapping, or an ``ml_collections.ConfigDict``."""
        return dataclass_from_config(cls, cfg, "optimizer")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_schedule(cfg) -> Callable[[jax.Array], jax.Array]:
    """The learning-rate schedule ``count -> lr`` of ``cfg`` (see ``OptimizerConfig``)."""
    cfg = OptimizerConfig.from_config(cfg)
    peak = float(cfg.learning_rate)
    init = peak * cfg.init_lr_ratio
    if cfg.schedule == "warmup_cosine":
        if cfg.total_steps <= cfg.warmup_steps:
            raise ValueError(f"total_steps ({cfg.total_steps}) must exceed warmup_steps "
                             f"({cfg.warmup_steps}) for the warmup_cosine schedule")
        if cfg.warmup_steps == 0:
            return optax.cosine_decay_schedule(peak, cfg.total_steps, alpha=cfg.end_lr_ratio)
        return optax.warmup_cosine_decay_schedule(
            init_value=init, peak_value=peak, warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.total_steps, end_value=peak * cfg.end_lr_ratio)
    if cfg.schedule == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(init, peak, cfg.warmup_steps), optax.constant_schedule(peak)],
            [cfg.warmup_steps])
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose 'warmup_cosine' or 'constant'")


def _decay_mask(params):
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optax optimizer of ``cfg`` (see the module docstring for its structure)."""
    cfg = OptimizerConfig.from_config(cfg)
    if cfg.accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {cfg.accum_steps}")
    if cfg.name not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose 'adamw' or 'sgd'")
    clip = cfg.grad_clip_norm

    def inner(learning_rate):
        parts = []
        if clip is not None and clip > 0:
            parts.append(optax.clip_by_global_norm(float(clip)))
        if cfg.name == "adamw":
            parts.append(optax.adamw(
                learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                mask=None if cfg.decay_all_params else _decay_mask))
        else:
            parts.append(optax.sgd(learning_rate, momentum=cfg.momentum or None,
                                   nesterov=cfg.nesterov))
        return optax.chain(*parts)

    opt = optax.inject_hyperparams(inner)(learning_rate=make_schedule(cfg))
    if cfg.accum_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.accum_steps).gradient_transformation()
    return opt


def _is_inject_state(x) -> bool:
    return isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def learning_rate_from_state(opt_state) -> jax.Array:
    """The learning rate stored by ``inject_hyperparams`` in ``opt_state``: the value the schedule
    gave for the most recent applied update (for step 0: ``schedule(0)``). NaN if none."""
    for leaf in jax.tree.leaves(opt_state, is_leaf=_is_inject_state):
        if _is_inject_state(leaf) and "learning_rate" in leaf.hyperparams:
            return jnp.asarray(leaf.hyperparams["learning_rate"], jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)


def applied_update_count(opt_state) -> Optional[jax.Array]:
    """Int32 scalar: how many real parameter updates ``opt_state`` has applied (the count the
    LR schedule is indexed by). Under ``optax.MultiSteps``: its ``gradient_step`` (one per
    ``accum_steps`` micro-batches); otherwise the ``inject_hyperparams`` count. None when
    ``opt_state`` has neither (an optimizer not built by ``make_optimizer``)."""
    if isinstance(opt_state, optax.MultiStepsState):
        return jnp.asarray(opt_state.gradient_step, jnp.int32)
    for leaf in jax.tree.leaves(opt_state, is_leaf=_is_inject_state):
        if _is_inject_state(leaf):
            return jnp.asarray(leaf.count, jnp.int32)
    return None


def update_was_applied(opt_state) -> jax.Array:
    """Bool scalar: did the last ``update`` apply a real parameter change? Always True without
    gradient accumulation; under ``optax.MultiSteps`` only on every ``k``-th micro-batch."""
    if isinstance(opt_state, optax.MultiStepsState):
        return jnp.logical_and(opt_state.mini_step == 0, opt_state.gradient_step > 0)
    return jnp.asarray(True)
