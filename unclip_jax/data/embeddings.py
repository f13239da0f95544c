"""The embeddings dir: what ``unclip embed`` writes and ``train.loop.EmbeddingDataset`` reads.

    DIR/embeddings.json              meta: num_examples, num_shards, num_processes, arrays
                                     ({name: [shape [1:], dtype]}), format, plus the caller's keys
    DIR/shard-pPPPPP-NNNNN.npz       shard N of process P: equal-length arrays [n, ...]
    DIR/shard-NNNNN.npz              (dirs written before the process index was in the name:
                                     one process; still read)

On a pod every process embeds its own part of the data (``open_data(..., one_pass=True)``
shards by process) into the same folder, so shard names carry the process index; process 0
writes ``embeddings.json`` once every process's shards are written (the totals come from an
all-gather), and no process returns before it exists. Readers load every ``shard-*.npz`` in
name order (process-major), whatever wrote them.

Paths go through ``etils.epath`` (required by orbax-checkpoint and tensorflow-datasets, which
this package depends on), so ``DIR`` may be a ``gs://`` folder as well as a local one.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from etils import epath

EMBED_META = "embeddings.json"
SHARD_GLOB = "shard-*.npz"
FORMAT = "unclip_jax.embeddings"
FORMAT_VERSION = 2  # 2: shard names carry the process index (1: shard-NNNNN.npz, still read)
DEFAULT_SHARD_SIZE = 4096  # examples per shard file


def shard_name(shard: int, process_index: int = 0) -> str:
    """File name of shard ``shard`` of process ``process_index``."""
    return f"shard-p{process_index:05d}-{shard:05d}.npz"


def is_embeddings_dir(path) -> bool:
    """Whether ``path`` (local or ``gs://``) holds an ``embeddings.json``."""
    return (epath.Path(path) / EMBED_META).exists()


def read_meta(path) -> dict:
    """The meta dict of an embeddings dir; ``FileNotFoundError`` saying what to do if none."""
    meta = epath.Path(path) / EMBED_META
    if not meta.exists():
        raise FileNotFoundError(f"{path} is not an embeddings dir (no {EMBED_META}); make one "
                                "with `unclip embed`")
    return json.loads(meta.read_text())


def shard_paths(path) -> list[epath.Path]:
    """Every ``shard-*.npz`` of the dir, sorted by name (legacy names, then process-major)."""
    return sorted(epath.Path(path).glob(SHARD_GLOB), key=lambda p: p.name)


def read_arrays(path, keys: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """``{name: array [N, ...]}``: the shards of every process concatenated in name order
    (``keys``: only those arrays). ``FileNotFoundError`` if the dir has no shards."""
    shards = shard_paths(path)
    if not shards:
        raise FileNotFoundError(f"no {SHARD_GLOB} in {path}; is `unclip embed` still writing "
                                "it, or did it fail? Embed again into a new folder")
    parts: dict[str, list] = {}
    for s in shards:
        with s.open("rb") as f, np.load(f, allow_pickle=False) as z:
            for k in z.files:
                if keys is None or k in keys:
                    parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _jax_process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _allgather(x: np.ndarray) -> np.ndarray:
    """``x`` of every process stacked ``[P, ...]`` (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def write_embeddings(out_dir, batches: Iterable[Mapping[str, np.ndarray]],
                     meta: Optional[dict] = None, shard_size: int = DEFAULT_SHARD_SIZE, *,
                     process_index: Optional[int] = None, process_count: Optional[int] = None,
                     allgather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                     barrier: Optional[Callable[[str], None]] = None) -> dict:
    """Write this process's ``batches`` (dicts of equal-length arrays; strings are stored as
    unicode) into ``out_dir`` as shards of ``shard_size`` examples named by process; process 0
    then writes the meta (``meta`` + totals over all processes). Every process must call it
    (with more than one process it runs collectives: ``allgather``, ``barrier``). Returns the
    meta dict on every process. ``FileExistsError`` if the folder already holds shards.
    ``process_index`` / ``process_count`` / ``allgather`` / ``barrier`` default to JAX's (tests
    pass their own)."""
    if process_index is None or process_count is None:
        process_index, process_count = _jax_process()
    allgather, barrier = allgather or _allgather, barrier or _barrier
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shard_paths(out):
        raise FileExistsError(f"{out_dir} already holds shards; choose a new output folder")
    if process_count > 1:  # nobody writes before every process has checked the folder
        barrier("unclip_embed_start")
    buf: dict[str, list] = {}
    count, shard, shapes = 0, 0, {}

    def flush():
        nonlocal shard
        if not buf:
            return
        arrays = {k: np.concatenate(v) for k, v in buf.items()}
        with (out / shard_name(shard, process_index)).open("wb") as f:
            np.savez(f, **arrays)
        shard += 1
        buf.clear()

    for b in batches:
        for k, v in b.items():
            v = np.asarray(v)
            buf.setdefault(k, []).append(v)
            shapes[k] = [list(v.shape[1:]), str(v.dtype)]
        count += len(next(iter(b.values())))
        if sum(len(x) for x in next(iter(buf.values()))) >= shard_size:
            flush()
    flush()
    totals = np.array([[count, shard]], np.int64)
    if process_count > 1:
        totals = allgather(totals[0]).reshape(process_count, 2)
    meta = dict(meta or {})
    meta.update(num_examples=int(totals[:, 0].sum()), num_shards=int(totals[:, 1].sum()),
                num_processes=int(process_count), arrays=shapes, format=FORMAT,
                format_version=FORMAT_VERSION)
    if process_index == 0:
        (out / EMBED_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if process_count > 1:  # nobody reads the dir before the meta is there
        barrier("unclip_embed_done")
    return meta


__all__ = ["EMBED_META", "FORMAT_VERSION", "shard_name", "is_embeddings_dir", "read_meta",
           "shard_paths", "read_arrays", "write_embeddings"]
