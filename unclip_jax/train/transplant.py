"""Warm-start a *deeper* UNet from a trained one: the trained weights moved into a UNet whose
``channel_mult`` adds resolution levels at the bottom (e.g. ``(1, 2, 2)`` -> ``(1, 2, 2, 3)``).

Unlike ``loop.grow_params`` (which only adds modules and keeps the model's function exactly),
an added bottom level changes the width and resolution of the middle block and the input of
the first up block above it, so those weights cannot be reused: they, and the new level, start
fresh, and the model's function changes. Everything else keeps its trained weights: the stem,
every down block of the old levels, the up blocks of the old levels (their names shift by
``added_levels * (num_res_blocks + 1)``, because ``output_blocks_*`` count from the bottom), the
conditioning (time, CLIP, caption) and the output head. The high-resolution levels, which cost
most of the FLOPs to train, start trained; the cheap low-resolution capacity starts fresh.

    params, report = transplant_unet_params(old_params, old_cfg, fresh_params, new_cfg)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np

PyTree = Any


class TransplantError(ValueError):
    pass


@dataclasses.dataclass
class TransplantReport:
    """Leaf paths (``module/.../leaf``, in the new UNet's names): ``copied`` from the trained
    UNet, ``fresh`` (kept their new init); ``dropped``: trained leaves (old names) with no
    place of the same shape in the new UNet."""
    copied: list
    fresh: list
    dropped: list

    def summary(self, params_old: PyTree) -> str:
        flat = _flat(params_old)
        n_old = sum(int(np.size(x)) for x in flat.values())
        n_drop = sum(int(np.size(flat[p])) for p in self.dropped)
        return (f"{len(self.copied)} leaves copied, {len(self.fresh)} fresh, "
                f"{len(self.dropped)} trained leaves dropped ({n_drop:,} of {n_old:,} trained "
                "parameters)")


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _flat(tree: PyTree) -> dict:
    return {_key(path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def level_offset(old_cfg, new_cfg) -> int:
    """How far the ``output_blocks_*`` indices shift: ``added_levels * (num_res_blocks + 1)``.
    Raises ``TransplantError`` unless ``new_cfg`` only appends levels to ``old_cfg``."""
    old_m, new_m = tuple(old_cfg.channel_mult), tuple(new_cfg.channel_mult)
    if len(new_m) < len(old_m) or new_m[:len(old_m)] != old_m:
        raise TransplantError(f"channel_mult {new_m} does not extend {old_m} by levels at the "
                              "bottom; only appended levels can be transplanted")
    for f in ("model_channels", "num_res_blocks", "image_size", "in_channels", "norm_groups"):
        if getattr(old_cfg, f, None) != getattr(new_cfg, f, None):
            raise TransplantError(f"{f} differs ({getattr(old_cfg, f, None)} -> "
                                  f"{getattr(new_cfg, f, None)}); only channel_mult may grow")
    return (len(new_m) - len(old_m)) * (old_cfg.num_res_blocks + 1)


def transplant_unet_params(old: PyTree, old_cfg, fresh: PyTree, new_cfg
                           ) -> tuple[PyTree, TransplantReport]:
    """``fresh`` (initialised params of ``new_cfg``'s UNet) with every trained leaf of ``old``
    (params of ``old_cfg``'s UNet) that has a place of the same shape copied in.

    Args:
      old: trained UNet params (plain nested dicts of arrays).
      old_cfg, new_cfg: their ``UNetConfig``s; ``new_cfg.channel_mult`` must extend
        ``old_cfg.channel_mult``.
      fresh: new UNet params (plain nested dicts), e.g. from ``unet.init_unet``.
    Returns: (params shaped like ``fresh``, a ``TransplantReport``).
    """
    shift = level_offset(old_cfg, new_cfg)
    rename = lambda p: re.sub(r"^output_blocks_(\d+)",  # noqa: E731
                              lambda m: f"output_blocks_{int(m.group(1)) + shift}", p)
    flat_old = {rename(k): (k, v) for k, v in _flat(old).items()}
    copied, fresh_keys, used = [], [], set()

    def one(path, x):
        key = _key(path)
        src = flat_old.get(key)
        if src is None or tuple(np.shape(src[1])) != tuple(np.shape(x)):
            fresh_keys.append(key)
            return x
        used.add(src[0])
        copied.append(key)
        return jax.numpy.asarray(src[1], x.dtype)

    out = jax.tree_util.tree_map_with_path(one, fresh)
    dropped = sorted(k for k, _ in flat_old.values() if k not in used)
    return out, TransplantReport(copied=copied, fresh=fresh_keys, dropped=dropped)
