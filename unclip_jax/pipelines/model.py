"""An unCLIP model: config + parameters of CLIP, prior, decoder and upsamplers + tokenizer.

A *model dir* (what ``--model`` takes) holds

  unclip.json   {"format": "unclip_jax.model", "format_version": N, "config": {...}, ...}
  params/       orbax checkpoint of {"clip", "prior", "decoder", "sr": {"0": ..}}
  tokenizer/    vocab.json + merges.txt (CLIPTokenizer files)

``load`` checks the format and version and says exactly what is wrong with a dir that is not
one of ours. Parameters are plain (unboxed) arrays; ``UnCLIP.modules`` builds the Flax modules.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unclip_jax import config as cfg_lib
from unclip_jax.diffusion import GaussianDiffusion, create_gaussian_diffusion
from unclip_jax.models import clip as clip_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.models.tokenizer import DEFAULT_TOKENIZER_DIR

FORMAT = "unclip_jax.model"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
META_FILE = "unclip.json"


class ModelDirError(ValueError):
    """A --model path that is missing, not ours, or of an unsupported version."""


@dataclasses.dataclass
class UnCLIP:
    """A whole unCLIP: ``config`` (ConfigDict, see ``unclip_jax/config.py``), ``params``
    ({'clip', 'prior' ({'params', 'buffers'}), 'decoder', 'sr': [..]}), tokenizer files, and
    whether the weights are random (untrained)."""

    config: ml_collections.ConfigDict
    params: dict
    tokenizer_dir: str = DEFAULT_TOKENIZER_DIR
    random_weights: bool = False
    source: str = ""

    def __post_init__(self):
        c = self.config
        dt = cfg_lib.compute_dtype(c)
        self.clip_config = cfg_lib.clip_config(c)
        self.prior_config = cfg_lib.prior_config(c)
        self.decoder_config = cfg_lib.decoder_config(c)
        self.sr_config = cfg_lib.sr_configs(c)
        self.clip = clip_lib.CLIP(self.clip_config, dtype=dt)
        self.prior = prior_lib.DiffusionPrior(self.prior_config)
        self.decoder = unet_lib.UNet(self.decoder_config)
        self.upsamplers = [unet_lib.UNet(s) for s in self.sr_config]
        self._cache: dict = {}

    # -- diffusion schedules ----------------------------------------------------------------
    def stage_options(self, stage: str) -> ml_collections.ConfigDict:
        return self.config.diffusion[stage]

    def diffusion(self, stage: str, sample_steps: Optional[str | int] = None) -> GaussianDiffusion:
        """The (respaced, when ``sample_steps`` is given) diffusion of a stage:
        'prior', 'decoder' or 'sr'."""
        o = self.stage_options(stage)
        return create_gaussian_diffusion(
            steps=o.steps, noise_schedule=o.schedule,
            timestep_respacing="" if sample_steps is None else str(sample_steps),
            model_output=o.model_output, model_var_type=o.model_var_type)

    @property
    def decoder_size(self) -> int:
        return self.decoder_config.image_size

    @property
    def output_size(self) -> int:
        return self.sr_config[-1].image_size if self.sr_config else self.decoder_size


def init_random(config: ml_collections.ConfigDict, seed: int = 0) -> UnCLIP:
    """An UnCLIP with randomly initialised weights (for tests and before training)."""
    # rbg keys: the init compiles twice as fast as with threefry on CPU
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), 3 + len(config.get("sr", []) or []))
    clip_cfg = cfg_lib.clip_config(config)
    prior_cfg, dec_cfg = cfg_lib.prior_config(config), cfg_lib.decoder_config(config)
    unet_params = lambda c, k: unet_lib.init_unet(c, k)["params"]  # noqa: E731
    params = {
        "clip": nn.meta.unbox(clip_lib.init_params(clip_cfg, keys[0])),
        "prior": nn.meta.unbox(jax.jit(lambda k: prior_lib.init_prior(prior_cfg, k))(keys[1])),
        "decoder": nn.meta.unbox(jax.jit(lambda k: unet_params(dec_cfg, k))(keys[2])),
        "sr": [nn.meta.unbox(jax.jit(lambda k, c=c: unet_params(c, k))(k))
               for c, k in zip(cfg_lib.sr_configs(config), keys[3:])],
    }
    return UnCLIP(config, params, random_weights=True, source=f"random:{config.get('name', '')}")


def _abstract_params(config) -> dict:
    return jax.eval_shape(lambda: init_random(config).params)


def save(model: UnCLIP, path: str) -> str:
    """Write ``model`` as a model dir at ``path`` (must not exist or be empty)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise ModelDirError(f"{path} exists and is not empty; choose a new output folder")
    os.makedirs(path, exist_ok=True)
    tree = dict(model.params)
    tree["sr"] = {str(i): p for i, p in enumerate(model.params["sr"])}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), tree)
    ckptr.wait_until_finished()
    shutil.copytree(model.tokenizer_dir, os.path.join(path, "tokenizer"))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "config": json.loads(cfg_lib.to_json(model.config)),
            "random_weights": model.random_weights}
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return path


def read_meta(path: str) -> dict:
    """Read and check ``unclip.json``; raise ``ModelDirError`` saying what is wrong."""
    if not os.path.isdir(path):
        raise ModelDirError(f"model dir not found: {path}")
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ModelDirError(
            f"{path} is not an unclip_jax model dir (no {META_FILE}); make one with "
            "`unclip train ...` or `unclip convert ...`")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{meta_path} is unreadable: {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelDirError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelDirError(
            f"{path} has model format version {version}; this unclip_jax reads versions "
            f"{list(SUPPORTED_VERSIONS)}. Upgrade unclip_jax"
            + (" (the dir is newer)" if isinstance(version, int) and version > FORMAT_VERSION
               else ""))
    return meta


def load(path: str) -> UnCLIP:
    """Load a model dir written by ``save`` (or by the trainers / converters)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta = read_meta(path)
    config = ml_collections.ConfigDict(meta["config"])
    abstract = _abstract_params(config)
    abstract["sr"] = {str(i): p for i, p in enumerate(abstract["sr"])}
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise ModelDirError(f"{path} has no params/ folder; the model dir is incomplete")
    try:
        tree = ocp.StandardCheckpointer().restore(params_dir, abstract)
    except Exception as e:  # orbax raises several types for mismatched trees
        raise ModelDirError(f"parameters in {params_dir} do not match the config in "
                            f"{META_FILE}: {e}") from None
    tree["sr"] = [tree["sr"][str(i)] for i in range(len(tree["sr"]))]
    tok = os.path.join(path, "tokenizer")
    return UnCLIP(config, tree, tokenizer_dir=tok if os.path.isdir(tok) else DEFAULT_TOKENIZER_DIR,
                  random_weights=bool(meta.get("random_weights", False)), source=path)
