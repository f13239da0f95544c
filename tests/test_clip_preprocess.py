"""CLIP image preprocessing vs transformers.CLIPImageProcessor."""
import numpy as np
import pytest
from PIL import Image

import transformers

from unclip_jax.data.clip_preprocess import CLIP_MEAN, CLIP_STD, preprocess, unnormalize  # noqa: E402


def _images():
    rng = np.random.default_rng(0)
    # smooth-ish random content (resampling of pure noise magnifies rounding differences)
    def img(h, w, c=3):
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, c), dtype=np.uint8)
        big = np.asarray(Image.fromarray(base.squeeze(-1) if c == 1 else base).resize((w, h), Image.BILINEAR))
        return np.clip(big.astype(np.int16) + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)
    return [
        img(300, 451),                      # landscape, odd margin
        img(517, 260),                      # portrait
        img(224, 224),                      # no resize
        img(100, 150),                      # upscaled
        Image.fromarray(img(240, 333, 1).reshape(240, 333)),        # grayscale PIL
        Image.fromarray(np.dstack([img(250, 250), np.full((250, 250), 200, np.uint8)])),
    ]


def test_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor()  # OpenAI defaults: shortest side 224 bicubic, crop 224, CLIP mean/std
    assert tuple(proc.image_mean) == pytest.approx(CLIP_MEAN)
    assert tuple(proc.image_std) == pytest.approx(CLIP_STD)
    images = _images()
    ours = preprocess(images)
    assert ours.shape == (len(images), 224, 224, 3) and ours.dtype == np.float32
    for i, im in enumerate(images):
        ref = proc(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        err = np.abs(ours[i] - ref).max()
        assert err < 1e-5, (i, err)


def test_batch_and_single_inputs_and_other_sizes():
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    ours = preprocess(batch, size=32)
    assert ours.shape == (2, 32, 32, 3)
    assert np.allclose(preprocess(batch[0], size=32)[0], ours[0])
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = proc(images=list(batch), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert np.abs(ours - ref).max() < 1e-5
    back = unnormalize(ours)
    assert back.min() > -1e-5 and back.max() < 1 + 1e-5
