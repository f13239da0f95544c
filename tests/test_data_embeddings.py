"""Embeddings dirs on a pod: process-unique shard names, one meta, every shard read back (local,
gs:// through etils.epath, and dirs of the previous naming); EmbeddingDataset stays in
lockstep across processes so process 0's data state resumes the others."""
import concurrent.futures
import json
import os
import threading

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing

from unclip_jax.data import embeddings as E
from unclip_jax.train import loop


def _batches(start, n, size=3):
    """Batches of ``size`` rows with ``id`` = start .. start + n - 1 (and a string column)."""
    for s in range(start, start + n, size):
        ids = np.arange(s, min(s + size, start + n))
        yield {"id": ids, "caption": np.array([f"c{i}" for i in ids]),
               "image_emb": np.repeat(ids[:, None], 4, 1).astype(np.float32)}


def _as_process(monkeypatch, index, count):
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: index)
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: count)


def test_two_processes_write_unique_shards_and_all_are_read(tmp_path, monkeypatch):
    """Two processes (threads, with jax.process_index / process_count mocked per thread and
    the collectives done with a thread barrier) embed into one folder."""
    out = str(tmp_path / "emb")
    counts = {0: 7, 1: 5}  # this process's examples (process 0: ids 0..6, process 1: 100..104)
    me = threading.local()
    sync = threading.Barrier(2, timeout=60)
    gathered, calls = {}, []

    def allgather(x):
        gathered[me.index] = np.asarray(x)
        sync.wait()
        return np.stack([gathered[p] for p in (0, 1)])

    def barrier(name):
        calls.append((me.index, name))
        sync.wait()

    monkeypatch.setattr(jax, "process_index", lambda *a, **k: me.index)
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
    monkeypatch.setattr(E, "_allgather", allgather)
    monkeypatch.setattr(E, "_barrier", barrier)

    def process(p):
        me.index = p
        return E.write_embeddings(out, _batches(100 * p, counts[p]), meta={"writer": p},
                                  shard_size=4)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        metas = list(pool.map(process, (0, 1)))
    assert sorted(os.listdir(out)) == [E.EMBED_META, "shard-p00000-00000.npz",
                                       "shard-p00000-00001.npz", "shard-p00001-00000.npz"]
    assert sorted(calls) == [(p, n) for p in (0, 1)
                             for n in ("unclip_embed_done", "unclip_embed_start")]
    with open(os.path.join(out, E.EMBED_META)) as f:
        meta = json.load(f)
    assert meta["writer"] == 0  # process 0 alone writes the meta, with the totals of both
    assert (meta["num_examples"], meta["num_shards"], meta["num_processes"]) == (12, 3, 2)
    assert [m["num_examples"] for m in metas] == [12, 12]
    assert meta["arrays"]["image_emb"] == [[4], "float32"]
    # every process reads every process's shards, in the same (process-major) order
    want = list(range(7)) + list(range(100, 105))
    for p in (0, 1):
        _as_process(monkeypatch, p, 2)
        ds = loop.EmbeddingDataset(out, batch_size=2, shuffle=False)
        assert ds.arrays["id"].tolist() == want
        assert ds.arrays["caption"].tolist() == [f"c{i}" for i in want]
        assert isinstance(loop.open_data(out, "prior", None, 2), loop.EmbeddingDataset)
    # a second embed into the same folder is refused before anything is written
    _as_process(monkeypatch, 0, 1)
    with pytest.raises(FileExistsError, match="choose a new output folder"):
        E.write_embeddings(out, _batches(0, 3))


def test_reads_dirs_with_the_previous_shard_names(tmp_path):
    for n in range(2):  # what `unclip embed` wrote before: shard-NNNNN.npz, format_version 1
        np.savez(tmp_path / f"shard-{n:05d}.npz", id=np.arange(3 * n, 3 * n + 3))
    (tmp_path / E.EMBED_META).write_text(json.dumps(
        {"num_examples": 6, "num_shards": 2, "format": "unclip_jax.embeddings",
         "format_version": 1}))
    ds = loop.EmbeddingDataset(str(tmp_path), batch_size=2, shuffle=False)
    assert ds.arrays["id"].tolist() == list(range(6)) and ds.meta["format_version"] == 1
    assert [b["id"].tolist() for b, _ in zip(ds, range(3))] == [[0, 1], [2, 3], [4, 5]]


def test_gs_folders_go_through_epath(tmp_path):
    """``gs://`` dirs: every read and write goes through etils.epath (mocked onto tmp_path)."""
    bucket = "gs://bucket"
    seen = []

    def local(orig, path, *args, **kwargs):
        seen.append(os.fspath(path))
        return orig(os.fspath(path).replace(bucket, str(tmp_path)), *args, **kwargs)

    def glob(orig, path, *args, **kwargs):
        found = local(orig, path, *args, **kwargs)
        return [os.fspath(f).replace(str(tmp_path), bucket) for f in found]

    with epath_testing.mock_epath(open=local, exists=local, glob=glob, mkdir=local,
                                  makedirs=local, isdir=local):
        E.write_embeddings(f"{bucket}/emb", _batches(0, 5), shard_size=2, process_index=0,
                           process_count=1)
        assert E.is_embeddings_dir(f"{bucket}/emb")
        ds = loop.open_data(f"{bucket}/emb", "prior", None, 2, one_pass=True)
        assert isinstance(ds, loop.EmbeddingDataset)
        assert ds.arrays["id"].tolist() == list(range(5))
    assert sorted(os.listdir(tmp_path / "emb")) == [E.EMBED_META] + [
        f"shard-p00000-{n:05d}.npz" for n in range(2)]
    assert all(p.startswith(bucket) for p in seen) and len(seen) > 5


def test_embedding_dataset_processes_stay_in_lockstep(tmp_path, monkeypatch):
    """10 examples over 3 processes: every process takes 3 per epoch, so epoch ends (and the
    saved state) agree, and process 0's state resumes process 2 at its own next batch."""
    E.write_embeddings(str(tmp_path), _batches(0, 10), process_index=0, process_count=1)
    runs, states = {}, {}
    for p in (0, 2):
        _as_process(monkeypatch, p, 3)
        ds = loop.EmbeddingDataset(str(tmp_path), batch_size=2, seed=1)
        it = iter(ds)
        runs[p] = [next(it)["id"].tolist() for _ in range(5)]
        states[p] = ds.get_state()
    assert states[0] == states[2]
    assert all(not set(a) & set(b) for a, b in zip(runs[0], runs[2]))
    _as_process(monkeypatch, 2, 3)
    unbroken = loop.EmbeddingDataset(str(tmp_path), batch_size=2, seed=1)
    it = iter(unbroken)
    want = [next(it)["id"].tolist() for _ in range(8)][5:]
    resumed = loop.EmbeddingDataset(str(tmp_path), batch_size=2, seed=1)
    resumed.set_state(json.loads(json.dumps(states[0])))  # what the checkpoint holds
    it = iter(resumed)
    assert [next(it)["id"].tolist() for _ in range(3)] == want
