"""Input pipeline: per-process sharded, seeded, checkpointable batches from tfds data sources.

A :class:`Reader` reads any random-access source (``tfds.data_source(...)`` over array_record
files, or a list of dicts) and yields numpy batches::

    {"image": float32 [B, H, W, 3] in [-1, 1], "caption": str [B] (one caption drawn at random
     per example from its list), "index": int64 [B] record indices, **extra keys}

Order is a pure function of ``(seed, epoch, position)``: epoch ``e`` visits the records in the
permutation ``grain.experimental.index_shuffle(., n - 1, seed_e)`` (a Feistel-style shuffle,
O(1) memory, so it scales to any ``n``); process ``p`` of ``P`` (``grain.ShardOptions``, by
default ``ShardByJaxProcess``) takes global positions ``p, p + P, p + 2P, ...`` of each epoch,
``n // P`` of them, so all processes run the same number of steps. Batch ``k`` holds local
positions ``[k B, (k + 1) B)`` (batches run across epoch ends when repeating). Captions are
drawn with ``np.random.default_rng((seed, 0, k, p))``. The iterator state is therefore just the
next batch number (plus the settings it must match), a JSON-able dict. It does not name the
process: all processes consume batches in lockstep (one per train step), so the next batch
number is the same on every process, and a state saved by one process (Orbax writes the data
state from the primary host only) resumes every process at its own next batch::

    reader = Reader(source, batch_size=32, seed=0)
    it = iter(reader); batch = next(it)
    state = reader.get_state()          # store with the checkpoint
    ...
    reader2 = Reader(source, batch_size=32, seed=0); reader2.set_state(state)
    next(reader2)                       # exactly the batch `reader` would have produced next

Decoding runs on a small thread pool and ``prefetch`` batches are prepared ahead; they are a
pure function of the batch number, so prefetching never changes what is produced.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

STATE_VERSION = 2  # 2: no shard_index (process-independent); 1 (read too) recorded it
READABLE_STATE_VERSIONS = (1, 2)
# settings a state is valid for: resuming under other ones would not continue the same order
STATE_SETTINGS = ("seed", "batch_size", "num_records", "shuffle", "shard_count")


def _grain():
    import grain.python as gp
    import grain.python.experimental as gpe
    return gp, gpe


def default_shard_options():
    """``grain.ShardByJaxProcess``: shard index/count = ``jax.process_index/count()``."""
    gp, _ = _grain()
    return gp.ShardByJaxProcess(drop_remainder=True)


def load_source(name: str, split: str, data_dir: str | None = None):
    """``tfds.data_source(name, split=split, data_dir=data_dir)`` (array_record, TF-free)."""
    import tensorflow_datasets as tfds
    return tfds.data_source(name, split=split, data_dir=data_dir)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1)[0] & 0x7FFFFFFF)


def record_index(position: int, *, num_records: int, seed: int, shuffle: bool = True,
                 shard_index: int = 0, shard_count: int = 1) -> int:
    """Record read at a process-local position: a pure function of (seed, epoch, position)."""
    per_shard = num_records // shard_count
    epoch, i = divmod(position, per_shard)
    g = i * shard_count + shard_index
    if not shuffle or num_records == 1:
        return g
    _, gpe = _grain()
    return int(gpe.index_shuffle(g, num_records - 1, epoch_seed(seed, epoch), 4))


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray, np.bytes_)) else str(x)


def _stack(values: list) -> np.ndarray:
    if values and isinstance(values[0], (bytes, bytearray, np.bytes_, str)):
        return np.array([_text(v) for v in values], dtype=object)
    return np.stack([np.asarray(v) for v in values])


@dataclasses.dataclass
class Reader:
    """Sharded, shuffled, repeated batches; see the module docstring.

    Args:
      source: random-access source (``len`` and ``__getitem__``) of example dicts.
      batch_size: per-process batch size.
      seed: shuffling and caption-choice seed.
      shuffle: shuffle each epoch (else record order).
      num_epochs: ``None`` repeats forever; otherwise stop after this many epochs.
      drop_remainder: with finite epochs, drop a last partial batch.
      shard_options: a ``grain.ShardOptions`` (default: ``ShardByJaxProcess``).
      image_key / caption_key: fields holding the uint8 image and the caption list; ``None``
        leaves that part out.
      extra_keys: other fields to batch as they are (strings become ``str`` arrays).
      transform: optional ``fn(batch, rng) -> batch`` run on the host after batching, with
        ``rng = np.random.default_rng((seed, 1, k, shard))`` (augmentation).
      num_threads / prefetch: decode threads, batches prepared ahead.
    """
    source: Any
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    drop_remainder: bool = True
    shard_options: Any = None
    image_key: str | None = "image"
    caption_key: str | None = "captions"
    extra_keys: Sequence[str] = ()
    transform: Callable[[dict, np.random.Generator], dict] | None = None
    num_threads: int = 4
    prefetch: int = 2

    def __post_init__(self):
        so = self.shard_options or default_shard_options()
        self.shard_index, self.shard_count = int(so.shard_index), int(so.shard_count)
        self.num_records = len(self.source)
        self.per_shard = self.num_records // self.shard_count
        if self.per_shard < 1:
            raise ValueError(f"{self.num_records} records cannot be split over "
                             f"{self.shard_count} processes")
        if self.num_epochs is None:
            self.num_batches = None
        else:
            total = self.num_epochs * self.per_shard
            self.num_batches = (total // self.batch_size if self.drop_remainder
                                else -(-total // self.batch_size))
        self._next = 0
        self._pool = (concurrent.futures.ThreadPoolExecutor(self.num_threads)
                      if self.num_threads > 0 else None)
        self._batcher = None
        self._queue: collections.deque = collections.deque()

    # ------------------------------------------------------------------ order
    @property
    def steps_per_epoch(self) -> int:
        return self.per_shard // self.batch_size

    def indices(self, k: int) -> np.ndarray:
        """Record indices of batch ``k`` of this process."""
        start = k * self.batch_size
        stop = start + self.batch_size
        if self.num_epochs is not None:
            stop = min(stop, self.num_epochs * self.per_shard)
        return np.array([record_index(p, num_records=self.num_records, seed=self.seed,
                                      shuffle=self.shuffle, shard_index=self.shard_index,
                                      shard_count=self.shard_count)
                         for p in range(start, stop)], dtype=np.int64)

    # ------------------------------------------------------------------ batches
    def make_batch(self, k: int) -> dict[str, np.ndarray]:
        """Batch ``k`` of this process (pure function of k and the settings)."""
        idx = self.indices(k)
        if self._pool is None:
            examples = [self.source[int(i)] for i in idx]
        else:
            examples = list(self._pool.map(lambda i: self.source[int(i)], idx))
        batch: dict[str, np.ndarray] = {"index": idx}
        if self.image_key:
            images = np.stack([np.asarray(e[self.image_key]) for e in examples])
            batch["image"] = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        if self.caption_key:
            rng = np.random.default_rng((self.seed, 0, k, self.shard_index))
            caps = []
            for e in examples:
                options = [_text(c) for c in np.atleast_1d(e[self.caption_key])]
                caps.append(options[int(rng.integers(len(options)))] if options else "")
            batch["caption"] = np.array(caps, dtype=object)
        for key in self.extra_keys:
            batch[key] = _stack([e[key] for e in examples])
        if self.transform is not None:
            batch = self.transform(batch, np.random.default_rng((self.seed, 1, k,
                                                                 self.shard_index)))
        return batch

    def _submit(self, k: int):
        if self._batcher is None:  # one thread assembles batches ahead; _pool decodes
            self._batcher = concurrent.futures.ThreadPoolExecutor(1)
        self._queue.append((k, self._batcher.submit(self.make_batch, k)))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        k = self._next
        if self.num_batches is not None and k >= self.num_batches:
            raise StopIteration
        if self.prefetch <= 0:
            batch = self.make_batch(k)
        else:
            if not self._queue or self._queue[0][0] != k:
                self._queue.clear()
                self._submit(k)
            last = self._queue[-1][0]
            while len(self._queue) < 1 + self.prefetch and (
                    self.num_batches is None or last + 1 < self.num_batches):
                last += 1
                self._submit(last)
            _, fut = self._queue.popleft()
            batch = fut.result()
        self._next = k + 1
        return batch

    # ------------------------------------------------------------------ checkpointing
    def get_state(self) -> dict:
        """JSON-able state: the next batch number and the settings it is valid for (the same on
        every process; see the module docstring)."""
        state = {"version": STATE_VERSION, "next_batch": self._next}
        state.update({key: getattr(self, key) for key in STATE_SETTINGS})
        return state

    def set_state(self, state: Mapping) -> None:
        """Resume from :meth:`get_state` of this or any other process of the same run (a
        version-1 state's ``shard_index`` is ignored: the next batch number does not depend on
        it); raises ``ValueError`` if the settings differ."""
        version = state.get("version")
        if version not in READABLE_STATE_VERSIONS:
            raise ValueError(f"reader state has version={version!r}; this unclip_jax reads "
                             f"versions {list(READABLE_STATE_VERSIONS)} (a newer unclip_jax "
                             "wrote it? upgrade, or resume in a new workdir)")
        for key in STATE_SETTINGS:
            if state.get(key) != getattr(self, key):
                raise ValueError(f"reader state has {key}={state.get(key)!r}, this reader "
                                 f"{getattr(self, key)!r}: resume with the settings (and "
                                 "process count) of the run that saved it")
        self._next = int(state["next_batch"])
        self._queue.clear()

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self._next * self.batch_size / self.per_shard

    def close(self):
        self._queue.clear()
        for pool in (self._batcher, self._pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._batcher = self._pool = None


def make_reader(name: str, split: str, batch_size: int, *, data_dir: str | None = None,
                **kwargs) -> Reader:
    """A :class:`Reader` over ``tfds.data_source(name, split, data_dir)``."""
    return Reader(load_source(name, split, data_dir), batch_size, **kwargs)
