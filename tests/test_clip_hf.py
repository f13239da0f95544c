"""HF transformers CLIP checkpoints -> our Flax CLIP: exact parity on tiny random models."""
import numpy as np
import pytest

import torch
import transformers

import jax.numpy as jnp  # noqa: E402

from clip_testutil import hf_clip_model, token_batch  # noqa: E402
from unclip_jax.convert.hf_clip import (  # noqa: E402
    CheckpointMismatchError, convert_hf_state_dict, load_hf_clip)
from unclip_jax.models.clip import CLIP, CLIPConfig  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model():
    return hf_clip_model()


@pytest.fixture(scope="module")
def inputs(hf_model):
    t = hf_model.config.text_config
    rng = np.random.default_rng(0)
    ids, mask = token_batch(rng, 3, t.max_position_embeddings, t.vocab_size, t.bos_token_id,
                            t.eos_token_id)
    v = hf_model.config.vision_config
    pix = rng.standard_normal((2, v.image_size, v.image_size, 3)).astype(np.float32)
    return ids, mask, pix


@pytest.fixture(scope="module")
def reference(hf_model, inputs):
    ids, mask, pix = inputs
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids),
                       pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2)))
        masked = hf_model.text_model(input_ids=torch.from_numpy(ids),
                                     attention_mask=torch.from_numpy(mask))
        # CLIPModel.forward normalises its embeds; the *_features methods do not (nor do we)
        text_embeds = hf_model.get_text_features(input_ids=torch.from_numpy(ids))
        image_embeds = hf_model.get_image_features(
            pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2)))
    return dict(text_embeds=text_embeds.numpy(), image_embeds=image_embeds.numpy(),
                text_states=out.text_model_output.last_hidden_state.numpy(),
                image_states=out.vision_model_output.last_hidden_state.numpy(),
                masked_states=masked.last_hidden_state.numpy(),
                logit_scale=float(hf_model.logit_scale.detach().exp()))


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_clipmodel_parity(hf_model, inputs, reference, tmp_path, safe):
    hf_model.save_pretrained(tmp_path, safe_serialization=safe)
    params, config = load_hf_clip(str(tmp_path))
    assert config.text_config.eos_token_id == 98 and config.projection_dim == 24
    ids, mask, pix = inputs
    model = CLIP(config)
    out = model.apply({"params": params}, input_ids=jnp.asarray(ids), pixel_values=jnp.asarray(pix))
    for k in ("text_embeds", "image_embeds", "text_states", "image_states"):
        assert out[k].shape == reference[k].shape, k
        assert _max_err(out[k], reference[k]) < TOL, (k, _max_err(out[k], reference[k]))
    assert abs(float(out["logit_scale"]) - reference["logit_scale"]) < 1e-5
    if safe:  # the attention-mask path and the method API, once
        states = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                             method=CLIP.text_states)
        assert _max_err(states, reference["masked_states"]) < TOL
        emb = model.apply({"params": params}, jnp.asarray(pix), method=CLIP.encode_image)
        assert _max_err(emb, reference["image_embeds"]) < TOL


def test_text_and_vision_with_projection(hf_model, inputs, reference, tmp_path):
    """diffusers' unCLIP ships CLIPTextModelWithProjection / CLIPVisionModelWithProjection."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    ids, _, pix = inputs
    cfg = hf_model.config
    text = CLIPTextModelWithProjection(cfg.text_config).eval()
    text.text_model.load_state_dict(hf_model.text_model.state_dict())
    text.text_projection.load_state_dict(hf_model.text_projection.state_dict())
    text.save_pretrained(tmp_path / "text")
    params, config = load_hf_clip(str(tmp_path / "text"))
    assert set(params) == {"text_model", "text_projection"}
    emb, states = CLIP(config).apply({"params": params}, jnp.asarray(ids),
                                     method=CLIP.encode_text_and_states)
    assert _max_err(emb, reference["text_embeds"]) < TOL
    assert _max_err(states, reference["text_states"]) < TOL

    vision = CLIPVisionModelWithProjection(cfg.vision_config).eval()
    vision.vision_model.load_state_dict(hf_model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(hf_model.visual_projection.state_dict())
    vision.save_pretrained(tmp_path / "vision", safe_serialization=False)
    params, config = load_hf_clip(str(tmp_path / "vision"))
    assert set(params) == {"vision_model", "visual_projection"}
    emb = CLIP(config).apply({"params": params}, jnp.asarray(pix), method=CLIP.encode_image)
    assert _max_err(emb, reference["image_embeds"]) < TOL


def test_sharded_checkpoint(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "one")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    one, _ = load_hf_clip(str(tmp_path / "one"))
    sharded, _ = load_hf_clip(str(tmp_path / "sharded"))
    import jax
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, one, sharded))


def test_mismatches_raise_with_names(hf_model):
    config = CLIPConfig.from_hf(hf_model.config)
    sd = dict(hf_model.state_dict())
    bad = dict(sd, **{"text_model.extra.weight": sd["logit_scale"]})
    with pytest.raises(CheckpointMismatchError, match="text_model.extra.weight"):
        convert_hf_state_dict(bad, config)
    bad = {k: v for k, v in sd.items() if k != "vision_model.post_layernorm.bias"}
    with pytest.raises(CheckpointMismatchError, match="vision_model.post_layernorm.bias"):
        convert_hf_state_dict(bad, config)
    bad = {k: v for k, v in sd.items() if k != "logit_scale"}
    with pytest.raises(CheckpointMismatchError, match="logit_scale"):
        convert_hf_state_dict(bad, config)
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    bad = dict(sd, **{key: sd[key][:, :-1]})
    with pytest.raises(CheckpointMismatchError, match="shape mismatch for " + key.replace(".", r"\.")):
        convert_hf_state_dict(bad, config)
    # a config with one layer less leaves layers.1 keys unknown
    import dataclasses
    small = dataclasses.replace(config, text_config=dataclasses.replace(config.text_config,
                                                                      num_hidden_layers=1))
    with pytest.raises(CheckpointMismatchError, match="text_model.encoder.layers.1"):
        convert_hf_state_dict(sd, small)
