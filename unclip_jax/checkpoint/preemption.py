"""Preemption: turn SIGTERM (TPU / spot-VM preemption, ``kill``) into "save and exit 0".

The handler only sets a flag; the train loop polls it between steps, saves a checkpoint and
returns normally, so the process exits 0 and the scheduler restarts it to resume::

    with PreemptionGuard() as guard:
        for step in range(start, total):
            state, metrics = train_step(state, next_batch())
            if guard.should_stop(step):
                ckpt.save(step + 1, state, data_state)
                ckpt.wait()
                break

On several processes with JAX's preemption sync service running (``jax.distributed`` with
``jax_enable_preemption_service``, the default) the guard installs no handler (the service's
notifier owns SIGTERM there) and ``should_stop(step)`` asks
``multihost_utils.reached_preemption_sync_point``, which gives every host the same answer at the
same step, so all hosts save the same step. When the service is not running the guard falls back
to its own SIGTERM handler on every host, and ``should_stop`` all-gathers the hosts' flags
every ``check_every`` steps (a tiny blocking collective, so not every step: it would wait for
the step just dispatched) so that all hosts still stop at the same step.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)


def preemption_service_running() -> bool:
    """Whether JAX's preemption sync manager is up (``jax.distributed.initialize`` with
    ``jax_enable_preemption_service``); False when it is not or this jax hides it."""
    try:
        from jax._src import distributed

        state = distributed.global_state
        return state.client is not None and state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def any_process_requested(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (all processes must call it at the
    same point; one all-gather of an int32)."""
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))
    return bool(np.any(np.asarray(flags)))


class PreemptionGuard:
    """Context manager installing a handler for ``signals`` (default SIGTERM) that sets
    ``self.requested``. The previous handlers come back on exit. Signal handlers can only be
    installed from the main thread; elsewhere the guard is inert (never requests a stop).
    ``use_sync_service``: whether this multi-process run relies on JAX's preemption sync point
    (set by ``install``)."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), check_every: int = 10):
        self.signals = tuple(signals)
        self.check_every = max(1, int(check_every))
        self.requested = False
        self.signalled = False  # this host got a signal
        self.signal_received: Optional[int] = None
        self._previous: dict[int, object] = {}
        self.use_sync_service = False

    def _handler(self, signum, frame):  # noqa: ARG002 - signal API
        # ``requested`` is the stop every process agrees on: on one process the signal is it;
        # on several, ``should_stop`` sets it when the hosts' flags are compared
        self.signalled = True
        if jax.process_count() == 1:
            self.requested = True
        self.signal_received = signum
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)

    def install(self) -> "PreemptionGuard":
        self.use_sync_service = jax.process_count() > 1 and preemption_service_running()
        if self.use_sync_service:
            # jax.distributed's preemption notifier owns SIGTERM on multi-process runs; replacing
            # its handler would leave hosts disagreeing about when to stop.
            log.info("PreemptionGuard: %d processes, relying on JAX's preemption sync point",
                     jax.process_count())
            return self
        if jax.process_count() > 1:
            log.warning(
                "PreemptionGuard: %d processes but JAX's preemption sync service is not running "
                "(jax.distributed.initialize with jax_enable_preemption_service=True starts it); "
                "falling back to a SIGTERM handler on each host, with the hosts' stop flags "
                "all-gathered at every step", jax.process_count())
        self._install_handlers()
        return self

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard: not on the main thread; signal handlers not installed")
            return
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def should_stop(self, step: Optional[int] = None) -> bool:
        """True once a stop was requested.

        Single process: once a signal arrived. Several processes with ``step`` given: once JAX's
        preemption sync point is reached, or (sync service not running) once any host got a
        signal; the same answer on every host either way (call it at the same steps on all
        hosts). Without the sync service the hosts' flags are compared every ``check_every``
        steps only (a stop comes at most that many steps after the signal).
        """
        if step is not None and jax.process_count() > 1:
            if self.use_sync_service:
                try:
                    from jax.experimental import multihost_utils

                    if multihost_utils.reached_preemption_sync_point(int(step)):
                        self.requested = True
                    return self.requested
                except Exception as e:  # noqa: BLE001 - the service went away: use the flags
                    log.warning("preemption sync point unavailable (%s); from now on using a "
                                "SIGTERM handler and the hosts' flags", e)
                    self.use_sync_service = False
                    self._install_handlers()
            if int(step) % self.check_every == 0 and any_process_requested(self.signalled):
                self.requested = True
        return self.requested
