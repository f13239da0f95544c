"""Per-stage training losses: finite, gradients reach every parameter, classifier-free-guidance
drop rates as configured, blurred upsampler conditioning, inpainting init from the decoder.

Uses the microscopic config tests/fixtures/micro.py (compiles dominate on CPU)."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import config as cfg_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.train import losses
from unclip_jax.train.cli import load_config
from unclip_jax.train.loop import SyntheticSource

MICRO = os.path.join(os.path.dirname(__file__), "fixtures", "micro.py")
B = 16


@functools.lru_cache(maxsize=None)
def _config():
    return load_config(MICRO, {})


def _randomize(params, key):
    """Perturb every leaf: at init, layers feeding zero-initialised convs get no gradient
    (documented in losses.py), which would hide a parameter that is never used."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                           for p, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _setup(stage):
    """(stage, randomised params, batch, jitted value_and_grad) for one stage."""
    c = _config()
    st = losses.build_stage(stage, c)
    params = _randomize(nn.meta.unbox(jax.jit(st.init)(jax.random.PRNGKey(0))),
                        jax.random.PRNGKey(1))
    src = SyntheticSource(B, 16, seed=3, embeddings=(8, 16, 8))
    batch = jax.tree.map(jnp.asarray, st.prepare(src.batch(0)))
    fn = jax.jit(jax.value_and_grad(st.make_loss(st.frozen), has_aux=True))
    return st, params, batch, fn


@pytest.mark.parametrize("stage", losses.STAGES)
def test_loss_finite_and_every_param_gets_gradient(stage):
    st, params, batch, fn = _setup(stage)
    # key 2 drops at least one CLIP embedding and one caption in this batch (asserted below),
    # so the null embeddings are trained too
    (loss, aux), grads = fn(params, batch, jax.random.PRNGKey(2))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.isfinite(float(v)) for v in aux.values())
    for k in ("drop_clip_frac", "drop_text_frac"):
        if k in aux:
            assert 0 < float(aux[k]) < 1, (k, float(aux[k]))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
    assert not dead, f"{stage}: parameters without gradient: {dead}"
    assert all(np.all(np.isfinite(np.asarray(g))) for _, g in flat)
    if stage in ("decoder", "inpaint"):
        assert "vb" in aux  # hybrid loss (learned sigma)
        # L = L_simple + 0.001 * N * L_vlb with N = 1000 timesteps
        np.testing.assert_allclose(float(loss), float(aux["mse"]) + float(aux["vb"]),
                                   rtol=1e-5)


@pytest.mark.parametrize("stage,expected", [
    ("prior", {"drop_text_frac": 0.1}),
    ("decoder", {"drop_clip_frac": 0.1, "drop_text_frac": 0.5}),
])
def test_cfg_drop_rates_follow_config(stage, expected):
    c = _config()
    assert c.diffusion.prior.cfg_drop_text == 0.1
    assert (c.diffusion.decoder.cfg_drop_clip, c.diffusion.decoder.cfg_drop_text) == (0.1, 0.5)
    st, params, batch, fn = _setup(stage)
    fracs = {k: [] for k in expected}
    for i in range(40):  # 40 x 16 = 640 draws: std of the rate <= 0.02
        _, aux = fn(params, batch, jax.random.PRNGKey(100 + i))[0]
        for k in expected:
            fracs[k].append(float(aux[k]))
    for k, p in expected.items():
        assert abs(np.mean(fracs[k]) - p) < 0.05, (k, np.mean(fracs[k]), p)


def test_sr_conditioning_is_cropped_downsampled_and_blurred():
    c = _config()
    s = losses.sr_settings(c)
    assert (s["high"], s["low"], s["crop"], s["factor"]) == (16, 8, 8, 2)
    rs = np.random.default_rng(0)
    images = jnp.asarray(rs.uniform(-1, 1, (32, 16, 16, 3)), jnp.float32)
    hi, lo, sigma = jax.jit(lambda k, x: losses.sr_conditioning(k, x, s))(
        jax.random.PRNGKey(0), images)
    assert hi.shape == (32, 8, 8, 3) and lo.shape == (32, 4, 4, 3)
    assert np.all((np.asarray(sigma) >= 0.4) & (np.asarray(sigma) <= 0.6))
    # the crop is a window of the image (random offsets on the 2-pixel grid)
    found = [any(np.array_equal(np.asarray(hi[i]), np.asarray(images[i, y:y + 8, x:x + 8]))
                 for y in range(0, 9, 2) for x in range(0, 9, 2)) for i in range(32)]
    assert all(found)
    plain = losses.resize_images(hi, 4)
    # blurred: less high-frequency energy than the plain downsample, same mean
    def hf(x):
        x = np.asarray(x)
        return np.mean(np.abs(np.diff(x, axis=1))) + np.mean(np.abs(np.diff(x, axis=2)))
    assert hf(lo) < 0.9 * hf(plain)
    np.testing.assert_allclose(np.mean(np.asarray(lo)), np.mean(np.asarray(plain)), atol=0.02)
    # sigma -> 0 is the identity; larger sigma blurs more
    x = images[:2, :8, :8]
    np.testing.assert_allclose(losses.gaussian_blur(x, jnp.zeros(2), 3), x, atol=1e-6)
    assert hf(losses.gaussian_blur(x, jnp.full(2, 2.0), 5)) < hf(
        losses.gaussian_blur(x, jnp.full(2, 0.5), 5))


def test_random_box_masks():
    m = np.asarray(losses.random_box_masks(jax.random.PRNGKey(0), 256, 16, 0.25, 0.75))
    assert m.shape == (256, 16, 16, 1) and set(np.unique(m)) <= {0.0, 1.0}
    hole = 1 - m.mean(axis=(1, 2, 3))
    assert hole.min() >= (4 * 4) / 256 - 1e-6 and hole.max() <= (12 * 12) / 256 + 1e-6


def test_inpaint_params_from_decoder_start_as_the_decoder():
    c = _config()
    dcfg = losses.cfg_lib.decoder_config(c)
    icfg = cfg_lib.inpaint_decoder_config(c)
    dec = _setup("decoder")[1]  # randomised decoder params
    inp = losses.inpaint_params_from_decoder(dec, unet_lib.abstract_params(icfg))
    k_dec, k_inp = dec["conv_in"]["kernel"], inp["conv_in"]["kernel"]
    assert k_inp.shape[2] == k_dec.shape[2] + 4
    np.testing.assert_array_equal(k_inp[:, :, :3], k_dec)
    assert not np.any(np.asarray(k_inp[:, :, 3:]))
    kw = unet_lib.dummy_inputs(dcfg, batch=2)
    rs = np.random.default_rng(0)
    x = jnp.asarray(rs.standard_normal((2, 8, 8, 3)), jnp.float32)
    kw.pop("x")
    kw["t"] = jnp.array([3, 500])
    kw["clip_emb"] = jnp.asarray(rs.standard_normal((2, 8)), jnp.float32)
    out_dec = jax.jit(lambda p, x, kw: unet_lib.UNet(dcfg).apply({"params": p}, x, **kw))(
        dec, x, kw)
    keep = jnp.asarray(rs.integers(0, 2, (2, 8, 8, 1)), jnp.float32)
    out_inp = jax.jit(lambda p, x, kw: unet_lib.UNet(icfg).apply({"params": p}, x, **kw))(
        inp, x, dict(kw, inpaint_image=x * 0.5, inpaint_mask=keep))
    np.testing.assert_allclose(out_inp, out_dec, rtol=1e-5, atol=1e-5)


def test_missing_embeddings_is_a_clear_error():
    loss_fn = losses.make_loss_fn("prior", _config())
    with pytest.raises(losses.MissingBatchKeyError, match="unclip embed"):
        loss_fn(None, {"image": np.zeros((2, 8, 8, 3))}, jax.random.PRNGKey(0))
