"""OpenAI ``clip`` package checkpoints (``.pt``) -> our Flax CLIP params.

Accepts the TorchScript archives that ``clip.load`` downloads and plain ``torch.save`` state dicts
with the same key names (``positional_embedding``, ``transformer.resblocks.N.attn.in_proj_weight``,
``visual.conv1.weight``, ``visual.proj``, ...). Only ViT image towers are supported (the
ModifiedResNet ones raise). The architecture is inferred from the shapes as OpenAI's
``build_model`` does (heads = width // 64 unless given). Keys are renamed to HF's names (splitting
the fused q/k/v projection, transposing the ``x @ W`` projections) and then converted by
``unclip_jax.convert.hf_clip`` with its strict unknown / missing / shape checks.

OpenAI's text model pools at ``argmax(ids)`` (its EOT token has the highest id), so the config gets
``pooling='argmax'``; it applies no padding mask, so call ``encode_text`` without one to match.
"""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from typing import Any, Mapping, Optional

import numpy as np

from unclip_jax.convert.hf_clip import CheckpointMismatchError, _to_numpy, convert_hf_state_dict
from unclip_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

# Non-parameter entries some OpenAI state dicts carry (build_model deletes them too).
IGNORED_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {  # OpenAI computes x @ W: [in, out]; HF Linear wants [out, in]
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}


def read_openai_checkpoint(path: str) -> dict[str, np.ndarray]:
    """State dict of an OpenAI CLIP ``.pt``: a TorchScript archive (``torch.jit.load``) or a plain
    ``torch.save``-d state dict (optionally under ``'state_dict'``)."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    sd = None
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; still reads it
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
            sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict or TorchScript archive, got {type(sd)}")
    return {k: _to_numpy(v) for k, v in sd.items()}


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl")
                   for n in z.namelist())


def infer_openai_config(sd: Mapping[str, Any], num_text_heads: Optional[int] = None,
                        num_vision_heads: Optional[int] = None, head_width: int = 64) -> CLIPConfig:
    """Architecture from shapes, as OpenAI's ``build_model`` (heads = width // ``head_width``)."""
    if "visual.conv1.weight" not in sd:
        if any(k.startswith("visual.layer1.") for k in sd):
            raise NotImplementedError("ModifiedResNet (RN50...) CLIP image towers are not supported")
        raise CheckpointMismatchError(f"no visual.conv1.weight: not an OpenAI ViT CLIP; "
                                      f"first keys {sorted(sd)[:10]}")

    def layers(prefix):
        idx = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and (m.group(1) or "") == prefix}
        if idx != set(range(len(idx))):
            raise CheckpointMismatchError(f"non-contiguous {prefix}transformer.resblocks: {sorted(idx)}")
        return len(idx)

    shape = lambda k: tuple(np.shape(sd[k]))  # noqa: E731
    width = shape("ln_final.weight")[0]
    vwidth, _, patch, _ = shape("visual.conv1.weight")
    grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
    embed_dim = shape("text_projection")[1]
    text = CLIPTextConfig(
        vocab_size=shape("token_embedding.weight")[0],
        hidden_size=width,
        intermediate_size=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
        projection_dim=embed_dim,
        num_hidden_layers=layers(""),
        num_attention_heads=num_text_heads or max(width // head_width, 1),
        max_position_embeddings=shape("positional_embedding")[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=shape("token_embedding.weight")[0] - 2,
        eos_token_id=shape("token_embedding.weight")[0] - 1,
        pooling="argmax",
    )
    vision = CLIPVisionConfig(
        hidden_size=vwidth,
        intermediate_size=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        projection_dim=embed_dim,
        num_hidden_layers=layers("visual."),
        num_attention_heads=num_vision_heads or max(vwidth // head_width, 1),
        num_channels=shape("visual.conv1.weight")[1],
        image_size=patch * grid,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    logit = float(np.asarray(sd["logit_scale"]).reshape(())) if "logit_scale" in sd else 2.6592
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim,
                      logit_scale_init_value=logit)


def openai_to_hf_state_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rename an OpenAI CLIP state dict to ``transformers.CLIPModel`` key names (numpy)."""
    out: dict[str, np.ndarray] = {}
    unknown = []

    def put(k, v):
        if k in out:
            raise CheckpointMismatchError(f"{k} produced twice")
        out[k] = v

    for key, value in sd.items():
        if key in IGNORED_OPENAI_KEYS:
            continue
        v = _to_numpy(value)
        if key in _TOP_RENAMES:
            put(_TOP_RENAMES[key], v)
        elif key in _TRANSPOSED:
            if v.ndim != 2:
                raise CheckpointMismatchError(f"{key}: expected a matrix, got shape {v.shape}")
            put(_TRANSPOSED[key], v.T)
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in _BLOCK_RENAMES:
                put(base + _BLOCK_RENAMES[rest], v)
            elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                if v.shape[0] % 3:
                    raise CheckpointMismatchError(f"{key}: first dim {v.shape[0]} not divisible by 3")
                suffix = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(v, 3, axis=0)):
                    put(f"{base}self_attn.{name}.{suffix}", part)
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(f"unknown OpenAI CLIP keys ({len(unknown)}): {sorted(unknown)}")
    return out


def convert_openai_state_dict(sd: Mapping[str, Any], num_text_heads: Optional[int] = None,
                              num_vision_heads: Optional[int] = None,
                              param_dtype: Any = np.float32) -> tuple[dict, CLIPConfig]:
    """OpenAI-named state dict -> ``(params, config)``. All of CLIP is required (both towers,
    projections, ``logit_scale``)."""
    config = infer_openai_config(sd, num_text_heads, num_vision_heads)
    hf = openai_to_hf_state_dict(sd)
    parts = {"text", "text_projection", "vision", "visual_projection", "logit_scale"}
    return convert_hf_state_dict(hf, config, parts=parts, param_dtype=param_dtype), config


def load_openai_clip(path: str, num_text_heads: Optional[int] = None,
                     num_vision_heads: Optional[int] = None,
                     param_dtype: Any = np.float32) -> tuple[dict, CLIPConfig]:
    """Load an OpenAI CLIP ``.pt`` (TorchScript or state dict) -> ``(params, config)``.
    fp16 weights (as OpenAI ships them) become ``param_dtype``."""
    return convert_openai_state_dict(read_openai_checkpoint(path), num_text_heads,
                                     num_vision_heads, param_dtype)


__all__ = ["read_openai_checkpoint", "infer_openai_config", "openai_to_hf_state_dict",
           "convert_openai_state_dict", "load_openai_clip"]
