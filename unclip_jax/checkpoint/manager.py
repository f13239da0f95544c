"""Checkpoints: an orbax ``CheckpointManager`` wrapper for exact resume.

Each checkpoint ``<workdir>/<step>/`` holds two items:

* ``state``: the ``TrainState`` pytree (params, optimizer state, EMA, step, skip counter, RNG),
  saved sharded (each host writes its shards) with orbax's pytree handler;
* ``data``:  the data iterator's state (anything JSON-able), ``JsonSave``;

and, in the step's orbax metadata (``custom_metadata``), ``{"format_version": FORMAT_VERSION,
"config": <the run's config as JSON>, "step": step, "unclip_jax_version": ...}``.

``restore(target)`` takes the *abstract* target state: a pytree of ``jax.ShapeDtypeStruct``
carrying the shardings wanted now (``parallel.with_shardings(jax.eval_shape(...), shardings)``),
or concrete arrays whose shardings are reused. The mesh may differ from the one that saved:
orbax reads each new shard from the stored array. Missing checkpoints, a different format
version or a different config raise errors that name the checkpoint path.

Saves are asynchronous by default: ``save`` returns once arrays are copied off the devices
(so the state can be donated to the next step straight away) and the files are written in the
background; ``wait()`` / ``close()`` block until they are on disk.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

import unclip_jax
from unclip_jax.utils.paths import is_remote

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_ITEM = "state"
DATA_ITEM = "data"

PyTree = Any


class CheckpointError(RuntimeError):
    """Base class of checkpoint errors; the message names the path."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


class CheckpointFormatError(CheckpointError):
    pass


class ConfigMismatchError(CheckpointError, ValueError):
    pass


class Restored(NamedTuple):
    """What ``Checkpointer.restore`` returns."""

    state: PyTree
    data_state: Any
    step: int
    config: Optional[dict]


def config_to_json(config: Any) -> Optional[dict]:
    """A JSON-normalised copy of ``config`` (dict, ``ml_collections.ConfigDict``, dataclass),
    or None. Tuples become lists; non-JSON leaves become their ``str``."""
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(old: Optional[dict], new: Optional[dict]) -> list[str]:
    """Human-readable differences ``key: old -> new`` between two JSON configs."""
    a, b = _flatten(old or {}), _flatten(new or {})
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            diffs.append(f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}")
    return diffs


def _state_handler(min_replica_parallel_bytes: Optional[int]) -> ocp.PyTreeCheckpointHandler:
    """A pytree handler whose ``jax.Array`` handler writes a replicated array in parallel from
    its replicas only when each replica's slice has at least ``min_replica_parallel_bytes``
    (orbax slices every replicated shard otherwise: one small compile per shape, seconds of CPU
    for nothing on tiny arrays). None: orbax's default handler."""
    if min_replica_parallel_bytes is None:
        return ocp.PyTreeCheckpointHandler()
    th = ocp.type_handlers
    try:
        from orbax.checkpoint._src.metadata import array_metadata_store

        array_handler = th.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(),
            min_slice_bytes_for_replica_parallel=int(min_replica_parallel_bytes))
    except (ImportError, AttributeError, TypeError):  # other orbax layouts: defaults
        return ocp.PyTreeCheckpointHandler()
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
        (jax.Array, array_handler), (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _abstract_target(target: PyTree) -> PyTree:
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree.map(one, target)


class Checkpointer:
    """Save / restore train state + data-iterator state under ``workdir``.

    Args:
      workdir: checkpoint directory (local path or any ``etils.epath`` URL such as ``gs://``).
      save_every: ``maybe_save`` saves when ``step % save_every == 0`` (``save(force=True)``
        always saves).
      keep_last: keep the newest N checkpoints (None keeps all).
      async_save: write in a background thread (orbax async checkpointing).
      config: the run's config; stored with every checkpoint and compared on restore.
      comparable: maps a stored / current config to the part that must match on restore
        (default: all of it), e.g. to leave out sampling-only settings.
      min_replica_parallel_bytes: replicated arrays are written from all their replicas in
        parallel only when each slice is at least this big (None: orbax's default, always).
    """

    def __init__(self, workdir: str, save_every: int = 1000, keep_last: Optional[int] = 3,
                 async_save: bool = True, config: Any = None,
                 min_replica_parallel_bytes: Optional[int] = 1 << 20,
                 comparable: Optional[Callable[[dict], dict]] = None):
        self.workdir = str(workdir) if is_remote(workdir) else os.path.abspath(workdir)
        self.save_every = int(save_every)
        self.keep_last = keep_last
        self.config = config_to_json(config)
        self._comparable = comparable or (lambda c: c)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, self.save_every),
            max_to_keep=keep_last,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.workdir, options=options,
            item_handlers={STATE_ITEM: _state_handler(min_replica_parallel_bytes),
                           DATA_ITEM: ocp.JsonCheckpointHandler()})

    # -- saving -----------------------------------------------------------------------------

    def save(self, step: int, state: PyTree, data_state: Any = None, force: bool = True,
             metrics: Optional[dict] = None) -> bool:
        """Save ``state`` and ``data_state`` as checkpoint ``step``. With ``force=False`` it only
        saves on ``save_every`` multiples (orbax's interval policy). A step that is already saved
        is not saved again. Returns whether it saved."""
        step = int(step)
        if step in self._manager.all_steps():
            # e.g. a preemption save right after the periodic save of the same step
            log.info("checkpoint %d already exists in %s; not saving again", step, self.workdir)
            return False
        custom = {
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "step": step,
            "unclip_jax_version": unclip_jax.__version__,
        }
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeSave(state),
            DATA_ITEM: ocp.args.JsonSave({"data_state": data_state}),
        })
        saved = self._manager.save(step, args=args, force=force, metrics=metrics,
                                   custom_metadata=custom)
        if saved:
            log.info("checkpoint %d -> %s", step, self.step_path(step))
        return bool(saved)

    def should_save(self, step: int) -> bool:
        """Whether ``maybe_save`` saves at ``step`` (a multiple of ``save_every``)."""
        return self.save_every > 0 and int(step) % self.save_every == 0

    def maybe_save(self, step: int, state: PyTree, data_state: Any = None) -> bool:
        """Save if ``step`` is a multiple of ``save_every``."""
        if self.should_save(step):
            return self.save(step, state, data_state, force=True)
        return False

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inspection -------------------------------------------------------------------------

    def step_path(self, step: int) -> str:
        return os.path.join(self.workdir, str(int(step)))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def metadata(self, step: Optional[int] = None) -> dict:
        """The custom metadata (format version, config, step) of checkpoint ``step`` (default:
        the latest); raises ``CheckpointNotFoundError`` / ``CheckpointFormatError``."""
        step = self._resolve_step(step)
        try:
            md = self._manager.metadata(step)
            custom = dict(getattr(md, "custom_metadata", None) or {})
        except Exception as e:  # noqa: BLE001 - unreadable metadata: say where
            raise CheckpointFormatError(
                f"cannot read the metadata of checkpoint {self.step_path(step)}: {e}") from e
        version = custom.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointFormatError(
                f"checkpoint {self.step_path(step)} has format version {version!r}; this "
                f"unclip_jax ({unclip_jax.__version__}) reads format version {FORMAT_VERSION}")
        return custom

    def _resolve_step(self, step: Optional[int]) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointNotFoundError(f"no checkpoint found in {self.workdir}")
            return max(steps)
        if int(step) not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.workdir} (found steps {sorted(steps)})")
        return int(step)

    # -- restoring --------------------------------------------------------------------------

    def restore(self, target: PyTree, step: Optional[int] = None,
                check_config: bool = True) -> Restored:
        """Restore checkpoint ``step`` (default: latest) onto ``target``'s shapes and shardings.

        ``target``: the abstract state (``ShapeDtypeStruct`` s with ``sharding``) or concrete
        arrays (their shardings are used). With ``check_config`` and a config given to this
        ``Checkpointer``, a stored config that differs raises ``ConfigMismatchError`` listing the
        differing keys.
        """
        step = self._resolve_step(step)
        custom = self.metadata(step)
        stored_config = custom.get("config")
        if check_config and self.config is not None and (
                stored_config is None
                or self._comparable(stored_config) != self._comparable(self.config)):
            diffs = config_diff(stored_config and self._comparable(stored_config),
                                self._comparable(self.config))
            raise ConfigMismatchError(
                f"config of checkpoint {self.step_path(step)} differs from this run's config "
                f"(stored -> now): {'; '.join(diffs) if diffs else 'stored config missing'}. "
                "Resume with the same config or restore with check_config=False.")
        target = _abstract_target(target)
        args = ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
            DATA_ITEM: ocp.args.JsonRestore(),
        })
        try:
            out = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - add the path to whatever orbax says
            raise CheckpointError(
                f"failed to restore checkpoint {self.step_path(step)}: {type(e).__name__}: {e}"
            ) from e
        data = out[DATA_ITEM] or {}
        return Restored(out[STATE_ITEM], data.get("data_state"), step, stored_config)
