"""Plan a pod without a pod: compile the real sharded train / sample step for a TPU topology on a
CPU host and read per-device memory and FLOPs from the compiled executable (``unclip plan``).

With ``libtpu`` installed (``pip install 'jax[tpu]==0.10.2'``) JAX can describe a TPU slice that
is not attached (``jax.experimental.topologies.get_topology_desc``): its devices are
*compile-only*. We build a ``Mesh`` over them, create the train state abstractly
(``jax.eval_shape`` of the init, logical -> mesh shardings, as ``parallel.sharded_init`` would),
lower the same ``jax.jit`` train step that training runs (AdamW, EMA, bf16 compute, fp32 params,
donated state; loss = the stage's diffusion loss) and compile it for the topology. The TPU
compiler then reports, per device, the bytes of the arguments, outputs, aliased buffers and
temporaries (``memory_analysis()``) and the FLOPs of the partitioned program
(``cost_analysis()``); a step that does not fit in HBM fails to compile with
``RESOURCE_EXHAUSTED``, whose message says how much it needed.

Numbers (per device unless said otherwise):

* HBM in use: arguments + outputs - aliased (donated) + temporaries + generated code, against
  the chip's HBM (``CHIPS``).
* FLOPs of one step (per device, and times the device count), the *ideal* step time at the
  chip's peak bf16 FLOP rate (a lower bound: real steps reach 40-60% of it).
* parameters: count, fp32 bytes in all, bytes held by one device under the mesh, against
  total / (fsdp * tensor) (what perfect sharding would give).

Nothing here needs the topology to estimate: ``estimate`` computes the exact per-device bytes of
the train state from the shardings (no compile), plus fp32 gradients, a lower bound on the HBM a
step needs; ``suggest_mesh`` scales a compiled (or estimated) breakdown to other meshes with the
same device count. Both are labelled *estimate* in the report.

The TPU runtime is never started: ``JAX_PLATFORMS`` is untouched (CPU stays the default
backend), libtpu is loaded only as a compiler, with ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (another
process may hold ``/tmp/libtpu_lockfile``) and ``TPU_SKIP_MDS_QUERY=1`` (no GCE metadata server).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from unclip_jax.utils.flops import cost_dict

GiB = 1024 ** 3

# --------------------------------------------------------------------------------------------
# Chips and topologies
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU chip as JAX sees it (one device per chip; v4 / v5p in megacore mode).

    hbm_gib: HBM per chip (GiB). peak_bf16_tflops: dense bf16 peak per chip (TFLOP/s).
    hbm_gbps: HBM bandwidth (GB/s), for the memory-bound time. dims: 3 for the 3-D torus chips
    (v4, v5p), 2 for the 2-D ones (v5e, v6e). cores_per_chip: TensorCores per chip, which the
    ``v4-32`` style accelerator names count (v4-32 = 16 chips).
    """

    name: str
    hbm_gib: float
    peak_bf16_tflops: float
    hbm_gbps: float
    dims: int
    cores_per_chip: int
    libtpu_name: str
    chip_config_name: str

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * GiB)


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32, 275, 1200, 3, 2, "v4", "megacore"),
    "v5e": ChipSpec("v5e", 16, 197, 819, 2, 1, "v5e", "default"),
    "v5p": ChipSpec("v5p", 95, 459, 2765, 3, 2, "v5p", "megacore"),
    "v6e": ChipSpec("v6e", 32, 918, 1640, 2, 1, "v6e", "default"),
}
_CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p",
                 "v6litepod": "v6e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: ``chip`` and the chip grid ``shape`` (e.g. v5p 4x4x4 = 64 chips)."""

    chip: ChipSpec
    shape: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        """``v5p:4x4x4`` (the form libtpu takes)."""
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU name (``v5p-128``: TensorCores for v4 / v5p, chips for v5e / v6e)."""
        n = self.num_chips * self.chip.cores_per_chip
        prefix = {"v5e": "v5litepod"}.get(self.chip.name, self.chip.name)
        return f"{prefix}-{n}"

    def topology_kwargs(self) -> dict:
        """Extra ``get_topology_desc`` arguments: megacore for v4 / v5p (one device per chip,
        as on a real VM), hosts of 2x2x1 chips (1x1x1 for one chip) and the torus wraparound
        of full slices."""
        shape3 = tuple(self.shape) + (1,) * (3 - len(self.shape))
        if self.chip.dims == 3:
            wrap = (all(s % 4 == 0 for s in shape3),) * 3
        else:
            wrap = tuple(s >= 16 for s in shape3[:2]) + (False,)
        host = (1, 1, 1) if self.num_chips == 1 else (2, 2, 1)
        return dict(chip_config_name=self.chip.chip_config_name, chips_per_host_bounds=host,
                    num_slices=1, wrap=wrap)


def _grid_for(n: int, dims: int) -> tuple[int, ...]:
    """A balanced power-of-two chip grid of ``n`` chips (16 -> 2x2x4 / 4x4)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"{n} chips is not a power of two: give the grid explicitly "
                         f"(e.g. v5p:4x4x12)")
    if dims == 3:
        if n < 4:
            raise ValueError("3-D TPU slices (v4, v5p) have at least 4 chips (2x2x1)")
        if n == 4:
            return (2, 2, 1)
    g = [1] * dims
    while math.prod(g) < n:
        g[g.index(min(g))] *= 2
    return tuple(sorted(g))


def parse_topology(name: str) -> Topology:
    """``v5p:4x4x4`` | ``v5p-128`` | ``v4:2x2x4`` | ``v4-32`` | ``v5e:2x2`` | ``v5litepod-16`` |
    ``v6e-8`` -> ``Topology``. Accelerator-type names count TensorCores on v4 / v5p (2 per
    chip) and chips on v5e / v6e, as Cloud TPU does."""
    s = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?::|-)(.+)", s)
    if not m:
        raise ValueError(f"bad topology {name!r}: use e.g. v5p:4x4x4, v4-32, v5e:2x2")
    kind, rest = m.groups()
    kind = _CHIP_ALIASES.get(kind, kind)
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU {kind!r} in {name!r}; known: {sorted(CHIPS)}")
    chip = CHIPS[kind]
    if ":" in s:
        try:
            shape = tuple(int(x) for x in rest.split("x"))
        except ValueError:
            raise ValueError(f"bad chip grid {rest!r} in {name!r} (want e.g. 4x4x4)") from None
        if len(shape) != chip.dims or min(shape) < 1:
            raise ValueError(f"{chip.name} grids have {chip.dims} dims, got {rest!r}")
        return Topology(chip, shape)
    try:
        cores = int(rest)
    except ValueError:
        raise ValueError(f"bad accelerator type {name!r} (want e.g. v4-32)") from None
    if cores % chip.cores_per_chip:
        raise ValueError(f"{name}: {chip.name} counts {chip.cores_per_chip} cores per chip")
    return Topology(chip, _grid_for(cores // chip.cores_per_chip, chip.dims))


def libtpu_available() -> bool:
    from jax._src import cloud_tpu_init

    return cloud_tpu_init.get_tpu_library_path() is not None


INSTALL_HINT = "pip install 'jax[tpu]==0.10.2'  (or: pip install -e '.[tpu]')"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (libtpu prints GCE-metadata warnings on a host without TPUs); the text is
    re-printed if the block raises."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture etc.
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        except BaseException:
            os.dup2(saved, fd)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def topology_devices(topology: Union[str, Topology]) -> list:
    """Compile-only devices of a TPU topology (needs libtpu; starts no TPU runtime)."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if not libtpu_available():
        raise RuntimeError(f"compiling for {topo.name} needs libtpu: {INSTALL_HINT}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    with _quiet_stderr():
        try:
            desc = topologies.get_topology_desc(topology_name=topo.name, platform="tpu",
                                                **topo.topology_kwargs())
        except Exception:  # noqa: BLE001 - older libtpu: fall back to the plain name
            desc = topologies.get_topology_desc(topology_name=topo.name, platform="tpu")
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise RuntimeError(f"{topo.name}: libtpu gave {len(devices)} devices for "
                           f"{topo.num_chips} chips")
    return devices


# --------------------------------------------------------------------------------------------
# Meshes
# --------------------------------------------------------------------------------------------


def parse_mesh(text: Optional[str]) -> dict:
    """``"data=2,fsdp=8,tensor=1"`` -> ``{'data': 2, 'fsdp': 8, 'tensor': 1}`` (missing axes:
    data=-1, fsdp=1, tensor=1 as in ``make_mesh``)."""
    out = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in ("data", "fsdp", "tensor") or not v.strip():
            raise ValueError(f"bad mesh entry {part!r}: use data=..,fsdp=..,tensor=..")
        out[k] = int(v)
    return out


def resolve_mesh(mesh: Optional[Mapping[str, int]], num_devices: int) -> dict:
    from unclip_jax.parallel.mesh import resolve_mesh_shape

    m = dict(mesh or {})
    if not m:
        m = {"data": 1, "fsdp": -1, "tensor": 1}
    d, f, t = resolve_mesh_shape(m.get("data", -1), m.get("fsdp", 1), m.get("tensor", 1),
                                 num_devices)
    return {"data": d, "fsdp": f, "tensor": t}


def _unbox(tree):
    from unclip_jax.parallel.mesh import unbox

    return unbox(tree)


def _abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    from unclip_jax.parallel.mesh import MESH_AXES

    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


# --------------------------------------------------------------------------------------------
# Stage specs: the trainer's stage (init, loss, optimizer, EMA) + batch shapes + sample step
# --------------------------------------------------------------------------------------------

PLAN_STAGES = ("prior", "decoder", "sr", "inpaint")


@dataclasses.dataclass
class StageSpec:
    """What ``plan`` needs of one stage (all abstract / traceable).

    The train part is exactly what ``unclip train`` runs: ``train.losses.build_stage`` (init of
    the trainable params, the stage's loss on its frozen variables) and
    ``train.loop.train_config`` (optimizer, EMA, batch size, mesh) of ``config.train.<stage>``.
    """

    stage: str
    model_config: Any
    init_params: Callable  # rng -> boxed params
    loss_fn: Callable  # (params, batch, rng) -> (loss, aux)
    batch: dict  # name -> ShapeDtypeStruct (global shapes, as the data pipeline delivers)
    train: Any  # train.loop.TrainConfig
    sample_fn: Optional[Callable]  # (params, inputs, key) -> x_prev
    sample_inputs: Optional[dict]  # name -> ShapeDtypeStruct
    sample_steps: int
    note: str = ""
    _abstract: Any = None

    def abstract_params(self):
        """``jax.eval_shape`` of the init (boxed); traced once (big UNets take a while)."""
        if self._abstract is None:
            self._abstract = jax.eval_shape(self.init_params, jax.random.PRNGKey(0))
        return self._abstract


def _section(config, *path, default=None):
    node = config
    for p in path:
        if node is None:
            return default
        try:
            node = node[p] if not isinstance(node, (list, tuple)) else node[int(p)]
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            return default
    return node


def _plain(x):
    from unclip_jax.config import _plain as plain

    return plain(x)


def _diffusion(dcfg: Mapping, respacing=""):
    from unclip_jax.diffusion import create_gaussian_diffusion

    return create_gaussian_diffusion(
        steps=int(dcfg.get("steps", 1000)), noise_schedule=dcfg.get("schedule", "cosine"),
        timestep_respacing=respacing, model_output=dcfg.get("model_output", "eps"),
        model_var_type=dcfg.get("model_var_type", "fixed_small"))


def _num_sample_steps(dcfg: Mapping) -> int:
    from unclip_jax.diffusion import space_timesteps

    steps = int(dcfg.get("steps", 1000))
    return len(space_timesteps(steps, dcfg.get("sample_steps", "") or steps))


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)


def train_batch_shapes(config, stage: str, batch_size: int, sr_index: int = 0) -> dict:
    """Global shapes of one train batch of ``stage`` as the data pipeline delivers it (see
    ``train/losses.py``): embeddings from ``unclip embed`` for the prior; images at the decoder
    size + embeddings (or caption token ids) for the decoder; images at the upsampler's output
    size for ``sr`` (the loss crops and degrades them in-graph)."""
    from unclip_jax import config as cfgmod
    from unclip_jax.train import losses

    b, f32 = batch_size, jnp.float32
    if stage == "prior":
        p = cfgmod.prior_config(config)
        return {"image_emb": _sds((b, p.clip_dim), f32), "text_emb": _sds((b, p.clip_dim), f32),
                "text_states": _sds((b, p.num_text_tokens, p.states_dim), f32),
                "text_mask": _sds((b, p.num_text_tokens), jnp.bool_)}
    if stage in ("decoder", "inpaint"):
        u = cfgmod.decoder_config(config)
        out = {"image": _sds((b, u.image_size, u.image_size, u.in_channels), f32)}
        if u.clip_dim:
            out["image_emb"] = _sds((b, u.clip_dim), f32)
        if u.text_encoder == "clip":
            out["text_emb"] = _sds((b, u.text_emb_dim), f32)
            out["text_states"] = _sds((b, u.text_ctx, u.text_states_dim), f32)
            out["text_mask"] = _sds((b, u.text_ctx), jnp.bool_)
        elif u.text_encoder == "transformer":
            out["input_ids"] = _sds((b, u.text_ctx), jnp.int32)
            out["text_mask"] = _sds((b, u.text_ctx), jnp.bool_)
        return out
    if stage == "sr":
        s = losses.sr_settings(config, sr_index)
        out = {"image": _sds((b, s["high"], s["high"], s["config"].in_channels), f32)}
        if s["corruption"] == "bsr":  # degraded on the host by the stage's prepare
            out["low_res"] = _sds((b, s["low"], s["low"], s["config"].in_channels), f32)
        return out
    raise ValueError(f"unknown stage {stage!r}; choose one of {PLAN_STAGES}")


def _unet_sampler(ucfg, dcfg: Mapping, sample_batch: int):
    """One ancestral (DDPM) step of the UNet at its output size; classifier-free guidance (one
    forward over ``[cond; uncond]``) when it is conditioned, as the samplers run it."""
    from unclip_jax.diffusion import classifier_free_guidance, ddpm_step
    from unclip_jax.models.unet import UNet, dummy_inputs

    model = UNet(ucfg)
    diffusion = _diffusion(dcfg, dcfg.get("sample_steps", "") or "")
    guided = bool(ucfg.clip_dim or ucfg.text_encoder != "none")
    scale = float(dcfg.get("guidance", 1.0) or 1.0)
    inputs = dict(jax.eval_shape(lambda: dummy_inputs(ucfg, sample_batch)))
    inputs.pop("t")

    def sample_fn(params, inp, key):
        x_t = inp["x"]
        bsz = x_t.shape[0]
        kw = {k: inp[k] for k in inp if k != "x"}

        def model_fn(x, ts, **kwargs):
            return model.apply({"params": params}, x, ts, **kwargs)

        fn = model_fn
        if guided:
            kw = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), kw)
            drop = jnp.concatenate([jnp.zeros((bsz,), bool), jnp.ones((bsz,), bool)])
            if ucfg.clip_dim:
                kw["drop_clip"] = drop
            if ucfg.text_encoder != "none":
                kw["drop_text"] = drop
            fn = classifier_free_guidance(model_fn, scale,
                                          learned_variance=diffusion.learned_variance)
        t = jnp.full((bsz,), diffusion.num_timesteps - 1, jnp.int32)
        x_prev, _ = ddpm_step(diffusion, fn, x_t, t, key, kw)
        return x_prev

    return sample_fn, inputs


def _prior_sampler(pcfg, dcfg: Mapping, sample_batch: int, buffers):
    """One guided ancestral step of the prior for ``sample_batch * num_candidates`` rows."""
    from unclip_jax.diffusion import classifier_free_guidance, ddpm_step
    from unclip_jax.models.prior import DiffusionPrior

    model = DiffusionPrior(pcfg)
    diffusion = _diffusion(dcfg, dcfg.get("sample_steps", "") or "")
    scale = float(dcfg.get("guidance", 1.0) or 1.0)
    b = sample_batch * int(dcfg.get("num_candidates", 1) or 1)
    d, tl, ds = pcfg.clip_dim, pcfg.num_text_tokens, pcfg.states_dim
    inputs = {"x": _sds((b, d), jnp.float32), "text_emb": _sds((b, d), jnp.float32),
              "text_states": _sds((b, tl, ds), jnp.float32),
              "text_mask": _sds((b, tl), jnp.bool_)}

    def sample_fn(params, inp, key):
        x_t = inp["x"]
        bsz = x_t.shape[0]
        variables = {"params": params, "buffers": buffers}

        def model_fn(x, ts, text_emb, text_states, text_mask, drop):
            return model.apply(variables, x, ts, text_emb, text_states, text_mask, drop)

        kw = {k: jnp.concatenate([inp[k]] * 2, axis=0)
              for k in ("text_emb", "text_states", "text_mask")}
        kw["drop"] = jnp.concatenate([jnp.zeros((bsz,), bool), jnp.ones((bsz,), bool)])
        fn = classifier_free_guidance(model_fn, scale)
        t = jnp.full((bsz,), diffusion.num_timesteps - 1, jnp.int32)
        x_prev, _ = ddpm_step(diffusion, fn, x_t, t, key, kw, clip_denoised=False)
        return x_prev

    return sample_fn, inputs


def _copy_config(config):
    import ml_collections

    return ml_collections.ConfigDict(_plain(config))


def _stage_train_config(config, stage: str):
    from unclip_jax.train import loop

    if _section(config, "train", stage) is None:
        return loop.TrainConfig(stage=stage)
    return loop.train_config(config, stage)


def stage_spec(config, stage: str, *, batch_size: Optional[int] = None,
               sample_batch: Optional[int] = None, sr_index: int = 0,
               dtype: Optional[str] = None, train_size: Optional[int] = None,
               remat: Optional[bool] = None) -> StageSpec:
    """The ``StageSpec`` of ``stage`` ('prior' | 'decoder' | 'sr' | 'inpaint') of an unCLIP
    config (``ConfigDict`` as in ``experiments/*.py``; not modified).

    ``batch_size`` default: ``train.<stage>.batch_size``; ``sample_batch`` default: the train
    batch. ``dtype`` overrides ``config.dtype``; ``train_size`` the upsampler's training crop
    (``train.sr.crop_size``); ``remat`` the UNet's ``remat`` flag.
    """
    from unclip_jax import config as cfgmod
    from unclip_jax.train import losses

    if stage not in PLAN_STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {PLAN_STAGES}")
    config = _copy_config(config)
    if dtype is not None:
        config.dtype = dtype
    if stage == "sr":
        n_sr = len(config.get("sr", ()) or ())
        if not 0 <= sr_index < n_sr:
            raise ValueError(f"sr index {sr_index} out of range: the config has {n_sr} "
                             "upsampler(s)")
        if train_size is not None:
            if _section(config, "train", "sr") is None:
                raise ValueError("--train-size needs a train.sr section in the config")
            config.train.sr.crop_size = int(train_size)
    if remat is not None:
        if stage == "sr":
            config.sr[sr_index]["remat"] = bool(remat)
        elif stage != "prior":
            config.decoder.remat = bool(remat)
    tc = _stage_train_config(config, stage)
    batch_size = int(tc.batch_size if batch_size is None else batch_size)
    sample_batch = batch_size if sample_batch is None else int(sample_batch)
    st = losses.build_stage(stage, config, sr_index=sr_index)
    loss_fn = st.make_loss(st.frozen)
    batch = train_batch_shapes(config, stage, batch_size, sr_index)
    diff = dict(_plain(_section(config, "diffusion", losses.DIFFUSION_SECTION[stage],
                                default={}) or {}))
    note = ""
    if stage == "prior":
        mcfg = cfgmod.prior_config(config)
        sample_fn, sample_inputs = _prior_sampler(mcfg, diff, sample_batch,
                                                  st.frozen["buffers"])
        k = int(diff.get("num_candidates", 1) or 1)
        note = f"sampling draws {k} candidates per prompt" if k > 1 else ""
    else:
        if stage == "sr":
            s = losses.sr_settings(config, sr_index)
            mcfg = s["config"]
            if s["crop"] != s["high"]:
                note = f"trains on {s['crop']}x{s['crop']} crops of {s['high']}x{s['high']}"
        elif stage == "inpaint":
            mcfg = cfgmod.inpaint_decoder_config(config)
        else:
            mcfg = cfgmod.decoder_config(config)
        sample_fn, sample_inputs = _unet_sampler(mcfg, diff, sample_batch)
    return StageSpec(stage, mcfg, st.init, loss_fn, batch, tc, sample_fn, sample_inputs,
                     _num_sample_steps(diff), note)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepCost:
    """What the TPU compiler says about one compiled step (per device).

    ``peak_bytes`` = arguments + outputs - aliased + temporaries + generated code.
    ``error`` is the compiler's message when it refused (e.g. RESOURCE_EXHAUSTED: out of HBM);
    then ``peak_bytes`` is the 'Used' figure of that message when it has one, else (when the
    message names only the HLO temporaries, kept in ``temp_bytes``) those plus the train state
    and batch.
    """

    name: str
    compiled: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    peak_bytes: int = 0
    flops_per_device: float = 0.0
    bytes_accessed_per_device: float = 0.0
    compile_seconds: float = 0.0
    error: Optional[str] = None

    def fits(self, hbm_bytes: int) -> bool:
        return self.compiled and self.peak_bytes <= hbm_bytes


@dataclasses.dataclass
class PlanReport:
    """Result of ``plan``. Bytes are per device unless named ``_total``."""

    stage: str
    config_name: str
    topology: str
    accelerator_type: str
    chip: str
    num_devices: int
    mesh: dict
    batch_size: int
    sample_batch: int
    dtype: str
    hbm_bytes: int
    peak_tflops: float
    param_count: int
    param_bytes_total: int
    param_bytes_per_device: int
    param_bytes_ideal: int  # total / (fsdp * tensor)
    replicated_param_bytes: int  # of the per-device figure: leaves no mesh axis shards
    state_bytes_per_device: int  # params + optimizer state + EMA (fp32), exact from shardings
    batch_bytes_per_device: int
    estimate_bytes: int  # analytic lower bound of a train step: state + fp32 grads + batch
    train: Optional[StepCost] = None
    sample: Optional[StepCost] = None
    sample_steps: int = 0
    suggestion: Optional[str] = None
    note: str = ""

    # ---- derived -------------------------------------------------------------------------
    @property
    def fits(self) -> bool:
        """The train step compiled for the topology and its per-device peak fits in HBM; without
        a compile, the analytic lower bound fits (an optimistic answer: see ``estimate_bytes``)."""
        if self.train is not None:
            return self.train.fits(self.hbm_bytes)
        return self.estimate_bytes <= self.hbm_bytes

    @property
    def estimated(self) -> bool:
        return self.train is None or not self.train.compiled

    @property
    def flops_per_step_total(self) -> float:
        return self.train.flops_per_device * self.num_devices if self.train else 0.0

    def ideal_step_seconds(self, cost: Optional[StepCost] = None) -> float:
        cost = cost or self.train
        if cost is None or not cost.flops_per_device:
            return float("nan")
        return cost.flops_per_device / (self.peak_tflops * 1e12)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(fits=self.fits, estimated=self.estimated,
                 flops_per_step_total=self.flops_per_step_total,
                 ideal_step_seconds=self.ideal_step_seconds())
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    # ---- text ----------------------------------------------------------------------------
    def to_text(self) -> str:
        g = _gb
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"unclip plan: {self.config_name} / {self.stage} on {self.topology} "
            f"({self.accelerator_type}: {self.num_devices} x TPU {self.chip}, "
            f"{g(self.hbm_bytes)} HBM, {self.peak_tflops:.0f} bf16 TFLOP/s per chip)",
            f"  mesh {mesh}; global batch {self.batch_size} "
            f"({self.batch_size / max(1, self.mesh['data'] * self.mesh['fsdp']):g} per "
            f"data-parallel shard); compute {self.dtype}, params fp32"
            + (f"; {self.note}" if self.note else ""),
            f"  params: {self.param_count / 1e6:,.1f}M = {g(self.param_bytes_total)} fp32; "
            f"per device {g(self.param_bytes_per_device)} vs total/(fsdp*tensor) "
            f"{g(self.param_bytes_ideal)} (x{_ratio(self.param_bytes_per_device, self.param_bytes_ideal)}"
            f"; {g(self.replicated_param_bytes)} replicated)",
            f"  train state (params + AdamW mu, nu + EMA) per device: "
            f"{g(self.state_bytes_per_device)}; batch {g(self.batch_bytes_per_device)}",
        ]
        if self.train is not None:
            lines += self._cost_lines(self.train, "train step")
        if self.sample is not None:
            lines += self._cost_lines(self.sample, "sampling loop", per_image_steps=True)
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        if self.train is None and self.fits:
            verdict = "MAY FIT (lower bound only, activations not counted)"
        how = "analytic lower bound, no compile" if self.train is None else (
            "compiled" if self.train.compiled else "compiler refused")
        peak = self.train.peak_bytes if self.train is not None else self.estimate_bytes
        lines.append(f"  => train step {verdict} in {g(self.hbm_bytes)} HBM per chip "
                     f"({how}: {g(peak)} per device, "
                     f"{100.0 * peak / self.hbm_bytes:.0f}% of HBM)")
        if self.train is None or not self.train.compiled:
            lines.append(f"     estimate (state + fp32 grads + batch, no activations): "
                         f"{g(self.estimate_bytes)} per device")
        if self.suggestion:
            lines.append(f"  suggestion: {self.suggestion}")
        return "\n".join(lines)

    def _cost_lines(self, c: StepCost, what: str, per_image_steps: bool = False) -> list:
        g = _gb
        if not c.compiled:
            used = f" (needs {g(c.peak_bytes)} per device)" if c.peak_bytes else ""
            return [f"  {what}: NOT COMPILED{used}: {_first_line(c.error)}"]
        t = self.ideal_step_seconds(c)
        out = [
            f"  {what} per device: args {g(c.argument_bytes)} + out {g(c.output_bytes)} "
            f"- aliased {g(c.alias_bytes)} + temp {g(c.temp_bytes)} + code {g(c.code_bytes)} "
            f"= {g(c.peak_bytes)} ({100.0 * c.peak_bytes / self.hbm_bytes:.0f}% of HBM)",
            f"  {what} FLOPs: {_flops(c.flops_per_device)} per device, "
            f"{_flops(c.flops_per_device * self.num_devices)} in all; ideal time at "
            f"peak {_secs(t)}" + (f" (HBM-bandwidth bound {_secs(self._mem_time(c))})"
                                  if c.bytes_accessed_per_device else "")
            + f"; compiled in {c.compile_seconds:.0f} s",
        ]
        if per_image_steps and self.sample_steps:
            # XLA counts the fori_loop body once: the FLOPs above are one guided step's.
            out.append(f"  sampling ({self.sample_steps} steps, batch {self.sample_batch}): "
                       f"FLOPs above are per step; ideal {_secs(t * self.sample_steps)} per batch")
        return out

    def _mem_time(self, c: StepCost) -> float:
        bw = CHIPS[self.chip].hbm_gbps * 1e9
        return c.bytes_accessed_per_device / bw

    def markdown_row(self) -> str:
        """``| stage | topology | mesh | batch | fits | GB/device | TFLOP/step | ideal s | param
        GB/device | total/N |`` (see ``MARKDOWN_HEADER``)."""
        mesh = f"{self.mesh['data']}/{self.mesh['fsdp']}/{self.mesh['tensor']}"
        if self.train is not None and self.train.compiled:
            peak = f"{self.train.peak_bytes / GiB:.1f}"
        elif self.train is not None and self.train.peak_bytes:
            peak = f"{self.train.peak_bytes / GiB:.1f} (OOM)"
        else:
            peak = f">= {self.estimate_bytes / GiB:.1f} (est.)"
        fits = "yes" if self.fits else "NO"
        if self.train is None and self.fits:
            fits = "lower bound fits"
        tf = (f"{self.flops_per_step_total / 1e12:,.0f}" if self.train and self.train.compiled
              else "-")
        t = self.ideal_step_seconds()
        return (f"| {self.config_name} {self.stage} | {self.topology} ({self.accelerator_type}) "
                f"| {mesh} | {self.batch_size} | {fits} | {peak} "
                f"/ {self.hbm_bytes / GiB:.0f} | {tf} | "
                f"{'-' if math.isnan(t) else f'{t:.3f}'} | "
                f"{self.param_bytes_per_device / GiB:.2f} | {self.param_bytes_ideal / GiB:.2f} |")


MARKDOWN_HEADER = (
    "| model / stage | topology | mesh d/f/t | batch | fits | GiB per device / HBM "
    "| TFLOP per step (all chips) | ideal step s | param GiB per device | total/(f*t) GiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|")


def _gb(b: float) -> str:
    if abs(b) < GiB:
        return f"{b / 2 ** 20:,.1f} MiB"
    return f"{b / GiB:,.2f} GiB"


def _flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if f >= scale:
            return f"{f / scale:,.2f} {unit}"
    return f"{f / 1e6:,.2f} MFLOP"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if b else "-"


def _secs(t: float) -> str:
    if math.isnan(t):
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:,.1f} us"
    return f"{t * 1e3:,.1f} ms" if t < 1 else f"{t:,.2f} s"


def _first_line(s: Optional[str]) -> str:
    s = (s or "").strip()
    for line in s.splitlines():
        if line.strip():
            return line.strip()[:300]
    return s[:300]


# --------------------------------------------------------------------------------------------
# Byte counting
# --------------------------------------------------------------------------------------------


def _shard_bytes(shape: Sequence[int], dtype, spec: PartitionSpec, sizes: Mapping[str, int]
                 ) -> int:
    n = 1
    for d, dim in enumerate(shape):
        entry = spec[d] if d < len(spec) else None
        k = 1
        for ax in ((entry,) if isinstance(entry, str) else (entry or ())):
            k *= sizes[ax]
        n *= -(-int(dim) // k)
    return n * np.dtype(dtype).itemsize


def _tree_bytes(abstract_boxed, mesh_sizes: Mapping[str, int]) -> tuple[int, int, int]:
    """(total bytes, bytes per device, replicated bytes per device) of a boxed abstract tree
    under the logical rules (``param_shardings``' specs, computed on an abstract mesh)."""
    from flax import linen as nn

    from unclip_jax.parallel.mesh import logical_to_mesh_spec

    amesh = _abstract_mesh(mesh_sizes)
    total = per_dev = repl = 0
    for leaf in jax.tree.leaves(abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if isinstance(leaf, nn.Partitioned):
            x = leaf.value
            spec = logical_to_mesh_spec(leaf.names, amesh, x.shape)
        else:
            x = leaf
            spec = PartitionSpec()
        if not hasattr(x, "shape"):
            continue
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        shard = _shard_bytes(x.shape, x.dtype, spec, mesh_sizes)
        total += nbytes
        per_dev += shard
        if shard == nbytes:
            repl += shard
    return total, per_dev, repl


def _batch_bytes_per_device(batch: Mapping, mesh_sizes: Mapping[str, int]) -> int:
    from unclip_jax.parallel.mesh import batch_spec

    amesh = _abstract_mesh(mesh_sizes)
    return sum(_shard_bytes(x.shape, x.dtype, batch_spec(amesh, x.shape), mesh_sizes)
               for x in batch.values())


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------

_USED_RE = re.compile(r"Used\s+([0-9.]+)([KMGT]?)\s+of\s+([0-9.]+)([KMGT]?)\s+hbm", re.I)
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


# libtpu's other refusal: "... the total memory required for HLO temporaries (42.42G) exceeds
# available HBM (30.75G)" -- temporaries only (the train state and batch come on top)
_TEMPS_RE = re.compile(r"HLO temporaries\s*\(([0-9.]+)([KMGT]?)\)", re.I)


def _parse_oom(msg: str, pattern: re.Pattern = _USED_RE) -> Optional[int]:
    """The byte figure ``pattern`` finds in an out-of-HBM message (default: 'Used X of Y hbm';
    ``_TEMPS_RE``: 'HLO temporaries (X)'), or None."""
    m = pattern.search(msg or "")
    if not m:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@contextlib.contextmanager
def _no_persistent_cache_writes():
    """Compile-only (topology) executables can be written to JAX's persistent cache but not read
    back ("PjRtCompiler must be constructed with a Client"): keep them out of it."""
    key = "jax_persistent_cache_min_compile_time_secs"
    old = getattr(jax.config, key)
    jax.config.update(key, 1e12)
    try:
        yield
    finally:
        jax.config.update(key, old)


@contextlib.contextmanager
def _elapsed_bar(desc: str):
    """A tqdm bar that shows the elapsed time of a long, silent step (compiling a Karlo-size
    UNet for a pod takes 15-20 minutes on 2 CPU cores); one plain line when stderr is not a
    terminal."""
    import threading

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    if not tty:  # a log file: one line, not a refresh every second
        print(f"{desc} ...", file=sys.stderr, flush=True)
    bar = tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", file=sys.stderr, ncols=80,
               disable=not tty, leave=False)
    done = threading.Event()

    def tick():
        while not done.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def _cost_of(lowered_fn: Callable[[], Any], name: str) -> StepCost:
    t0 = time.perf_counter()
    try:
        with _no_persistent_cache_writes(), _elapsed_bar(f"compiling the {name} step"):
            compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is a result, not a crash
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "hbm" not in msg.lower():
            raise
        return StepCost(name, False, peak_bytes=_parse_oom(msg) or 0,
                        temp_bytes=_parse_oom(msg, _TEMPS_RE) or 0, error=msg,
                        compile_seconds=time.perf_counter() - t0)
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = cost_dict(compiled.cost_analysis())
    arg = int(getattr(mem, "argument_size_in_bytes", 0))
    out = int(getattr(mem, "output_size_in_bytes", 0))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    temp = int(getattr(mem, "temp_size_in_bytes", 0))
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    return StepCost(name, True, arg, out, alias, temp, code, arg + out - alias + temp + code,
                    float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                    compile_seconds=dt)


def _compile_train(spec: StageSpec, mesh: Mesh, compute_dtype) -> StepCost:
    """Lower + compile the train step exactly as ``train.loop.train`` builds it."""
    from unclip_jax.parallel.mesh import batch_shardings, param_shardings, with_shardings
    from unclip_jax.train import TrainState, jit_train_step, make_optimizer, make_train_step

    tc = spec.train
    optimizer = make_optimizer(tc.optimizer())
    use_ema = tc.ema_decay > 0

    def init_fn(params, rng):
        return TrainState.create(params, optimizer, rng, use_ema=use_ema)

    abstract = jax.eval_shape(init_fn, spec.abstract_params(), jax.random.PRNGKey(0))
    shardings = param_shardings(abstract, mesh)
    state = with_shardings(abstract, shardings)
    b_sh = batch_shardings(spec.batch, mesh)
    batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         spec.batch, b_sh)
    step = make_train_step(spec.loss_fn, optimizer, tc.ema() if use_ema else None,
                           compute_dtype=compute_dtype)
    jitted = jit_train_step(step, mesh, shardings, batch_sharding=b_sh)
    return _cost_of(lambda: jitted.lower(state, batch), "train")


def _compile_sample(spec: StageSpec, mesh: Mesh, compute_dtype) -> StepCost:
    """Lower + compile the whole sampling loop (``spec.sample_steps`` guided steps in a
    ``lax.fori_loop``) with the sampler's shardings; its FLOPs are one step's (XLA counts a loop
    body once, ``test_sampling_loop_compiles_for_v5e_and_flops_are_per_step``)."""
    from unclip_jax.parallel.mesh import (
        batch_shardings,
        mesh_context,
        param_shardings,
        with_shardings,
    )

    abstract = spec.abstract_params()
    p_sh = param_shardings(abstract, mesh)
    params = with_shardings(abstract, p_sh)
    # Sampling keeps the (EMA) params in the compute dtype.
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, compute_dtype if jnp.issubdtype(
            x.dtype, jnp.floating) else x.dtype, sharding=x.sharding), params)
    i_sh = batch_shardings(spec.sample_inputs, mesh)
    inputs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          spec.sample_inputs, i_sh)
    repl = NamedSharding(mesh, PartitionSpec())
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
    out_sh = i_sh["x"]
    steps = max(int(spec.sample_steps), 1)

    def sample_loop(params, inp, key):
        """The whole sampling loop: ``steps`` guided steps in a ``lax.fori_loop``, as the
        pipelines run them (one compiled body; peak memory is the loop's)."""
        def body(i, x):
            return spec.sample_fn(params, {**inp, "x": x}, jax.random.fold_in(key, i))
        return jax.lax.fori_loop(0, steps, body, inp["x"])

    jitted = jax.jit(sample_loop, in_shardings=(p_sh, i_sh, repl), out_shardings=out_sh)

    def lower():
        with mesh_context(mesh):
            return jitted.lower(params, inputs, key)

    return _cost_of(lower, "sample")


# --------------------------------------------------------------------------------------------
# Suggestions (analytic)
# --------------------------------------------------------------------------------------------


def _param_temp_bytes(param_bytes_per_device: int, compute_itemsize: int) -> int:
    """Temporaries of a train step that scale with the parameter shard: fp32 gradients and the
    compute-dtype copy of the params."""
    return param_bytes_per_device + param_bytes_per_device * compute_itemsize // 4


def suggest_mesh(report: PlanReport, headroom: float = 0.9) -> Optional[str]:
    """An analytic suggestion for a mesh (same devices) that would fit, from a report's compiled
    (or refused, or estimated) per-device bytes. Moving devices from ``data`` to ``fsdp`` keeps
    the per-device batch and divides the state by the fsdp factor; the activation part is taken
    as what is left of the peak after state, batch and parameter-sized temporaries. Labelled an
    estimate: compile the suggested mesh to confirm."""
    n, m = report.num_devices, report.mesh
    f, t = m["fsdp"], m["tensor"]
    itemsize = 2 if report.dtype in ("bfloat16", "float16") else 4
    ptemp = _param_temp_bytes(report.param_bytes_per_device, itemsize)
    state = report.state_bytes_per_device
    batch = report.batch_bytes_per_device
    peak = report.train.peak_bytes if report.train is not None and report.train.peak_bytes \
        else report.estimate_bytes
    act = max(0, peak - state - batch - ptemp)
    budget = headroom * report.hbm_bytes
    shard_part = state + ptemp - report.replicated_param_bytes * (4 + 1 + itemsize / 4.0)

    def est(f2: int) -> float:
        fixed = report.replicated_param_bytes * (4 + 1 + itemsize / 4.0)
        return fixed + shard_part * f / f2 + batch + act

    label = "estimate, not compiled"
    if report.fits and est(f) <= budget:
        return None
    # the current mesh at the same batch is no suggestion: either it fits (handled above) or
    # it is over budget
    candidates = [f2 for f2 in _divisors(n // t) if f2 > f]
    for f2 in candidates:
        if est(f2) <= budget:
            d2 = n // (f2 * t)
            return (f"mesh data={d2},fsdp={f2},tensor={t} (~{est(f2) / GiB:.1f} GiB per device, "
                    f"{label}; per-device batch unchanged)")
    f2 = n // t
    fixed_part = est(f2) - act
    per_example = act / max(1.0, report.batch_size / (m["data"] * f))
    if per_example > 0 and fixed_part < budget:
        per_dev_batch = int((budget - fixed_part) // per_example)
        if per_dev_batch >= 1:
            return (f"mesh data=1,fsdp={f2},tensor={t} with a global batch <= "
                    f"{per_dev_batch * f2} ({per_dev_batch} per device; or keep the batch and "
                    f"use gradient accumulation / remat) ({label})")
    need = (est(f2) if fixed_part >= budget else fixed_part) / budget
    chips = int(2 ** math.ceil(math.log2(max(2.0, need) * n)))
    return (f"does not fit even fully sharded (fsdp={f2}): state alone ~{fixed_part / GiB:.1f} "
            f"GiB per device; use about {chips}+ chips (fsdp over all of them) or a chip with "
            f"more HBM ({label})")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def _load_config(config):
    from unclip_jax.config import load_config_file

    if isinstance(config, (str, os.PathLike)):
        return load_config_file(os.fspath(config))
    return config


def plan(config, stage: str, topology: Union[str, Topology, None] = None, *,
         mesh: Union[None, str, Mapping[str, int]] = None, batch_size: Optional[int] = None,
         sample_batch: Optional[int] = None, dtype: Optional[str] = None,
         sr_index: Optional[int] = None, compile_train: bool = True, compile_sample: bool = True,
         train_size: Optional[int] = None, remat: Optional[bool] = None,
         suggest: bool = True) -> PlanReport:
    """Plan ``stage`` of ``config`` on a TPU ``topology``.

    Args:
      config: an unCLIP ``ConfigDict`` or the path of an ``experiments/*.py`` file. The train
        step is the one ``unclip train`` builds from ``config.train.<stage>`` (optimizer, EMA,
        loss; defaults of ``train.loop.TrainConfig`` when the section is missing).
      stage: 'decoder' | 'prior' | 'sr' | 'inpaint'.
      sr_index: which upsampler for 'sr' (default ``train.sr.index``, else 0).
      topology: ``v5p:4x4x4``, ``v4-32``, ... (see ``parse_topology``); default
        ``config.tpu.topology``.
      mesh: ``{'data': .., 'fsdp': .., 'tensor': ..}`` or ``"data=2,fsdp=8"`` (one axis may be
        -1); default ``train.<stage>.mesh`` (when it does not fit the slice: all on fsdp).
      batch_size: global train batch; default ``train.<stage>.batch_size``.
      sample_batch: batch of the sampling step (default: the train batch).
      dtype: compute dtype ('bfloat16' | 'float32'); default ``config.dtype``.
      compile_train / compile_sample: compile the steps for the topology (needs libtpu); with
        both off only the analytic numbers are reported (no libtpu needed).
      train_size: the upsampler's training crop (``train.sr.crop_size``).
      remat: override the UNet's ``remat`` (activation rematerialisation).
      suggest: add an analytic mesh suggestion when the step does not fit.
    """
    from unclip_jax.config import compute_dtype as _cdtype

    config = _load_config(config)
    if sr_index is None:
        sr_index = int(_section(config, "train", "sr", "index", default=0) or 0)
    topology = topology or _section(config, "tpu", "topology")
    if topology is None:
        raise ValueError("give a topology (e.g. v5p:4x4x4), or set tpu.topology in the config")
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    n = topo.num_chips
    dtype_name = dtype or config.get("dtype", "float32")
    spec = stage_spec(config, stage, batch_size=batch_size, sample_batch=sample_batch,
                      sr_index=sr_index, dtype=dtype_name, train_size=train_size, remat=remat)
    batch_size = spec.batch[next(iter(spec.batch))].shape[0]
    cdtype = _cdtype({"dtype": dtype_name})
    mesh_cfg = parse_mesh(mesh) if isinstance(mesh, str) else mesh
    notes = []
    if mesh_cfg:
        sizes = resolve_mesh(mesh_cfg, n)
    else:
        try:
            sizes = resolve_mesh(spec.train.mesh, n)
        except ValueError as e:  # the config's mesh is for another slice size
            sizes = resolve_mesh(None, n)
            notes.append(f"train.mesh does not fit {n} devices ({e}); using fsdp={n}")

    abstract_params = spec.abstract_params()
    p_total, p_dev, p_repl = _tree_bytes(abstract_params, sizes)
    param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(
        _unbox(abstract_params)))
    # State = params + mu + nu (+ EMA), all fp32 with the params' shardings (+ a few scalars).
    state_dev = (4 if spec.train.ema_decay > 0 else 3) * p_dev
    batch_dev = _batch_bytes_per_device(spec.batch, sizes)
    estimate = state_dev + p_dev + batch_dev
    ideal = p_total // (sizes["fsdp"] * sizes["tensor"])

    report = PlanReport(
        stage=stage + (f"[{sr_index}]" if stage == "sr" else ""),
        config_name=str(config.get("name", "config")), topology=topo.name,
        accelerator_type=topo.accelerator_type, chip=topo.chip.name, num_devices=n,
        mesh=sizes, batch_size=batch_size,
        sample_batch=sample_batch if sample_batch is not None else batch_size,
        dtype=dtype_name, hbm_bytes=topo.chip.hbm_bytes,
        peak_tflops=topo.chip.peak_bf16_tflops, param_count=int(param_count),
        param_bytes_total=p_total, param_bytes_per_device=p_dev, param_bytes_ideal=ideal,
        replicated_param_bytes=p_repl, state_bytes_per_device=state_dev,
        batch_bytes_per_device=batch_dev, estimate_bytes=estimate,
        sample_steps=spec.sample_steps, note="; ".join([spec.note] + notes).strip("; "))

    if compile_train or compile_sample:
        from unclip_jax.parallel.mesh import make_mesh

        devices = topology_devices(topo)
        dmesh = make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
        if compile_train:
            report.train = _compile_train(spec, dmesh, cdtype)
            tr = report.train
            if not tr.compiled and not tr.peak_bytes and tr.temp_bytes:
                # refused with only the temporaries named: the peak is at least those plus the
                # train state and batch the step takes as arguments
                tr.peak_bytes = tr.temp_bytes + state_dev + batch_dev
        if compile_sample and spec.sample_fn is not None:
            report.sample = _compile_sample(spec, dmesh, cdtype)
    if suggest and not report.fits:
        report.suggestion = suggest_mesh(report)
    elif suggest and report.train is None and estimate > 0.9 * report.hbm_bytes:
        report.suggestion = suggest_mesh(report)
    return report


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser(prog: str = "unclip plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compile the sharded train / sample step of one stage for a TPU topology "
                    "on this (CPU) host and report per-device HBM, FLOPs and parameter "
                    "sharding. Needs libtpu: " + INSTALL_HINT)
    p.add_argument("--config", required=True, help="experiments/<name>.py")
    p.add_argument("--stage", required=True, choices=PLAN_STAGES)
    p.add_argument("--sr-index", type=int, default=None,
                   help="which upsampler for --stage sr (default: train.sr.index, else 0)")
    p.add_argument("--topology", default=None,
                   help="v5p:4x4x4, v4:2x2x4, v5e:2x2, v6e:4x4 or v5p-128, v4-32, v5litepod-16 "
                        "(default: tpu.topology of the config)")
    p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (one may be -1)")
    p.add_argument("--batch", type=int, default=None, help="global train batch size")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="batch of the sampling step (default: the train batch)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"))
    p.add_argument("--train-size", type=int, default=None,
                   help="upsampler training crop size (overrides train.sr.crop_size)")
    p.add_argument("--remat", default=None, choices=("on", "off"),
                   help="override the UNet's activation rematerialisation")
    p.add_argument("--no-sample", action="store_true", help="skip the sampling loop")
    p.add_argument("--estimate-only", action="store_true",
                   help="no compile: analytic numbers only (works without libtpu)")
    p.add_argument("--verify", action="store_true",
                   help="when the step does not fit, compile the suggested mesh too")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table row")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set decoder.model_channels=256 (repeatable)")
    return p


def _parse_value(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def plan_main(argv: Optional[Sequence[str]] = None) -> int:
    """``unclip plan --config experiments/<cfg>.py --stage decoder|prior|sr --topology v5p:4x4x8
    [--mesh data=..,fsdp=..,tensor=..] [--batch N] ...``: print the report; exit 0 when the
    train step fits, 3 when it does not, 2 on usage errors."""
    args = build_parser().parse_args(argv)
    from unclip_jax.config import ConfigError, load_config_file

    try:
        overrides = {}
        for item in args.set:
            k, sep, v = item.partition("=")
            if not sep:
                raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
            overrides[k.strip()] = _parse_value(v.strip())
        config = load_config_file(args.config, overrides)
        kw = dict(mesh=args.mesh, batch_size=args.batch, sample_batch=args.sample_batch,
                  dtype=args.dtype, sr_index=args.sr_index, train_size=args.train_size,
                  remat=None if args.remat is None else args.remat == "on")
        compile_ = not args.estimate_only
        if compile_ and not libtpu_available():
            print(f"libtpu is not installed, so nothing can be compiled for a TPU: "
                  f"{INSTALL_HINT}\nshowing the analytic estimate only.\n", file=sys.stderr)
            compile_ = False
        report = plan(config, args.stage, args.topology, compile_train=compile_,
                      compile_sample=compile_ and not args.no_sample, **kw)
    except (ConfigError, ValueError) as e:
        print(f"unclip plan: error: {e}", file=sys.stderr)
        return 2
    print(report.to_text())
    if args.verify and not report.fits and report.suggestion and compile_:
        m = re.search(r"mesh (data=\d+,fsdp=\d+,tensor=\d+)", report.suggestion)
        if m:
            gb = re.search(r"global batch <= (\d+)", report.suggestion)
            if gb:
                kw["batch_size"] = int(gb.group(1))
            kw["mesh"] = m.group(1)
            print(f"\nverifying the suggestion: --mesh {m.group(1)}"
                  + (f" --batch {kw['batch_size']}" if gb else ""))
            second = plan(config, args.stage, args.topology, compile_train=True,
                          compile_sample=False, suggest=False, **kw)
            print(second.to_text())
    if args.markdown:
        print()
        print(MARKDOWN_HEADER)
        print(report.markdown_row())
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    return 0 if report.fits else 3


if __name__ == "__main__":  # python -m unclip_jax.parallel.plan ...
    sys.exit(plan_main())
