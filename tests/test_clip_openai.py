"""OpenAI `clip` checkpoints (.pt: TorchScript archive or plain state dict) -> our Flax CLIP."""
import warnings

import numpy as np
import pytest

import torch
import transformers

import jax.numpy as jnp  # noqa: E402

from clip_testutil import hf_clip_model, token_batch  # noqa: E402
from unclip_jax.convert.hf_clip import CheckpointMismatchError  # noqa: E402
from unclip_jax.convert.openai_clip import (  # noqa: E402
    convert_openai_state_dict, infer_openai_config, load_openai_clip)
from unclip_jax.models.clip import CLIP  # noqa: E402

# OpenAI uses ids where EOT is the largest id in the vocabulary (argmax pooling)
TEXT = dict(eos_token_id=98, bos_token_id=97)


def hf_to_openai(sd):
    """Rename a HF CLIPModel state dict to the key names of OpenAI's clip/model.py."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        for hf, oa in (("text_model.encoder.layers.", "transformer.resblocks."),
                       ("vision_model.encoder.layers.", "visual.transformer.resblocks.")):
            if k.startswith(hf):
                idx, rest = k[len(hf):].split(".", 1)
                base = f"{oa}{idx}."
                names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                         "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
                mod, p = rest.rsplit(".", 1)
                if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    key = f"{base}attn.in_proj_{p}"
                    out.setdefault(key, {})[mod[10]] = v
                else:
                    out[base + names[mod] + "." + p] = v
                break
        else:
            top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                   "text_model.embeddings.position_embedding.weight": "positional_embedding",
                   "text_model.final_layer_norm.weight": "ln_final.weight",
                   "text_model.final_layer_norm.bias": "ln_final.bias",
                   "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
                   "vision_model.embeddings.class_embedding": "visual.class_embedding",
                   "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                   "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
                   "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
                   "vision_model.post_layernorm.weight": "visual.ln_post.weight",
                   "vision_model.post_layernorm.bias": "visual.ln_post.bias",
                   "logit_scale": "logit_scale"}
            if k in top:
                out[top[k]] = v
            elif k == "text_projection.weight":
                out["text_projection"] = v.T.contiguous()
            elif k == "visual_projection.weight":
                out["visual.proj"] = v.T.contiguous()
            else:
                raise KeyError(k)
    for k, v in list(out.items()):
        if isinstance(v, dict):
            out[k] = torch.cat([v["q"], v["k"], v["v"]], 0)
    return {k: v.detach().clone() for k, v in out.items()}


def torchscript_archive(sd, path):
    """Save ``sd`` inside a scripted module so that ``torch.jit.load(path).state_dict() == sd``."""
    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in sd.items():
        *mods, name = key.split(".")
        m = root
        for part in mods:
            if not hasattr(m, part):
                m.add_module(part, Holder())
            m = getattr(m, part)
        m.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def model_and_sd():
    hf = hf_clip_model(text=TEXT, seed=1)
    return hf, hf_to_openai(hf.state_dict())


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "fp16"])
def test_openai_parity(model_and_sd, tmp_path, fmt):
    hf, sd = model_and_sd
    path = tmp_path / "clip.pt"
    if fmt == "torchscript":
        torchscript_archive(sd, path)
    elif fmt == "fp16":  # OpenAI ships fp16 weights, and non-parameter ints in its archives
        torch.save(dict({k: v.half() for k, v in sd.items()}, input_resolution=torch.tensor(32),
                        context_length=torch.tensor(16), vocab_size=torch.tensor(99)), path)
    else:
        torch.save(sd, path)
    params, config = load_openai_clip(str(path), num_text_heads=4, num_vision_heads=4)
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.max_position_embeddings) == (32, 2, 99, 16)
    assert (v.image_size, v.patch_size, v.intermediate_size, config.projection_dim) == (32, 8, 64, 24)
    assert t.intermediate_size == 37 and t.pooling == "argmax"

    rng = np.random.default_rng(1)
    ids, _ = token_batch(rng, 3, 16, 99, 97, 98)
    pix = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        if fmt == "fp16":  # compare against the same rounded weights
            hf = hf_clip_model(text=TEXT, seed=1)
            hf.load_state_dict({k: p.half().float() for k, p in hf.state_dict().items()})
        ref_t = hf.get_text_features(input_ids=torch.from_numpy(ids)).numpy()
        ref_i = hf.get_image_features(pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2))).numpy()
        ref_s = hf.text_model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    out = CLIP(config).apply({"params": params}, input_ids=jnp.asarray(ids), pixel_values=jnp.asarray(pix))
    assert np.abs(np.asarray(out["text_embeds"]) - ref_t).max() < 1e-4
    assert np.abs(np.asarray(out["image_embeds"]) - ref_i).max() < 1e-4
    assert np.abs(np.asarray(out["text_states"]) - ref_s).max() < 1e-4
    assert abs(float(out["logit_scale"]) - float(np.exp(2.0))) < 1e-2


def test_infer_heads_like_build_model_and_errors():
    hf = hf_clip_model(text=dict(TEXT, hidden_size=128, num_attention_heads=2, intermediate_size=512),
                       vision=dict(hidden_size=192, num_attention_heads=3, intermediate_size=256,
                                   image_size=48, patch_size=16), projection_dim=40)
    sd = hf_to_openai(hf.state_dict())
    c = infer_openai_config(sd)
    assert (c.text_config.num_attention_heads, c.vision_config.num_attention_heads) == (2, 3)
    assert (c.vision_config.image_size, c.vision_config.patch_size, c.projection_dim) == (48, 16, 40)
    params, _ = convert_openai_state_dict(sd)  # converts with inferred heads
    assert params["text_model"]["encoder"]["layers_0"]["attn"]["query"]["kernel"].shape == (128, 2, 64)
    bad = dict(sd, **{"transformer.resblocks.0.attn.extra": sd["logit_scale"]})
    with pytest.raises(CheckpointMismatchError, match="transformer.resblocks.0.attn.extra"):
        convert_openai_state_dict(bad)
    bad = {k: v for k, v in sd.items() if k != "visual.ln_post.bias"}
    with pytest.raises(CheckpointMismatchError, match="vision_model.post_layernorm.bias"):
        convert_openai_state_dict(bad)
    with pytest.raises(NotImplementedError):
        infer_openai_config({"visual.layer1.0.conv1.weight": np.zeros(1)})
