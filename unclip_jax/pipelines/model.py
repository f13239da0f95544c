"""An unCLIP model: config + parameters of CLIP, prior, decoder and upsamplers + tokenizer.

A *model dir* (what ``--model`` takes) holds

  unclip.json   {"format": "unclip_jax.model", "format_version": N, "config": {...}, ...}
  params/       orbax checkpoint of {"clip", "prior", "decoder", "sr": {"0": ..}} and, when the
                config has an ``ar_prior`` section, "ar_prior": {"params", "pca", "quantizer",
                "dot_quantizer"} (the autoregressive prior with its PCA basis and quantizers)
  tokenizer/    vocab.json + merges.txt (CLIPTokenizer files)
  params/inpaint  (format 2) optional: the inpainting decoder (``config.decoder`` with
                ``inpaint=True``; meta ``has_inpaint``), used by ``unclip inpaint``
  pca.npz       optional: PCA basis of the model's CLIP image embeddings (``unclip pca``; made
                by ``unclip pca-fit``), keys mean [D], basis [D, k], explained_variance [k],
                total_variance []

Format 2 may store the large weight tensors as bfloat16 (meta ``storage_dtype``; ``save(...,
storage_dtype='bfloat16')``) to halve the size on disk; ``load`` returns float32 either way. The
prior's buffers and the AR prior's PCA / quantizer tables always stay float32.
``load`` checks the format and version and says exactly what is wrong with a dir that is not
one of ours. Parameters are plain (unboxed) arrays; ``UnCLIP.modules`` builds the Flax modules.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unclip_jax import config as cfg_lib
from unclip_jax.diffusion import GaussianDiffusion, create_gaussian_diffusion
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models import clip as clip_lib
from unclip_jax.models import pca as pca_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.models.tokenizer import DEFAULT_TOKENIZER_DIR
from unclip_jax.utils.paths import is_remote

FORMAT = "unclip_jax.model"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 2: optional inpainting decoder, bfloat16 storage
META_FILE = "unclip.json"
PCA_FILE = "pca.npz"
# keys of config.ar_prior that set sampling defaults rather than ARPriorConfig fields
AR_SAMPLING_KEYS = ("temperature", "top_p", "guidance", "num_candidates")
AR_SAMPLING_DEFAULTS = dict(temperature=1.0, top_p=1.0, guidance=1.0, num_candidates=1)


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
    pca: Optional[pca_lib.PCA] = None  # PCA of the CLIP image embeddings (pca.npz), if shipped

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
        # a separate inpainting decoder (decoder config + 4 input channels), when trained
        self.inpaint_decoder = (unet_lib.UNet(cfg_lib.inpaint_decoder_config(c))
                                if "inpaint" in self.params else None)
        self.ar_prior_config = ar_prior_config(c)
        self.ar_prior = (ar_lib.ARPrior(self.ar_prior_config)
                         if self.ar_prior_config is not None else None)
        self._cache: dict = {}

    @property
    def has_inpaint_decoder(self) -> bool:
        return self.inpaint_decoder is not None

    @property
    def has_ar_prior(self) -> bool:
        return self.ar_prior is not None and "ar_prior" in self.params

    def ar_components(self) -> tuple[pca_lib.PCA, pca_lib.Quantizer, pca_lib.Quantizer]:
        """(PCA basis, code quantizer, dot-token quantizer) of the AR prior."""
        if not self.has_ar_prior:
            raise ValueError("this model has no autoregressive prior (config section ar_prior)")
        t = self.params["ar_prior"]
        return (pca_lib.PCA(**t["pca"]), pca_lib.Quantizer(edges=t["quantizer"]["edges"]),
                pca_lib.Quantizer(edges=t["dot_quantizer"]["edges"]))

    def ar_sampling_options(self) -> dict:
        sec = self.config.get("ar_prior") or {}
        return {k: sec.get(k, v) for k, v in AR_SAMPLING_DEFAULTS.items()}

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


def ar_prior_config(config) -> Optional[ar_lib.ARPriorConfig]:
    """The ``ar_prior`` config section (minus the sampling keys) as ARPriorConfig, or None."""
    sec = config.get("ar_prior")
    if not sec:
        return None
    fields = {k: v for k, v in cfg_lib._plain(sec).items() if k not in AR_SAMPLING_KEYS}
    return cfg_lib._build(ar_lib.ARPriorConfig, fields, "ar_prior",
                          dtype=cfg_lib.compute_dtype(config))


def ar_prior_tree(params, pca: pca_lib.PCA, quantizer: pca_lib.Quantizer,
                  dot_quantizer: pca_lib.Quantizer) -> dict:
    """The ``params['ar_prior']`` entry: AR transformer params + PCA basis + quantizers, as
    plain dicts of arrays (what the model dir stores)."""
    return {"params": params,
            "pca": {"mean": pca.mean, "basis": pca.basis,
                    "explained_variance": pca.explained_variance,
                    "total_variance": pca.total_variance},
            "quantizer": {"edges": quantizer.edges},
            "dot_quantizer": {"edges": dot_quantizer.edges}}


def _random_ar_prior(cfg: ar_lib.ARPriorConfig, key) -> dict:
    """Random AR prior params + a random orthonormal PCA basis and uniform quantizers."""
    import numpy as np

    params = nn.meta.unbox(jax.jit(lambda k: ar_lib.init_ar_prior(cfg, k))(key)["params"])
    d, k = cfg.clip_dim, cfg.pca_dims
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
    var = np.linspace(1.0, 0.1, d) / d
    pca = pca_lib.PCA(mean=jnp.zeros((d,), jnp.float32), basis=jnp.asarray(q[:, :k], jnp.float32),
                      explained_variance=jnp.asarray(var[:k], jnp.float32),
                      total_variance=jnp.asarray(var.sum(), jnp.float32))
    span = 3.0 / float(np.sqrt(d))
    quantizer = pca_lib.uniform_quantizer(np.full(k, -span), np.full(k, span), cfg.num_buckets)
    return ar_prior_tree(params, pca, quantizer,
                         pca_lib.uniform_quantizer(-1.0, 1.0, cfg.dot_buckets))


def init_random(config: ml_collections.ConfigDict, seed: int = 0) -> UnCLIP:
    """An UnCLIP with randomly initialised weights (for tests and before training)."""
    # rbg keys: the init compiles twice as fast as with threefry on CPU
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), 3 + len(config.get("sr", []) or []))
    clip_cfg = cfg_lib.clip_config(config)
    prior_cfg, dec_cfg = cfg_lib.prior_config(config), cfg_lib.decoder_config(config)
    unet_params = lambda c, k: unet_lib.init_unet(c, k)["params"]  # noqa: E731
    params = {
        # clip_text_only: converted models without a CLIP image tower (unclip convert)
        "clip": nn.meta.unbox(clip_lib.init_params(
            clip_cfg, keys[0], vision=not config.get("clip_text_only", False))),
        "prior": nn.meta.unbox(jax.jit(lambda k: prior_lib.init_prior(prior_cfg, k))(keys[1])),
        "decoder": nn.meta.unbox(jax.jit(lambda k: unet_params(dec_cfg, k))(keys[2])),
        "sr": [nn.meta.unbox(jax.jit(lambda k, c=c: unet_params(c, k))(k))
               for c, k in zip(cfg_lib.sr_configs(config), keys[3:])],
    }
    # sr_last_step: upsamplers with a second UNet for their last step (Karlo's super_res_last)
    sr_cfgs = cfg_lib.sr_configs(config)
    last = [int(i) for i in (config.get("sr_last_step", ()) or ())]
    if last:
        params["sr_last"] = {
            str(i): nn.meta.unbox(jax.jit(lambda k, c=sr_cfgs[i]: unet_params(c, k))(
                jax.random.fold_in(keys[3 + i], 1))) for i in last}
    ar_cfg = ar_prior_config(config)
    if ar_cfg is not None:
        params["ar_prior"] = _random_ar_prior(ar_cfg, jax.random.fold_in(keys[0], 7))
    return UnCLIP(config, params, tokenizer_dir=cfg_lib.tokenizer_dir(config), random_weights=True,
                  source=f"random:{config.get('name', '')}")


def _abstract_params(config, inpaint: bool = False) -> dict:
    tree = jax.eval_shape(lambda: init_random(config).params)
    if inpaint:
        tree["inpaint"] = nn.meta.unbox(unet_lib.abstract_params(
            cfg_lib.inpaint_decoder_config(config)))
    return tree


STORAGE_DTYPES = ("float32", "bfloat16")
# subtrees that keep float32 storage whatever storage_dtype says (small, precision-sensitive)
_FP32_STORED = ("prior/buffers", "ar_prior")


def _cast_for_storage(tree: dict, dtype) -> dict:
    """``tree`` (arrays or ShapeDtypeStructs) with its float32 leaves cast to ``dtype``,
    except the subtrees in ``_FP32_STORED``."""
    def cast(path, x):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if any(name.startswith(p) for p in _FP32_STORED) or x.dtype != jnp.float32:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return jnp.asarray(x, dtype)
    return jax.tree_util.tree_map_with_path(cast, tree)


def save(model: UnCLIP, path: str, storage_dtype: str = "float32") -> str:
    """Write ``model`` as a model dir at ``path`` (must not exist or be empty); weights stored
    as ``storage_dtype`` ('float32' or 'bfloat16', see the module docstring)."""
    import orbax.checkpoint as ocp

    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
    if is_remote(path):
        raise ModelDirError(f"model dirs are written to local disk, not {path}: export to a local "
                            "folder and copy it (e.g. gsutil -m cp -r DIR gs://...)")
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise ModelDirError(f"{path} exists and is not empty; choose a new output folder")
    os.makedirs(path, exist_ok=True)
    tree = dict(model.params)
    tree["sr"] = {str(i): p for i, p in enumerate(model.params["sr"])}
    if storage_dtype != "float32":
        tree = _cast_for_storage(tree, jnp.dtype(storage_dtype))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), tree)
    ckptr.wait_until_finished()
    shutil.copytree(model.tokenizer_dir, os.path.join(path, "tokenizer"))
    if model.pca is not None:
        save_pca(model.pca, os.path.join(path, PCA_FILE))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "config": json.loads(cfg_lib.to_json(model.config)),
            "random_weights": model.random_weights, "storage_dtype": storage_dtype,
            "has_inpaint": model.has_inpaint_decoder}
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
    abstract = _abstract_params(config, inpaint=bool(meta.get("has_inpaint", False)))
    abstract["sr"] = {str(i): p for i, p in enumerate(abstract["sr"])}
    storage = meta.get("storage_dtype", "float32")
    if storage not in STORAGE_DTYPES:
        raise ModelDirError(f"{path}: unknown storage_dtype {storage!r} in {META_FILE} "
                            f"(this unclip_jax reads {list(STORAGE_DTYPES)})")
    if storage != "float32":
        abstract = _cast_for_storage(abstract, jnp.dtype(storage))
    # restore onto this process's first device: the stored shardings name the devices of the
    # machine that saved the dir (a CPU), which another platform (a GPU / TPU) does not have
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                            abstract)
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise ModelDirError(f"{path} has no params/ folder; the model dir is incomplete")
    try:
        tree = ocp.StandardCheckpointer().restore(params_dir, abstract)
    except Exception as e:  # orbax raises several types for mismatched trees
        raise ModelDirError(f"parameters in {params_dir} do not match the config in "
                            f"{META_FILE}: {e}") from None
    tree["sr"] = [tree["sr"][str(i)] for i in range(len(tree["sr"]))]
    if storage != "float32":  # compute in float32 whatever the storage
        tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32)
                            if x.dtype == jnp.dtype(storage) else x, tree)
    tok = os.path.join(path, "tokenizer")
    pca_path = os.path.join(path, PCA_FILE)
    pca = load_pca(pca_path) if os.path.isfile(pca_path) else None
    return UnCLIP(config, tree, tokenizer_dir=tok if os.path.isdir(tok) else DEFAULT_TOKENIZER_DIR,
                  random_weights=bool(meta.get("random_weights", False)), source=path, pca=pca)


# ------------------------------------------------------------------------------ PCA files

PCA_KEYS = ("mean", "basis", "explained_variance", "total_variance")


class BasisFileError(ValueError):
    """A PCA basis file that is missing or not one written by ``save_pca``."""


def save_pca(pca: pca_lib.PCA, path: str) -> str:
    """Write a PCA basis as ``.npz`` (keys ``PCA_KEYS``, float32)."""
    import numpy as np

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(getattr(pca, k), np.float32) for k in PCA_KEYS})
    return path


def load_pca(path: str) -> pca_lib.PCA:
    """Read a basis written by ``save_pca``; ``BasisFileError`` says what is wrong."""
    import numpy as np

    if not os.path.isfile(path):
        raise BasisFileError(f"PCA basis file not found: {path} (make one with "
                             "`unclip pca-fit IMAGE_FOLDER --out FILE`)")
    try:
        with np.load(path) as z:
            arrays = {k: np.asarray(z[k], np.float32) for k in PCA_KEYS}
    except Exception as e:  # zipfile / pickle / KeyError
        raise BasisFileError(f"{path} is not a PCA basis file written by `unclip pca-fit` "
                             f"({type(e).__name__}: {e})") from None
    d = arrays["mean"].shape[0] if arrays["mean"].ndim == 1 else -1
    b = arrays["basis"]
    if d < 0 or b.ndim != 2 or b.shape[0] != d or arrays["explained_variance"].shape != b.shape[1:]:
        raise BasisFileError(f"{path}: inconsistent PCA shapes (mean {arrays['mean'].shape}, "
                             f"basis {b.shape})")
    return pca_lib.PCA(**{k: jnp.asarray(v) for k, v in arrays.items()})
