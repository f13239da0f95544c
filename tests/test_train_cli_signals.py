"""`unclip train` as a real process: SIGTERM saves and exits 0, kill -9 loses at most one
checkpoint interval (synchronous saves; with asynchronous ones also the save in flight), and the
same command resumes after either (the in-process tests in
test_train_loop.py check bitwise-exact resumes; these check the process-level contract)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from unclip_jax.checkpoint import Checkpointer

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
MICRO = os.path.join(HERE, "fixtures", "micro.py")
SAVE_EVERY = 5


def _cmd(workdir, steps, *extra):
    return [sys.executable, "-m", "unclip_jax.cli", "train", "prior", "--config", MICRO,
            "--workdir", workdir, "--data", "synthetic", "--steps", str(steps), "--no-progress",
            f"--config.train.prior.save_every={SAVE_EVERY}", "--config.train.prior.log_every=1",
            "--config.train.prior.keep_last=100", *extra]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _start_and_signal(workdir, sig, at_step, *extra):
    """Run `unclip train` until its console shows step >= at_step, then send ``sig``."""
    proc = subprocess.Popen(_cmd(workdir, 100000, *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step=") and int(line.split()[0][5:]) >= at_step:
                proc.send_signal(sig)
                break
            assert time.monotonic() < deadline, "".join(seen[-20:])
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(seen) + (out or "")


def _latest(workdir):
    ckpt = Checkpointer(workdir)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def _resume_continues(workdir, start, *extra):
    r = subprocess.run(_cmd(workdir, start + 3, *extra), capture_output=True, text=True, env=_env(),
                       cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _latest(workdir) == start + 3
    steps = [rec["step"] for rec in _records(workdir) if "loss" in rec]
    # the resumed run logs start+1, start+2, start+3 right after what the first run logged
    assert steps[-3:] == [start + 1, start + 2, start + 3], steps[-8:]


def test_sigterm_on_the_real_cli_saves_exits_0_and_resumes(tmp_path):
    wd = str(tmp_path / "run")
    rc, out = _start_and_signal(wd, signal.SIGTERM, at_step=3)
    assert rc == 0, out[-3000:]
    last = _records(wd)[-1]
    assert last["event"] == "preempted_saved", last
    assert _latest(wd) == last["step"] >= 3
    _resume_continues(wd, last["step"])


@pytest.mark.parametrize("async_save", [False, True])
def test_kill_9_loses_at_most_one_interval_and_resumes(tmp_path, async_save):
    """Synchronous saves: at most one interval is lost. Asynchronous saves (the default): the
    micro model's steps take milliseconds, far less than a save, so the save being written at
    the kill may be lost too — but never more than one (orbax starts a save only after the
    previous one finished), and its unfinished folder does not stop the resume."""
    wd = str(tmp_path / "run")
    flag = f"--config.train.prior.async_save={str(async_save).lower()}"
    rc, out = _start_and_signal(wd, signal.SIGKILL, 4 * SAVE_EVERY + 2, flag)
    assert rc == -signal.SIGKILL, out[-3000:]
    logged = max(rec["step"] for rec in _records(wd) if "loss" in rec)
    kept = _latest(wd)
    assert kept is not None and kept % SAVE_EVERY == 0 and kept >= SAVE_EVERY
    in_flight = [d for d in os.listdir(wd) if "tmp" in d]
    # metrics are written one step late; the step being written when the process died is lost
    lost_bound = SAVE_EVERY + 1 if not async_save else 2 * SAVE_EVERY + 1
    assert logged - kept <= lost_bound, (logged, kept, in_flight)
    assert len(in_flight) <= 1
    _resume_continues(wd, kept, flag)
