"""Device mesh, logical -> mesh shardings, sharded init and multi-host helpers.

One mesh with axes ``('data', 'fsdp', 'tensor')``:

* ``data``   pure data parallelism (params replicated over it),
* ``fsdp``   data parallelism whose params / optimizer state are sharded (ZeRO-3 style) along
             the logical ``embed`` / ``conv_in`` dims,
* ``tensor`` tensor (model) parallelism along ``mlp`` / ``heads`` / ``vocab`` / ``conv_out``.

The batch is sharded over ``('data', 'fsdp')``. Parameters carry logical axis names
(``nn.Partitioned`` boxes, see ``unclip_jax/models/layers.py``); ``LOGICAL_RULES`` in
``rules.py`` maps them to mesh axes. A dimension that its mesh axes do not divide is replicated
instead (so odd sizes such as 3 RGB channels never fail to shard), and one mesh axis is never used
twice in a single spec.

State is created sharded without ever materialising it on one device::

    abstract = jax.eval_shape(init_fn, *args)           # boxed ShapeDtypeStructs
    shardings = param_shardings(abstract, mesh)          # NamedSharding per (unboxed) leaf
    state = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)

which is what ``sharded_init`` does. Where a mesh context is needed (models calling
``constrain(x, logical_names)`` for activations), use ``mesh_context(mesh)`` (``jax.set_mesh``);
``with mesh:`` is deprecated.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from unclip_jax.parallel.rules import LOGICAL_RULES, check_logical_names

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")

PyTree = Any
LogicalSpec = Union[PartitionSpec, Sequence[Union[str, Sequence[str], None]]]


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------

def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fill in the one ``-1`` axis so that ``data * fsdp * tensor == num_devices``.

    Raises ``ValueError`` (naming the sizes and the device count) when more than one size is
    ``-1``, a size is 0 or below -1, or the sizes do not multiply to the device count.
    """
    sizes = [int(data), int(fsdp), int(tensor)]
    desc = f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) for {num_devices} devices"
    if sizes.count(-1) > 1:
        raise ValueError(f"{desc}: at most one mesh axis may be -1 (= the remaining devices)")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{desc}: mesh axis sizes must be positive or -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(
                f"{desc}: the fixed axes ({known} devices) do not divide the device count")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"{desc}: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ``Mesh`` of shape ``(data, fsdp, tensor)`` over ``devices`` (default: all devices).

    ``-1`` for one axis means "the rest of the devices". Axis types are ``Auto`` (GSPMD
    propagation; ``jax.make_mesh`` would default to ``Explicit``). Device order comes from
    ``mesh_utils.create_device_mesh`` so that ``tensor`` (innermost) maps to the fastest links
    on TPU / GPU. Raises ``ValueError`` when the sizes do not fit the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    try:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(shape, devices)
    except Exception as e:  # noqa: BLE001 - odd topologies (device subsets): plain order
        log.debug("create_device_mesh failed (%s); using the given device order", e)
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# --------------------------------------------------------------------------------------------
# Logical -> mesh specs
# --------------------------------------------------------------------------------------------

_RULES = dict(LOGICAL_RULES)


def _mesh_axes_for(logical: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """Mesh axes that one logical entry (a name, a tuple of names, or None) maps to, in order."""
    if logical is None:
        return ()
    names = (logical,) if isinstance(logical, str) else tuple(logical)
    check_logical_names(names)
    out: list[str] = []
    for n in names:
        rule = _RULES[n]
        if rule is None:
            continue
        out.extend((rule,) if isinstance(rule, str) else rule)
    return tuple(out)


def logical_to_mesh_spec(logical: LogicalSpec, mesh: Mesh,
                         shape: Optional[Sequence[int]] = None) -> PartitionSpec:
    """Map a logical spec (``PartitionSpec('embed', 'mlp')`` or ``('embed', 'mlp')``) to a mesh
    ``PartitionSpec`` using ``LOGICAL_RULES``.

    Per dimension, the rule's mesh axes are kept in order while (a) the axis is not already used
    by an earlier dimension and (b) with ``shape`` given, the product of the kept axis sizes still
    divides the dimension; the others are dropped (replication along them). A dim whose rule
    gives no usable axis is replicated (``None``). Unknown logical names raise
    ``UnknownLogicalAxisError`` (a ``ValueError``).

    Args:
      logical: one entry per array dimension (a logical name, a tuple of names, or None). It may
        be shorter than ``shape`` (trailing dims replicated).
      mesh: the device mesh (only its axis sizes are read).
      shape: the array shape, for the divisibility check; None skips it.
    """
    entries = tuple(logical)
    if shape is not None and len(entries) > len(shape):
        raise ValueError(f"logical spec {entries} has more entries than the array has dims "
                         f"(shape {tuple(shape)})")
    sizes = dict(mesh.shape)
    used: set[str] = set()
    out: list[Union[None, str, tuple[str, ...]]] = []
    for d, entry in enumerate(entries):
        kept: list[str] = []
        prod = 1
        for ax in _mesh_axes_for(entry):
            if ax not in sizes:
                raise ValueError(f"logical rule maps to mesh axis {ax!r}, which mesh "
                                 f"{tuple(mesh.axis_names)} does not have")
            if ax in used or ax in kept:
                continue
            if shape is not None and shape[d] % (prod * sizes[ax]):
                continue
            kept.append(ax)
            prod *= sizes[ax]
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_sharding(logical: LogicalSpec, mesh: Mesh,
                     shape: Optional[Sequence[int]] = None) -> NamedSharding:
    """``NamedSharding(mesh, logical_to_mesh_spec(logical, mesh, shape))``."""
    return NamedSharding(mesh, logical_to_mesh_spec(logical, mesh, shape))


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def param_shardings(abstract_tree: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding`` for every leaf of a (possibly boxed) abstract pytree.

    ``abstract_tree`` is typically ``jax.eval_shape(model.init, ...)`` or of a whole train-state
    init: leaves are ``nn.Partitioned`` boxes (their logical names map through
    ``logical_to_mesh_spec`` with the leaf shape) or plain arrays / ``ShapeDtypeStruct`` s
    (replicated: step counters, RNG keys, optimizer scalars). The result has the *unboxed*
    structure (boxes replaced by their sharding), matching ``nn.meta.unbox(tree)``.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, nn.Partitioned):
            return logical_sharding(x.names, mesh, x.value.shape)
        return replicated  # plain leaves and other metadata boxes (no axis names)

    return jax.tree.map(one, abstract_tree, is_leaf=_is_box)


def unbox(tree: PyTree) -> PyTree:
    """Strip ``nn.Partitioned`` (and other metadata) boxes: plain arrays, same structure."""
    return meta.unbox(tree)


def logical_specs(abstract_tree: PyTree) -> PyTree:
    """Logical ``PartitionSpec`` per leaf of a boxed tree (``P()`` for unboxed leaves)."""
    return jax.tree.map(
        lambda x: PartitionSpec(*x.names) if isinstance(x, nn.Partitioned) else PartitionSpec(),
        abstract_tree, is_leaf=_is_box)


def with_shardings(abstract_tree: PyTree, shardings: PyTree) -> PyTree:
    """``ShapeDtypeStruct`` s carrying ``shardings`` (targets for restore / AOT compile).

    ``abstract_tree`` may be boxed (it is unboxed first) or hold arrays.
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        unbox(abstract_tree), shardings)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, flax_rules: bool = False):
    """``jax.set_mesh(mesh)`` (what ``constrain`` and jitted steps trace under).

    ``flax_rules=True`` also enters ``nn.logical_axis_rules(LOGICAL_RULES)`` for models calling
    ``nn.with_logical_constraint``. Off by default: with rules active flax re-checks each boxed
    param at apply time with a sharding constraint, which fails for ``nn.DenseGeneral`` kernels
    (e.g. ``layers.MultiHeadAttention``; flax 0.12.8); and flax applies the rules without the
    divisibility / no-reuse fallback. Prefer ``constrain`` for activations.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.set_mesh(mesh))
        if flax_rules:
            stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
        yield mesh


def constrain(x: jax.Array, logical: LogicalSpec) -> jax.Array:
    """Sharding constraint on an activation by logical names, e.g. ``constrain(h, ('batch',
    'length', None))``, resolved with ``logical_to_mesh_spec`` against the mesh set by
    ``jax.set_mesh`` / ``mesh_context``; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh_spec(logical, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def sharded_init(init_fn: Callable[..., PyTree], mesh: Mesh, *args,
                 return_shardings: bool = False):
    """Run ``init_fn(*args)`` with its outputs created directly in their shardings.

    ``jax.eval_shape(init_fn, *args)`` gives the boxed abstract outputs; ``param_shardings``
    turns their logical names into ``NamedSharding`` s; ``jax.jit(unbox . init_fn,
    out_shardings=...)`` then materialises each shard on its own device (nothing is built whole
    on one device first). ``args`` (e.g. an RNG key, dummy inputs) are traced.

    Returns the unboxed, sharded pytree, or ``(tree, shardings)`` with ``return_shardings``.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh)
    # Only the mesh, not flax's logical rules: with rules active, flax constrains each boxed param
    # as it is created, which fails for DenseGeneral kernels (initialised flat, then reshaped).
    # out_shardings already places every leaf.
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return (out, shardings) if return_shardings else out


# --------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------

def batch_spec(mesh: Mesh, shape: Optional[Sequence[int]] = None) -> PartitionSpec:
    """Leading (batch) dim over ``('data', 'fsdp')``; with ``shape`` the divisibility fallback
    of ``logical_to_mesh_spec`` applies (a batch that the axes do not divide is replicated along
    the axes that fail)."""
    return logical_to_mesh_spec(("batch",), mesh, shape)


def batch_sharding(mesh: Mesh, shape: Optional[Sequence[int]] = None) -> NamedSharding:
    """``NamedSharding`` for one batch array ``[B, ...]`` (see ``batch_spec``)."""
    return NamedSharding(mesh, batch_spec(mesh, shape))


def batch_shardings(batch: PyTree, mesh: Mesh) -> PyTree:
    """Per-leaf batch shardings for a pytree of ``[B, ...]`` arrays (0-d leaves replicated)."""
    def one(x):
        shape = np.shape(x)
        if len(shape) == 0:
            return NamedSharding(mesh, PartitionSpec())
        return batch_sharding(mesh, shape)

    return jax.tree.map(one, batch)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Put a *global* host batch (the same on every process) onto the mesh, batch-sharded."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), batch, batch_shardings(batch, mesh))


# --------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------

_DISTRIBUTED_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _should_initialize_distributed(env: Optional[dict] = None) -> bool:
    env = os.environ if env is None else env
    flag = env.get("UNCLIP_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    if any(env.get(k) for k in _DISTRIBUTED_ENV_VARS):
        return True
    # TPU VM pod slice: one hostname per worker.
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return True
    # SLURM / Open MPI with several tasks (jax.distributed auto-detects these clusters).
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(k, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def maybe_initialize_distributed(**kwargs) -> bool:
    """Call ``jax.distributed.initialize(**kwargs)`` when this is a multi-process job.

    Multi-process means: ``UNCLIP_DISTRIBUTED=1``; or a coordinator address in the environment
    (``JAX_COORDINATOR_ADDRESS``); or a TPU pod slice (``TPU_WORKER_HOSTNAMES`` lists several
    workers); or SLURM / Open MPI with several tasks. ``UNCLIP_DISTRIBUTED=0`` forces single
    process. Must run before any other JAX call touches devices. Idempotent.

    Returns True when the process is (now) part of a distributed job.
    """
    if jax.distributed.is_initialized():
        return True
    if not _should_initialize_distributed():
        return False
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that logs and writes side files)."""
    return jax.process_index() == 0


def global_batch_from_local(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """Assemble per-process batch shards into global, batch-sharded ``jax.Array`` s.

    Every process passes its own ``[B_local, ...]`` slice (numpy or host arrays; its data
    reader is sharded by ``jax.process_index()``); the result is ``[B_local * process_count,
    ...]`` sharded over ``('data', 'fsdp')`` (``jax.make_array_from_process_local_data``). On a
    single process this is the same as ``shard_batch``.
    """
    n = jax.process_count()

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        global_shape = (x.shape[0] * n,) + x.shape[1:]
        sharding = batch_sharding(mesh, global_shape)
        if n > 1 and sharding.spec[:1] != batch_spec(mesh)[:1]:
            raise ValueError(
                f"global batch {global_shape[0]} ({x.shape[0]} per process x {n} processes) is "
                f"not divisible by data*fsdp = {mesh.shape['data'] * mesh.shape['fsdp']}")
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, local_batch)


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------

def per_device_bytes(tree: PyTree) -> dict[Any, int]:
    """Bytes each device holds for the arrays in ``tree`` (addressable shards only)."""
    out: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def total_bytes(tree: PyTree) -> int:
    """Logical (unsharded) bytes of the arrays in ``tree``."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
