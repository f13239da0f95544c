"""Fixed-shape batching: every batch padded to one size, so a jitted function compiles once."""
from __future__ import annotations

from typing import Iterator


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[int, int, list[int]]]:
    """``(batch index, real count, indices)`` per batch of ``range(n)``; the last batch's
    indices are padded to ``batch_size`` by repeating its last index (cut the outputs to the
    real count)."""
    b = int(batch_size)
    for i, s in enumerate(range(0, n, b)):
        m = min(b, n - s)
        yield i, m, list(range(s, s + m)) + [s + m - 1] * (b - m)
