"""`ImageCaptionFolder`: a tensorflow-datasets builder for your own captioned images.

The folder (``folder=`` or the download config's ``manual_dir``) holds images (png, jpg, jpeg,
webp, bmp, gif, or ``.npy`` uint8 arrays [H, W], [H, W, 3] or [H, W, 4]), in sub-folders if you
like, and captions in one of these forms (looked for in this order):

* ``captions.csv`` / ``metadata.csv`` with a header ``file,caption`` (``image`` or ``file_name``
  also name the file column); several rows for one file give it several captions;
* ``captions.jsonl`` / ``metadata.jsonl``, one object a line: ``{"image": "a.png", "caption":
  "..."}`` or ``{"image": "a.png", "captions": ["...", "..."]}`` (``file`` / ``file_name`` work);
* sidecar text files: ``cat.png`` + ``cat.txt``, one caption a line.

File paths are relative to the folder. Each example::

    image     uint8 [S, S, 3] PNG: alpha composited on white, center-cropped to a square and
              resized (bicubic) to the config's image_size S
    captions  list of str (stripped, empty ones dropped)
    id        the image's path relative to the folder

Bad data never stops the build: an unreadable or corrupt image, an image without any non-empty
caption, an array of the wrong shape, a caption for a missing image, or a malformed CSV / JSONL
row (``malformed_row``) is skipped, logged, and counted; the counts are logged at the end and
kept in the dataset metadata (``info.metadata["skipped"]``).

    builder = ImageCaptionFolder(folder="my_images", data_dir="data",
                                 config=ImageCaptionConfig(name="128", image_size=128))
    builder.download_and_prepare()
    source = tfds.data_source("image_caption_folder/128", data_dir="data", split="train")

or from the command line, which prints the ``--data`` spec that ``unclip train`` / ``unclip
embed`` take (``unclip_jax.data.build_folder``)::

    python -m unclip_jax.data.build_folder my_images --data-dir data --image-size 128
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import logging
import os
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".npy")
CAPTION_FILES = ("captions.csv", "metadata.csv", "captions.jsonl", "metadata.jsonl")
_FILE_KEYS = ("file", "image", "file_name", "filename", "path")


class SkipExample(ValueError):
    """Raised for an example that is skipped (and counted) instead of written."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------- images

def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise SkipExample("bad_array", f"dtype {arr.dtype}, want uint8")
    if arr.ndim == 2:
        return Image.fromarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return Image.fromarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        return Image.fromarray(arr)
    raise SkipExample("bad_array", f"shape {arr.shape}, want [H, W], [H, W, 3] or [H, W, 4]")


def square_resize(im: Image.Image, size: int) -> np.ndarray:
    """Composite on white, center-crop to a square, resize to ``size`` -> uint8 [S, S, 3]."""
    im = _to_rgb(im)
    w, h = im.size
    if w < 1 or h < 1:
        raise SkipExample("bad_image", f"size {im.size}")
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), Image.BICUBIC)
    out = np.asarray(im, dtype=np.uint8)
    if out.shape != (size, size, 3):
        raise SkipExample("bad_array", f"processed shape {out.shape}")
    return out


def load_square_image(path: str, size: int) -> np.ndarray:
    """Read an image file or ``.npy`` array as uint8 [size, size, 3]; SkipExample if bad."""
    try:
        if path.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
            return square_resize(_array_to_pil(np.asarray(arr)), size)
        with Image.open(path) as im:
            im.load()
            return square_resize(im, size)
    except SkipExample:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise SkipExample("unreadable_image", f"{path}: {e}") from None


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- captions

def _norm(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/") if path else path


def list_images(folder: str) -> list[str]:
    """Image paths under ``folder``, relative, sorted."""
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                out.append(_norm(os.path.relpath(os.path.join(root, f), folder)))
    return sorted(out)


def _file_of(row: dict) -> str | None:
    for k in _FILE_KEYS:
        if row.get(k):
            return _norm(str(row[k]))
    return None


MALFORMED_ROW = "malformed_row"  # skip reason of a CSV / JSONL row without a file or caption


def read_captions(folder: str, captions_file: str | None = None,
                  skipped: Optional[collections.Counter] = None) -> dict[str, list[str]]:
    """``{relative image path: [captions]}`` from a CSV / JSONL file or sidecar .txt files.
    Malformed rows are logged, left out and counted in ``skipped[MALFORMED_ROW]`` (when a
    counter is given)."""
    def malformed(where: str, why: str) -> None:
        log.warning("%s: %s, skipped (%s)", where, why, MALFORMED_ROW)
        if skipped is not None:
            skipped[MALFORMED_ROW] += 1

    path = None
    if captions_file:
        path = captions_file if os.path.isabs(captions_file) else os.path.join(folder,
                                                                               captions_file)
    else:
        for name in CAPTION_FILES:
            if os.path.exists(os.path.join(folder, name)):
                path = os.path.join(folder, name)
                break
    caps: dict[str, list[str]] = collections.defaultdict(list)
    if path is None:  # sidecar .txt files
        for rel in list_images(folder):
            txt = os.path.join(folder, os.path.splitext(rel)[0] + ".txt")
            if os.path.exists(txt):
                with open(txt, encoding="utf-8", errors="replace") as f:
                    caps[rel] += [line.strip() for line in f]
        return dict(caps)
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for i, row in enumerate(csv.DictReader(f)):
                rel = _file_of(row)
                if rel is None or row.get("caption") is None:
                    malformed(f"{path} row {i + 2}", "no file/caption column")
                    continue
                caps[rel].append(row["caption"])
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rel = _file_of(row)
                    got = row.get("captions", row.get("caption"))
                    got = [got] if isinstance(got, str) else list(got or [])
                except (ValueError, TypeError, AttributeError) as e:
                    malformed(f"{path} line {i + 1}", str(e))
                    continue
                if rel is None:
                    malformed(f"{path} line {i + 1}", "no image path")
                    continue
                caps[rel] += [str(c) for c in got]
    return dict(caps)


# ----------------------------------------------------------------------------- builder

@dataclasses.dataclass
class ImageCaptionConfig(tfds.core.BuilderConfig):
    """``image_size``: side of the square output images; ``captions_file``: a CSV / JSONL path
    (relative to the folder) instead of the auto-detected one."""
    image_size: int = 64
    captions_file: str | None = None


class ImageCaptionFolder(tfds.core.GeneratorBasedBuilder):
    """Images + captions from a local folder (CSV, JSONL or sidecar .txt captions)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [ImageCaptionConfig(name=str(s), image_size=s) for s in (64, 256)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass folder= or put the images + captions in manual_dir."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds's own lookup imports `importlib_resources` (not installed) for editable installs.
        return epath.Path(__file__)

    def __init__(self, *, folder: str | None = None, file_format=None, **kwargs):
        self._folder = folder
        self.skipped: collections.Counter = collections.Counter()
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description="Images with captions from a local folder.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "id": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        folder = self._folder or os.fspath(dl_manager.manual_dir)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder not found: {folder}")
        return {"train": self._generate_examples(folder)}

    def _skip(self, reason: str, detail: str):
        self.skipped[reason] += 1
        log.warning("skipping %s (%s)", detail, reason)

    def _generate_examples(self, folder: str) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        captions = read_captions(folder, cfg.captions_file, skipped=self.skipped)
        images = set(list_images(folder))
        for rel in sorted(set(captions) - images):
            self._skip("missing_image", rel)
        written = 0
        for rel in sorted(images):
            caps = [c.strip() for c in captions.get(rel, []) if c and c.strip()]
            if not caps:
                self._skip("no_caption", rel)
                continue
            try:
                image = load_square_image(os.path.join(folder, rel), cfg.image_size)
            except SkipExample as e:
                self._skip(e.reason, str(e))
                continue
            written += 1
            yield rel, {"image": _png(image), "captions": caps, "id": rel}
        total = sum(self.skipped.values())
        log.warning("ImageCaptionFolder(%s): wrote %d examples, skipped %d %s", folder, written,
                    total, dict(self.skipped))
        self.info.metadata["skipped"] = dict(self.skipped)
        self.info.metadata["num_skipped"] = total

