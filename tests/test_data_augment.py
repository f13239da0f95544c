"""Augment: crops, blur corruption (fixed or sigma-derived kernels), paired crops, BSR-lite,
inpainting masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import augment as A


def _noise(b=2, h=16, w=16, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (b, h, w, 3), minval=-1, maxval=1)


def _high_freq_energy(x):
    f = np.abs(np.fft.fft2(np.asarray(x), axes=(1, 2))) ** 2
    h = x.shape[1]
    fy = np.abs(np.fft.fftfreq(h))[:, None]
    fx = np.abs(np.fft.fftfreq(x.shape[2]))[None, :]
    hf = (np.maximum(fy, fx) > 0.25)[None, :, :, None]
    return float((f * hf).sum())


def test_gaussian_blur():
    x = _noise()
    tiny = A.gaussian_blur(x, 0.05)
    np.testing.assert_allclose(tiny, x, atol=1e-5)
    blur = jax.jit(lambda r, x: A.blur_corrupt(r, x, (1.0, 2.0)))(jax.random.PRNGKey(1), x)
    assert blur.shape == x.shape and blur.dtype == x.dtype
    assert _high_freq_energy(blur) < 0.1 * _high_freq_energy(x)
    # constant images stay constant (normalised taps, reflect padding)
    np.testing.assert_allclose(A.gaussian_blur(jnp.full((1, 8, 8, 3), 0.3), 1.5), 0.3,
                               atol=1e-6)
    # per-example sigma: the example with the larger sigma is smoother
    two = A.gaussian_blur(x, jnp.array([0.3, 2.0]), max_sigma=2.0)
    assert _high_freq_energy(two[1:]) < _high_freq_energy(two[:1])


def test_random_resized_crop():
    x = _noise(3, 16, 16)
    same = A.random_resized_crop(jax.random.PRNGKey(0), x, scale=(1, 1), ratio=(1, 1))
    np.testing.assert_allclose(same, x, atol=1e-5)
    out = jax.jit(lambda r, x: A.random_resized_crop(r, x, 8, scale=(0.3, 0.6)))(
        jax.random.PRNGKey(2), x)
    assert out.shape == (3, 8, 8, 3)
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-5
    flipped = A.random_resized_crop(jax.random.PRNGKey(0), x, scale=(1, 1), ratio=(1, 1),
                                    flip_prob=1.0)
    np.testing.assert_allclose(flipped, x[:, :, ::-1], atol=1e-5)


def test_paired_random_crop_aligned():
    low = _noise(4, 8, 8)
    high = jnp.repeat(jnp.repeat(low, 4, axis=1), 4, axis=2)   # exact 4x nearest upsample
    lo, hi = jax.jit(A.paired_random_crop, static_argnums=3)(jax.random.PRNGKey(3), low, high,
                                                             8)
    assert lo.shape == (4, 2, 2, 3) and hi.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(jnp.repeat(jnp.repeat(lo, 4, 1), 4, 2), hi)
    lo2, hi2 = A.paired_random_crop(jax.random.PRNGKey(3), low, high)   # quarter size default
    assert hi2.shape == (4, 8, 8, 3) and lo2.shape == (4, 2, 2, 3)


def test_bsr_degrade():
    rng = np.random.default_rng(0)
    img = (np.random.default_rng(1).uniform(size=(2, 32, 32, 3)) * 255).astype(np.uint8)
    out = A.bsr_degrade_batch(rng, img, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    again = A.bsr_degrade_batch(np.random.default_rng(0), img, 16)
    np.testing.assert_array_equal(out, again)
    f = A.bsr_degrade_batch(np.random.default_rng(0), img.astype(np.float32) / 127.5 - 1, 16)
    assert f.dtype == np.float32 and f.min() >= -1 and f.max() <= 1
    plain = A.bsr_degrade(np.random.default_rng(5), img[0], 16, blur_prob=0, noise_prob=0,
                          jpeg_prob=0, interpolations=("box",))
    np.testing.assert_array_equal(
        plain, np.asarray(Image.fromarray(img[0]).resize((16, 16), Image.BOX)))


def test_inpaint_masks():
    rng = np.random.default_rng(0)
    for kind in ("box", "brush", "outpaint"):
        m = A.random_inpaint_masks(rng, 6, 24, 20, kinds=(kind,))
        assert m.shape == (6, 24, 20, 1) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}
        flat = m.reshape(6, -1)
        assert np.all(flat.min(1) == 0) and np.all(flat.max(1) == 1)
    mixed = A.random_inpaint_masks(np.random.default_rng(1), 4, 2, 2)
    assert mixed.shape == (4, 2, 2, 1)


def test_random_crop_and_fixed_kernel_blur():
    x = _noise(4, 12, 12)
    out = jax.jit(lambda r, x: A.random_crop(r, x, 6, align=3))(jax.random.PRNGKey(2), x)
    assert out.shape == (4, 6, 6, 3)
    for i in range(4):  # a window at offsets on the 3-pixel grid
        assert any(np.array_equal(out[i], x[i, y:y + 6, z:z + 6])
                   for y in (0, 3, 6) for z in (0, 3, 6))
    assert A.random_crop(jax.random.PRNGKey(2), x, 12) is x
    # kernel_size fixes the taps: 1 tap is the identity, more taps blur more
    np.testing.assert_allclose(A.gaussian_blur(x, 2.0, kernel_size=1), x, atol=1e-6)
    assert _high_freq_energy(A.gaussian_blur(x, 2.0, kernel_size=5)) < _high_freq_energy(
        A.gaussian_blur(x, 2.0, kernel_size=3))
    with pytest.raises(ValueError, match="odd"):
        A.gaussian_blur(x, 1.0, kernel_size=4)
    # blur_corrupt: sigma drawn in the range; a range up to 0 leaves the images as they are
    y, sigma = A.blur_corrupt(jax.random.PRNGKey(0), x, (0.4, 0.6), kernel_size=3,
                              return_sigma=True)
    assert y.shape == x.shape and np.all((sigma >= 0.4) & (sigma <= 0.6))
    assert A.blur_corrupt(jax.random.PRNGKey(0), x, (0.0, 0.0)) is x
