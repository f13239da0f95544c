"""Mesh creation, logical axis rules, sharded init, multi-host helpers."""
from unclip_jax.parallel.rules import LOGICAL_RULES, check_logical_names  # noqa: F401
