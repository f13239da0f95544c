"""The train state: one pytree that holds everything a resumed run needs (bar data-iterator state,
which the checkpointer stores beside it).

Counters (documented contract, relied on by ``step.py`` and the tests):

* ``step``    number of train-step calls (batches consumed), finite or not. Data streams and the
              per-step RNG are indexed by it, so a resumed run sees the same batches and noise.
* ``skipped`` number of those calls whose update was skipped because the loss or a gradient was
              not finite. Skipped calls leave ``params``, ``opt_state`` and ``ema_params``
              unchanged, so the optimizer's own count (LR schedule) is ``step - skipped``
              (divided by the accumulation factor under gradient accumulation).
* ``rng``     a raw ``uint32[2]`` base key (``jax.random.PRNGKey``; raw so that orbax saves it as
              a plain array). It is never advanced: step ``s`` uses
              ``jax.random.fold_in(rng, s)``.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """``step: int32[]``, ``params``, ``opt_state``, ``ema_params`` (or None), ``rng: uint32[2]``,
    ``skipped: int32[]``. Params and optimizer state are fp32 (storage dtype)."""

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    ema_params: Optional[PyTree]
    rng: jax.Array
    skipped: jax.Array

    @classmethod
    def create(cls, params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array,
               use_ema: bool = True) -> "TrainState":
        """A fresh state at step 0.

        ``params`` may be boxed (``nn.Partitioned``; the boxes then propagate into the optimizer
        state and EMA, which is what ``parallel.sharded_init`` reads the shardings from) or plain.
        ``rng`` is a raw ``PRNGKey`` (a typed ``jax.random.key`` is converted to its key data).
        The EMA starts as a copy of ``params`` (a separate buffer, so donation is safe).
        """
        if _is_typed_key(rng):
            rng = jax.random.key_data(rng)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
            rng=jnp.asarray(rng, jnp.uint32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def step_rng(self) -> jax.Array:
        """The RNG key for the current step: ``fold_in(rng, step)`` (raw ``uint32[2]``)."""
        return jax.random.fold_in(self.rng, self.step)


def _is_typed_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
