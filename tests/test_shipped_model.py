"""The shipped default model (issue "5 of 6"): the emoji unCLIP inside the package.

CI does not train; these tests load the committed model dir, check that it is the default
``--model``, small enough to ship, complete (every stage trained, an inpainting decoder), and that
it samples a small image end to end that follows its caption better than a wrong one.
"""
import os

import jax
import numpy as np
import pytest

from unclip_jax import cli
from unclip_jax.pipelines import model as model_lib
from unclip_jax.pipelines import stages, text_to_image
from unclip_jax.utils.images import to_uint8

# UNCLIP_MODEL_UNDER_TEST: run these checks on a candidate model dir before it replaces the
# shipped one (experiments/emoji_cpu_round.sh); unset, they check the shipped model.
SHIPPED = os.environ.get("UNCLIP_MODEL_UNDER_TEST") or cli.SHIPPED_MODEL
MAX_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def model():
    assert os.path.isfile(os.path.join(SHIPPED, model_lib.META_FILE)), (
        f"no shipped model at {SHIPPED}: train it (README, 'The shipped emoji model')")
    return cli.load_model(SHIPPED)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_shipped_model_is_the_default_small_and_complete(model):
    assert cli.default_model() == cli.SHIPPED_MODEL
    assert _dir_bytes(SHIPPED) <= MAX_BYTES
    meta = model_lib.read_meta(SHIPPED)
    assert meta["storage_dtype"] == "bfloat16" and meta["has_inpaint"]
    assert not model.random_weights and model.has_inpaint_decoder
    assert not os.path.exists(os.path.join(SHIPPED, "random_stages.json"))
    # experiments/emoji.py (32 px decoder, one upsampler) or emoji16.py (16 px, two upsamplers)
    assert model.config.name in ("emoji", "emoji16") and model.output_size == 64
    assert model.decoder_size * 2 ** len(model.upsamplers) == 64
    assert model.pca is not None  # `unclip pca` works without --basis


def test_shipped_model_samples_a_small_image(model):
    out = text_to_image.text_to_image(model, ["a red heart"], jax.random.key(0),
                                      prior_steps="5", decoder_steps="5", sr_steps="3")
    img = to_uint8(np.asarray(out["images"]))
    assert img.shape == (1, 64, 64, 3)
    assert img.std() > 10  # not a flat or blank picture


def test_shipped_clip_matches_images_to_their_captions(model):
    """The shipped CLIP is trained: a decoded red heart is closer to 'a red heart' than to
    captions of other emoji (CLIP of the model's own sample: a sanity check, not the quality
    benchmark, which uses a separately trained CLIP)."""
    captions = ["a red heart", "a green apple", "a blue car", "a yellow star"]
    text = stages.encode_text(model, captions)
    out = text_to_image.text_to_image(model, captions[:1], jax.random.key(1),
                                      prior_steps="10", decoder_steps="10", stop_after="decoder")
    z = stages.embed_images(model, to_uint8(np.asarray(out["decoder"])))
    sims = np.asarray(z @ text.emb.T)[0]
    assert sims.argmax() == 0, sims
