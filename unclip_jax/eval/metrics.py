"""Sample-quality metrics on feature vectors (numpy, float64): CLIP R-precision and the
Frechet distance (CLIP-FID when the features are evaluation-CLIP image embeddings).

Both take plain arrays so they are tested against closed forms; embedding images and captions
with an evaluation CLIP lives in ``unclip_jax.eval.clip_features``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def sample_distractors(labels: Sequence, pool_labels: Sequence, rng: np.random.Generator,
                       num_distractors: int = 99) -> np.ndarray:
    """For each query ``labels[i]``, ``num_distractors`` indices into the pool drawn without
    replacement among pool entries whose label differs from ``labels[i]`` -> ``[N, k]`` int.
    Raises ``ValueError`` when the pool has fewer than ``num_distractors`` other labels."""
    labels = list(labels)
    pool_labels = np.asarray(list(pool_labels), dtype=object)
    out = np.empty((len(labels), int(num_distractors)), np.int64)
    for i, lab in enumerate(labels):
        others = np.flatnonzero(pool_labels != lab)
        if len(others) < num_distractors:
            raise ValueError(f"R-precision: only {len(others)} pool captions of other concepts "
                             f"than {lab!r}; need {num_distractors} distractors")
        out[i] = rng.choice(others, size=int(num_distractors), replace=False)
    return out


def r_precision(image_feats, caption_feats_true, caption_feats_pool, rng=None, *,
                num_distractors: int = 99, labels: Optional[Sequence] = None,
                pool_labels: Optional[Sequence] = None, distractors=None,
                return_ranks: bool = False):
    """CLIP R-precision (R = 1, i.e. top-1): for each image ``i`` rank its true caption
    ``caption_feats_true[i]`` among ``num_distractors`` captions of *other* concepts drawn from
    ``caption_feats_pool`` by cosine similarity; the score is the fraction of images whose true
    caption ranks first (ties count against it). Chance level is ``1 / (num_distractors + 1)``.

    ``labels [N]`` / ``pool_labels [P]``: the concept of each image and of each pool caption;
    distractors are drawn among pool captions whose label differs from the image's. Without
    labels, every pool entry counts as another concept (the pool must then not contain the true
    captions). ``distractors [N, k]`` (pool indices) fixes the draw instead of ``rng``, so that
    several rows of a table are ranked against the same captions.
    Returns the top-1 score (and the 0-based rank of each true caption with ``return_ranks``).
    """
    img = l2_normalize(image_feats)
    true = l2_normalize(caption_feats_true)
    pool = l2_normalize(caption_feats_pool)
    n = img.shape[0]
    if true.shape != img.shape:
        raise ValueError(f"image feats {img.shape} and true caption feats {true.shape} differ")
    if distractors is None:
        if rng is None:
            rng = np.random.default_rng(0)
        elif isinstance(rng, (int, np.integer)):
            rng = np.random.default_rng(int(rng))
        if labels is None:
            labels, pool_labels = [0] * n, [1] * pool.shape[0]
        distractors = sample_distractors(labels, pool_labels, rng, num_distractors)
    distractors = np.asarray(distractors)
    s_true = np.sum(img * true, axis=-1)                              # [N]
    s_dis = np.einsum("nd,nkd->nk", img, pool[distractors])           # [N, k]
    ranks = np.sum(s_dis >= s_true[:, None], axis=-1)                 # ties count against
    score = float(np.mean(ranks == 0)) if n else float("nan")
    return (score, ranks) if return_ranks else score


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``feats [N, D]`` in float64."""
    x = np.asarray(feats, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``.

    ``tr((S1 S2)^1/2)`` is computed as the trace of the square root of the *symmetric* PSD
    matrix ``S1^1/2 S2 S1^1/2`` (same eigenvalues as S1 S2) with symmetric eigendecompositions
    in float64 and negative round-off eigenvalues clipped, so it stays real and stable for
    singular covariances (fewer samples than dimensions) where ``scipy.linalg.sqrtm`` of
    ``S1 S2`` returns complex noise."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))
    d = mu1 - mu2
    return float(max(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to ``feats_a [N, D]`` and ``feats_b [M, D]``
    (FID when the features are Inception pool features; CLIP-FID with CLIP image
    embeddings). Biased upward for small N; compare values computed with the same N."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


__all__ = ["l2_normalize", "sample_distractors", "r_precision", "gaussian_stats",
           "frechet_distance", "frechet_distance_from_stats"]
