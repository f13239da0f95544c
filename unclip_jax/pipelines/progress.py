"""Per-stage progress bars that cost nothing inside jitted loops when off.

The samplers take a static ``progress(step, total)`` host callback; a new Python function per
call would recompile the loop, so there is exactly one: ``report``, which forwards to the bar
of the stage running now (set with ``stage(...)``).
"""
from __future__ import annotations

import contextlib
import sys
from tqdm.auto import tqdm

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
    bar = tqdm(total=1, desc=f"{name:>8s}", leave=True, file=sys.stderr, dynamic_ncols=True)
    _state.bar = bar
    try:
        yield bar
    finally:
        _state.bar = None
        bar.close()


def callback(enabled: bool):
    """The ``progress`` argument for a sampler: ``report`` when enabled, else None."""
    return report if enabled else None
