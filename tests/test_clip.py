"""Our Flax CLIP: shapes, dtypes, causal text mask, pooling, bf16, logical partitioning."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_testutil import TEXT, VISION, token_batch
from unclip_jax.models.clip import (CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig,
                                    clip_logits, contrastive_loss, eot_index, init_params,
                                    normalize)
from unclip_jax.parallel.rules import KNOWN_LOGICAL_NAMES

CFG = CLIPConfig(CLIPTextConfig(**TEXT), CLIPVisionConfig(**VISION), projection_dim=24,
                 logit_scale_init_value=2.0)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def _apply(model, params, **kw):
    return jax.jit(lambda p, kw: model.apply({"params": p}, **kw))(params, kw)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids, mask = token_batch(rng, 3, 16, 99, 97, 98)
    pix = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pix)


def test_shapes_and_dtypes(params, inputs):
    ids, _, pix = inputs
    out = _apply(CLIP(CFG), params, input_ids=ids, pixel_values=pix)
    assert out["text_embeds"].shape == (3, 24) and out["image_embeds"].shape == (2, 24)
    assert out["text_states"].shape == (3, 16, 32) and out["image_states"].shape == (2, 17, 32)
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert float(out["logit_scale"]) == pytest.approx(np.exp(2.0), rel=1e-6)
    lt, li = clip_logits(out["text_embeds"], out["image_embeds"], out["logit_scale"])
    assert lt.shape == (3, 2) and np.allclose(lt, li.T)
    assert np.allclose(jnp.linalg.norm(normalize(out["text_embeds"]), axis=-1), 1, atol=1e-6)


def test_text_only_and_vision_only_trees():
    t = init_params(CFG, vision=False, abstract=True)
    v = init_params(CFG, text=False, abstract=True)
    assert set(t) == {"text_model", "text_projection"}
    assert set(v) == {"vision_model", "visual_projection"}


def test_causal_mask_is_causal(params, inputs):
    ids = inputs[0]
    f = jax.jit(lambda p, x: CLIP(CFG).apply({"params": p}, x, method=CLIP.text_states))
    base = f(params, ids)
    for pos in (5, 11, 15):
        changed = ids.at[:, pos].set((ids[:, pos] + 7) % 90 + 1)
        out = f(params, changed)
        assert np.array_equal(np.asarray(out[:, :pos]), np.asarray(base[:, :pos])), pos
        assert not np.allclose(out[:, pos:], base[:, pos:])


def test_eot_pooling_rules():
    ids = jnp.array([[97, 5, 98, 0, 0], [97, 98, 98, 98, 98], [97, 96, 3, 98, 2]])
    eos = CFG.text_config
    assert eot_index(ids, eos).tolist() == [2, 1, 3]  # first eos
    legacy = dataclasses.replace(eos, eos_token_id=2)  # HF: eos_token_id == 2 -> argmax
    assert eot_index(ids, legacy).tolist() == [2, 1, 3]
    assert eot_index(jnp.array([[5, 9, 2]]), legacy).tolist() == [1]
    argmax = dataclasses.replace(eos, pooling="argmax")
    assert eot_index(jnp.array([[97, 98, 0, 98]]), argmax).tolist() == [1]


def test_bf16_close_to_fp32(params, inputs):
    ids, _, pix = inputs
    f32 = _apply(CLIP(CFG), params, input_ids=ids, pixel_values=pix)
    b16 = _apply(CLIP(CFG, dtype=jnp.bfloat16), params, input_ids=ids, pixel_values=pix)
    assert b16["text_embeds"].dtype == jnp.bfloat16
    for k in ("text_embeds", "image_embeds", "text_states"):
        a, b = np.asarray(f32[k], np.float32), np.asarray(b16[k], np.float32)
        rel = np.abs(a - b).max() / np.abs(a).max()
        cos = np.sum(normalize(a) * normalize(b), -1)
        assert rel < 0.05 and cos.min() > 0.999, (k, rel, cos.min())


def test_every_param_has_logical_names(params):
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim and all(n in KNOWN_LOGICAL_NAMES for n in x.names), x.names
    specs = nn.get_partition_spec(params)
    assert specs["text_model"]["token_embedding"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["vision_model"]["encoder"]["layers_0"]["attn"]["query"]["kernel"] == \
        jax.sharding.PartitionSpec("embed", "heads", "kv")


def test_config_roundtrip_and_from_hf():
    assert CLIPConfig.from_dict(CFG.to_dict()) == CFG
    import transformers
    hf = transformers.CLIPConfig(text_config=dict(TEXT), vision_config=dict(VISION), projection_dim=24)
    ours = CLIPConfig.from_hf(hf)
    assert ours.text_config == CFG.text_config and ours.vision_config == CFG.vision_config
    t = CLIPConfig.from_hf(transformers.CLIPTextConfig(**TEXT))
    assert t.text_config == CFG.text_config and t.projection_dim == 24
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="mish")


def test_contrastive_loss_matches_hf():
    import torch
    from transformers.models.clip.modeling_clip import clip_loss

    rng = np.random.default_rng(3)
    t, i = rng.standard_normal((2, 5, 8)).astype(np.float32)
    ours = float(contrastive_loss(jnp.asarray(t), jnp.asarray(i), jnp.float32(7.0)))
    tn, im = (torch.nn.functional.normalize(torch.from_numpy(x), dim=-1) for x in (t, i))
    ref = float(clip_loss(7.0 * tn @ im.T))
    assert ours == pytest.approx(ref, rel=1e-5)
