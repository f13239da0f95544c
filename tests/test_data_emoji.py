"""EmojiDataset on a tiny fake npm tarball (same layout as emoji-datasource 16.0.0)."""
import io
import json
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data import emoji as E

COLORS = {(0, 0): (200, 0, 0), (1, 0): (0, 200, 0), (2, 0): (0, 0, 200), (0, 1): (10, 20, 30),
          (1, 1): (120, 60, 0)}
ENTRIES = [
    {"name": "HEAVY BLACK HEART", "unified": "2764-FE0F", "non_qualified": "2764",
     "short_names": ["heart"], "sheet_x": 0, "sheet_y": 0, "category": "Smileys & Emotion",
     "subcategory": "heart", "has_img_google": True, "has_img_twitter": True},
    {"name": "THUMBS UP SIGN", "unified": "1F44D", "non_qualified": None,
     "short_names": ["+1", "thumbsup"], "sheet_x": 1, "sheet_y": 0, "category": "People & Body",
     "subcategory": "hand-fingers-closed", "has_img_google": True, "has_img_twitter": True,
     "skin_variations": {"1F3FD": {"unified": "1F44D-1F3FD", "sheet_x": 1, "sheet_y": 1,
                                   "has_img_google": True, "has_img_twitter": True}}},
    {"name": "GRINNING FACE", "unified": "1F600", "non_qualified": None,
     "short_names": ["grinning"], "sheet_x": 2, "sheet_y": 0, "category": "Smileys & Emotion",
     "subcategory": "face-smiling", "has_img_google": True, "has_img_twitter": True},
    # in the committed test-concept list:
    {"name": "HASH KEY", "unified": "0023-FE0F-20E3", "non_qualified": "0023-20E3",
     "short_names": ["hash"], "sheet_x": 0, "sheet_y": 1, "category": "Symbols",
     "subcategory": "keycap", "has_img_google": True, "has_img_twitter": True},
]


def _sheet():
    """3 x 2 cells; opaque black padding so any off-by-one cut shows up."""
    s = np.zeros((2 * E.STRIDE, 3 * E.STRIDE, 4), np.uint8)
    s[..., 3] = 255
    for (x, y), c in COLORS.items():
        y0, x0 = y * E.STRIDE + 1, x * E.STRIDE + 1
        s[y0:y0 + 64, x0:x0 + 64, :3] = c
    s[1:65, 133:197, 3] = 0          # grinning face cell fully transparent -> white
    return s


def _tarball(path, style):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("package/emoji.json", json.dumps(ENTRIES).encode()),
                           (E.SHEET_MEMBER.format(style=style), _png(_sheet()))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji")
    manual = root / "manual"
    manual.mkdir()
    for style in E.STYLES:
        _tarball(str(manual / E.tarball_name(style)), style)
    data_dir = str(root / "data")
    b = E.EmojiDataset(data_dir=data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return data_dir


def _read(data_dir, split):
    src = tfds.data_source("emoji_dataset", data_dir=data_dir, split=split)
    out = {}
    for i in range(len(src)):
        ex = src[i]
        out[(ex["style"].decode(), ex["unified"].decode())] = ex
    return out


def test_counts_split_and_cells(prepared):
    train, test = _read(prepared, "train"), _read(prepared, "test")
    assert len(train) == 2 * 4 and len(test) == 2 * 1  # 3 concepts + 1 skin tone; 1 concept
    assert {u for _, u in test} == {"0023-FE0F-20E3"}
    for style in E.STYLES:
        heart = train[(style, "2764-FE0F")]
        assert heart["image"].shape == (64, 64, 3) and heart["image"].dtype == np.uint8
        assert np.all(heart["image"] == COLORS[(0, 0)])     # no padding bleed
        assert np.all(train[(style, "1F44D-1F3FD")]["image"] == COLORS[(1, 1)])
        assert np.all(train[(style, "1F600")]["image"] == 255)   # alpha -> white
        assert np.all(test[(style, "0023-FE0F-20E3")]["image"] == COLORS[(0, 1)])


def test_captions_and_fields(prepared):
    train = _read(prepared, "train")
    heart = train[("twitter", "2764-FE0F")]
    caps = [c.decode() for c in heart["captions"]]
    assert caps[0] == "red heart"
    assert "a twitter emoji of a red heart" in caps and "heavy black heart" in caps
    assert "an emoji of a red heart" in caps and "heart" in caps
    assert all(c == c.lower() for c in caps)
    tone = train[("google", "1F44D-1F3FD")]
    tcaps = [c.decode() for c in tone["captions"]]
    assert tcaps[0] == "thumbs up: medium skin tone"
    assert tone["concept"].decode() == "1F44D" and tone["skin_tone"].decode() == "medium"
    assert tone["category"].decode() == "People & Body"
    assert heart["skin_tone"].decode() == "" and heart["style"].decode() == "twitter"


def test_concept_captions(prepared):
    caps = E.load_concept_captions(prepared)
    assert set(caps) == {"2764-FE0F", "1F44D", "1F600", "0023-FE0F-20E3"}
    assert E.concept_caption_list(prepared, split="test") == [caps["0023-FE0F-20E3"][0]]
    assert "red heart" in E.concept_caption_list(prepared, split="train")


def test_split_file_is_stable():
    test = E.load_test_concepts()
    assert 150 < len(test) < 250           # ~10% of 1,911 concepts
    assert all(E.is_test_concept(u) for u in test)   # the file matches the seeded hash


@pytest.mark.slow
def test_real_download(tmp_path):
    """Downloads both tarballs (136 MB) through the tfds download manager (checksums pinned)."""
    b = E.EmojiDataset(data_dir=str(tmp_path / "data"))
    b.download_and_prepare(download_dir=str(tmp_path / "dl"))
    n = {k: v.num_examples for k, v in b.info.splits.items()}
    assert n["train"] + n["test"] == 2 * (1911 + 1875)
