"""Reader: sharding, seeded shuffling, random captions, exact resume from a JSON state."""
import json

import numpy as np
import pytest
import grain.python as gp
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data.pipeline import Reader, record_index


@pytest.fixture(scope="module")
def tfds_source(tmp_path_factory):
    """A 23-image array_record dataset written by ImageCaptionFolder, read with data_source."""
    from unclip_jax.data.image_caption import ImageCaptionConfig, ImageCaptionFolder
    root = tmp_path_factory.mktemp("pipe")
    folder = root / "imgs"
    folder.mkdir()
    for i in range(23):
        Image.new("RGB", (8, 8), (i * 10, 255 - i * 10, i)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"image {i}\nnumber {i}\nthe {i}th\n")
    b = ImageCaptionFolder(folder=str(folder), data_dir=str(root / "data"),
                           config=ImageCaptionConfig(name="s8", image_size=8))
    b.download_and_prepare()
    return tfds.data_source("image_caption_folder/s8", data_dir=str(root / "data"),
                            split="train")


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == object:
            assert list(a[k]) == list(b[k])
        else:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])


def test_resume_gives_the_same_batches(tfds_source):
    kw = dict(batch_size=4, seed=3, shard_options=gp.NoSharding(), extra_keys=("id",))
    r = Reader(tfds_source, **kw)
    first = [next(r) for _ in range(10)]       # 40 positions: crosses an epoch end (23)
    state = json.loads(json.dumps(r.get_state()))
    cont = [next(r) for _ in range(5)]
    r.close()
    r2 = Reader(tfds_source, **kw)
    r2.set_state(state)
    again = [next(r2) for _ in range(5)]
    r2.close()
    for a, b in zip(cont, again):
        _same(a, b)
    b0 = first[0]
    assert b0["image"].shape == (4, 8, 8, 3) and b0["image"].dtype == np.float32
    assert b0["image"].min() >= -1 and b0["image"].max() <= 1
    for cap, i in zip(b0["caption"], b0["id"]):
        n = int(i[:2])
        assert cap in (f"image {n}", f"number {n}", f"the {n}th")
    # prefetch / threads never change what is produced
    r3 = Reader(tfds_source, prefetch=0, num_threads=0, **kw)
    for a in first[:3]:
        _same(a, next(r3))
    with pytest.raises(ValueError):
        Reader(tfds_source, **{**kw, "seed": 4}).set_state(state)


def test_shuffle_shards_epochs():
    n = 50
    src = [{"image": np.full((2, 2, 3), i, np.uint8), "captions": [f"c{i}", f"d{i}"]}
           for i in range(n)]

    def epoch_indices(shard, count, seed, epoch):
        per = n // count
        return [record_index(epoch * per + p, num_records=n, seed=seed, shard_index=shard,
                             shard_count=count) for p in range(per)]

    e0 = epoch_indices(0, 1, 0, 0)
    assert sorted(e0) == list(range(n)) and e0 != list(range(n))
    assert epoch_indices(0, 1, 0, 1) != e0 and epoch_indices(0, 1, 1, 0) != e0
    s0, s1 = epoch_indices(0, 2, 0, 0), epoch_indices(1, 2, 0, 0)
    assert not set(s0) & set(s1) and len(s0) == len(s1) == 25
    r = Reader(src, batch_size=10, seed=0, shard_options=gp.ShardOptions(1, 2),
               num_epochs=2, prefetch=1)
    batches = list(r)
    assert len(batches) == 5 and r.steps_per_epoch == 2
    got = np.concatenate([b["index"] for b in batches])
    assert list(got[:25]) == s1 and list(got[25:]) == epoch_indices(1, 2, 0, 1)
    caps = np.concatenate([b["caption"] for b in batches])
    assert {c[0] for c in caps} == {"c", "d"}
    assert all(c[1:] == str(i) for c, i in zip(caps, got))
    # images follow indices: pixel value == record index
    img = np.concatenate([b["image"] for b in batches])
    np.testing.assert_allclose((img[:, 0, 0, 0] + 1) * 127.5, got, atol=1e-4)


def test_default_sharding_uses_jax_process():
    r = Reader([{"image": np.zeros((1, 1, 3), np.uint8), "captions": ["x"]}] * 4, 2)
    assert (r.shard_index, r.shard_count) == (0, 1)


def test_primary_hosts_state_resumes_every_process():
    """Orbax saves the data state of process 0 only; on resume every process gets it. Two
    processes (shard 0 / 1 of 2) in lockstep: process 0's state restores a fresh shard-1 reader
    at exactly the batch shard 1 would have produced next, unbroken."""
    n = 37  # 18 per process: batches of 4 cross epoch ends
    src = [{"image": np.full((2, 2, 3), i, np.uint8), "captions": [f"a{i}", f"b{i}", f"c{i}"]}
           for i in range(n)]
    kw = dict(batch_size=4, seed=5, prefetch=0, num_threads=0)
    procs = [Reader(src, shard_options=gp.ShardOptions(p, 2), **kw) for p in (0, 1)]
    for _ in range(6):  # 6 lockstep steps
        for r in procs:
            next(r)
    saved = json.loads(json.dumps(procs[0].get_state()))  # what the checkpoint holds
    assert "shard_index" not in saved
    unbroken = [next(procs[1]) for _ in range(5)]
    resumed = Reader(src, shard_options=gp.ShardOptions(1, 2), **kw)
    resumed.set_state(saved)
    for want in unbroken:
        _same(want, next(resumed))
    # shard 1's own records: at each position (same epoch) another record than shard 0's
    for k, b in enumerate(unbroken, start=6):
        assert np.all(b["index"] != procs[0].indices(k))
    # states of the previous format (version 1, with the saving process's shard_index) load too
    v1 = dict(saved, version=1, shard_index=0)
    old = Reader(src, shard_options=gp.ShardOptions(1, 2), **kw)
    old.set_state(v1)
    _same(unbroken[0], next(old))
    # another process count changes every process's order: a clear error
    with pytest.raises(ValueError, match="shard_count=2.*process count"):
        Reader(src, shard_options=gp.ShardOptions(0, 3), **kw).set_state(saved)
    with pytest.raises(ValueError, match="version=99"):
        Reader(src, shard_options=gp.ShardOptions(1, 2), **kw).set_state(dict(saved, version=99))
