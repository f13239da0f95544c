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
from unclip_jax.data import augment
from unclip_jax.models import unet as unet_lib
from unclip_jax.train import losses
from unclip_jax.train.cli import load_config
from unclip_jax.train.loop import SyntheticSource, train_config

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
    np.testing.assert_allclose(augment.gaussian_blur(x, jnp.zeros(2), kernel_size=3), x,
                               atol=1e-6)
    assert hf(augment.gaussian_blur(x, jnp.full(2, 2.0), kernel_size=5)) < hf(
        augment.gaussian_blur(x, jnp.full(2, 0.5), kernel_size=5))


def _previous_sr_conditioning(rng, images, s):
    """The upsampler conditioning as train/losses.py computed it before it called
    data/augment.py (verbatim copy of its own blur and crop): the regression reference."""
    def kernels(sigma, size):
        r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
        w = jnp.exp(-0.5 * (r[None] / jnp.maximum(sigma[:, None], 1e-3)) ** 2)
        return w / jnp.sum(w, axis=-1, keepdims=True)

    def blur(x, sigma, size):
        k = kernels(sigma, size)
        p = size // 2
        h, w = x.shape[1], x.shape[2]
        xp = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0)), mode="reflect")
        x = sum(k[:, i, None, None, None] * xp[:, i:i + h] for i in range(size))
        xp = jnp.pad(x, ((0, 0), (0, 0), (p, p), (0, 0)), mode="reflect")
        return sum(k[:, i, None, None, None] * xp[:, :, i:i + w] for i in range(size))

    def crops(rng, x, crop, align):
        b, h, w, c = x.shape
        ky, kx = jax.random.split(rng)
        oy = jax.random.randint(ky, (b,), 0, (h - crop) // align + 1) * align
        ox = jax.random.randint(kx, (b,), 0, (w - crop) // align + 1) * align
        return jax.vmap(lambda im, y, xx: jax.lax.dynamic_slice(im, (y, xx, 0),
                                                                (crop, crop, c)))(x, oy, ox)

    k_crop, k_sig = jax.random.split(rng)
    hi = crops(k_crop, losses.resize_images(images, s["high"]), s["crop"], s["factor"])
    lo = losses.resize_images(hi, s["crop"] // s["factor"])
    smin, smax = s["blur_sigma"]
    sigma = jax.random.uniform(k_sig, (hi.shape[0],), minval=smin, maxval=smax)
    return hi, blur(lo, sigma, s["blur_kernel"]), sigma


@pytest.mark.parametrize("kernel", [3, 5])
def test_sr_blur_conditioning_is_augments_and_unchanged(kernel):
    """The default ('blur') conditioning is made by data/augment.py's crop and blur, and gives
    exactly what the previous in-losses implementation gave (shipped configs: same training)."""
    s = dict(losses.sr_settings(_config()), blur_kernel=kernel)
    assert s["corruption"] == "blur" and s["resized_crop"] is None
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
    key = jax.random.PRNGKey(7)
    hi, lo, sigma = jax.jit(lambda k, x: losses.sr_conditioning(k, x, s))(key, images)
    k_crop, k_sig = jax.random.split(key)
    want_hi = augment.random_crop(k_crop, images, 8, align=2)
    want_lo, want_sigma = augment.blur_corrupt(k_sig, losses.resize_images(want_hi, 4),
                                               (0.4, 0.6), kernel_size=kernel, return_sigma=True)
    for got, want in ((hi, want_hi), (lo, want_lo), (sigma, want_sigma)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    old = jax.jit(lambda k, x: _previous_sr_conditioning(k, x, s))(key, images)
    for got, want in zip((hi, lo, sigma), old):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _with(config, stage, **kw):
    c = config.copy_and_resolve_references()
    with c.train[stage].unlocked():
        for k, v in kw.items():
            c.train[stage][k] = v
    return c


def test_sr_bsr_corruption_is_made_on_the_host():
    c = _with(_config(), "sr", corruption=("bsr",))
    assert list(train_config(c, "sr").extra["corruption"]) == ["bsr"]  # a known key
    s = losses.sr_settings(c)
    assert s["corruption"] == "bsr"
    from unclip_jax.parallel.plan import train_batch_shapes  # `unclip plan` feeds low_res too

    assert train_batch_shapes(c, "sr", 4)["low_res"].shape == (4, 8, 8, 3)
    st = losses.build_stage("sr", c)
    host = SyntheticSource(B, 16, seed=3).batch(0)
    batch = st.prepare(host)
    assert batch["image"].shape == (B, 16, 16, 3)
    assert batch["low_res"].shape == (B, 8, 8, 3) and batch["low_res"].dtype == np.float32
    # augment's BSR-lite, from a host rng that is a function of the batch (resume-exact)
    want = augment.bsr_degrade_batch(losses._content_rng(0, host["image"]), host["image"], 8)
    np.testing.assert_array_equal(batch["low_res"], want)
    np.testing.assert_array_equal(st.prepare(host)["low_res"], batch["low_res"])
    assert not np.array_equal(st.prepare(SyntheticSource(B, 16, seed=4).batch(0))["low_res"],
                              batch["low_res"])
    plain = np.asarray(losses.resize_images(jnp.asarray(host["image"]), 8))
    assert np.mean(np.abs(batch["low_res"] - plain)) > 0.02  # degraded, not just downsampled
    # in-graph: aligned crops of the image and of its degraded low-res version
    hi, lo, sigma = jax.jit(lambda k, x, l: losses.sr_conditioning(k, x, s, l))(
        jax.random.PRNGKey(0), batch["image"], batch["low_res"])
    assert hi.shape == (B, 8, 8, 3) and lo.shape == (B, 4, 4, 3) and sigma is None
    for i in range(B):
        y, x = [(y, x) for y in range(0, 9, 2) for x in range(0, 9, 2)
                if np.array_equal(hi[i], batch["image"][i, y:y + 8, x:x + 8])][0]
        np.testing.assert_array_equal(lo[i], batch["low_res"][i, y // 2:y // 2 + 4,
                                                              x // 2:x // 2 + 4])
    # the loss trains on it: other conditioning than blur, same params and rng
    _, params, blur_batch, blur_fn = _setup("sr")
    fn = jax.jit(st.make_loss(st.frozen))
    loss, aux = fn(params, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(2))
    blur_loss, blur_aux = blur_fn(params, blur_batch, jax.random.PRNGKey(2))[0]
    assert np.isfinite(float(loss)) and "blur_sigma" not in aux and "blur_sigma" in blur_aux
    assert abs(float(loss) - float(blur_loss)) > 1e-6
    with pytest.raises(losses.MissingBatchKeyError, match="low_res"):
        losses.make_loss_fn("sr", c)(params, {"image": batch["image"]}, jax.random.PRNGKey(0))
    # one name per upsampler index, checked
    with pytest.raises(cfg_lib.ConfigError, match="one per upsampler"):
        losses.sr_settings(_with(_config(), "sr", corruption=("blur", "bsr")))
    with pytest.raises(cfg_lib.ConfigError, match="choose one of"):
        losses.sr_settings(_with(_config(), "sr", corruption="jpeg"))
    with pytest.raises(cfg_lib.ConfigError, match="train.sr.bsr"):
        losses.sr_settings(_with(c, "sr", bsr=dict(noise=1)))


def test_paper_config_degrades_the_second_upsamplers_input_with_bsr():
    paper = load_config(os.path.join(os.path.dirname(MICRO), "..", "..", "experiments",
                                     "paper.py"), {})
    assert [losses.sr_settings(paper, i)["corruption"] for i in (0, 1)] == ["blur", "bsr"]
    for name in ("emoji", "emoji16", "tiny", "karlo"):  # shipped configs: blur, no crop
        c = load_config(os.path.join(os.path.dirname(MICRO), "..", "..", "experiments",
                                     f"{name}.py"), {})
        assert {losses.sr_settings(c, i)["corruption"]
                for i in range(len(cfg_lib.sr_configs(c)))} == {"blur"}
        assert all(losses.resized_crop_settings(c, st) is None
                   for st in losses.RESIZED_CROP_STAGES)


def test_resized_crop_of_training_images(monkeypatch):
    """train.<stage>.resized_crop_scale turns on augment.random_resized_crop (off by default)."""
    calls = []
    real = augment.random_resized_crop

    def spy(rng, images, out_size=None, **kw):
        calls.append((images.shape, out_size, kw))
        return real(rng, images, out_size, **kw)

    monkeypatch.setattr(augment, "random_resized_crop", spy)
    st, params, batch, default_fn = _setup("decoder")
    c = _with(_config(), "decoder", resized_crop_scale=(0.5, 0.9))
    assert "resized_crop_scale" in train_config(c, "decoder").extra
    fn = jax.jit(losses.make_loss_fn("decoder", c))
    loss, _ = fn(params, batch, jax.random.PRNGKey(2))
    assert calls == [((B, 16, 16, 3), 8, {"scale": (0.5, 0.9), "ratio": augment.CROP_RATIO})]
    base, _ = default_fn(params, batch, jax.random.PRNGKey(2))[0]
    assert np.isfinite(float(loss)) and abs(float(loss) - float(base)) > 1e-6
    # the images it trains on are augment's crop at the model size
    key = jax.random.PRNGKey(3)
    crop = losses.resized_crop_settings(c, "decoder")
    np.testing.assert_array_equal(losses.train_images(batch["image"], 8, crop, key),
                                  real(key, batch["image"], 8, scale=(0.5, 0.9),
                                       ratio=augment.CROP_RATIO))
    calls.clear()
    jax.jit(losses.make_loss_fn("decoder", _config()))(params, batch, jax.random.PRNGKey(2))
    assert calls == []  # default: off
    with pytest.raises(cfg_lib.ConfigError, match="resized_crop_scale"):
        losses.resized_crop_settings(_with(_config(), "clip", resized_crop_scale=(0.5, 1.5)),
                                     "clip")
    with pytest.raises(cfg_lib.ConfigError, match="corruption='bsr'"):
        losses.sr_settings(_with(_config(), "sr", corruption="bsr",
                                 resized_crop_scale=(0.5, 1.0)))


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
