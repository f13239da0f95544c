"""JAX persistent compilation cache: on for the CLI and tests (compiles dominate on CPU)."""
from __future__ import annotations

import os

import jax


def default_cache_dir() -> str:
    return os.environ.get(
        "UNCLIP_JAX_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "unclip_jax", "jax_compilation_cache"),
    )


def enable_compilation_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache at ``path`` (default ``~/.cache/unclip_jax``).

    Set ``UNCLIP_JAX_CACHE`` to move it; every compile that takes over 0.5 s is cached.
    """
    path = path or default_cache_dir()
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
