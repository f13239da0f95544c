"""ImageCaptionFolder: CSV / JSONL / sidecar captions, resizing, bad data skipped + counted, and
the command line that builds a dataset and prints its --data spec."""
import collections
import json
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data.build_folder import main
from unclip_jax.data.image_caption import ImageCaptionConfig, ImageCaptionFolder, read_captions


def _img(path, size, color, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


def _folder(tmp_path, kind):
    d = tmp_path / f"imgs_{kind}"
    _img(str(d / "red.png"), (40, 20), (255, 0, 0))                     # wide: center-crop
    _img(str(d / "sub" / "clear.png"), (16, 16), (0, 0, 255, 0), "RGBA")  # transparent -> white
    _img(str(d / "blue.jpg"), (8, 8), (0, 0, 255))
    (d / "corrupt.png").write_bytes(b"\x89PNG not really")
    np.save(d / "good.npy", np.full((12, 12, 3), 7, np.uint8))
    np.save(d / "wrong.npy", np.zeros((12, 12, 5), np.uint8))                # wrong shape
    caps = {"red.png": ["a red square", "red"], "sub/clear.png": ["nothing"],
            "blue.jpg": ["   "],                                             # empty caption
            "corrupt.png": ["broken"], "good.npy": ["grey"], "wrong.npy": ["bad"],
            "missing.png": ["gone"]}
    if kind == "csv":
        with open(d / "captions.csv", "w") as f:
            f.write("file,caption\n")
            for k, v in caps.items():
                for c in v:
                    f.write(f'{k},"{c}"\n')
            f.write("lonely.png\n")            # malformed: no caption field
            f.write(',"caption of no file"\n')  # malformed: no file
    elif kind == "jsonl":
        with open(d / "metadata.jsonl", "w") as f:
            for k, v in caps.items():
                f.write(json.dumps({"image": k, "captions": v}) + "\n")
            f.write("{not json\n")                          # malformed: not JSON
            f.write(json.dumps({"caption": "no file"}) + "\n")  # malformed: no image path
    else:
        for k, v in caps.items():
            if os.path.exists(d / k):
                (d / k).with_suffix(".txt").write_text("\n".join(v) + "\n")
    return str(d)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "txt"])
def test_builder_reads_captions_and_skips_bad_data(tmp_path, kind, caplog):
    folder = _folder(tmp_path, kind)
    data_dir = str(tmp_path / "data")
    b = ImageCaptionFolder(folder=folder, data_dir=data_dir,
                           config=ImageCaptionConfig(name="s16", image_size=16))
    with caplog.at_level(logging.WARNING, logger="unclip_jax.data.image_caption"):
        b.download_and_prepare()
    src = tfds.data_source("image_caption_folder/s16", data_dir=data_dir, split="train")
    got = {src[i]["id"].decode(): src[i] for i in range(len(src))}
    assert sorted(got) == ["good.npy", "red.png", "sub/clear.png"]
    red = got["red.png"]
    assert red["image"].shape == (16, 16, 3) and red["image"].dtype == np.uint8
    assert np.all(red["image"] == [255, 0, 0])
    assert [c.decode() for c in red["captions"]] == ["a red square", "red"]
    assert np.all(got["sub/clear.png"]["image"] == 255)
    assert np.all(got["good.npy"]["image"] == 7)
    skipped = b.skipped
    assert skipped["no_caption"] == 1 and skipped["bad_array"] == 1
    assert skipped["unreadable_image"] == 1
    if kind != "txt":
        assert skipped["missing_image"] == 1
    assert skipped["malformed_row"] == (0 if kind == "txt" else 2)
    total = sum(skipped.values())
    assert total == (3 if kind == "txt" else 6)
    reloaded = tfds.builder("image_caption_folder/s16", data_dir=data_dir)
    assert reloaded.info.metadata["num_skipped"] == total
    assert reloaded.info.metadata["skipped"] == dict(skipped)
    # the end-of-build line reports the counts, malformed rows included
    end = [r.getMessage() for r in caplog.records if "wrote 3 examples" in r.getMessage()]
    assert len(end) == 1 and f"skipped {total} " in end[0]
    if kind != "txt":
        assert "'malformed_row': 2" in end[0]
        assert sum("(malformed_row)" in r.getMessage() for r in caplog.records) == 2


def test_read_captions_csv_multiple_rows(tmp_path):
    (tmp_path / "captions.csv").write_text("image,caption\na.png,one\n./a.png,two\n,three\n")
    skipped = collections.Counter()
    assert read_captions(str(tmp_path), skipped=skipped) == {"a.png": ["one", "two"]}
    assert skipped == {"malformed_row": 1}
    assert read_captions(str(tmp_path)) == {"a.png": ["one", "two"]}  # counter optional


def test_command_line_builds_and_prints_the_data_spec(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rs = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rs.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"{i}.png", "caption": f"random {i}"}) + "\n" for i in range(4)))
    data_dir = str(tmp_path / "data")
    assert main([str(folder), "--data-dir", data_dir, "--image-size", "8", "--name", "t8"]) == 0
    spec = f"tfds:image_caption_folder/t8:train@{data_dir}"
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"--data {spec}"
    from unclip_jax.train.loop import open_data

    reader = open_data(spec, "clip", None, 2)  # what `unclip train --data SPEC` opens
    batch = next(iter(reader))
    reader.close()
    assert batch["image"].shape == (2, 8, 8, 3) and reader.num_examples == 4
    assert all(c.startswith("random ") for c in batch["caption"])
