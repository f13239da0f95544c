"""Per-stage progress bars that cost nothing inside jitted loops when off.

The samplers take a static ``progress(step, total)`` host callback; a new Python function per
call would recompile the loop, so there is exactly one: ``report``, which forwards to the bar
of the stage running now (set with ``stage(...)``).

Per-step bars are off by default (``STEP_PROGRESS``): JAX's persistent compilation cache does
not keep executables that carry host callbacks, so a loop with the per-step callback is compiled
anew in every process. By default a stage's bar shows the stage and its wall time, and the
sampling loops come from the cache; ``unclip ... --step-progress`` turns the per-step bars on.
"""
from __future__ import annotations

import contextlib
import sys

from tqdm.auto import tqdm

# Per-step progress inside the jitted loops (costs a compile per process; see above).
STEP_PROGRESS = False


def set_step_progress(on: bool) -> None:
    global STEP_PROGRESS
    STEP_PROGRESS = bool(on)


class _State:
    bar = None


# A plain global, not thread-local: jax.debug.callback runs on the runtime's threads.
_state = _State()


def report(step, total) -> None:
    """Host callback for the samplers (static, stable identity): ``step`` of ``total`` done
    (1-based)."""
    bar = _state.bar
    if bar is not None:
        bar.total = int(total)
        bar.n = int(step)
        bar.refresh()


@contextlib.contextmanager
def stage(name: str, enabled: bool = True):
    """``with stage("decoder"):`` shows a tqdm bar that the sampler's callbacks move."""
    if not enabled:
        yield None
        return
    bar = tqdm(total=1, desc=f"{name:>8s}", leave=True, file=sys.stderr, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
    _state.bar = bar
    try:
        yield bar
    finally:
        _state.bar = None
        if bar.n < bar.total:
            bar.n = bar.total  # the stage is done (its steps were not reported one by one)
            bar.refresh()
        bar.close()


def callback(enabled: bool):
    """The ``progress`` argument for a sampler: ``report`` when enabled and per-step progress
    is on (``STEP_PROGRESS``), else None (nothing traced)."""
    return report if (enabled and STEP_PROGRESS) else None
