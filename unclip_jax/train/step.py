"""A generic train step: loss -> grads -> (skip if non-finite) -> optax update -> EMA; and the
matching eval step: loss (and aux metrics) of the EMA params on a batch, no update.

``loss_fn(params, batch, rng) -> loss`` or ``-> (loss, aux)`` where ``loss`` is a scalar and
``aux`` a dict of scalar metrics. ``params`` arrive cast to the compute dtype (bf16 on
accelerators); the master params, gradients and optimizer state stay fp32 because the cast
happens inside the differentiated function. ``rng`` is ``fold_in(state.rng, state.step)``
(raw ``uint32[2]``), so a resumed run draws the same noise.

Metrics of one call (all scalars, replicated):
  loss       the loss of this batch (NaN / inf when it was not finite)
  grad_norm  global L2 norm of this batch's gradient (before clipping / accumulation)
  lr         learning rate of the most recent applied update (``optim.learning_rate_from_state``)
  skipped    1 when this call's update was skipped (non-finite loss or gradient), else 0
  + aux      whatever ``loss_fn`` returned
Counters: see ``state.py`` (``step`` always +1, ``skipped`` +1 on a skipped call).

The eval step (``make_eval_step`` / ``jit_eval_step``) returns the same ``loss`` + aux metrics
for ``state.ema_params`` (``state.params`` without EMA) in the train step's compute dtype, with
the deterministic rng ``eval_rng(state.rng, batch_index)``: the i-th eval batch gets the same
noise at every eval, so evals at different steps are comparable.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax.parallel.mesh import BATCH_AXES, mesh_context
from unclip_jax.train.ema import DecayFn, ema_decay_fn, ema_update
from unclip_jax.train.optim import (
    applied_update_count,
    learning_rate_from_state,
    update_was_applied,
)
from unclip_jax.train.state import TrainState

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], Union[jax.Array, tuple[jax.Array, dict]]]
StepFn = Callable[[TrainState, PyTree], tuple[TrainState, dict]]
EvalFn = Callable[[TrainState, PyTree, jax.Array], dict]

# fold_in tag of the eval rng stream (train steps fold in the step number, 0, 1, 2, ...; eval
# folds in this tag first, then the eval batch index, so the two streams never share a key)
EVAL_RNG_TAG = 0x6576616C  # "eval"


def cast_floating(tree: PyTree, dtype) -> PyTree:
    """Cast the floating-point leaves of ``tree`` to ``dtype`` (ints / keys untouched)."""
    def one(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(one, tree)


def _select(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    ema_decay: Union[None, float, DecayFn, Any] = None,
                    compute_dtype=jnp.float32) -> StepFn:
    """Build ``train_step(state, batch) -> (state, metrics)`` (pure; jit it with
    ``jit_train_step``).

    Args:
      loss_fn: ``(params_in_compute_dtype, batch, rng) -> loss | (loss, aux)``.
      optimizer: the optax transformation that built ``state.opt_state``.
      ema_decay: None (no EMA; ``state.ema_params`` is left as is), a float, an
        ``ema.EmaConfig`` / mapping, or a callable ``n_updates -> decay``. The EMA moves only on
        calls whose update was applied (finite, and the k-th micro-batch under accumulation),
        and ``n_updates`` counts those applied updates (``optim.applied_update_count``), not
        micro-batches, so an EMA warmup runs over updates.
      compute_dtype: dtype the params are cast to inside the loss (e.g. ``jnp.bfloat16``).

    A call whose loss or gradient norm is not finite leaves params, optimizer state and EMA
    unchanged, increments ``step`` and ``skipped``, and reports ``skipped = 1``.
    """
    decay_fn = ema_decay if callable(ema_decay) else ema_decay_fn(ema_decay)

    def compute_loss(params, batch, rng):
        out = loss_fn(cast_floating(params, compute_dtype), batch, rng)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        return jnp.asarray(loss, jnp.float32), aux

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        rng = state.step_rng()
        (loss, aux), grads = grad_fn(state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.logical_and(jnp.isfinite(loss), jnp.isfinite(grad_norm))

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if decay_fn is not None and ema_params is not None:
            n_updates = applied_update_count(state.opt_state)
            if n_updates is None:  # an optimizer without a count: one update per finite call
                n_updates = state.step - state.skipped
            decay = decay_fn(n_updates)
            ema_params = _select(update_was_applied(opt_state),
                                 ema_update(ema_params, params, decay), ema_params)

        params = _select(finite, params, state.params)
        opt_state = _select(finite, opt_state, state.opt_state)
        if ema_params is not None:
            ema_params = _select(finite, ema_params, state.ema_params)
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
            skipped=state.skipped + skipped)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": learning_rate_from_state(opt_state),
            "skipped": skipped,
        }
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in dict(aux).items()})
        return new_state, metrics

    return train_step


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _default_batch_sharding(mesh: Mesh, batch_sharding: Optional[PyTree]) -> PyTree:
    if batch_sharding is None:
        return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return batch_sharding


def _with_mesh(jitted, mesh: Mesh, flax_rules: bool):
    """``jitted`` called and lowered under ``mesh_context(mesh, flax_rules)``."""
    def call(*args):
        with mesh_context(mesh, flax_rules=flax_rules):
            return jitted(*args)

    def lower(*args):
        with mesh_context(mesh, flax_rules=flax_rules):
            return jitted.lower(*args)

    call.lower = lower
    call.jitted = jitted
    return call


def jit_train_step(step_fn: StepFn, mesh: Mesh, state_shardings: PyTree,
                   batch_sharding: Optional[PyTree] = None, donate: bool = True,
                   flax_rules: bool = False):
    """``jax.jit(step_fn)`` with state in/out shardings, batch sharding and donated state.

    Args:
      step_fn: ``(state, batch) -> (state, metrics)`` (e.g. from ``make_train_step``).
      mesh: the device mesh; ``parallel.mesh_context(mesh, flax_rules)`` (``jax.set_mesh``, and
        flax's logical axis rules only when ``flax_rules``; see ``mesh_context`` for why they
        are off by default) is entered around each call and ``lower``, so models may use
        sharding constraints (``parallel.constrain``).
      state_shardings: ``TrainState`` of ``NamedSharding`` s (e.g. from ``sharded_init(...,
        return_shardings=True)``).
      batch_sharding: a sharding (prefix) for the batch; default: leading dim over
        ``('data', 'fsdp')`` for every leaf (pass ``parallel.batch_shardings(batch, mesh)`` when
        the batch has scalar leaves or leaves the batch axes do not divide).
      donate: donate the input state's buffers to the output state.
      flax_rules: also enter ``nn.logical_axis_rules`` (for models calling
        ``nn.with_logical_constraint``).

    Returns a callable ``(state, batch) -> (state, metrics)`` with ``.lower(state, batch)`` and
    ``.jitted`` (the underlying ``jax.jit`` object). Metrics come back replicated.
    """
    jitted = jax.jit(step_fn,
                     in_shardings=(state_shardings, _default_batch_sharding(mesh, batch_sharding)),
                     out_shardings=(state_shardings, _replicated(mesh)),
                     donate_argnums=(0,) if donate else ())
    return _with_mesh(jitted, mesh, flax_rules)


def eval_rng(base_rng: jax.Array, batch_index: Union[int, jax.Array]) -> jax.Array:
    """The eval rng of eval batch ``batch_index``: ``fold_in(fold_in(base_rng, EVAL_RNG_TAG),
    batch_index)`` (raw ``uint32[2]``); independent of the train step."""
    return jax.random.fold_in(jax.random.fold_in(base_rng, EVAL_RNG_TAG), batch_index)


def make_eval_step(loss_fn: LossFn, compute_dtype=jnp.float32, use_ema: bool = True) -> EvalFn:
    """Build ``eval_step(state, batch, batch_index) -> metrics`` (pure; jit it with
    ``jit_eval_step``).

    Args:
      loss_fn: the train step's ``(params_in_compute_dtype, batch, rng) -> loss | (loss, aux)``.
      compute_dtype: the train step's compute dtype (params are cast to it, as in training).
      use_ema: evaluate ``state.ema_params`` when the state has them (else ``state.params``).

    ``batch_index``: int32 scalar, the position of the batch in the eval set; the rng is
    ``eval_rng(state.rng, batch_index)``. Metrics: ``loss`` (float32 scalar) + ``aux`` (float32
    scalars). The state is only read.
    """
    def eval_step(state: TrainState, batch: PyTree, batch_index: jax.Array) -> dict:
        params = state.ema_params if use_ema and state.ema_params is not None else state.params
        out = loss_fn(cast_floating(params, compute_dtype), batch,
                      eval_rng(state.rng, batch_index))
        loss, aux = out if isinstance(out, tuple) else (out, {})
        metrics = {"loss": jnp.asarray(loss, jnp.float32)}
        metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in dict(aux).items()})
        return metrics

    return eval_step


def jit_eval_step(eval_fn: EvalFn, mesh: Mesh, state_shardings: PyTree,
                  batch_sharding: Optional[PyTree] = None, flax_rules: bool = False):
    """``jax.jit(eval_fn)`` with the train step's state and batch shardings; the state is not
    donated (training goes on with it). Arguments as for ``jit_train_step``.

    Returns a callable ``(state, batch, batch_index=0) -> metrics`` (replicated scalars) with
    ``.lower`` and ``.jitted``.
    """
    jitted = jax.jit(eval_fn,
                     in_shardings=(state_shardings, _default_batch_sharding(mesh, batch_sharding),
                                   _replicated(mesh)),
                     out_shardings=_replicated(mesh))
    wrapped = _with_mesh(jitted, mesh, flax_rules)

    def call(state, batch, batch_index=0):
        return wrapped(state, batch, jnp.asarray(batch_index, jnp.int32))

    call.lower = lambda state, batch, batch_index=0: wrapped.lower(
        state, batch, jnp.asarray(batch_index, jnp.int32))
    call.jitted = jitted
    return call
