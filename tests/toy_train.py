"""A tiny partitioned model and a deterministic data stream for the parallel / train /
checkpoint tests (not a test module itself)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.models.layers import Dense, Transformer
from unclip_jax.train.state import TrainState

SEQ = 4


class ToyModel(nn.Module):
    """``[B, L, width] -> [B, L, out]``: a pre-LN transformer plus a Dense head."""

    width: int = 16
    num_layers: int = 1
    num_heads: int = 2
    out: int = 4

    @nn.compact
    def __call__(self, x):
        h = Transformer(self.num_layers, self.num_heads, name="transformer")(x)
        return Dense(self.out, ("embed", "vocab"), name="head")(h)


def toy_batch(step: int, batch_size: int = 8, width: int = 16, out: int = 4) -> dict:
    """Batch number ``step`` of a fixed stream: ``x [B, L, width]``, ``y [B, L, out]``."""
    rs = np.random.default_rng(1000 + int(step))
    return {
        "x": rs.standard_normal((batch_size, SEQ, width)).astype(np.float32),
        "y": rs.standard_normal((batch_size, SEQ, out)).astype(np.float32),
    }


def make_loss_fn(model: ToyModel, noise: float = 0.0):
    """MSE loss; with ``noise`` > 0 the input is jittered by the step RNG (tests RNG resume)."""

    def loss_fn(params, batch, rng):
        x = batch["x"]
        if noise:
            x = x + noise * jax.random.normal(rng, x.shape, x.dtype)
        pred = model.apply({"params": params}, x.astype(jax.tree.leaves(params)[0].dtype))
        loss = jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)
        return loss, {"pred_mean": jnp.mean(pred)}

    return loss_fn


def make_init_fn(model: ToyModel, optimizer, use_ema: bool = True):
    """``rng -> boxed TrainState`` (for ``parallel.sharded_init`` / ``jax.eval_shape``)."""

    def init_fn(rng):
        x = jnp.zeros((1, SEQ, model.width), jnp.float32)
        params = model.init(rng, x)["params"]
        return TrainState.create(params, optimizer, rng, use_ema=use_ema)

    return init_fn


def to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)
