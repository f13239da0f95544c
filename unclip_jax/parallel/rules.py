"""Logical -> mesh axis rules, in one place.

Every parameter of every model carries logical axis names (``nn.with_logical_partitioning``).
These rules map them onto the mesh axes ``('data', 'fsdp', 'tensor')``. A logical name that is
not listed here raises, so a typo in a model cannot silently replicate a huge tensor.

Logical names used by the models:
  batch     activations' batch dimension
  embed     model width of transformers / dense layers (sharded over fsdp)
  mlp       hidden width of MLPs (tensor parallel)
  heads     attention heads (tensor parallel)
  kv        per-head channels (replicated)
  vocab     token vocabulary (tensor parallel)
  conv_in   input channels of a conv kernel (fsdp)
  conv_out  output channels of a conv kernel / channels of a bias or norm (tensor)
  norm      scales and biases of norms over the model width (replicated)
  length    sequence positions (replicated)
  spatial   conv kernel height / width, image height / width (replicated)
  null      small learned tables that are never worth sharding (replicated)
"""
from __future__ import annotations

from typing import Sequence

LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("length", None),
    ("spatial", None),
    ("null", None),
)

KNOWN_LOGICAL_NAMES = frozenset(name for name, _ in LOGICAL_RULES)


class UnknownLogicalAxisError(ValueError):
    pass


def check_logical_names(names: Sequence[str | None], where: str = "") -> None:
    """Raise if any logical axis name is not in LOGICAL_RULES."""
    for n in names:
        if n is not None and n not in KNOWN_LOGICAL_NAMES:
            raise UnknownLogicalAxisError(
                f"unknown logical axis name {n!r}{' in ' + where if where else ''}; "
                f"known names: {sorted(KNOWN_LOGICAL_NAMES)}. Add a rule to "
                "unclip_jax/parallel/rules.py:LOGICAL_RULES or fix the model annotation."
            )
