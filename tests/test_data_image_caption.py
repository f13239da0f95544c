"""ImageCaptionFolder: CSV / JSONL / sidecar captions, resizing, and bad data skipped + counted."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

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
    elif kind == "jsonl":
        with open(d / "metadata.jsonl", "w") as f:
            for k, v in caps.items():
                f.write(json.dumps({"image": k, "captions": v}) + "\n")
            f.write("{not json\n")
    else:
        for k, v in caps.items():
            if os.path.exists(d / k):
                (d / k).with_suffix(".txt").write_text("\n".join(v) + "\n")
    return str(d)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "txt"])
def test_builder_reads_captions_and_skips_bad_data(tmp_path, kind):
    folder = _folder(tmp_path, kind)
    data_dir = str(tmp_path / "data")
    b = ImageCaptionFolder(folder=folder, data_dir=data_dir,
                           config=ImageCaptionConfig(name="s16", image_size=16))
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
    reloaded = tfds.builder("image_caption_folder/s16", data_dir=data_dir)
    assert reloaded.info.metadata["num_skipped"] == sum(skipped.values())


def test_read_captions_csv_multiple_rows(tmp_path):
    (tmp_path / "captions.csv").write_text("image,caption\na.png,one\n./a.png,two\n")
    assert read_captions(str(tmp_path)) == {"a.png": ["one", "two"]}
