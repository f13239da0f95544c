"""The generic train step: non-finite skipping, EMA, gradient accumulation, LR, bf16 compute,
global-norm clipping; and the eval step (EMA params, compute dtype, fixed rng, no donation)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unclip_jax.train import (
    EmaConfig,
    OptimizerConfig,
    TrainState,
    ema_update,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
)
from unclip_jax.parallel import batch_shardings, make_mesh

SGD = dict(name="sgd", learning_rate=0.1, schedule="constant", grad_clip_norm=None)


def _params():
    return {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 10.0,
            "b": jnp.ones((4,), jnp.float32)}


def linear_loss(params, batch, rng):
    """MSE of ``x @ w + b`` against ``y``; ``batch['scale']`` multiplies the loss (inf -> NaN
    grads). ``x [B, 3]``, ``y [B, 4]``. Aux reports whether the params arrived as bf16."""
    pred = batch["x"] @ params["w"] + params["b"]
    loss = jnp.mean((pred - batch["y"]) ** 2) * batch["scale"]
    return loss, {"w_is_bf16": jnp.asarray(params["w"].dtype == jnp.bfloat16, jnp.float32)}


def _batch(i, n=8, scale=1.0):
    rs = np.random.default_rng(i)
    return {"x": rs.standard_normal((n, 3)).astype(np.float32),
            "y": rs.standard_normal((n, 4)).astype(np.float32),
            "scale": np.float32(scale)}


def _close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def test_non_finite_loss_skips_update():
    opt = make_optimizer(dict(name="adamw", learning_rate=1e-2, schedule="constant"))
    state = TrainState.create(_params(), opt, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(linear_loss, opt, ema_decay=0.5))
    state, m = step(state, _batch(0))
    assert int(m["skipped"]) == 0 and int(state.step) == 1 and int(state.skipped) == 0
    before = jax.device_get(state)
    for bad in (np.inf, np.nan):
        state, m = step(state, _batch(1, scale=bad))
        assert int(m["skipped"]) == 1
        assert not np.isfinite(float(m["loss"]))
    # params, optimizer state (incl. its count) and EMA unchanged; counters moved
    for field in ("params", "opt_state", "ema_params", "rng"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, field), getattr(before, field))
    assert int(state.step) == 3 and int(state.skipped) == 2
    # a finite batch updates again, exactly as if the bad ones never happened
    state, m = step(state, _batch(2))
    assert int(m["skipped"]) == 0 and int(state.step) == 4 and int(state.skipped) == 2
    assert not np.array_equal(np.asarray(state.params["w"]), before.params["w"])
    ref = TrainState.create(_params(), opt, jax.random.PRNGKey(0))
    ref, _ = step(ref, _batch(0))
    ref, _ = step(ref, _batch(2))
    _close(state.params, ref.params, rtol=0, atol=0)
    _close(state.opt_state, ref.opt_state, rtol=0, atol=0)


def test_ema_closed_form_with_constant_params():
    decay, n = 0.9, 4
    opt = make_optimizer(SGD)
    def zero_loss(p, b, r):  # zero gradient (params stay put); NaN when b["scale"] is NaN
        return 0.0 * (jnp.sum(p["w"]) + jnp.sum(p["b"])) * b["scale"]

    state = TrainState.create(_params(), opt, jax.random.PRNGKey(0))
    e0 = jax.tree.map(lambda p: p + 1.0, state.params)
    state = state.replace(ema_params=e0)
    step = jax.jit(make_train_step(zero_loss, opt, ema_decay=EmaConfig(decay=decay)))
    for i in range(n):
        state, m = step(state, _batch(i))
    _close(state.params, _params(), rtol=0, atol=0)
    # ema_n = p + decay^n (e0 - p)
    _close(state.ema_params, jax.tree.map(lambda p: p + decay ** n, _params()), rtol=1e-6)
    # a skipped step does not move the EMA
    ema_before = jax.device_get(state.ema_params)
    state, m = step(state, _batch(9, scale=np.nan))
    assert int(m["skipped"]) == 1
    _close(state.ema_params, ema_before, rtol=0, atol=0)
    # the plain function
    _close(ema_update({"a": jnp.ones(2)}, {"a": jnp.zeros(2)}, 0.75), {"a": 0.75 * np.ones(2)})


def test_grad_accumulation_equals_big_batch():
    k, micro = 4, 2
    big = _batch(0, n=k * micro)
    opt1 = make_optimizer(SGD)
    s1 = TrainState.create(_params(), opt1, jax.random.PRNGKey(0), use_ema=False)
    s1, _ = jax.jit(make_train_step(linear_loss, opt1))(s1, big)

    optk = make_optimizer(dict(SGD, accum_steps=k))
    sk = TrainState.create(_params(), optk, jax.random.PRNGKey(0), use_ema=True)
    stepk = jax.jit(make_train_step(linear_loss, optk, ema_decay=0.5))
    for i in range(k):
        mb = {"x": big["x"][i * micro:(i + 1) * micro], "y": big["y"][i * micro:(i + 1) * micro],
              "scale": big["scale"]}
        sk, _ = stepk(sk, mb)
        if i < k - 1:  # nothing applied (params, EMA) until the k-th micro-batch
            _close(sk.params, _params(), rtol=0, atol=0)
            _close(sk.ema_params, _params(), rtol=0, atol=0)
    _close(sk.params, s1.params, rtol=1e-6, atol=1e-6)
    # EMA moved once: 0.5 * init + 0.5 * new params
    _close(sk.ema_params, jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, _params(), s1.params),
           rtol=1e-6, atol=1e-6)


def test_lr_metric_follows_warmup_cosine_schedule():
    cfg = OptimizerConfig(name="adamw", learning_rate=1e-3, warmup_steps=2, total_steps=6,
                          grad_clip_norm=1.0, weight_decay=0.01)
    opt = make_optimizer(cfg)
    sched = make_schedule(cfg)
    state = TrainState.create(_params(), opt, jax.random.PRNGKey(0), use_ema=False)
    step = jax.jit(make_train_step(linear_loss, opt))
    lrs = []
    for i in range(5):
        state, m = step(state, _batch(i))
        lrs.append(float(m["lr"]))
        assert float(m["grad_norm"]) > 0
    np.testing.assert_allclose(lrs, [float(sched(i)) for i in range(5)], rtol=1e-6)
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-3)
    assert float(sched(6)) == pytest.approx(0.0, abs=1e-9)


def test_bf16_compute_keeps_fp32_state():
    opt = make_optimizer(dict(name="adamw", learning_rate=1e-2, schedule="constant"))
    state = TrainState.create(_params(), opt, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(linear_loss, opt, ema_decay=0.9, compute_dtype=jnp.bfloat16))
    new, m = step(state, _batch(0))
    assert float(m["w_is_bf16"]) == 1.0  # the loss saw bf16 params
    for tree in (new.params, new.ema_params):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))
    mu = new.opt_state.inner_state[1][0].mu
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mu))
    # close to the fp32 step (bf16 rounding only)
    ref, m32 = jax.jit(make_train_step(linear_loss, opt))(state, _batch(0))
    np.testing.assert_allclose(float(m["loss"]), float(m32["loss"]), rtol=3e-2)
    _close(new.params, ref.params, atol=2e-2)


def test_optimizer_config_sources_and_errors():
    cd = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.5, schedule="constant",
                                        momentum=0.9))
    cfg = OptimizerConfig.from_config(cd)
    assert cfg.learning_rate == 0.5 and cfg.momentum == 0.9
    assert isinstance(make_optimizer(cd), optax.GradientTransformation)
    with pytest.raises(ValueError, match="unknown optimizer config fields \\['lr'\\]"):
        make_optimizer({"lr": 1.0})
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        make_optimizer({"name": "lamb"})
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule({"warmup_steps": 10, "total_steps": 10})


def _mse_grads(params, batch):
    """Closed form of ``linear_loss`` (scale 1) and its gradient: ``r = x w + b - y``,
    ``L = mean(r^2)``, ``dL/dw = 2 x^T r / r.size``, ``dL/db = 2 sum_rows(r) / r.size``."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    r = x @ w + b - y
    return float(np.mean(r ** 2)), {"w": 2 * x.T @ r / r.size, "b": 2 * r.sum(0) / r.size}


def test_global_norm_clipping_scales_the_update():
    """SGD with grad_clip_norm c below the gradient's norm: the update is -lr * g * c / |g|
    (the clipped gradient's update), not -lr * g; the grad_norm metric is |g| before clipping."""
    lr, clip = 0.1, 0.05
    batch = _batch(0)
    _, g = _mse_grads(_params(), batch)
    norm = float(np.sqrt(sum(np.sum(v ** 2) for v in g.values())))
    assert norm > 10 * clip  # the clip really bites
    updated = {}
    for c in (clip, None):
        opt = make_optimizer(dict(SGD, learning_rate=lr, grad_clip_norm=c))
        state = TrainState.create(_params(), opt, jax.random.PRNGKey(0), use_ema=False)
        state, m = jax.jit(make_train_step(linear_loss, opt))(state, batch)
        np.testing.assert_allclose(float(m["grad_norm"]), norm, rtol=1e-5)
        updated[c] = state.params
    scale = clip / norm
    _close(updated[clip], {k: np.asarray(v) - lr * scale * g[k] for k, v in _params().items()},
           rtol=1e-5, atol=1e-6)
    _close(updated[None], {k: np.asarray(v) - lr * g[k] for k, v in _params().items()},
           rtol=1e-5, atol=1e-6)
    step = {k: np.asarray(updated[clip][k]) - np.asarray(_params()[k]) for k in g}
    np.testing.assert_allclose(np.sqrt(sum(np.sum(v ** 2) for v in step.values())), lr * clip,
                               rtol=1e-4)


def test_ema_warmup_counts_updates_not_micro_batches():
    """accum_steps 2 + EMA warmup: update n (0, 1, ...) uses decay min(d, (1+n)/(10+n)) with n
    counting applied updates: 1/10 then 2/11 (micro-batch counting would give 3/12 second)."""
    k = 2
    opt = make_optimizer(dict(SGD, accum_steps=k))
    state = TrainState.create(_params(), opt, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(linear_loss, opt,
                                   ema_decay=EmaConfig(decay=0.99, warmup=True)))
    ema = jax.tree.map(np.asarray, _params())
    for update, decay in enumerate((1 / 10, 2 / 11)):
        for i in range(k):
            state, _ = step(state, _batch(10 * update + i))
        p = jax.tree.map(np.asarray, state.params)
        assert not np.allclose(p["w"], ema["w"])
        ema = jax.tree.map(lambda e, q: decay * e + (1 - decay) * q, ema, p)
        _close(state.ema_params, ema, rtol=1e-6, atol=1e-7)


def _one_device_state_shardings(state, devices):
    mesh = make_mesh(1, 1, 1, devices=devices[:1])
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return mesh, jax.tree.map(lambda _: rep, state)


def test_eval_step_is_the_loss_of_the_ema_params_and_changes_nothing(devices):
    """jit_eval_step: loss = the closed-form MSE of the EMA params (params without EMA), aux
    passed through, the train step's compute dtype, and the state neither donated nor changed."""
    opt = make_optimizer(dict(name="adamw", learning_rate=1e-2, schedule="constant"))
    state = TrainState.create(_params(), opt, jax.random.PRNGKey(0))
    state = state.replace(ema_params=jax.tree.map(lambda p: p + 0.5, state.params))
    mesh, sh = _one_device_state_shardings(state, devices)
    state = jax.device_put(state, sh)
    before = jax.device_get(state)
    batch = _batch(3)
    b_sh = batch_shardings(batch, mesh)  # 'scale' is a scalar
    ev = jit_eval_step(make_eval_step(linear_loss), mesh, sh, batch_sharding=b_sh)
    m = ev(state, batch)
    want, _ = _mse_grads(before.ema_params, batch)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    assert float(m["w_is_bf16"]) == 0.0
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))  # not donated
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), before)
    # no EMA (or use_ema=False): the params
    m_raw = jit_eval_step(make_eval_step(linear_loss, use_ema=False), mesh, sh,
                          batch_sharding=b_sh)(state, batch)
    np.testing.assert_allclose(float(m_raw["loss"]), _mse_grads(before.params, batch)[0],
                               rtol=1e-5)
    # the train step's compute dtype
    m16 = jax.jit(make_eval_step(linear_loss, compute_dtype=jnp.bfloat16))(state, batch, 0)
    assert float(m16["w_is_bf16"]) == 1.0
    np.testing.assert_allclose(float(m16["loss"]), want, rtol=3e-2)


def test_eval_rng_is_fixed_per_batch_index():
    """The eval rng depends on the base rng and the eval batch index, not on the train step."""
    def noisy(params, batch, rng):
        return jnp.sum(params["b"]) * 0.0 + jax.random.uniform(rng)

    opt = make_optimizer(SGD)
    state = TrainState.create(_params(), opt, jax.random.PRNGKey(0), use_ema=False)
    ev = jax.jit(make_eval_step(noisy))
    a = float(ev(state, _batch(0), 0)["loss"])
    later = state.replace(step=state.step + 7)
    assert float(ev(later, _batch(0), 0)["loss"]) == a
    assert float(ev(state, _batch(0), 1)["loss"]) != a
    other = state.replace(rng=jax.random.PRNGKey(1))
    assert float(ev(other, _batch(0), 0)["loss"]) != a


def test_train_step_donates_the_state(devices):
    """jit_train_step donates the input state (its buffers are reused for the output: the old
    arrays are deleted); donate=False keeps it (the eval step's no-donation is checked in
    test_eval_step_is_the_loss_of_the_ema_params_and_changes_nothing)."""
    opt = make_optimizer(dict(name="adamw", learning_rate=1e-2, schedule="constant"))
    state = TrainState.create(_params(), opt, jax.random.PRNGKey(0))
    mesh, sh = _one_device_state_shardings(state, devices)
    batch = _batch(3)
    b_sh = batch_shardings(batch, mesh)
    step_fn = make_train_step(linear_loss, opt)
    kept = jax.device_put(state, sh)
    jit_train_step(step_fn, mesh, sh, batch_sharding=b_sh, donate=False)(kept, batch)
    assert not any(x.is_deleted() for x in jax.tree.leaves(kept))
    donated = jax.device_put(state, sh)
    new, _ = jit_train_step(step_fn, mesh, sh, batch_sharding=b_sh)(donated, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(donated.params))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))
