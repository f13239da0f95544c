"""Parameter counts of every model of a config, from ``jax.eval_shape`` (no memory).

    python -m unclip_jax.param_counts experiments/karlo.py experiments/paper.py
prints a markdown table (the README's).
"""
from __future__ import annotations

import math
import sys

import jax

from unclip_jax import config as cfg_lib
from unclip_jax.models import clip as clip_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib


def _count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def count_models(config) -> dict[str, int]:
    """{'clip', 'prior', 'decoder', 'sr1', ...: number of scalars} (the prior counts its
    params and its clip_mean / clip_std, as Karlo's and diffusers' checkpoints do; the stored
    empty-caption encoding of ``null_cond='buffer'`` is not a parameter)."""
    counts = {"clip": _count(clip_lib.init_params(cfg_lib.clip_config(config), abstract=True))}
    pc = cfg_lib.prior_config(config)
    prior_vars = jax.eval_shape(lambda k: prior_lib.init_prior(pc, k), jax.random.key(0))
    stats = {k: v for k, v in prior_vars["buffers"].items() if k in ("clip_mean", "clip_std")}
    counts["prior"] = _count(prior_vars["params"]) + _count(stats)
    counts["decoder"] = unet_lib.count_params(unet_lib.abstract_params(cfg_lib.decoder_config(config)))
    for i, s in enumerate(cfg_lib.sr_configs(config)):
        counts[f"sr{i + 1}"] = unet_lib.count_params(unet_lib.abstract_params(s))
    return counts


def markdown_table(paths: list[str]) -> str:
    rows = ["| config | model | parameters |", "|---|---|---:|"]
    for path in paths:
        config = cfg_lib.load_config_file(path)
        for name, n in count_models(config).items():
            rows.append(f"| {config.name} | {name} | {n:,} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table(sys.argv[1:] or ["experiments/karlo.py", "experiments/paper.py"]))
