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

On several processes the guard installs no handler (``jax.distributed``'s preemption notifier
owns SIGTERM there) and ``should_stop(step)`` asks
``multihost_utils.reached_preemption_sync_point``, which gives every host the same answer at the same step, so all hosts save the same step.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional, Sequence

import jax

log = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager installing a handler for ``signals`` (default SIGTERM) that sets
    ``self.requested``. The previous handlers come back on exit. Signal handlers can only be
    installed from the main thread; elsewhere the guard is inert (never requests a stop)."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):  # noqa: ARG002 - signal API
        self.requested = True
        self.signal_received = signum
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)

    def install(self) -> "PreemptionGuard":
        if jax.process_count() > 1:
            # jax.distributed's preemption notifier owns SIGTERM on multi-process runs; replacing
            # its handler would leave hosts disagreeing about when to stop.
            log.info("PreemptionGuard: %d processes, relying on JAX's preemption sync point",
                     jax.process_count())
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard: not on the main thread; signal handlers not installed")
            return self
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)
        return self

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
        preemption sync point is reached (the same answer on every host; call it at the same
        steps on all hosts). If the preemption service is not running it stays False there.
        """
        if step is not None and jax.process_count() > 1:
            try:
                from jax.experimental import multihost_utils

                if multihost_utils.reached_preemption_sync_point(int(step)):
                    self.requested = True
                return self.requested
            except Exception as e:  # noqa: BLE001 - preemption service not running
                log.debug("preemption sync point unavailable: %s", e)
        return self.requested
