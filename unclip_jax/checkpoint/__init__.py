"""orbax checkpoints for exact resume; preemption (SIGTERM) handling."""
from unclip_jax.checkpoint.manager import (  # noqa: F401
    FORMAT_VERSION,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    Checkpointer,
    ConfigMismatchError,
    Restored,
    config_to_json,
)
from unclip_jax.checkpoint.preemption import PreemptionGuard  # noqa: F401
