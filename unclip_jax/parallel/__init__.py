"""Mesh creation, logical axis rules, sharded init, multi-host helpers."""
from unclip_jax.parallel.mesh import (  # noqa: F401
    MESH_AXES,
    batch_sharding,
    batch_shardings,
    constrain,
    global_batch_from_local,
    is_main_process,
    logical_sharding,
    logical_to_mesh_spec,
    make_mesh,
    maybe_initialize_distributed,
    mesh_context,
    param_shardings,
    shard_batch,
    sharded_init,
    unbox,
    with_shardings,
)
from unclip_jax.parallel.rules import LOGICAL_RULES, check_logical_names  # noqa: F401
