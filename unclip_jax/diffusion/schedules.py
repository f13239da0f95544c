"""Beta schedules and timestep respacing.

Everything here is float64 NumPy (the tables are built once on the host); `gaussian.py` stores
them as float32 device arrays.

* `cosine_betas`: Nichol & Dhariwal (2021), eq. 17:
  alpha_bar(t) = f(t) / f(0),  f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),
  beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), 0.999).
* `linear_betas`: Ho et al. (2020), 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T so that other T
  give the same curve of alpha_bar.
* `space_timesteps` / `respace_betas`: keep a subset S of the original steps and rebuild betas so
  that the kept steps have the same alpha_bar as before:
  beta'_i = 1 - alpha_bar(S_i) / alpha_bar(S_{i-1}). `timestep_map[i] = S_i` is the original index
  the model is called with.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

COSINE_S = 0.008
MAX_BETA = 0.999


def betas_from_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = MAX_BETA) -> np.ndarray:
    """beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta), i = 0..T-1.

    `alpha_bar` maps t in [0, 1] to the cumulative product of (1 - beta) up to that time.
    Returns float64 [T].
    """
    t = np.arange(num_timesteps, dtype=np.float64)
    a_now = alpha_bar(t / num_timesteps)
    a_next = alpha_bar((t + 1) / num_timesteps)
    return np.minimum(1.0 - a_next / a_now, max_beta)


def cosine_alpha_bar(t, s: float = COSINE_S):
    """Unnormalised cosine alpha_bar f(t) = cos^2(((t + s) / (1 + s)) pi / 2), t in [0, 1]."""
    return np.cos((np.asarray(t, np.float64) + s) / (1.0 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = COSINE_S, max_beta: float = MAX_BETA) -> np.ndarray:
    """Improved-DDPM cosine schedule, float64 [T] (betas clipped at `max_beta`)."""
    return betas_from_alpha_bar(num_timesteps, lambda t: cosine_alpha_bar(t, s), max_beta)


def linear_betas(num_timesteps: int, beta_start: float | None = None,
                 beta_end: float | None = None) -> np.ndarray:
    """DDPM linear schedule, float64 [T]; defaults 1e-4 .. 0.02 scaled by 1000 / T."""
    scale = 1000.0 / num_timesteps
    beta_start = scale * 1e-4 if beta_start is None else beta_start
    beta_end = scale * 0.02 if beta_end is None else beta_end
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """'cosine' or 'linear' -> float64 betas [T]."""
    if name == "cosine":
        return cosine_betas(num_timesteps)
    if name == "linear":
        return linear_betas(num_timesteps)
    raise ValueError(f"unknown beta schedule {name!r} (expected 'cosine' or 'linear')")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Which of the original steps 0..T-1 to keep, sorted ascending.

    `section_counts`:
      * "ddimN": an integer stride that gives exactly N steps starting at 0 (as DDIM);
      * "N" or N: N steps spread evenly over [0, T-1] (first and last step kept);
      * "a,b,c" or [a, b, c]: the range is cut into len(counts) equal sections and section k gets
        counts[k] evenly spread steps;
      * "" or None: all T steps.
    """
    if section_counts is None or section_counts == "":
        return list(range(num_timesteps))
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                kept = list(range(0, num_timesteps, stride))
                if len(kept) == want:
                    return kept
            raise ValueError(f"no integer stride gives {want} of {num_timesteps} steps")
        section_counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    counts = list(section_counts)
    size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for k, count in enumerate(counts):
        section = size + (1 if k < extra else 0)
        if not 1 <= count <= section:
            raise ValueError(f"cannot take {count} steps from a section of {section}")
        if count == 1:
            offsets = [0]
        else:
            stride = (section - 1) / (count - 1)
            offsets = [round(j * stride) for j in range(count)]
        kept += [start + o for o in offsets]
        start += section
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """New betas for the kept steps and the map from new to original step index.

    Returns (betas' float64 [N], timestep_map int64 [N]) with
    alpha_bar'_i == alpha_bar_{S_i}: beta'_i = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}}.
    """
    betas = np.asarray(betas, np.float64)
    kept = np.asarray(sorted(set(int(t) for t in use_timesteps)), np.int64)
    if kept.size == 0 or kept[0] < 0 or kept[-1] >= betas.shape[0]:
        raise ValueError("use_timesteps must be a non-empty subset of range(len(betas))")
    alpha_bar = np.cumprod(1.0 - betas)[kept]
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    return 1.0 - alpha_bar / alpha_bar_prev, kept
