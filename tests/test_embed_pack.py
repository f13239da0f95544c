"""embed_pack: an `unclip embed` dir -> a small pack -> the same embeddings dir, re-encoded.

Uses the committed micro model's CLIP (tests/fixtures/micro_model)."""
import dataclasses
import os

import numpy as np
import pytest

from unclip_jax.train import embed_pack, loop
from unclip_jax.train.export import embed_dataset, load_clip_params

HERE = os.path.dirname(__file__)
FIXTURE_MODEL = os.path.join(HERE, "fixtures", "micro_model")
CAPTIONS = ["a red heart", "grinning face", "thumbs up", "a cat", "a dog", "fire", "a star",
            "a blue circle", "a green apple", "rain"]


def _batches(images, rng):
    """Two passes over ``images`` (other captions in each pass), in batches of 4."""
    for _ in range(2):
        for s in range(0, len(images), 4):
            img = images[s:s + 4]
            yield {"image": img.astype(np.float32) / 127.5 - 1.0,
                   "caption": [CAPTIONS[i] for i in rng.integers(0, len(CAPTIONS), len(img))]}


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    ccfg, params, tok = load_clip_params(None, model=FIXTURE_MODEL)
    size = ccfg.vision_config.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, size, size, 3)).astype(np.uint8)
    images[5] = images[1]  # a duplicate image within one pass, too
    out = str(tmp_path_factory.mktemp("emb"))
    embed_dataset(ccfg, params, _batches(images, rng), out, tokenizer_dir=tok, progress=False,
                  meta={"source": "test", "clip": FIXTURE_MODEL}, shard_size=5)
    return out, ccfg, params


def _arrays(path):
    return loop.EmbeddingDataset(path, batch_size=1, shuffle=False).arrays


def test_pack_unpack_round_trip(emb_dir, tmp_path):
    src, ccfg, params = emb_dir
    pack_file = str(tmp_path / "p.npz")
    meta = embed_pack.pack(src, pack_file)
    assert meta["num_examples"] == 12 and meta["num_images"] == 5  # 6 images, 2 equal
    size = lambda p: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p))  # noqa: E731
    assert os.path.getsize(pack_file) < size(src) / 2
    out = str(tmp_path / "unpacked")
    new_meta = embed_pack.unpack(pack_file, ccfg, params, out, batch_size=5, progress=False)
    assert new_meta["num_examples"] == 12 and new_meta["source"] == "test"
    a, b = _arrays(src), _arrays(out)
    assert sorted(a) == sorted(b)
    for k in ("image", "caption", "input_ids", "text_mask"):
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in embed_pack.RECOMPUTED:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    # the recomputation is real: another CLIP gives other embeddings
    import jax

    other = jax.tree.map(lambda x: x * 1.5, params)
    out2 = str(tmp_path / "other")
    embed_pack.unpack(pack_file, ccfg, other, out2, batch_size=5, progress=False)
    assert not np.allclose(_arrays(out2)["text_states"], a["text_states"], atol=1e-3)


def test_cli_and_clear_errors(emb_dir, tmp_path):
    src, ccfg, params = emb_dir
    pack_file = str(tmp_path / "p.npz")
    assert embed_pack.main(["pack", src, pack_file]) == 0
    out = str(tmp_path / "u")
    assert embed_pack.main(["unpack", pack_file, "--model", FIXTURE_MODEL, "--out", out,
                            "--no-progress"]) == 0
    assert loop.EmbeddingDataset(out, batch_size=4).num_examples == 12
    with pytest.raises(FileNotFoundError, match="not an embeddings dir"):
        embed_pack.pack(str(tmp_path), str(tmp_path / "x.npz"))
    with pytest.raises(FileNotFoundError, match="no pack file"):
        embed_pack.read_pack(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not an embeddings pack"):
        embed_pack.read_pack(str(tmp_path / "plain.npz"))
    short = dataclasses.replace(ccfg, text_config=dataclasses.replace(
        ccfg.text_config, max_position_embeddings=3))
    with pytest.raises(ValueError, match="tokens but this CLIP takes 3"):
        embed_pack.unpack(pack_file, short, params, str(tmp_path / "v"), progress=False)
