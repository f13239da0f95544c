"""PCA of CLIP image embeddings and per-dimension quantisation (for the autoregressive prior).

The unCLIP AR prior keeps the first 319 principal components of the (1024-d) CLIP image
embedding and quantises each into 1024 buckets. Both pieces are small pytrees
(``flax.struct.dataclass``) so they can be saved with the model and passed into jitted code.

* :class:`PCA`: ``mean [D]``, ``basis [D, k]`` (orthonormal columns, ordered by decreasing
  explained variance; sign fixed so each column's largest-magnitude entry is positive),
  ``explained_variance [k]``, ``total_variance`` (scalar). Fitted with a float64 numpy SVD.
* :class:`Quantizer`: per-dimension bucket edges ``edges [D, n + 1]``. Bucket ``b`` of dim ``d``
  is ``[edges[d, b], edges[d, b + 1])``; values below / above the range fall into the first /
  last bucket. A code decodes to its bucket centre, so for values inside the range the round
  trip error is at most half that bucket's width. Two ways to fit the edges:

  - ``"quantile"`` (default): edges at the per-dimension quantiles ``0, 1/n, ..., 1`` of the
    training coefficients: equal-mass buckets, so every code is used about equally often (what
    a cross-entropy model learns best); narrow buckets where the data is dense.
  - ``"uniform"``: ``n`` equal-width buckets over a per-dimension range, the ``[q, 1 - q]``
    quantiles of the training data (``clip_quantile=q``; 0 gives min..max).
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class PCA:
    """Fitted PCA. ``mean [D]``, ``basis [D, k]``, ``explained_variance [k]``,
    ``total_variance []`` (sum of all per-dimension variances of the data)."""

    mean: Array
    basis: Array
    explained_variance: Array
    total_variance: Array

    @property
    def num_components(self) -> int:
        return self.basis.shape[1]

    @property
    def explained_variance_ratio(self) -> Array:
        """``[k]`` fraction of the total variance per component (decreasing)."""
        return self.explained_variance / self.total_variance


def fit_pca(z, k: Optional[int] = None) -> PCA:
    """Fit PCA to ``z [N, D]`` keeping ``k`` components (default ``min(N, D)``).

    Uses a float64 SVD of the centred data; variance uses the ``N - 1`` denominator.
    """
    z = np.asarray(z, np.float64)
    n, d = z.shape
    k = min(n, d) if k is None else int(k)
    if not 0 < k <= min(n, d):
        raise ValueError(f"k must be in [1, min(N, D) = {min(n, d)}], got {k}")
    mean = z.mean(axis=0)
    zc = z - mean
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    basis = vt[:k].T  # [D, k]
    # deterministic signs: largest-magnitude entry of each column positive
    idx = np.argmax(np.abs(basis), axis=0)
    signs = np.sign(basis[idx, np.arange(k)])
    signs[signs == 0] = 1.0
    basis = basis * signs
    denom = max(n - 1, 1)
    var = s[:k] ** 2 / denom
    total = float((zc ** 2).sum() / denom)
    return PCA(mean=jnp.asarray(mean, jnp.float32), basis=jnp.asarray(basis, jnp.float32),
               explained_variance=jnp.asarray(var, jnp.float32),
               total_variance=jnp.asarray(total, jnp.float32))


def project(pca: PCA, z: Array, k: Optional[int] = None) -> Array:
    """``z [..., D] -> coefficients [..., k]`` (first ``k`` components; default all kept)."""
    basis = pca.basis if k is None else pca.basis[:, :k]
    return jnp.matmul(z - pca.mean, basis, precision=jax.lax.Precision.HIGHEST)


def reconstruct(pca: PCA, coeffs: Array, k: Optional[int] = None) -> Array:
    """``coeffs [..., k'] -> z [..., D]`` using the first ``k`` coefficients (default all ``k'``);
    the remaining components are set to zero (the mean)."""
    k = coeffs.shape[-1] if k is None else int(k)
    return pca.mean + jnp.matmul(coeffs[..., :k], pca.basis[:, :k].T,
                                 precision=jax.lax.Precision.HIGHEST)


@flax.struct.dataclass
class Quantizer:
    """Per-dimension scalar quantiser. ``edges [D, n + 1]`` (non-decreasing along the last
    axis)."""

    edges: Array

    @property
    def num_buckets(self) -> int:
        return self.edges.shape[-1] - 1

    @property
    def num_dims(self) -> int:
        return self.edges.shape[0]

    @property
    def centers(self) -> Array:
        """``[D, n]`` bucket centres (the decoded values)."""
        return 0.5 * (self.edges[:, 1:] + self.edges[:, :-1])

    @property
    def widths(self) -> Array:
        """``[D, n]`` bucket widths."""
        return self.edges[:, 1:] - self.edges[:, :-1]


def fit_quantizer(x, num_buckets: int, method: str = "quantile",
                  clip_quantile: float = 0.0) -> Quantizer:
    """Fit bucket edges to ``x [N, D]`` (see the module docstring for ``method``)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got {x.shape}")
    if method == "quantile":
        edges = np.quantile(x, np.linspace(0.0, 1.0, num_buckets + 1), axis=0).T
    elif method == "uniform":
        lo = np.quantile(x, clip_quantile, axis=0)
        hi = np.quantile(x, 1.0 - clip_quantile, axis=0)
        hi = np.where(hi > lo, hi, lo + 1e-6)
        frac = np.linspace(0.0, 1.0, num_buckets + 1)
        edges = lo[:, None] + (hi - lo)[:, None] * frac[None]
    else:
        raise ValueError(f"method must be 'quantile' or 'uniform', got {method!r}")
    edges = np.maximum.accumulate(edges, axis=1)  # guard float noise: non-decreasing
    return Quantizer(edges=jnp.asarray(edges, jnp.float32))


def uniform_quantizer(lo, hi, num_buckets: int) -> Quantizer:
    """Equal-width buckets over ``[lo, hi]`` (scalars or ``[D]`` arrays)."""
    lo = np.atleast_1d(np.asarray(lo, np.float64))
    hi = np.atleast_1d(np.asarray(hi, np.float64))
    frac = np.linspace(0.0, 1.0, num_buckets + 1)
    return Quantizer(edges=jnp.asarray(lo[:, None] + (hi - lo)[:, None] * frac[None],
                                       jnp.float32))


def quantize(q: Quantizer, x: Array) -> Array:
    """``x [..., D] -> int32 codes [..., D]`` in ``[0, n)``."""
    shape = x.shape
    flat = jnp.reshape(x, (-1, shape[-1])).astype(q.edges.dtype)
    inner = q.edges[:, 1:-1]  # [D, n - 1]
    codes = jax.vmap(lambda e, v: jnp.searchsorted(e, v, side="right"),
                     in_axes=(0, 1), out_axes=1)(inner, flat)
    return jnp.reshape(codes.astype(jnp.int32), shape)


def dequantize(q: Quantizer, codes: Array) -> Array:
    """``codes [..., D] -> [..., D]`` bucket centres."""
    centers = q.centers  # [D, n]
    d = jnp.arange(q.num_dims)
    return centers[d, codes]
