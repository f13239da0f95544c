"""Beta schedules and respacing against closed forms."""
import math

import numpy as np
import pytest

from unclip_jax.diffusion import (
    GaussianDiffusion,
    cosine_betas,
    create_gaussian_diffusion,
    linear_betas,
    respace,
    respace_betas,
    space_timesteps,
)


def test_cosine_alpha_bar_closed_form():
    T, s = 1000, 0.008
    betas = cosine_betas(T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expect = np.array([f(t + 1) / f(0) for t in range(T)])
    ab = np.cumprod(1 - betas)
    unclipped = betas < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]   # only the last step hits the clip
    np.testing.assert_allclose(ab[unclipped], expect[unclipped], rtol=1e-9, atol=1e-15)
    assert betas.max() == pytest.approx(0.999)
    d = GaussianDiffusion.from_betas(betas)
    np.testing.assert_allclose(np.asarray(d.alphas_cumprod)[:-1], expect[:-1], rtol=2e-6, atol=1e-12)


def test_linear_betas():
    b = linear_betas(1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b = linear_betas(250)  # scaled by 1000 / T
    assert b[0] == pytest.approx(4e-4) and b[-1] == pytest.approx(0.08)


def test_space_timesteps():
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert len(space_timesteps(1000, "ddim50")) == 50
    s27 = space_timesteps(1000, "27")
    assert len(s27) == 27 and s27[0] == 0 and s27[-1] == 999
    assert space_timesteps(1000, 27) == s27
    s = space_timesteps(300, "10,10,5")
    assert len(s) == 25
    counts = [sum(lo <= t < lo + 100 for t in s) for lo in (0, 100, 200)]
    assert counts == [10, 10, 5]
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim7")


def test_respacing_identity():
    full = create_gaussian_diffusion(1000, "cosine")
    same = create_gaussian_diffusion(1000, "cosine", "1000")
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1",
                 "posterior_log_variance_clipped"):
        np.testing.assert_allclose(np.asarray(getattr(same, name)),
                                   np.asarray(getattr(full, name)), rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(same.timestep_map), np.arange(1000))
    new_betas, tmap = respace_betas(cosine_betas(1000), range(1000))
    np.testing.assert_allclose(new_betas, cosine_betas(1000), rtol=1e-12)
    np.testing.assert_array_equal(tmap, np.arange(1000))


def test_respacing_keeps_alpha_bar_at_kept_steps():
    betas = linear_betas(1000)
    kept = space_timesteps(1000, "10,10,5")
    new_betas, tmap = respace_betas(betas, kept)
    np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas)[kept], rtol=1e-12)
    d = create_gaussian_diffusion(1000, "linear", "ddim25")
    assert d.num_timesteps == 25
    np.testing.assert_array_equal(np.asarray(d.timestep_map), np.arange(0, 1000, 40))
    # respacing a respaced diffusion composes the maps
    d5 = respace(d, "5")
    np.testing.assert_array_equal(np.asarray(d5.timestep_map),
                                  np.arange(0, 1000, 40)[space_timesteps(25, "5")])
    np.testing.assert_allclose(np.asarray(d5.alphas_cumprod),
                               np.cumprod(1 - betas)[np.asarray(d5.timestep_map)], rtol=1e-5)
