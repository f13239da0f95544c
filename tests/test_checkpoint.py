"""Checkpoints: bitwise round trip, restore onto another mesh, exact resume, clear errors,
preemption (SIGTERM -> save -> exit 0)."""
import os
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toy_train import ToyModel, make_init_fn, make_loss_fn, to_numpy, toy_batch
from unclip_jax.checkpoint import (
    FORMAT_VERSION,
    CheckpointFormatError,
    CheckpointNotFoundError,
    Checkpointer,
    ConfigMismatchError,
    PreemptionGuard,
)
from unclip_jax.checkpoint import manager as ckpt_manager
from unclip_jax.parallel import (
    make_mesh,
    param_shardings,
    shard_batch,
    sharded_init,
    with_shardings,
)
from unclip_jax.train import TrainState, jit_train_step, make_optimizer, make_train_step

ADAMW = dict(name="adamw", learning_rate=3e-3, warmup_steps=3, total_steps=40, weight_decay=0.01,
             grad_clip_norm=1.0)
CONFIG = {"model": {"width": 16, "layers": 1}, "optimizer": ADAMW}


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(to_numpy(a))
    lb, tb = jax.tree.flatten(to_numpy(b))
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


class Run:
    """Everything a (possibly resumed) toy training process builds for itself."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.model = ToyModel()
        self.opt = make_optimizer(ADAMW)
        self.init_fn = make_init_fn(self.model, self.opt)
        self.abstract = jax.eval_shape(self.init_fn, jax.random.PRNGKey(0))
        self.shardings = param_shardings(self.abstract, mesh)
        self.target = with_shardings(self.abstract, self.shardings)
        self.step = jit_train_step(
            make_train_step(make_loss_fn(self.model, noise=0.1), self.opt, ema_decay=0.9),
            mesh, self.shardings)

    def init(self):
        return sharded_init(self.init_fn, self.mesh, jax.random.PRNGKey(0))

    def train(self, state, start, stop):
        for i in range(start, stop):
            state, _ = self.step(state, shard_batch(toy_batch(i), self.mesh))
        return state


@pytest.fixture(scope="module")
def run_241(devices):
    return Run(make_mesh(2, 4, 1))


def test_round_trip_bitwise_and_restore_on_other_mesh(run_241, tmp_path):
    run = run_241
    state = run.train(run.init(), 0, 2)
    saved = to_numpy(state)
    ckpt = Checkpointer(str(tmp_path), save_every=1, keep_last=2, async_save=True, config=CONFIG)
    assert ckpt.save(2, state, data_state={"next_index": 2, "epoch": 0, "order": [3, 1, 2]})
    # the async save copied the arrays off-device: donating them to the next step is safe
    state = run.train(state, 2, 3)
    ckpt.wait()

    restored = Checkpointer(str(tmp_path), config=CONFIG).restore(run.target)
    assert restored.step == 2
    assert restored.data_state == {"next_index": 2, "epoch": 0, "order": [3, 1, 2]}
    assert restored.config == CONFIG
    _assert_trees_equal(restored.state, saved)
    jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f"{x.sharding} != {s}"),
                 restored.state, run.shardings)
    meta = ckpt.metadata(2)
    assert meta["format_version"] == FORMAT_VERSION and meta["config"] == CONFIG

    # a different mesh shape: same values, new shardings
    other = Run(make_mesh(1, 4, 2))
    moved = Checkpointer(str(tmp_path), config=CONFIG).restore(other.target, step=2).state
    _assert_trees_equal(moved, saved)
    fc1 = moved.params["transformer"]["layers_0"]["mlp"]["fc1"]["dense"]["kernel"]
    assert fc1.sharding == other.shardings.params["transformer"]["layers_0"]["mlp"]["fc1"][
        "dense"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # and it trains on the new mesh
    other.train(moved, 2, 3)
    ckpt.close()


def test_exact_resume_20_vs_10_plus_10(run_241, tmp_path):
    straight = run_241.train(run_241.init(), 0, 20)

    first = Run(run_241.mesh)
    state = first.train(first.init(), 0, 10)
    with Checkpointer(str(tmp_path), config=CONFIG) as ckpt:
        ckpt.save(int(state.step), state, data_state={"next_index": 10})
    del state, first

    # a "new process": fresh objects, abstract target, nothing reused
    second = Run(run_241.mesh)
    ckpt = Checkpointer(str(tmp_path), config=CONFIG)
    restored = ckpt.restore(second.target)
    start = restored.data_state["next_index"]
    assert start == int(restored.state.step) == 10
    resumed = second.train(restored.state, start, 20)
    ckpt.close()
    _assert_trees_equal(resumed, straight)


# ---------------------------------------------------------------------------- errors / policy


def _small_state():
    opt = make_optimizer(dict(name="sgd", learning_rate=0.1, schedule="constant"))
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}
    return TrainState.create(params, opt, jax.random.PRNGKey(1))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "empty"), async_save=False)
    with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint found in {tmp_path}/empty"):
        ckpt.restore(_small_state())
    ckpt.save(1, _small_state())
    with pytest.raises(CheckpointNotFoundError,
                       match="no checkpoint for step 5 .*found steps \\[1\\]"):
        ckpt.restore(_small_state(), step=5)
    ckpt.close()


def test_wrong_format_version_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_manager, "FORMAT_VERSION", FORMAT_VERSION + 1)
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(3, _small_state())
    monkeypatch.setattr(ckpt_manager, "FORMAT_VERSION", FORMAT_VERSION)
    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointFormatError,
                       match=f"{tmp_path}/3 has format version {FORMAT_VERSION + 1}"):
        ckpt.restore(_small_state())
    ckpt.close()


def test_config_mismatch_is_a_clear_error(tmp_path):
    with Checkpointer(str(tmp_path), async_save=False, config={"model": {"width": 16}}) as ckpt:
        ckpt.save(1, _small_state())
    ckpt = Checkpointer(str(tmp_path), config={"model": {"width": 32}})
    with pytest.raises(ConfigMismatchError, match=f"{tmp_path}/1 .*model.width: 16 -> 32"):
        ckpt.restore(_small_state())
    state = ckpt.restore(_small_state(), check_config=False).state
    _assert_trees_equal(state, _small_state())
    ckpt.close()


def test_save_every_and_keep_last(tmp_path):
    state = _small_state()
    with Checkpointer(str(tmp_path), save_every=2, keep_last=2, async_save=True) as ckpt:
        saved = [s for s in range(1, 7) if ckpt.maybe_save(s, state)]
        ckpt.wait()
        assert saved == [2, 4, 6]
        assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
        assert not ckpt.save(6, state)  # already saved (e.g. preemption right after a save)


# ---------------------------------------------------------------------------- preemption


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers can only be installed from the main thread")
def test_preemption_guard_sets_flag_and_restores_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    state = _small_state()
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        with PreemptionGuard() as guard:
            for step in range(100):
                if step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                if guard.should_stop(step):
                    ckpt.save(step, state)
                    break
        assert guard.requested and guard.signal_received == signal.SIGTERM
        assert ckpt.latest_step() == 3
    assert signal.getsignal(signal.SIGTERM) == before


def test_multiprocess_without_preemption_service_falls_back_to_sigterm(monkeypatch):
    """Several processes but JAX's preemption sync service not running: the guard installs its
    SIGTERM handler anyway, and should_stop all-gathers the hosts' flags every check_every
    steps (only then), so a signal on any host stops every host at the same step; between
    checks a host that got the signal does not stop alone."""
    from unclip_jax.checkpoint import preemption

    assert preemption.preemption_service_running() is False  # no jax.distributed here
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
    monkeypatch.setattr(preemption, "preemption_service_running", lambda: False)
    other_host = {"requested": False}
    gathered = []

    def fake_any(flag):  # this host's flag and the other host's
        gathered.append(flag)
        return flag or other_host["requested"]

    monkeypatch.setattr(preemption, "any_process_requested", fake_any)
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(check_every=2) as guard:
        assert not guard.use_sync_service
        assert signal.getsignal(signal.SIGTERM) == guard._handler
        assert not guard.should_stop(1) and not guard.should_stop(2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signalled and guard.signal_received == signal.SIGTERM
        assert not guard.should_stop(3)  # no check at step 3: the other host does not know yet
        assert guard.should_stop(4)
    assert gathered == [False, True]  # steps 2 and 4 only
    assert signal.getsignal(signal.SIGTERM) == before
    with PreemptionGuard(check_every=1) as guard:  # the signal reached the other host only
        other_host["requested"] = True
        assert guard.should_stop(3) and guard.requested and not guard.signalled


def test_multiprocess_with_preemption_service_uses_the_sync_point(monkeypatch):
    """With the service running the guard leaves SIGTERM to it and stops at the sync point."""
    from jax.experimental import multihost_utils

    from unclip_jax.checkpoint import preemption

    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
    monkeypatch.setattr(preemption, "preemption_service_running", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda s: s == 5)
    monkeypatch.setattr(preemption, "any_process_requested",
                        lambda flag: pytest.fail("no all-gather with the sync service"))
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert guard.use_sync_service and signal.getsignal(signal.SIGTERM) == before
        assert [guard.should_stop(s) for s in (3, 4)] == [False, False]
        assert guard.should_stop(5)


CHILD = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from unclip_jax.checkpoint import Checkpointer, PreemptionGuard
    from unclip_jax.train import TrainState, make_optimizer, make_train_step

    opt = make_optimizer(dict(name="sgd", learning_rate=0.1, schedule="constant"))
    state = TrainState.create({"w": jnp.ones((2, 2))}, opt, jax.random.PRNGKey(0))
    step_fn = jax.jit(make_train_step(lambda p, b, r: jnp.sum(p["w"] * b), opt))
    ckpt = Checkpointer(sys.argv[1], save_every=1000)
    with PreemptionGuard() as guard:
        while True:
            state, _ = step_fn(state, jnp.ones((2, 2)))
            print("step", int(state.step), flush=True)
            if guard.should_stop(int(state.step)):
                ckpt.save(int(state.step), state, data_state={"next": int(state.step)})
                ckpt.close()
                print("saved", int(state.step), flush=True)
                break
            time.sleep(0.02)
""")


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    saved = int(out.strip().splitlines()[-1].split()[1])
    assert saved >= 3
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == saved
    assert ckpt.restore(_small_state_like_child()).data_state == {"next": saved}
    ckpt.close()


def _small_state_like_child():
    opt = make_optimizer(dict(name="sgd", learning_rate=0.1, schedule="constant"))
    return TrainState.create({"w": jnp.ones((2, 2))}, opt, jax.random.PRNGKey(0))
