"""ml_collections configs <-> the models' dataclass configs.

A full unCLIP config (see ``experiments/*.py``) is a ``ConfigDict`` with sections

  clip       CLIPConfig fields (``text_config`` / ``vision_config`` nested, HF names)
  prior      PriorConfig fields
  decoder    UNetConfig fields (the 64x64 decoder in the paper)
  sr         list of UNetConfig dicts (upsamplers, in order; may be empty)
  diffusion  one section per stage (``prior``, ``decoder``, ``sr``): training schedule and
             sampling defaults
  dtype      compute dtype name ('float32' | 'bfloat16'); params are always float32

Keys are checked: a key that no dataclass field takes raises ``ConfigError`` naming it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

from unclip_jax.models.clip import CLIPConfig
from unclip_jax.models.prior import PriorConfig
from unclip_jax.models.unet import UNetConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A config key or value is wrong; the message says which and what to do."""


def _plain(x: Any) -> Any:
    """ConfigDict / tuples -> JSON-able dicts and lists."""
    if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _tuples(x: Any) -> Any:
    """Lists -> tuples, recursively (dataclass configs must be hashable)."""
    if isinstance(x, Mapping):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    return x


def _build(cls, section: Mapping[str, Any], where: str, **extra):
    fields = {f.name for f in dataclasses.fields(cls)}
    d = _tuples(_plain(section))
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section '{where}'; "
                          f"valid keys: {sorted(fields - {'dtype', 'param_dtype'})}")
    d.update({k: v for k, v in extra.items() if k in fields})
    return cls(**d)


def compute_dtype(config) -> Any:
    name = config.get("dtype", "float32")
    if name not in DTYPES:
        raise ConfigError(f"config.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def clip_config(config) -> CLIPConfig:
    try:
        return CLIPConfig.from_dict(_tuples(_plain(config.clip)))
    except TypeError as e:  # unknown nested key
        raise ConfigError(f"bad key in config section 'clip': {e}") from None


def prior_config(config) -> PriorConfig:
    return _build(PriorConfig, config.prior, "prior", dtype=compute_dtype(config))


def decoder_config(config) -> UNetConfig:
    return _build(UNetConfig, config.decoder, "decoder", dtype=compute_dtype(config))


def inpaint_decoder_config(config) -> UNetConfig:
    """The inpainting decoder: the decoder config with ``inpaint=True`` (GLIDE's extra input
    channels for the masked image and the keep-mask)."""
    return decoder_config(config).replace(inpaint=True)


def sr_configs(config) -> list[UNetConfig]:
    return [_build(UNetConfig, s, f"sr[{i}]", dtype=compute_dtype(config))
            for i, s in enumerate(config.get("sr", ()) or ())]


def tokenizer_dir(config) -> str:
    """The tokenizer files of a config: ``config.tokenizer`` is absent / '' (OpenAI CLIP's BPE,
    shipped), the name of a folder in ``unclip_jax/assets`` (e.g. 'emoji_tokenizer') or a
    path."""
    from unclip_jax.models.tokenizer import DEFAULT_TOKENIZER_DIR

    name = config.get("tokenizer", "") or ""
    if not name:
        return DEFAULT_TOKENIZER_DIR
    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", name)
    for path in (assets, name):
        if os.path.isfile(os.path.join(path, "vocab.json")):
            return os.path.abspath(path)
    raise ConfigError(f"config.tokenizer = {name!r}: no vocab.json in {assets} or {name}")


def to_json(config) -> str:
    return json.dumps(_plain(config), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


def load_config_file(path: str, overrides: Mapping[str, Any] | None = None
                     ) -> ml_collections.ConfigDict:
    """Import an ``experiments/*.py`` file and call its ``get_config()``; apply ``overrides``
    (dotted keys, e.g. ``{'decoder.model_channels': 64}``), refusing keys that do not exist."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (use one of experiments/*.py)")
    spec = importlib.util.spec_from_file_location(f"_unclip_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path} has no get_config()")
    config = mod.get_config()
    for key, value in (overrides or {}).items():
        apply_override(config, key, value)
    return config


def apply_override(config, dotted: str, value: Any) -> None:
    """Set ``config.<dotted>`` = value; the key must already exist."""
    node = config
    parts = dotted.split(".")
    for p in parts[:-1]:
        if p not in node:
            raise ConfigError(f"unknown config key {dotted!r} (no section {p!r})")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {dotted!r}; keys here: {sorted(node.keys())}")
    node[parts[-1]] = value
