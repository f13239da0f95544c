"""Mesh creation, logical -> mesh specs, sharded init, and sharded == unsharded train and eval
steps."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from toy_train import ToyModel, make_init_fn, make_loss_fn, to_numpy, toy_batch
from unclip_jax.parallel import mesh as pmesh
from unclip_jax.parallel.mesh import (
    batch_sharding,
    constrain,
    global_batch_from_local,
    is_main_process,
    logical_to_mesh_spec,
    make_mesh,
    maybe_initialize_distributed,
    mesh_context,
    param_shardings,
    per_device_bytes,
    shard_batch,
    sharded_init,
    total_bytes,
)
from unclip_jax.parallel.rules import UnknownLogicalAxisError
from unclip_jax.train import (
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_optimizer,
    make_train_step,
)

SGD = dict(name="sgd", learning_rate=0.1, schedule="constant", grad_clip_norm=None)


# ---------------------------------------------------------------------------- mesh


def test_make_mesh_shapes(devices):
    m = make_mesh()
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert dict(m.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(make_mesh(data=-1, fsdp=4).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(make_mesh(1, -1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    one = make_mesh(1, 1, 1, devices=devices[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize("sizes, match", [
    ((3, 1, 1), "8 devices"),
    ((2, 2, 1), "data\\*fsdp\\*tensor = 4"),
    ((-1, -1, 1), "at most one"),
    ((-1, 3, 1), "do not divide"),
    ((0, 8, 1), "positive"),
])
def test_bad_mesh_is_a_clear_error(devices, sizes, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(*sizes)


def test_logical_to_mesh_spec_rules_and_fallbacks(devices):
    mesh = make_mesh(2, 2, 2)
    assert logical_to_mesh_spec(("embed", "mlp"), mesh, (8, 16)) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(P("embed", "heads", "kv"), mesh, (8, 4, 3)) == P("fsdp", "tensor")
    # not divisible -> replicated on that dim
    assert logical_to_mesh_spec(("embed", "mlp"), mesh, (3, 16)) == P(None, "tensor")
    assert logical_to_mesh_spec(("conv_out",), mesh, (3,)) == P()
    # batch over ('data', 'fsdp'); a batch only 'data' divides keeps 'data'
    assert logical_to_mesh_spec(("batch", None), mesh, (8, 5)) == P(("data", "fsdp"))
    assert logical_to_mesh_spec(("batch",), make_mesh(2, 4, 1), (2,)) == P("data")
    # one mesh axis is never used twice
    assert logical_to_mesh_spec(("embed", "embed"), mesh, (8, 8)) == P("fsdp")
    assert logical_to_mesh_spec(("batch", "embed"), mesh, (8, 8)) == P(("data", "fsdp"))
    # no shape: no divisibility check
    assert logical_to_mesh_spec(("mlp", "embed"), mesh) == P("tensor", "fsdp")


def test_unknown_logical_name_is_a_clear_error(devices):
    mesh = make_mesh(8, 1, 1)
    with pytest.raises(UnknownLogicalAxisError, match="'embedding'.*rules.py"):
        logical_to_mesh_spec(("embedding", None), mesh, (4, 4))
    sds = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    boxed = {"w": nn.Partitioned(sds, names=("mlp", "hidden"))}
    with pytest.raises(ValueError, match="'hidden'"):
        param_shardings(boxed, mesh)


def test_param_shardings_mixed_tree(devices):
    mesh = make_mesh(1, 4, 2)
    tree = {
        "k": nn.Partitioned(jax.ShapeDtypeStruct((8, 6), jnp.float32), names=("embed", "mlp")),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    sh = param_shardings(tree, mesh)
    assert sh["k"] == NamedSharding(mesh, P("fsdp", "tensor"))
    assert sh["step"].spec == P()


def test_constrain_activations_by_logical_names(devices):
    f = jax.jit(lambda x: constrain(x * 2, ("batch", "embed")))
    with mesh_context(make_mesh(2, 4, 1)):
        assert f(jnp.ones((8, 4))).sharding.spec == P(("data", "fsdp"))
        assert f(jnp.ones((2, 4))).sharding.spec == P("data", "fsdp")  # fallback, no reuse
    np.testing.assert_array_equal(f(jnp.ones((8, 4))), 2.0)  # no mesh: a no-op


# ---------------------------------------------------------------------------- sharded init / memory


def test_fsdp_per_device_param_bytes_about_total_over_4(devices):
    model = ToyModel(width=64, num_layers=2, num_heads=4, out=16)
    init = lambda rng: model.init(rng, jnp.zeros((1, 4, 64)))["params"]  # noqa: E731
    params = sharded_init(init, make_mesh(2, 4, 1), jax.random.PRNGKey(0))
    total = total_bytes(params)
    per_dev = per_device_bytes(params)
    assert len(per_dev) == 8
    # exactly: each leaf's bytes / (product of the mesh axes its spec uses)
    sizes = {"data": 2, "fsdp": 4, "tensor": 1}
    expected = 0
    for x in jax.tree.leaves(params):
        axes = [a for e in x.sharding.spec if e for a in ((e,) if isinstance(e, str) else e)]
        expected += x.nbytes // int(np.prod([sizes[a] for a in axes]))
    # biases / norms over replicated dims are the only unsharded parts (~4% here)
    for nbytes in per_dev.values():
        assert nbytes == expected
        assert total / 4 <= nbytes <= 1.05 * total / 4, (nbytes, total)
    # same values as an unsharded init
    ref = jax.jit(init)(jax.random.PRNGKey(0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, nn.meta.unbox(ref))


# ---------------------------------------------------------------------------- batches / hosts


def test_batch_sharding_and_global_batch(devices):
    mesh = make_mesh(2, 4, 1)
    batch = toy_batch(0)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    g = global_batch_from_local(batch, mesh)  # one process: local batch == global batch
    assert g["x"].shape == batch["x"].shape
    assert g["x"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(g["x"]), batch["x"])
    s = shard_batch(batch, mesh)
    assert s["y"].sharding == g["y"].sharding
    assert is_main_process()


def test_maybe_initialize_distributed_single_process(monkeypatch):
    for k in ("UNCLIP_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
              "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert maybe_initialize_distributed() is False
    should = pmesh._should_initialize_distributed
    assert should({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
    assert not should({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert should({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert should({"SLURM_NTASKS": "4"})
    assert not should({"SLURM_NTASKS": "4", "UNCLIP_DISTRIBUTED": "0"})
    assert should({"UNCLIP_DISTRIBUTED": "1"})


# ---------------------------------------------------------------------------- sharded == unsharded


def _one_sgd_step(mesh):
    model = ToyModel()
    opt = make_optimizer(SGD)
    state, shardings = sharded_init(make_init_fn(model, opt, use_ema=False), mesh,
                                    jax.random.PRNGKey(0), return_shardings=True)
    step = jit_train_step(make_train_step(make_loss_fn(model), opt), mesh, shardings)
    state, metrics = step(state, shard_batch(toy_batch(0), mesh))
    return state, metrics, shardings


@pytest.fixture(scope="module")
def single_device_step(devices):
    state, metrics, _ = _one_sgd_step(make_mesh(1, 1, 1, devices=devices[:1]))
    return to_numpy(state.params), float(metrics["loss"])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (1, 4, 2)])
def test_sharded_step_equals_single_device(single_device_step, shape):
    ref_params, ref_loss = single_device_step
    mesh = make_mesh(*shape)
    state, metrics, shardings = _one_sgd_step(mesh)
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5),
                 state.params, ref_params)
    # params really live in the sharded layout
    fc1 = state.params["transformer"]["layers_0"]["mlp"]["fc1"]["dense"]["kernel"]
    want = logical_to_mesh_spec(("embed", "mlp"), mesh, fc1.shape)
    assert fc1.sharding.spec == want
    assert shardings.params["transformer"]["layers_0"]["mlp"]["fc1"]["dense"]["kernel"].spec == want
    if shape == (1, 4, 2):
        assert want == P("fsdp", "tensor")


def _eval_after_one_step(mesh):
    """One SGD step (so the EMA differs from the init), then the jitted eval of eval batch 1 of
    a noisy loss (the rng matters) with the train step's shardings."""
    model = ToyModel()
    opt = make_optimizer(SGD)
    state, shardings = sharded_init(make_init_fn(model, opt), mesh, jax.random.PRNGKey(0),
                                    return_shardings=True)
    loss_fn = make_loss_fn(model, noise=0.1)
    step = jit_train_step(make_train_step(loss_fn, opt, ema_decay=0.5), mesh, shardings)
    state, _ = step(state, shard_batch(toy_batch(0), mesh))
    ev = jit_eval_step(make_eval_step(loss_fn), mesh, shardings)
    batch = shard_batch(toy_batch(1), mesh)
    metrics = ev(state, batch, 1)
    assert all(not x.is_deleted() for x in jax.tree.leaves(state))  # eval donates nothing
    return {k: float(v) for k, v in metrics.items()}, float(ev(state, batch, 1)["loss"])


@pytest.fixture(scope="module")
def single_device_eval(devices):
    return _eval_after_one_step(make_mesh(1, 1, 1, devices=devices[:1]))[0]


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2)])
def test_sharded_eval_equals_single_device(single_device_eval, shape):
    ref = single_device_eval
    got, again = _eval_after_one_step(make_mesh(*shape))
    assert set(got) == {"loss", "pred_mean"} and got["loss"] == again  # deterministic
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)
