"""One trainer for every stage: ``train(stage, config, workdir, data, steps=...)``.

Read top to bottom::

    tc     = train_config(config, stage)              # config.train.<stage>
    mesh   = stage_mesh(tc.mesh)                      # ('data', 'fsdp', 'tensor')
    state  = restore latest checkpoint in workdir     # params + opt + EMA + step + RNG + data
             or sharded_init(TrainState.create(...))  # (inpaint: from decoder params)
    step   = jit_train_step(make_train_step(loss))    # bf16 compute, non-finite skip, donation
    evals  = jit_eval_step(make_eval_step(loss))      # same shardings, EMA params, no donation
    with PreemptionGuard():                           # SIGTERM -> save, return (exit 0)
        while state.step < steps:
            state, m = step(state, next(data))
            log every log_every (console, workdir/metrics.jsonl, TensorBoard if installed)
            eval every eval_every on eval_batches batches of eval_data -> eval_* metrics
            save every save_every (keep_last)         # kill -9 loses < one interval
            non-finite loss: skipped + logged; max_nonfinite in a row -> NonFiniteLossError

``steps`` is the *total* number of steps to reach (default ``total_steps``), so re-running the
same command after a preemption continues to the same end. Only process 0 writes logs. Steps are
micro-batches: under gradient accumulation (``accum_steps`` k) every k-th step applies an update
(see ``TrainConfig``).

Data: any ``DataSource`` (``__iter__`` -> host batches of numpy arrays / caption strings,
``get_state()`` -> JSON-able dict, ``set_state(dict)``) giving *per-process* batches of
``batch_size // process_count`` examples. ``SyntheticSource`` (tests), ``EmbeddingDataset``
(what ``unclip embed`` writes; prior / decoder / inpaint) and the readers of ``unclip_jax.data``
fit. ``open_data(spec, ...)`` builds one from a command-line string.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import config as cfg_lib
from unclip_jax.checkpoint import Checkpointer, PreemptionGuard
from unclip_jax.data import embeddings as embeddings_lib
from unclip_jax.parallel.mesh import (
    global_batch_from_local,
    is_main_process,
    make_mesh,
    param_shardings,
    sharded_init,
    with_shardings,
)
from unclip_jax.train.ema import EmaConfig
from unclip_jax.train.losses import DIFFUSION_SECTION, STAGES, build_stage
from unclip_jax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from unclip_jax.train.state import TrainState
from unclip_jax.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step
from unclip_jax.utils.paths import PathLike, as_path, is_remote

log = logging.getLogger(__name__)

PyTree = Any
METRICS_FILE = "metrics.jsonl"
METRIC_KEYS = ("step", "loss", "lr", "grad_norm", "images_per_sec")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the run stopped (exit non-zero)."""


# ------------------------------------------------------------------------------ config


COMMON_KEYS = {
    "batch_size", "learning_rate", "warmup_steps", "total_steps", "weight_decay",
    "grad_clip_norm", "accum_steps", "ema_decay", "ema_warmup", "save_every", "keep_last",
    "log_every", "max_nonfinite", "seed", "mesh", "schedule", "b1", "b2", "eps",
    "end_lr_ratio", "init_lr_ratio", "eval_every", "eval_batches", "async_save",
}
STAGE_KEYS = {
    "clip": {"init_from", "init_partial", "resized_crop_scale", "resized_crop_ratio"},
    "prior": {"init_from", "init_partial"},
    "decoder": {"vlb_weight", "snr_gamma", "init_from", "init_partial", "resized_crop_scale",
                "resized_crop_ratio"},
    "sr": {"crop_size", "blur_sigma", "blur_kernel", "index", "init_from", "init_partial",
           "corruption", "bsr", "resized_crop_scale", "resized_crop_ratio"},
    "inpaint": {"vlb_weight", "snr_gamma", "init_from", "mask_min_frac", "mask_max_frac",
                "mask_p_keep_all", "resized_crop_scale", "resized_crop_ratio"},
}
# Keys that may change between a run and its resume (not compared with the checkpoint's config).
VOLATILE_KEYS = ("save_every", "keep_last", "log_every", "max_nonfinite", "mesh", "init_from",
                 "init_partial", "eval_every", "eval_batches", "async_save")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``config.train.<stage>``; see ``experiments/tiny.py`` for the meaning of each key.

    Units. A *step* is one call of the train step on one batch of ``batch_size`` examples (a
    micro-batch under gradient accumulation). ``total_steps`` (the default ``--steps``),
    ``warmup_steps``, ``save_every``, ``log_every``, ``eval_every`` and the checkpoint numbers
    count steps. With ``accum_steps`` k > 1 every k-th step applies one optimizer update on the
    mean gradient of its k micro-batches (effective batch ``k * batch_size``); the LR schedule
    runs over ``total_steps // k`` updates with ``warmup_steps // k`` warmup updates
    (``total_steps`` must be a multiple of k), so the last step applies the schedule's last
    update. The EMA (and its warmup count) moves once per applied update.

    ``eval_every``: evaluate every that many steps (0: never) on the first ``eval_batches``
    batches of the eval data (``train(eval_data=...)``, ``unclip train --eval-data``), with the
    EMA params and a fixed rng; metrics are logged with an ``eval_`` prefix.
    """

    stage: str
    batch_size: int = 8
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 10_000
    weight_decay: float = 0.0
    grad_clip_norm: Optional[float] = 1.0
    accum_steps: int = 1
    ema_decay: float = 0.9999
    # True as before: a config that leaves it out trains (and resumes) as it always did;
    # EmaConfig's library default (a plain decay) is for direct make_train_step callers
    ema_warmup: bool = True
    save_every: int = 500
    keep_last: Optional[int] = 3
    log_every: int = 50
    max_nonfinite: int = 10
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 4
    # checkpoints written in a background thread while training goes on (orbax); a kill -9
    # then loses the steps since the last *finished* save: one interval, plus the save still
    # being written if saving takes longer than an interval. False: training waits for each
    # save, so at most one interval is lost.
    async_save: bool = True
    mesh: dict = dataclasses.field(default_factory=lambda: dict(data=-1, fsdp=1, tensor=1))
    optimizer_extra: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)

    def optimizer(self) -> OptimizerConfig:
        """The optimizer config; its warmup / total counts are optimizer updates (steps // k)."""
        k = max(1, int(self.accum_steps))
        return OptimizerConfig(
            name="adamw", learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps // k, total_steps=self.total_steps // k,
            weight_decay=self.weight_decay, grad_clip_norm=self.grad_clip_norm,
            accum_steps=self.accum_steps, **self.optimizer_extra)

    def ema(self) -> EmaConfig:
        return EmaConfig(decay=self.ema_decay, warmup=self.ema_warmup)


def _plain(x):
    return cfg_lib._plain(x)


def train_config(config, stage: str) -> TrainConfig:
    """``config.train.<stage>`` as a ``TrainConfig``; unknown keys raise ``ConfigError``."""
    if stage not in STAGES:
        raise cfg_lib.ConfigError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    train = config.get("train", None)
    if train is None or stage not in train:
        raise cfg_lib.ConfigError(
            f"config has no train.{stage} section; add one (see experiments/tiny.py)")
    d = dict(_plain(train[stage]))
    unknown = sorted(set(d) - COMMON_KEYS - STAGE_KEYS[stage])
    if unknown:
        raise cfg_lib.ConfigError(
            f"unknown key(s) {unknown} in config section 'train.{stage}'; valid keys: "
            f"{sorted(COMMON_KEYS | STAGE_KEYS[stage])}")
    opt_extra = {k: d.pop(k) for k in ("schedule", "b1", "b2", "eps", "end_lr_ratio",
                                       "init_lr_ratio") if k in d}
    extra = {k: d.pop(k) for k in list(d) if k in STAGE_KEYS[stage]}
    mesh = dict(data=-1, fsdp=1, tensor=1)
    mesh.update(d.pop("mesh", {}) or {})
    bad_mesh = sorted(set(mesh) - {"data", "fsdp", "tensor"})
    if bad_mesh:
        raise cfg_lib.ConfigError(f"unknown key(s) {bad_mesh} in train.{stage}.mesh")
    tc = TrainConfig(stage=stage, mesh=mesh, optimizer_extra=opt_extra, extra=extra, **d)
    for k in ("batch_size", "total_steps", "save_every", "log_every", "max_nonfinite",
              "accum_steps", "eval_batches"):
        if int(getattr(tc, k)) < 1:
            raise cfg_lib.ConfigError(f"train.{stage}.{k} must be >= 1, got {getattr(tc, k)}")
    if int(tc.eval_every) < 0:
        raise cfg_lib.ConfigError(f"train.{stage}.eval_every must be >= 0 (0: no eval), got "
                                  f"{tc.eval_every}")
    if tc.total_steps % tc.accum_steps:
        raise cfg_lib.ConfigError(
            f"train.{stage}.total_steps ({tc.total_steps}) must be a multiple of accum_steps "
            f"({tc.accum_steps}): steps count micro-batches and the LR schedule runs over "
            "total_steps // accum_steps updates")
    try:
        make_schedule(tc.optimizer())
    except ValueError as e:
        raise cfg_lib.ConfigError(f"train.{stage}: {e} (in optimizer updates: steps // "
                                  f"accum_steps = steps // {tc.accum_steps})") from None
    return tc


# diffusion settings that only choose sampling defaults: a trained stage does not depend on them
SAMPLING_KEYS = ("sample_steps", "sampler", "guidance", "num_candidates")


def training_identity(cfg_json: dict) -> dict:
    """A ``stage_config_json`` without the sampling-only diffusion keys: what must match to
    resume a run or export its weights under another config."""
    out = dict(cfg_json)
    if isinstance(out.get("diffusion"), dict):
        out["diffusion"] = {k: v for k, v in out["diffusion"].items() if k not in SAMPLING_KEYS}
    return out


def stage_config_json(config, stage: str) -> dict:
    """The part of ``config`` that defines a stage's run (model sections, its diffusion section,
    ``dtype`` and ``train.<stage>`` minus ``VOLATILE_KEYS``): stored with each checkpoint and
    compared on resume."""
    st_sections = {"clip": ("clip",), "prior": ("prior",), "decoder": ("decoder",),
                   "inpaint": ("decoder",), "sr": ("decoder", "sr")}[stage]
    out = {k: _plain(config[k]) for k in st_sections}
    out["dtype"] = config.get("dtype", "float32")
    if stage in DIFFUSION_SECTION:
        out["diffusion"] = _plain(config.diffusion[DIFFUSION_SECTION[stage]])
    train = dict(_plain(config.train[stage]))
    out["train"] = {k: v for k, v in train.items() if k not in VOLATILE_KEYS}
    out["stage"] = stage
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def stage_mesh(mesh_cfg: dict, devices: Optional[Sequence] = None, stage: str = "STAGE"):
    """``make_mesh`` from ``train.<stage>.mesh``. Positive sizes whose product is below the
    device count use the first ``data * fsdp * tensor`` devices (e.g. one device for tests) and
    log a warning naming the idle devices and the setting that uses them all."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg.get(k, 1)) for k in ("data", "fsdp", "tensor")]
    if -1 not in sizes and 0 < math.prod(sizes) < len(devices):
        log.warning(
            "train.%s.mesh data*fsdp*tensor = %s = %d uses only %d of the %d devices (the "
            "other %d stay idle); set --config.train.%s.mesh.data=-1 to use them all",
            stage, "*".join(map(str, sizes)), math.prod(sizes), math.prod(sizes), len(devices),
            len(devices) - math.prod(sizes), stage)
        devices = devices[:math.prod(sizes)]
    try:
        return make_mesh(*sizes, devices=devices)
    except ValueError as e:
        raise cfg_lib.ConfigError(f"train mesh: {e}") from None


# ------------------------------------------------------------------------------ data sources


@runtime_checkable
class DataSource(Protocol):
    """Per-process batches with a checkpointable position."""

    def __iter__(self) -> Iterator[dict]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


CAPTION_WORDS = ("red", "blue", "green", "yellow", "heart", "star", "face", "cat", "dog",
                 "smiling", "sad", "big", "small", "moon", "sun", "tree")


class SyntheticSource:
    """Deterministic synthetic batches: batch ``i`` depends only on ``(seed, i)``.

    Keys: ``image [B, S, S, 3]`` in [-1, 1] (smooth colour blobs), ``caption`` strings; with
    ``embeddings=(clip_dim, text_len, text_width)`` also ``image_emb``, ``text_emb``,
    ``text_states``, ``text_mask`` (random, correlated with the image colour). ``nan_batches``:
    batch indices whose arrays are NaN (tests of non-finite handling).
    """

    def __init__(self, batch_size: int, image_size: int = 16, seed: int = 0,
                 embeddings: Optional[tuple[int, int, int]] = None,
                 nan_batches: Sequence[int] = ()):
        self.batch_size, self.image_size, self.seed = int(batch_size), int(image_size), int(seed)
        self.embeddings = embeddings
        self.nan_batches = set(int(i) for i in nan_batches)
        self.index = 0

    def batch(self, i: int) -> dict:
        rs = np.random.default_rng([self.seed, int(i)])
        b, s = self.batch_size, self.image_size
        yy, xx = np.meshgrid(np.linspace(-1, 1, s), np.linspace(-1, 1, s), indexing="ij")
        colour = rs.uniform(-1, 1, (b, 1, 1, 3))
        cy, cx = rs.uniform(-0.5, 0.5, (2, b, 1, 1))
        blob = np.exp(-((yy[None] - cy) ** 2 + (xx[None] - cx) ** 2) * 4.0)[..., None]
        image = np.clip(colour * blob + 0.1 * rs.standard_normal((b, s, s, 3)), -1, 1)
        words = rs.integers(0, len(CAPTION_WORDS), (b, 3))
        out = {"image": image.astype(np.float32),
               "caption": np.array([" ".join(CAPTION_WORDS[w] for w in row) for row in words])}
        if self.embeddings is not None:
            d, length, width = self.embeddings
            base = np.tile(colour.reshape(b, 3), (1, -(-d // 3)))[:, :d]
            out["image_emb"] = (base + 0.3 * rs.standard_normal((b, d))).astype(np.float32)
            out["text_emb"] = (base + 0.3 * rs.standard_normal((b, d))).astype(np.float32)
            out["text_states"] = rs.standard_normal((b, length, width)).astype(np.float32)
            n = rs.integers(3, length + 1, (b,))
            out["text_mask"] = (np.arange(length)[None] < n[:, None]).astype(np.int32)
        if int(i) in self.nan_batches:
            for k, v in out.items():
                if v.dtype.kind == "f":
                    out[k] = np.full_like(v, np.nan)
        return out

    def __iter__(self):
        while True:
            b = self.batch(self.index)
            self.index += 1
            yield b

    def get_state(self) -> dict:
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


EMBED_META = embeddings_lib.EMBED_META


class EmbeddingDataset:
    """Reader of an ``unclip embed`` output dir (``embeddings.json`` + ``shard-*.npz`` of every
    process that wrote it; local or ``gs://``, see ``unclip_jax.data.embeddings``).

    Every array of the shards is loaded into memory (fine at emoji / tiny scale). Each epoch is a
    permutation drawn from ``(seed, epoch)``; this process takes every ``process_count``-th
    example of it, ``num_examples // process_count`` of them (the same count on every process,
    so processes stay in lockstep and the state saved by process 0 resumes every process).
    Batches drop the remainder of an epoch. State: ``{epoch, index}``.
    ``clip_stats()`` -> ``(mean [D], std [D])`` of the image embeddings (prior normalisation).
    """

    def __init__(self, path: str, batch_size: int, seed: int = 0, shuffle: bool = True,
                 keys: Optional[Sequence[str]] = None):
        self.path = path
        self.meta = embeddings_lib.read_meta(path)
        self.arrays = embeddings_lib.read_arrays(path, keys)
        self.num_examples = len(next(iter(self.arrays.values())))
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), shuffle
        self.epoch, self.index = 0, 0
        n_local = self.num_examples // jax.process_count()
        if n_local < self.batch_size:
            raise ValueError(f"{path}: {n_local} examples per process, fewer than the batch "
                             f"size {self.batch_size}")

    def _order(self, epoch: int) -> np.ndarray:
        n = self.num_examples
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        return order[jax.process_index()::jax.process_count()][:n // jax.process_count()]

    def __iter__(self):
        order = self._order(self.epoch)
        while True:
            if self.index + self.batch_size > len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            idx = order[self.index:self.index + self.batch_size]
            self.index += self.batch_size
            batch = {k: v[idx] for k, v in self.arrays.items()}
            if "image" in batch and batch["image"].dtype == np.uint8:
                batch["image"] = batch["image"].astype(np.float32) / 127.5 - 1.0
            yield batch

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def clip_stats(self) -> tuple[np.ndarray, np.ndarray]:
        emb = self.arrays["image_emb"].astype(np.float64)
        return emb.mean(0).astype(np.float32), (emb.std(0) + 1e-6).astype(np.float32)


write_embeddings = embeddings_lib.write_embeddings  # process-unique shard names, gs:// too


def open_data(spec: str, stage: str, config, batch_size: int, seed: int = 0,
              one_pass: bool = False, passes: int = 1) -> DataSource:
    """A data source from a command-line string.

    * ``synthetic`` / ``synthetic:SIZE``: ``SyntheticSource`` (with embeddings for prior /
      decoder / inpaint, shaped by ``config``);
    * a dir with ``embeddings.json`` (``unclip embed`` output): ``EmbeddingDataset``;
    * ``tfds:NAME[:SPLIT][@DATA_DIR]`` (e.g. ``tfds:emoji_dataset:train@data``): the
      checkpointable grain reader of ``unclip_jax.data.pipeline`` over that prepared tfds
      dataset (images in [-1, 1], one caption drawn per example).

    ``one_pass``: a finite, unshuffled pass over the data keeping the last partial batch (for
    ``unclip embed``); ``passes`` > 1 repeats it (tfds data: another caption is drawn for
    each example in each pass).
    """
    if spec.startswith("synthetic"):
        size = int(spec.split(":", 1)[1]) if ":" in spec else _default_image_size(config, stage)
        emb = None
        if stage in ("prior", "decoder", "inpaint"):
            c = cfg_lib.clip_config(config)
            emb = (c.projection_dim, c.text_config.max_position_embeddings,
                   c.text_config.hidden_size)
        return SyntheticSource(batch_size, size, seed, embeddings=emb)
    if embeddings_lib.is_embeddings_dir(spec):
        return EmbeddingDataset(spec, batch_size, seed, shuffle=not one_pass)
    if spec.startswith("tfds:"):
        body, _, data_dir = spec[len("tfds:"):].partition("@")
        name, _, split = body.partition(":")
        try:
            from unclip_jax.data import pipeline as pipeline_lib
        except ImportError as e:
            raise cfg_lib.ConfigError(f"--data {spec}: the data pipeline is unavailable: {e}")
        for mod in ("emoji", "image_caption"):  # register our builders with tfds
            try:
                __import__(f"unclip_jax.data.{mod}")
            except ImportError:
                pass
        kw = dict(seed=seed)
        epochs = max(1, int(passes)) if one_pass else 1
        if one_pass:
            kw.update(num_epochs=epochs, shuffle=False, drop_remainder=False)
        try:
            reader = pipeline_lib.make_reader(name, split or "train", batch_size,
                                              data_dir=data_dir or None, **kw)
        except Exception as e:  # noqa: BLE001 - tfds raises many types for a missing dataset
            raise cfg_lib.ConfigError(f"--data {spec}: cannot open tfds dataset {name!r} "
                                      f"(split {split or 'train'!r}, data_dir "
                                      f"{data_dir or 'default'!r}): {e}") from None
        reader.num_examples = reader.per_shard * epochs
        return reader
    if os.path.isdir(spec):
        raise cfg_lib.ConfigError(f"--data {spec}: the folder has no {EMBED_META}; make an "
                                  "embeddings dir with `unclip embed`")
    if os.sep in spec or spec.startswith("."):
        raise cfg_lib.ConfigError(f"--data {spec}: no such folder (an embeddings dir from "
                                  "`unclip embed` was expected)")
    raise cfg_lib.ConfigError(
        f"--data {spec!r}: use 'synthetic[:SIZE]', an embeddings dir (from `unclip embed`), or "
        "'tfds:NAME[:SPLIT][@DATA_DIR]'")


def _default_image_size(config, stage: str) -> int:
    if stage == "clip":
        return cfg_lib.clip_config(config).vision_config.image_size
    if stage == "sr":
        return cfg_lib.sr_configs(config)[0].image_size
    return cfg_lib.decoder_config(config).image_size


# ------------------------------------------------------------------------------ metrics


class MetricsWriter:
    """Console + ``workdir/metrics.jsonl`` (+ TensorBoard when ``tensorboardX`` or
    ``tensorboard``'s writer is importable). Inert on processes other than 0.

    ``workdir``: a local path or a remote ``etils.epath`` URL (``gs://bucket/run``). Local files
    are appended to; a remote object cannot be appended to, so there the writer keeps the
    file's text (what was there + the new records) and rewrites it at most every
    ``remote_flush_seconds`` (and on ``flush`` / ``close``), not on every record: uploads stay
    a few per minute however often the loop logs.
    TensorBoard on a remote workdir: only for the URL schemes ``tensorboardX`` writes itself
    (``gs``, ``s3``; else skipped with a log line).
    """

    def __init__(self, workdir: PathLike, enabled: bool = True, console: bool = True,
                 tensorboard: bool = True, remote_flush_seconds: float = 60.0):
        self.enabled = enabled and is_main_process()
        self.remote_flush_seconds = float(remote_flush_seconds)
        self._last_flush = time.monotonic()
        self._dirty = False
        self.console = console
        self.dir = as_path(workdir)
        self.remote = is_remote(self.dir)
        self.path = self.dir / METRICS_FILE
        self._tb = None
        self._f = None
        self._text = ""
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.remote:
                self._text = self.path.read_text() if self.path.exists() else ""
            else:
                self._f = self.path.open("a")
            if tensorboard:
                self._tb = _tensorboard_writer(str(self.dir / "tensorboard"), self.remote)

    def _append(self, line: str) -> None:
        if self._f is not None:
            self._f.write(line)
            self._f.flush()
        else:
            self._text += line
            self._dirty = True
            if time.monotonic() - self._last_flush >= self.remote_flush_seconds:
                self.flush()

    def flush(self) -> None:
        """Upload the remote file now if records are waiting (a no-op for a local file, which
        is flushed on every record)."""
        if self.enabled and self._dirty:
            self.path.write_text(self._text)
            self._dirty = False
        self._last_flush = time.monotonic()

    def write(self, record: dict, pbar=None) -> None:
        if not self.enabled:
            return
        rec = {k: _json_number(v) for k, v in record.items()}
        self._append(json.dumps(rec, sort_keys=True) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(record["step"]))
            self._tb.flush()
        if self.console:
            msg = " ".join(f"{k}={_fmt(v)}" for k, v in rec.items())
            if pbar is not None and not pbar.disable:
                pbar.write(msg, file=sys.stderr)  # where the bar is (tqdm.write: stdout)
            else:
                print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self._f is not None:
                self._f.close()
            if self._tb is not None:
                self._tb.close()


def _tensorboard_writer(logdir: str, remote: bool = False):
    if remote:
        scheme = logdir.split("://", 1)[0]
        try:
            from tensorboardX import SummaryWriter, record_writer
        except ImportError:
            record_writer = None
        # tensorboardX writes these schemes itself when their client library is installed
        flag = {"gs": "GCS_ENABLED", "s3": "S3_ENABLED"}.get(scheme)
        if record_writer is None or flag is None or not getattr(record_writer, flag, False):
            log.info("no TensorBoard events for %s: tensorboardX (with google-cloud-storage for "
                     "gs://, boto3 for s3://) is needed for that URL (metrics.jsonl is written)",
                     logdir)
            return None
        try:
            return SummaryWriter(logdir)
        except Exception as e:  # noqa: BLE001 - e.g. the cloud client library is missing
            log.info("no TensorBoard events for %s: %s", logdir, e)
            return None
    for mod in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            m = __import__(mod, fromlist=["SummaryWriter"])
            return m.SummaryWriter(logdir)
        except Exception:  # noqa: BLE001 - optional dependency
            continue
    return None


def _json_number(v):
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class TrainResult:
    """``state`` (the final TrainState, on the mesh), ``frozen`` (non-trainable variables),
    ``step``, ``preempted`` (stopped by SIGTERM after saving), ``last_metrics``,
    ``eval_history`` (``[(step, {eval_loss, eval_<aux>...})]`` of this run's evals)."""

    state: TrainState
    frozen: PyTree
    step: int
    preempted: bool
    last_metrics: dict
    workdir: str
    eval_history: list = dataclasses.field(default_factory=list)


def _checkpoint_tree(state, frozen):
    return {"train": state, "frozen": frozen} if jax.tree.leaves(frozen) else {"train": state}


def _load_init_params(config, path: str, stage: str = "decoder", sr_index: int = 0):
    """Params of ``stage`` for ``train.<stage>.init_from``: a model dir or a train workdir of
    that stage (its EMA params). The inpainting decoder starts from decoder params."""
    from unclip_jax.train import export as export_lib

    params = export_lib.load_stage_params(config, stage, path, sr_index=sr_index)
    return params["params"] if stage == "prior" else params


def grow_params(loaded: PyTree, fresh: PyTree, what: str) -> tuple[PyTree, list[str]]:
    """``fresh`` (a freshly initialised params tree of a config that *adds* modules to the one
    ``loaded`` was trained with) with every leaf of ``loaded`` copied in; the added leaves keep
    their fresh init. Returns (params, the added leaves' paths). Added residual branches whose
    output layer is zero-initialised (attention ``proj_out``, a ResBlock's ``out_conv``) leave
    the model's function unchanged at step 0. Raises ``ValueError`` when a loaded leaf has no
    place in ``fresh`` or another shape: trained weights are never dropped silently."""
    flat_loaded = {jax.tree_util.keystr(k): v
                   for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    used, added = set(), []

    def one(path, x):
        key = jax.tree_util.keystr(path)
        if key not in flat_loaded:
            added.append(key)
            return x
        src = flat_loaded[key]
        if tuple(np.shape(src)) != tuple(x.shape):
            raise ValueError(f"{what}: param {key} has shape {tuple(np.shape(src))} there and "
                             f"{tuple(x.shape)} in this config; init_partial only adds modules")
        used.add(key)
        return jnp.asarray(src, x.dtype)

    out = jax.tree_util.tree_map_with_path(one, fresh)
    dropped = sorted(set(flat_loaded) - used)
    if dropped:
        raise ValueError(f"{what}: {len(dropped)} of its params have no place in this config "
                         f"(e.g. {dropped[0]}); init_partial only adds modules")
    return out, added


def train(stage: str, config, workdir: str, data: DataSource, *, steps: Optional[int] = None,
          progress: bool = True, console: bool = True,
          callbacks: Sequence[Callable[[int, dict], None]] = (),
          devices: Optional[Sequence] = None,
          eval_data: Optional[DataSource] = None) -> TrainResult:
    """Train ``stage`` (``clip``, ``prior``, ``decoder``, ``sr``, ``inpaint``) until
    ``state.step == steps`` (default ``train.<stage>.total_steps``), resuming from the latest
    checkpoint in ``workdir`` if there is one.

    ``data`` yields per-process host batches (see the module docstring). ``callbacks`` get
    ``(step, metrics)`` after every step (host floats), before the next step is dispatched.
    ``eval_data``: per-process batches like ``data``, needed when ``train.<stage>.eval_every``
    > 0; its first ``eval_batches`` batches are read once and evaluated (EMA params, fixed rng)
    every ``eval_every`` steps: ``eval_``-prefixed metrics, ``TrainResult.eval_history``.
    Without callbacks the host reads each step's metrics one step late, so that preparing the
    next batch overlaps the device's work (no sync per step). Raises ``NonFiniteLossError`` after
    ``max_nonfinite`` non-finite losses in a row, ``ConfigError`` for bad config,
    ``checkpoint.ConfigMismatchError`` when the workdir's checkpoints were made with another
    model / schedule config.
    """
    tc = train_config(config, stage)
    if tc.eval_every > 0 and eval_data is None:
        raise cfg_lib.ConfigError(
            f"train.{stage}.eval_every={tc.eval_every} needs eval data: pass --eval-data SPEC "
            "(same syntax as --data; train(..., eval_data=...) from Python), or set "
            f"--config.train.{stage}.eval_every=0")
    end = int(tc.total_steps if steps is None else steps)
    st = build_stage(stage, config, sr_index=int(tc.extra.get("index", 0)))
    mesh = stage_mesh(tc.mesh, devices, stage)
    optimizer = make_optimizer(tc.optimizer())
    use_ema = tc.ema_decay > 0

    def init_fn(rng):
        return TrainState.create(st.init(rng), optimizer, rng, use_ema=use_ema)

    rng = jax.random.PRNGKey(tc.seed)
    abstract = jax.eval_shape(init_fn, rng)
    shardings = param_shardings(abstract, mesh)
    ckpt = Checkpointer(workdir, save_every=tc.save_every, keep_last=tc.keep_last,
                        async_save=bool(tc.async_save), config=stage_config_json(config, stage),
                        comparable=training_identity)
    frozen = _initial_frozen(st, data)
    frozen_sh = jax.tree.map(lambda _: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()), frozen)
    if ckpt.latest_step() is not None:
        target = _checkpoint_tree(with_shardings(abstract, shardings),
                                  with_shardings(frozen, frozen_sh))
        restored = ckpt.restore(target)
        state = restored.state["train"]
        frozen = restored.state.get("frozen", frozen)
        if restored.data_state is not None:
            data.set_state(restored.data_state)
        log.info("resumed %s from %s at step %d", stage, workdir, restored.step)
    else:
        state = sharded_init(init_fn, mesh, rng)
        frozen = jax.device_put(frozen, frozen_sh)
        init_from = tc.extra.get("init_from", "")
        if stage == "inpaint" and init_from:
            from unclip_jax.train.losses import inpaint_params_from_decoder

            params = inpaint_params_from_decoder(_load_init_params(config, init_from),
                                                 state.params)
        elif init_from:
            # continue from trained weights (a shipped model dir, another run): params and EMA
            # start there; optimizer state, step and schedule start afresh
            params = _load_init_params(config, init_from, stage,
                                       sr_index=int(tc.extra.get("index", 0) or 0))
            fresh = nn.meta.unbox(state.params)
            want = jax.tree.map(lambda x: x.shape, fresh)
            got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
            if want == got:
                params = jax.tree.map(lambda p, x: jnp.asarray(p, x.dtype), params, fresh)
            elif tc.extra.get("init_partial", False):
                params, added = grow_params(params, fresh, f"train.{stage}.init_from {init_from}")
                log.info("init_partial: %d new %s params keep their fresh init: %s", len(added),
                         stage, ", ".join(added))
            else:
                raise ValueError(f"train.{stage}.init_from {init_from}: its {stage} weights do "
                                 "not fit this config (if the config only adds modules, e.g. "
                                 "attention at another resolution, set "
                                 f"--config.train.{stage}.init_partial=true)")
        if init_from:
            params = jax.device_put(params, shardings.params)
            state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params)
                                  if use_ema else None)
            log.info("initialised %s from %s", stage, init_from)
    start = int(state.step)

    loss_fn = st.make_loss(frozen)
    compute_dtype = cfg_lib.compute_dtype(config)
    pure_step = make_train_step(loss_fn, optimizer, tc.ema() if use_ema else None,
                                compute_dtype=compute_dtype)
    step_fn = None  # jitted at the first batch, with that batch's shardings
    evaluator = (_Evaluator(make_eval_step(loss_fn, compute_dtype), eval_data, st, mesh,
                            shardings, tc.eval_batches) if tc.eval_every > 0 else None)
    eval_history: list = []

    writer = MetricsWriter(workdir, console=console)
    pbar = _progress_bar(start, end, stage, progress and is_main_process())
    nonfinite_in_a_row = 0
    acc: dict[str, list] = {}
    t_last, n_last = time.perf_counter(), 0
    last: dict = {}
    preempted = False
    step = start
    pending = None  # (step, device metrics) of the last dispatched step, read one step late

    def process(done: int, metrics) -> None:
        """Host side of step ``done``: callbacks, non-finite accounting, logging."""
        nonlocal nonfinite_in_a_row, acc, t_last, n_last, last
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        n_last += 1
        last = m
        for cb in callbacks:
            cb(done, m)
        if m["skipped"]:
            nonfinite_in_a_row += 1
            writer.write({"step": done, "event": "nonfinite_skipped", "loss": m["loss"],
                          "grad_norm": m["grad_norm"], "in_a_row": nonfinite_in_a_row}, pbar)
            if nonfinite_in_a_row >= tc.max_nonfinite:
                latest = ckpt.latest_step()
                raise NonFiniteLossError(
                    f"{stage}: {nonfinite_in_a_row} non-finite losses in a row (last at "
                    f"step {done}, loss={m['loss']}); stopping. "
                    + (f"The last checkpoint in {workdir} is step {latest}. " if latest is not None
                       else f"There is no checkpoint yet in {workdir}. ")
                    + f"Lower train.{stage}.learning_rate or check the data, then resume.")
        else:
            nonfinite_in_a_row = 0
            for k, v in m.items():
                acc.setdefault(k, []).append(v)
        pbar.update(1)
        if done % tc.log_every == 0 or done == end:
            now = time.perf_counter()
            rec = {"step": done}
            rec.update({k: float(np.mean(v)) for k, v in acc.items() if k != "skipped"})
            rec["lr"] = m["lr"]
            rec["skipped"] = int(n_last - len(acc.get("loss", [])))
            rec["images_per_sec"] = tc.batch_size * n_last / max(now - t_last, 1e-9)
            for k in ("loss", "grad_norm"):
                rec.setdefault(k, float("nan"))
            writer.write(rec, pbar)
            pbar.set_postfix(loss=f"{rec['loss']:.4g}")
            acc, t_last, n_last = {}, now, 0

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            done, metrics = pending
            pending = None
            process(done, metrics)

    try:
        with PreemptionGuard() as guard:
            it = iter(data)
            while step < end:
                host = st.prepare(next(it))
                batch = global_batch_from_local(host, mesh)
                if step_fn is None:
                    step_fn = jit_train_step(pure_step, mesh, shardings,
                                             batch_sharding=jax.tree.map(lambda x: x.sharding,
                                                                         batch))
                state, metrics = step_fn(state, batch)
                step += 1
                # the step just dispatched runs on the device while the host reads the previous
                # step's metrics and prepares the next batch (no sync per step)
                flush()
                pending = (step, metrics)
                if callbacks:  # callbacks see each step before the next one is dispatched
                    flush()
                if evaluator is not None and step % tc.eval_every == 0:
                    flush()  # the train record of this step is written before its eval record
                    rec = evaluator(state)
                    eval_history.append((step, rec))
                    writer.write({"step": step, **rec}, pbar)
                stop = guard.should_stop(step)
                if stop or ckpt.should_save(step):
                    flush()  # a non-finite abort must not leave a checkpoint past it
                    writer.flush()  # a remote metrics file is as fresh as the checkpoint
                ckpt.maybe_save(step, _checkpoint_tree(state, frozen), data.get_state())
                if stop:
                    ckpt.save(step, _checkpoint_tree(state, frozen), data.get_state())
                    writer.write({"step": step, "event": "preempted_saved"}, pbar)
                    preempted = True
                    break
            flush()
            if not preempted:
                ckpt.save(step, _checkpoint_tree(state, frozen), data.get_state())
    finally:
        pbar.close()
        writer.close()
        ckpt.close()
    return TrainResult(state, frozen, step, preempted, last, workdir, eval_history)


class _Evaluator:
    """``evaluator(state) -> {eval_loss, eval_<aux>...}``: the mean metrics of the jitted eval
    step over the first ``num_batches`` batches of ``data`` (read, prepared and put on the mesh
    once at the first eval, then reused at every eval so evals are comparable)."""

    def __init__(self, eval_fn, data: DataSource, st, mesh, state_shardings, num_batches: int):
        self.eval_fn, self.data, self.st, self.mesh = eval_fn, data, st, mesh
        self.state_shardings, self.num_batches = state_shardings, int(num_batches)
        self.batches: Optional[list] = None
        self.jitted = None

    def _setup(self) -> None:
        it = iter(self.data)
        self.batches = [global_batch_from_local(self.st.prepare(next(it)), self.mesh)
                        for _ in range(self.num_batches)]
        self.jitted = jit_eval_step(self.eval_fn, self.mesh, self.state_shardings,
                                    batch_sharding=jax.tree.map(lambda x: x.sharding,
                                                                self.batches[0]))

    def __call__(self, state: TrainState) -> dict:
        if self.batches is None:
            self._setup()
        sums: dict[str, float] = {}
        for i, batch in enumerate(self.batches):
            m = jax.device_get(self.jitted(state, batch, i))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {f"eval_{k}": v / len(self.batches) for k, v in sums.items()}


def _initial_frozen(st, data) -> PyTree:
    """The stage's non-trainable variables; the prior's normalisation stats come from the data
    (``data.clip_stats()``) when it has them."""
    frozen = st.frozen
    if st.name == "prior" and hasattr(data, "clip_stats"):
        from unclip_jax.models import prior as prior_lib

        mean, std = data.clip_stats()
        v = prior_lib.set_clip_stats({"buffers": frozen["buffers"]}, mean, std)
        frozen = {"buffers": v["buffers"]}
    return frozen


def _progress_bar(start: int, end: int, stage: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, desc=f"train {stage}", unit="step", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


__all__ = ["train", "TrainResult", "TrainConfig", "train_config", "stage_config_json",
           "stage_mesh", "DataSource", "SyntheticSource", "EmbeddingDataset",
           "write_embeddings", "open_data", "MetricsWriter", "NonFiniteLossError",
           "METRICS_FILE", "METRIC_KEYS"]
