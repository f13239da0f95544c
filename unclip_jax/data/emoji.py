"""`EmojiDataset`: a tensorflow-datasets builder for the Google and Twitter emoji sets.

Source: the npm packages ``emoji-datasource-google`` and ``emoji-datasource-twitter`` at version
16.0.0 (iamcal/emoji-data). Each tarball holds ``package/emoji.json`` and a 64 px sprite sheet
``package/img/<style>/sheets/64.png`` (4092 x 4092 RGBA, 66 px cells = 64 px emoji + 1 px
padding on every side). Each style has 1,911 base emoji plus 1,875 skin-tone variants, whose
sheet coordinates are in ``skin_variations``.

Examples (one per style x emoji x skin tone)::

    image      uint8 [64, 64, 3] PNG (alpha composited on white)
    captions   list of str, lowercase; the first is the CLDR name ("red heart",
               "thumbs up: medium skin tone"); then "a twitter emoji of a red heart",
               "an emoji of a red heart", the Unicode name ("heavy black heart"), short names
    concept    unified code of the *base* emoji ("2764-FE0F"): all skin tones and both styles
               of one emoji share it
    unified    unified code of this image (with skin-tone modifiers)
    style      "google" | "twitter"
    skin_tone  "" | "medium" | "light,dark" (one entry per modifier, in order)
    category, subcategory   from emoji.json ("Smileys & Emotion", "heart")

Splits: ``test`` holds ~10% of base concepts (every skin tone and both styles of a concept stay
on one side), listed in the committed file ``unclip_jax/assets/emoji_split/test_concepts.txt``
(chosen once by :func:`is_test_concept`, a seeded hash); ``train`` is the rest.

The tarballs are downloaded through the tfds download manager (pinned sha256 below), or read
from ``manual_dir`` when ``emoji-datasource-<style>-16.0.0.tgz`` is there::

    builder = EmojiDataset(data_dir="/path/to/data")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))
    source = tfds.data_source("emoji_dataset", data_dir="/path/to/data", split="train")

CLDR names come from the PyPI ``emoji`` package (``emoji.EMOJI_DATA[char]["en"]``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import unicodedata
from typing import Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

log = logging.getLogger(__name__)

STYLES = ("google", "twitter")
PACKAGE_VERSION = "16.0.0"
CELL = 64          # emoji pixels per cell side
PADDING = 1        # transparent pixels around each cell
STRIDE = CELL + 2 * PADDING  # 66
SHEET_MEMBER = "package/img/{style}/sheets/64.png"
JSON_MEMBER = "package/emoji.json"


def tarball_name(style: str) -> str:
    return f"emoji-datasource-{style}-{PACKAGE_VERSION}.tgz"


def tarball_url(style: str) -> str:
    return (f"https://registry.npmjs.org/emoji-datasource-{style}/-/"
            f"{tarball_name(style)}")


# (size in bytes, sha256), computed once from the registry tarballs.
TARBALL_CHECKSUMS = {
    "google": (74344091, "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"),
    "twitter": (61683754, "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"),
}

SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}

# The split: a concept is in `test` iff it is listed in this file. The list was made once with
# `write_test_concepts` (hash below) from emoji-datasource 16.0.0 and must not be regenerated.
SPLIT_SALT = "unclip-emoji-split-v1"
TEST_FRACTION = 0.1
TEST_CONCEPTS_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                                  "emoji_split", "test_concepts.txt")


# ----------------------------------------------------------------------------- names, captions

def unified_to_char(unified: str) -> str:
    """``"2764-FE0F"`` -> ``"\u2764\ufe0f"``."""
    return "".join(chr(int(c, 16)) for c in unified.split("-"))


_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def _clean(name: str) -> str:
    name = name.strip(":").replace("_", " ").translate(_QUOTES)
    return re.sub(r"\s+", " ", name).strip().lower()


def _ascii_fold(name: str) -> str:
    """``"flag: côte d'ivoire"`` -> ``"flag: cote d'ivoire"``."""
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()


def _emoji_data():
    try:
        import emoji as emoji_pkg
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError("EmojiDataset needs the PyPI `emoji` package for CLDR names "
                          "(pip install 'emoji>=2.14,<3')") from e
    return emoji_pkg.EMOJI_DATA


def cldr_names(entry: Mapping) -> list[str]:
    """CLDR-style names of a base emoji (``["red heart", "heart"]``: name first, then aliases),
    looked up in the ``emoji`` package by its unified / non-qualified code points."""
    data = _emoji_data()
    codes = [entry.get("unified"), entry.get("non_qualified")]
    if entry.get("unified"):
        codes.append(entry["unified"].replace("-FE0F", ""))
    for code in codes:
        if not code:
            continue
        item = data.get(unified_to_char(code))
        if item:
            names = [item["en"]] + list(item.get("alias", []))
            return _dedupe(_clean(n) for n in names)
    return []


def skin_tone_label(key: str | None) -> str:
    """``"1F3FD"`` -> ``"medium"``, ``"1F3FB-1F3FF"`` -> ``"light,dark"``; ``""`` for none."""
    if not key:
        return ""
    return ",".join(SKIN_TONES[k] for k in key.split("-"))


def _tone_phrase(key: str | None) -> str:
    """CLDR suffix: ``"medium skin tone"``; two equal tones collapse to one."""
    if not key:
        return ""
    tones = _dedupe(SKIN_TONES[k] for k in key.split("-"))
    return ", ".join(f"{t} skin tone" for t in tones)


def _with_article(name: str) -> str:
    """``"red heart"`` -> ``"a red heart"``; plurals, flags and numbers get no article."""
    if name.startswith("flag: "):
        return "the flag of " + name[len("flag: "):]
    first = name.split(" ")[0]
    last = name.split(":")[0].split(" ")[-1]
    if first in ("a", "an", "the") or not name[:1].isalpha():
        return name
    if last.endswith("s") and not last.endswith(("ss", "us", "is")):
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def _dedupe(items: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for s in items:
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def emoji_captions(entry: Mapping, style: str | None = None,
                   skin_key: str | None = None) -> list[str]:
    """Captions of one image, lowercase, most natural first.

    ``entry`` is a base emoji from emoji.json; ``skin_key`` a ``skin_variations`` key.
    Without ``style`` the style-specific caption is left out (a concept's captions).
    """
    cldr = cldr_names(entry)
    unicode_name = _clean(entry.get("name") or "")
    short = [_clean(s) for s in entry.get("short_names") or []]
    main = cldr[0] if cldr else (unicode_name or (short[0] if short else entry["unified"]))
    if entry.get("subcategory") in ("country-flag", "subdivision-flag") and \
            not main.startswith("flag"):
        cldr = [main] + cldr  # "united states" stays as a caption after "flag: united states"
        main = "flag: " + main
    tone = _tone_phrase(skin_key)
    if tone:
        title = f"{main}: {tone}"
        phrase = f"{_with_article(main)} with {tone}"
        suffix = f", {tone}"
    else:
        title, phrase, suffix = main, _with_article(main), ""
    caps = [title]
    if style:
        caps.append(f"a {style} emoji of {phrase}")
    caps.append(f"an emoji of {phrase}")
    caps += [n + suffix for n in [unicode_name] + [c for c in cldr if c != main] + short if n]
    if not title.isascii():
        caps.append(_ascii_fold(title))
    return _dedupe(caps)


def concept_captions(entries: Sequence[Mapping]) -> dict[str, list[str]]:
    """``{concept unified code: style-free captions of the base emoji}`` for all entries."""
    return {e["unified"]: emoji_captions(e) for e in entries}


# ----------------------------------------------------------------------------- split

def is_test_concept(unified: str, fraction: float = TEST_FRACTION,
                    salt: str = SPLIT_SALT) -> bool:
    """Seeded hash of a concept's unified code: True for ~``fraction`` of concepts."""
    h = int.from_bytes(hashlib.sha256(f"{salt}:{unified}".encode()).digest()[:8], "big")
    return (h % 1_000_000) < fraction * 1_000_000


def write_test_concepts(entries: Sequence[Mapping], path: str = TEST_CONCEPTS_PATH) -> list[str]:
    """Write the held-out concept list (run once; the committed file is the split)."""
    chosen = sorted(e["unified"] for e in entries if is_test_concept(e["unified"]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# emoji-datasource {PACKAGE_VERSION} base concepts held out as `test` "
                f"(sha256 salt {SPLIT_SALT!r}, fraction {TEST_FRACTION}). Do not regenerate.\n")
        for u in chosen:
            f.write(u + "\n")
    return chosen


def load_test_concepts(path: str = TEST_CONCEPTS_PATH) -> frozenset[str]:
    with open(path) as f:
        return frozenset(line.strip() for line in f
                         if line.strip() and not line.startswith("#"))


# ----------------------------------------------------------------------------- sheets

def read_package(tgz_path: str, style: str) -> tuple[list[dict], np.ndarray]:
    """Read ``emoji.json`` and the 64 px sheet (RGBA uint8) from an npm tarball."""
    with tarfile.open(tgz_path, "r:gz") as tar:
        entries = json.load(tar.extractfile(JSON_MEMBER))
        with Image.open(io.BytesIO(tar.extractfile(SHEET_MEMBER.format(style=style)).read())) \
                as im:
            sheet = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    return entries, sheet


def read_emoji_json(tgz_path: str) -> list[dict]:
    with tarfile.open(tgz_path, "r:gz") as tar:
        return json.load(tar.extractfile(JSON_MEMBER))


def cut_cell(sheet: np.ndarray, sheet_x: int, sheet_y: int) -> np.ndarray:
    """The 64x64 emoji at cell (x, y) of an RGBA sheet, composited on white -> uint8 RGB."""
    y0, x0 = sheet_y * STRIDE + PADDING, sheet_x * STRIDE + PADDING
    cell = sheet[y0:y0 + CELL, x0:x0 + CELL]
    if cell.shape != (CELL, CELL, 4):
        raise ValueError(f"cell ({sheet_x}, {sheet_y}) is outside the {sheet.shape} sheet")
    rgb = cell[..., :3].astype(np.uint32)
    a = cell[..., 3:].astype(np.uint32)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def iter_images(entries: Sequence[Mapping], sheet: np.ndarray, style: str):
    """Yield ``(unified, base entry, skin key or None, image)`` for every emoji in the sheet."""
    flag = f"has_img_{style}"
    for e in entries:
        if e.get(flag, True):
            yield e["unified"], e, None, cut_cell(sheet, e["sheet_x"], e["sheet_y"])
        for key, v in (e.get("skin_variations") or {}).items():
            if v.get(flag, True):
                yield v["unified"], e, key, cut_cell(sheet, v["sheet_x"], v["sheet_y"])


# ----------------------------------------------------------------------------- builder

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_manual(manual_dir, style: str) -> str | None:
    if not manual_dir:
        return None
    path = os.path.join(os.fspath(manual_dir), tarball_name(style))
    return path if os.path.exists(path) else None


class EmojiDataset(tfds.core.GeneratorBasedBuilder):
    """Google + Twitter emoji (emoji-datasource 16.0.0), 64x64 RGB, several captions each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "emoji-datasource-google/twitter 16.0.0, 64 px cells."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: put emoji-datasource-google-16.0.0.tgz and "
        "emoji-datasource-twitter-16.0.0.tgz (from registry.npmjs.org) in manual_dir; "
        "otherwise they are downloaded.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds's own lookup imports `importlib_resources` (not installed) for editable installs.
        return epath.Path(__file__)

    def __init__(self, *, file_format=None, **kwargs):
        # array_record: random access for tfds.data_source + grain, and no TensorFlow needed.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
        return {tarball_url(s): tfds.core.download.checksums.UrlInfo(
                    size=size, checksum=sha, filename=tarball_name(s))
                for s, (size, sha) in TARBALL_CHECKSUMS.items()}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(CELL, CELL, 3), encoding_format="png"),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "concept": tfds.features.Text(),
                "unified": tfds.features.Text(),
                "style": tfds.features.Text(),
                "skin_tone": tfds.features.Text(),
                "category": tfds.features.Text(),
                "subcategory": tfds.features.Text(),
            }),
            homepage="https://github.com/iamcal/emoji-data",
            metadata=tfds.core.MetadataDict(),
        )

    def _tarballs(self, dl_manager) -> dict[str, str]:
        manual_dir = None
        try:
            manual_dir = dl_manager.manual_dir
        except Exception:  # tfds raises when manual_dir is unset / missing
            manual_dir = None
        paths, to_download = {}, {}
        for style in STYLES:
            local = _find_manual(manual_dir, style)
            if local:
                size, sha = TARBALL_CHECKSUMS[style]
                got = _sha256(local)
                if got != sha:
                    log.warning("%s has sha256 %s, not the pinned %s of %s", local, got, sha,
                                tarball_url(style))
                paths[style] = local
            else:
                to_download[style] = tarball_url(style)
        if to_download:
            got = dl_manager.download(to_download)
            paths.update({k: os.fspath(v) for k, v in got.items()})
        return paths

    def _split_generators(self, dl_manager):
        paths = self._tarballs(dl_manager)
        test = load_test_concepts()
        entries = read_emoji_json(paths[STYLES[0]])
        caps = concept_captions(entries)
        self.info.metadata["concept_captions"] = caps
        self.info.metadata["test_concepts"] = sorted(c for c in caps if c in test)
        return {
            "train": self._generate_examples(paths, test, want_test=False),
            "test": self._generate_examples(paths, test, want_test=True),
        }

    def _generate_examples(self, paths: Mapping[str, str], test: frozenset, want_test: bool):
        for style in STYLES:
            entries, sheet = read_package(paths[style], style)
            for unified, e, key, image in iter_images(entries, sheet, style):
                if (e["unified"] in test) != want_test:
                    continue
                yield f"{style}/{unified}", {
                    "image": png_bytes(image),
                    "captions": emoji_captions(e, style, key),
                    "concept": e["unified"],
                    "unified": unified,
                    "style": style,
                    "skin_tone": skin_tone_label(key),
                    "category": e.get("category") or "",
                    "subcategory": e.get("subcategory") or "",
                }


def load_concept_captions(data_dir: str | None = None,
                          split: str | None = None) -> dict[str, list[str]]:
    """Captions of every concept of a prepared ``emoji_dataset`` (``{concept: captions}``),
    optionally only those of ``split`` ("train" / "test"). Read from the dataset's metadata."""
    builder = EmojiDataset(data_dir=data_dir)
    meta = builder.info.metadata
    if not meta or "concept_captions" not in meta:
        raise FileNotFoundError(f"emoji_dataset is not prepared in {builder.data_dir}; run "
                                "EmojiDataset(data_dir=...).download_and_prepare() first")
    caps = dict(meta["concept_captions"])
    if split is not None:
        test = set(meta["test_concepts"])
        caps = {c: v for c, v in caps.items() if (c in test) == (split == "test")}
    return caps


def concept_caption_list(data_dir: str | None = None, split: str | None = None) -> list[str]:
    """The first (CLDR) caption of each concept, sorted by concept code: a small vocabulary of
    prompts for R-precision and sampling grids."""
    caps = load_concept_captions(data_dir, split)
    return [caps[c][0] for c in sorted(caps)]


if __name__ == "__main__":  # python -m unclip_jax.data.emoji --write-test-concepts TARBALL
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--write-test-concepts", metavar="TARBALL")
    args = p.parse_args()
    if args.write_test_concepts:
        got = write_test_concepts(read_emoji_json(args.write_test_concepts))
        print(f"wrote {len(got)} test concepts to {TEST_CONCEPTS_PATH}")
