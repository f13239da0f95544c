"""``transformers`` PyTorch CLIP checkpoints -> our Flax CLIP params (``unclip_jax.models.clip``).

Reads a ``save_pretrained`` directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, sharded or not) of a ``CLIPModel``, ``CLIPTextModel(WithProjection)`` or
``CLIPVisionModel(WithProjection)`` (diffusers' unCLIP uses the ``*WithProjection`` ones).

Every checkpoint key is mapped by name; unknown keys, missing keys and shape mismatches raise with
the offending names, and every parameter of our (abstractly initialised) model for the towers
present is assigned exactly once. Weights become ``param_dtype`` (fp32 by default).

Layout changes: torch ``Linear.weight [out, in]`` -> kernel ``[in, out]``; q/k/v kernels
``[D, H, Dh]``, out kernel ``[H, Dh, D]``; patch conv ``[D, C, p, p]`` -> ``[p, p, C, D]`` (NHWC).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from unclip_jax.models.clip import CLIPConfig, init_params

# Keys that HF checkpoints may hold but that are buffers, not parameters.
IGNORED_HF_KEYS = (
    "text_model.embeddings.position_ids",
    "vision_model.embeddings.position_ids",
)


class CheckpointMismatchError(ValueError):
    """Unknown / missing keys or shape mismatches between a checkpoint and our parameters."""


# ------------------------------------------------------------------------------------------
# reading checkpoints
# ------------------------------------------------------------------------------------------
def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    import torch  # only for torch tensors

    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64, torch.float16):
        t = t.float()  # bf16 etc.: numpy has no such dtype
    return t.numpy()


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (TypeError, ValueError):  # bf16 has no numpy dtype: go through torch
        out = {}
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                out[k] = _to_numpy(f.get_tensor(k))
    return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return {k: _to_numpy(v) for k, v in sd.items()}


def _read_file(path: str) -> dict[str, np.ndarray]:
    return _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)


def load_hf_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read the weights of a HF checkpoint directory (or one weights file) as numpy arrays.

    Prefers ``model.safetensors`` (or its ``.index.json`` shards), then ``pytorch_model.bin``."""
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            return _read_sharded(path)
        return _read_file(path)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        f = os.path.join(path, name)
        if os.path.exists(f):
            return _read_sharded(f) if name.endswith(".index.json") else _read_file(f)
    raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin (or shard index) in {path}")


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
    with open(index_path) as f:
        index = json.load(f)
    folder = os.path.dirname(index_path)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(_read_file(os.path.join(folder, shard)))
    return out


def load_hf_config(path: str) -> CLIPConfig:
    """Our ``CLIPConfig`` from a HF checkpoint directory's ``config.json``."""
    with open(os.path.join(path, "config.json")) as f:
        return CLIPConfig.from_hf(json.load(f))


# ------------------------------------------------------------------------------------------
# key mapping
# ------------------------------------------------------------------------------------------
# Each rule: (hf shape from our shape, hf array -> our array).
def _linear_shape(s):  # ours [in, out] -> torch [out, in]
    return (s[1], s[0])


def _qkv_shape(s):  # ours [D, H, Dh] -> torch [H*Dh, D]
    return (s[1] * s[2], s[0])


def _out_shape(s):  # ours [H, Dh, D] -> torch [D, H*Dh]
    return (s[2], s[0] * s[1])


def _conv_shape(s):  # ours [p, p, C, D] -> torch [D, C, p, p]
    return (s[3], s[2], s[0], s[1])


RULES: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda s: tuple(s), lambda w, s: w),
    "linear": (_linear_shape, lambda w, s: w.T),
    "qkv": (_qkv_shape, lambda w, s: w.T.reshape(s)),
    "qkv_bias": (lambda s: (s[0] * s[1],), lambda w, s: w.reshape(s)),
    "out": (_out_shape, lambda w, s: w.T.reshape(s)),
    "conv": (_conv_shape, lambda w, s: w.transpose(2, 3, 1, 0)),
}


def _ln(hf: str, ours: tuple) -> list:
    return [(f"{hf}.weight", ours + ("ln", "scale"), "copy"),
            (f"{hf}.bias", ours + ("ln", "bias"), "copy")]


def _encoder(hf: str, ours: tuple, num_layers: int) -> list:
    rows = []
    for i in range(num_layers):
        h, o = f"{hf}.layers.{i}", ours + (f"layers_{i}",)
        rows += _ln(f"{h}.layer_norm1", o + ("ln1",))
        rows += _ln(f"{h}.layer_norm2", o + ("ln2",))
        for hn, on in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            rows.append((f"{h}.self_attn.{hn}.weight", o + ("attn", on, "kernel"), "qkv"))
            rows.append((f"{h}.self_attn.{hn}.bias", o + ("attn", on, "bias"), "qkv_bias"))
        rows.append((f"{h}.self_attn.out_proj.weight", o + ("attn", "out", "kernel"), "out"))
        rows.append((f"{h}.self_attn.out_proj.bias", o + ("attn", "out", "bias"), "copy"))
        for fc in ("fc1", "fc2"):
            rows.append((f"{h}.mlp.{fc}.weight", o + ("mlp", fc, "dense", "kernel"), "linear"))
            rows.append((f"{h}.mlp.{fc}.bias", o + ("mlp", fc, "dense", "bias"), "copy"))
    return rows


def hf_key_table(config: CLIPConfig, parts: Iterable[str]) -> list[tuple[str, tuple, str]]:
    """``(hf_key, our_param_path, rule)`` for the chosen parts: ``text``, ``text_projection``,
    ``vision``, ``visual_projection``, ``logit_scale``."""
    parts = set(parts)
    rows: list = []
    if "text" in parts:
        t = ("text_model",)
        rows += [
            ("text_model.embeddings.token_embedding.weight", t + ("token_embedding", "embedding"), "copy"),
            ("text_model.embeddings.position_embedding.weight", t + ("position_embedding",), "copy"),
        ]
        rows += _encoder("text_model.encoder", t + ("encoder",), config.text_config.num_hidden_layers)
        rows += _ln("text_model.final_layer_norm", t + ("final_layer_norm",))
    if "text_projection" in parts:
        rows.append(("text_projection.weight", ("text_projection", "dense", "kernel"), "linear"))
    if "vision" in parts:
        v = ("vision_model",)
        rows += [
            ("vision_model.embeddings.patch_embedding.weight", v + ("patch_embedding", "kernel"), "conv"),
            ("vision_model.embeddings.class_embedding", v + ("class_embedding",), "copy"),
            ("vision_model.embeddings.position_embedding.weight", v + ("position_embedding",), "copy"),
        ]
        rows += _ln("vision_model.pre_layrnorm", v + ("pre_layernorm",))
        rows += _encoder("vision_model.encoder", v + ("encoder",), config.vision_config.num_hidden_layers)
        rows += _ln("vision_model.post_layernorm", v + ("post_layernorm",))
    if "visual_projection" in parts:
        rows.append(("visual_projection.weight", ("visual_projection", "dense", "kernel"), "linear"))
    if "logit_scale" in parts:
        rows.append(("logit_scale", ("logit_scale",), "copy"))
    return rows


def detect_parts(keys: Iterable[str]) -> set[str]:
    """Which parts a HF CLIP state dict holds (see ``hf_key_table``)."""
    parts = set()
    for k in keys:
        if k.startswith("text_model."):
            parts.add("text")
        elif k.startswith("vision_model."):
            parts.add("vision")
        elif k in ("text_projection.weight", "visual_projection.weight", "logit_scale"):
            parts.add(k.split(".")[0])
    return parts


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested mapping -> {key path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
    """{key path tuple: leaf} -> nested dicts (the inverse of ``flatten``)."""
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def expected_param_shapes(config: CLIPConfig, parts: Iterable[str]) -> dict[tuple, tuple]:
    """Our parameter paths -> shapes for the given parts (from an abstract init)."""
    import flax.linen as nn

    parts = set(parts)
    tree = nn.unbox(init_params(config, text="text" in parts, vision="vision" in parts,
                                abstract=True))
    flat = {p: tuple(x.shape) for p, x in flatten(tree).items()}
    keep = {"text": ("text_model",), "text_projection": ("text_projection",),
            "vision": ("vision_model",), "visual_projection": ("visual_projection",),
            "logit_scale": ("logit_scale",)}
    roots = {keep[p][0] for p in parts}
    return {p: s for p, s in flat.items() if p[0] in roots}


def convert_hf_state_dict(state_dict: Mapping[str, Any], config: CLIPConfig,
                          parts: Optional[Iterable[str]] = None,
                          param_dtype: Any = np.float32) -> dict:
    """Map a HF CLIP state dict (name -> array/tensor) to our nested ``params`` dict.

    ``parts`` defaults to what the state dict holds; a CLIPModel (both towers) must also hold
    both projections and ``logit_scale``. Raises ``CheckpointMismatchError`` naming unknown or
    missing keys and shape mismatches.
    """
    sd = {k: v for k, v in state_dict.items() if k not in IGNORED_HF_KEYS}
    if parts is None:
        parts = detect_parts(sd)
        if {"text", "vision"} <= parts:
            parts |= {"text_projection", "visual_projection", "logit_scale"}
    parts = set(parts)
    if not parts & {"text", "vision"}:
        raise CheckpointMismatchError(
            f"no CLIP text_model.* / vision_model.* keys found; first keys: {sorted(sd)[:10]}")
    table = hf_key_table(config, parts)
    expected = expected_param_shapes(config, parts)

    table_keys = {row[0] for row in table}
    unknown = sorted(set(sd) - table_keys)
    missing = sorted(table_keys - set(sd))
    problems = []
    if unknown:
        problems.append(f"unknown checkpoint keys ({len(unknown)}): {unknown}")
    if missing:
        problems.append(f"missing checkpoint keys ({len(missing)}): {missing}")

    flat: dict[tuple, np.ndarray] = {}
    for hf_key, path, rule in table:
        if hf_key not in sd:
            continue
        if path not in expected:
            problems.append(f"{hf_key} -> {'/'.join(path)}: no such parameter in our model")
            continue
        if path in flat:
            problems.append(f"{'/'.join(path)} assigned twice (second time from {hf_key})")
            continue
        hf_shape_of, transform = RULES[rule]
        ours = expected[path]
        want = hf_shape_of(ours)
        w = _to_numpy(sd[hf_key])
        if tuple(w.shape) != tuple(want):
            problems.append(f"shape mismatch for {hf_key}: checkpoint {tuple(w.shape)}, expected "
                            f"{tuple(want)} (ours {'/'.join(path)} {ours})")
            continue
        flat[path] = np.array(transform(w, ours), dtype=param_dtype, order="C")
    unassigned = sorted("/".join(p) for p in set(expected) - set(flat))
    if unassigned and not problems:
        problems.append(f"parameters left unassigned ({len(unassigned)}): {unassigned}")
    if problems:
        raise CheckpointMismatchError("HF CLIP conversion failed:\n  " + "\n  ".join(problems))
    return unflatten(flat)


def load_hf_clip(path: str, param_dtype: Any = np.float32) -> tuple[dict, CLIPConfig]:
    """Load a HF CLIP checkpoint directory -> ``(params, config)``; use as
    ``CLIP(config).apply({'params': params}, ...)``. Text-only / vision-only directories give
    only that tower's parameters (plus its projection when the checkpoint has one)."""
    config = load_hf_config(path)
    sd = load_hf_state_dict(path)
    return convert_hf_state_dict(sd, config, param_dtype=param_dtype), config


__all__ = [
    "CheckpointMismatchError", "load_hf_clip", "load_hf_state_dict", "load_hf_config",
    "convert_hf_state_dict", "hf_key_table", "detect_parts", "expected_param_shapes",
]
