"""R-precision and Frechet distance against closed forms (unclip_jax/eval/metrics.py)."""
import numpy as np
import pytest

from unclip_jax.eval import metrics


def _random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _sqrtm_spd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w)) @ v.T


def test_frechet_from_stats_matches_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, 2.0)
    # commuting covariances (diagonal): tr((S1 S2)^1/2) = sum sqrt(a_i b_i)
    a, b = np.diag(s1), np.diag(s2)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = metrics.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # general case: the Wasserstein-2 formula with S2^1/2 S1 S2^1/2 (the other order)
    r2 = _sqrtm_spd(s2)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(_sqrtm_spd(r2 @ s1 @ r2))
    np.testing.assert_allclose(metrics.frechet_distance_from_stats(mu1, s1, mu2, s2), want,
                               rtol=1e-9)
    assert metrics.frechet_distance_from_stats(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    # symmetric in its arguments
    np.testing.assert_allclose(metrics.frechet_distance_from_stats(mu2, s2, mu1, s1), want,
                               rtol=1e-9)


def test_frechet_of_gaussian_samples_approaches_analytic_value():
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, 0.5)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    want = metrics.frechet_distance_from_stats(mu1, s1, mu2, s2)
    assert metrics.frechet_distance(x, y) == pytest.approx(want, rel=0.02)
    # one-dimensional closed form: (m1 - m2)^2 + (sd1 - sd2)^2
    u = rng.normal(1.0, 2.0, size=(n, 1))
    v = rng.normal(-1.0, 0.5, size=(n, 1))
    assert metrics.frechet_distance(u, v) == pytest.approx(4.0 + 1.5 ** 2, rel=0.02)


def test_frechet_of_identical_features_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 8))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    few = rng.standard_normal((5, 32))   # rank-deficient covariance (N < D)
    fd = metrics.frechet_distance(few, few)
    assert np.isfinite(fd) and fd == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(few, few + 3.0) == pytest.approx(9.0 * 32, rel=1e-6)


def test_r_precision_perfectly_aligned_is_one():
    rng = np.random.default_rng(3)
    n_concepts, d = 150, 16
    captions = rng.standard_normal((n_concepts, d))
    labels = np.repeat(np.arange(100), 2)              # 2 images per concept, first 100 concepts
    images = 5.0 * captions[labels]                     # same direction, other norm
    r, ranks = metrics.r_precision(images, captions[labels], captions, rng, labels=labels,
                                   pool_labels=np.arange(n_concepts), return_ranks=True)
    assert r == 1.0 and (ranks == 0).all()


def test_r_precision_random_features_is_chance():
    rng = np.random.default_rng(4)
    n, pool, d = 4000, 300, 32
    caps = rng.standard_normal((pool, d))
    labels = rng.integers(0, pool, n)
    images = rng.standard_normal((n, d))
    r = metrics.r_precision(images, caps[labels], caps, rng, labels=labels,
                            pool_labels=np.arange(pool), num_distractors=99)
    # chance = 1/100; binomial sd = sqrt(0.01 * 0.99 / 4000) ~ 0.0016
    assert abs(r - 0.01) < 0.006
    r9 = metrics.r_precision(images, caps[labels], caps, rng, labels=labels,
                             pool_labels=np.arange(pool), num_distractors=9)
    assert abs(r9 - 0.1) < 0.03


def test_distractors_exclude_the_true_concept_and_need_enough_others():
    rng = np.random.default_rng(5)
    pool_labels = np.repeat(np.arange(20), 3)          # several captions per concept
    d = metrics.sample_distractors([0, 7, 19], pool_labels, rng, num_distractors=50)
    assert d.shape == (3, 50)
    for lab, row in zip([0, 7, 19], d):
        assert (pool_labels[row] != lab).all() and len(set(row)) == 50
    with pytest.raises(ValueError, match="distractors"):
        metrics.sample_distractors([0], pool_labels, rng, num_distractors=58)
    # a fixed draw gives the same score whatever the rng
    caps = rng.standard_normal((60, 8))
    img = rng.standard_normal((3, 8))
    a = metrics.r_precision(img, caps[[0, 21, 57]], caps, distractors=d)
    b = metrics.r_precision(img, caps[[0, 21, 57]], caps, np.random.default_rng(9), distractors=d)
    assert a == b
