"""Pipelines on the tiny random unCLIP (experiments/tiny.py): text -> image (diffusion and AR
prior), variations, interpolation, text diffs, inpainting, PCA strips, ablation and probes.

The model is built once per test session (shared with tests/test_cli_commands.py through the
CLI's in-process model cache); every sampler runs 2 steps.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import cli
from unclip_jax.pipelines import inpaint as inpaint_lib
from unclip_jax.pipelines import interpolate as interp_lib
from unclip_jax.pipelines import model as model_lib
from unclip_jax.pipelines import pca as pca_lib
from unclip_jax.pipelines import probes, stages, text_diff, text_to_image, variations

STEPS = dict(decoder_steps=2, sr_steps=2)


@pytest.fixture(scope="module")
def model():
    return cli.load_model("random:tiny")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)


def test_slerp_endpoints_norm_and_parallel():
    a = jnp.asarray([[3.0, 0.0, 0.0]])
    b = jnp.asarray([[0.0, 3.0, 0.0]])
    z = stages.slerp(a, b, jnp.linspace(0, 1, 5))
    assert (z[0] == a[0]).all() and (z[-1] == b[0]).all()
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 3.0, rtol=1e-6)
    np.testing.assert_allclose(z[2], [3 / np.sqrt(2), 3 / np.sqrt(2), 0], rtol=1e-6)
    same = stages.slerp(a, 2 * a, 0.5)  # parallel: falls back to lerp, no NaN
    np.testing.assert_allclose(same, 1.5 * a, rtol=1e-6)


def test_text_to_image_diffusion_and_ar_prior_seeded(model):
    k0, k1 = jax.random.key(0), jax.random.key(1)
    run = lambda k, **kw: text_to_image.text_to_image(  # noqa: E731
        model, ["a red heart"], k, num_per_prompt=2, prior_steps=2, **STEPS, **kw)
    a, b, c = run(k0), run(k0), run(k1)
    assert a["images"].shape == (2, model.output_size, model.output_size, 3)
    assert a["decoder"].shape == (2, model.decoder_size, model.decoder_size, 3)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.allclose(a["images"], c["images"])
    ar = run(k0, prior="ar")
    assert ar["image_emb"].shape == a["image_emb"].shape
    assert np.isfinite(np.asarray(ar["images"])).all()
    early = run(k0, stop_after="prior")
    assert set(early) == {"image_emb"}


def test_decoder_candidates_keep_the_one_closest_to_the_caption(model):
    """decoder num_candidates K: the K samples per row are exactly what the decoder draws for
    the rows repeated K times; the kept one is each row's argmax of the model's own CLIP
    cosine with the caption, and only the kept ones reach the upsampler."""
    key = jax.random.key(3)
    text = stages.encode_text(model, ["a red heart", "a cat"])
    emb = jax.random.normal(jax.random.key(4), (2, model.clip_config.projection_dim))
    k = 3
    out = stages.decode_and_upsample(model, key, emb, text, num_candidates=k, **STEPS)
    k_dec, _ = jax.random.split(key)
    rep = lambda a: jnp.repeat(a, k, axis=0)  # noqa: E731
    cands = stages.sample_decoder(model, k_dec, rep(emb), stages.TextCondition(
        *(rep(a) for a in text)), steps=2)
    from unclip_jax.utils.images import to_uint8

    img = np.array(stages.embed_images(model, to_uint8(jax.device_get(cands))))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt = np.asarray(text.emb) / np.linalg.norm(np.asarray(text.emb), axis=-1, keepdims=True)
    sim = np.einsum("bkd,bd->bk", img.reshape(2, k, -1), txt)
    best = sim.argmax(1)
    assert len(set(sim.round(6).ravel())) > 2  # the candidates differ
    want = np.asarray(cands).reshape((2, k) + cands.shape[1:])[np.arange(2), best]
    np.testing.assert_allclose(np.asarray(out["decoder"]), want, atol=1e-6)
    assert out["images"].shape == (2, model.output_size, model.output_size, 3)
    one = stages.decode_and_upsample(model, key, emb, text, **STEPS)
    one_k1 = stages.decode_and_upsample(model, key, emb, text, num_candidates=1, **STEPS)
    np.testing.assert_array_equal(np.asarray(one["images"]), np.asarray(one_k1["images"]))
    with pytest.raises(ValueError, match="caption"):
        stages.decode_and_upsample(model, key, emb, None, num_candidates=2, **STEPS)
    with pytest.raises(ValueError, match=">= 1"):
        stages.decoder_candidates(model, 0)


def test_ar_prior_embeddings_lie_in_the_pca_span(model):
    text = stages.encode_text(model, ["a cat", "a dog"])
    z = stages.sample_ar_prior(model, jax.random.key(0), text, num_candidates=2)
    pca, quant, _ = model.ar_components()
    coeffs = (z - pca.mean) @ pca.basis
    np.testing.assert_allclose(pca.mean + coeffs @ pca.basis.T, z, atol=1e-5)
    centers = np.asarray(quant.centers)
    for d in range(coeffs.shape[1]):  # each coefficient is a bucket centre
        assert np.min(np.abs(centers[d][None] - np.asarray(coeffs[:, d])[:, None]), 1).max() < 1e-5


def test_variations_seeded_and_inverted(model, images):
    k = jax.random.key(3)
    a = variations.variations(model, images[0], k, num=2, **STEPS)
    b = variations.variations(model, images[0], k, num=2, **STEPS)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["images"].shape == (2, model.output_size, model.output_size, 3)
    z = stages.embed_images(model, images[:1])
    np.testing.assert_array_equal(a["image_emb"], jnp.repeat(z, 2, 0))
    inv = variations.variations(model, images[0], k, num=2, invert=True, **STEPS)
    assert inv["x_T"].shape == (2, model.decoder_size, model.decoder_size, 3)
    assert not np.allclose(inv["images"][0], inv["images"][1])  # eta > 0: they vary


def test_interpolation_endpoints_are_the_input_embeddings(model, images):
    out = interp_lib.interpolate(model, images[0], images[1], jax.random.key(0), frames=3,
                                 **STEPS)
    z = stages.embed_images(model, [images[0], images[1]])
    np.testing.assert_array_equal(out["image_emb"][0], z[0])
    np.testing.assert_array_equal(out["image_emb"][-1], z[1])
    assert (out["x_T"] == out["x_T"][:1]).all()  # decoder noise fixed
    assert out["images"].shape == (3, model.output_size, model.output_size, 3)


def test_textdiff_theta_zero_is_the_plain_variation(model, images):
    out = text_diff.text_diff(model, images[0], "a photo of a cat", "an anime drawing of a cat",
                              jax.random.key(5), frames=3, stop_after="decoder", **STEPS)
    np.testing.assert_allclose(out["theta"], [0, 0.25, 0.5])
    z_i = stages.embed_images(model, images[:1])[0]
    np.testing.assert_array_equal(out["image_emb"][0], z_i)
    var = variations.variations(model, images[0], jax.random.key(9), num=1, sampler="ddim",
                                eta=0.0, x_T=out["x_T"][:1], stop_after="decoder", **STEPS)
    np.testing.assert_allclose(out["decoder"][0], var["decoder"][0], atol=1e-5)
    assert not np.allclose(out["image_emb"][0], out["image_emb"][-1])


def test_inpaint_keeps_every_pixel_outside_the_mask(model, images):
    mask = np.zeros((40, 40), bool)
    mask[8:20, 5:30] = True
    for kw in (dict(feather=3, keep_style=0.4), dict(jumps=1)):
        out = inpaint_lib.inpaint(model, images[0], mask, "a flamingo", jax.random.key(0),
                                  num=2, prior_steps=2, **STEPS, **kw)
        assert out["images"].shape == (2, 40, 40, 3) and out["images"].dtype == np.uint8
        np.testing.assert_array_equal(out["images"][:, ~mask], np.broadcast_to(
            images[0][~mask], (2,) + images[0][~mask].shape))
        assert (out["images"][:, mask] != images[0][mask]).any()


def test_feather_alpha_and_mask_resize():
    m = np.zeros((12, 12), bool)
    m[2:10, 2:10] = True
    a = inpaint_lib.feather_alpha(m, 3)
    assert (a[~m] == 0).all() and a[2, 2] == pytest.approx(1 / 3) and a[5, 5] == 1
    tiny = np.zeros((40, 40), bool)
    tiny[0, 0] = True  # one pixel still marks its cell after downsizing
    small = inpaint_lib.resize_mask(tiny, 4)
    assert small[0, 0] == 1 and small.sum() == 1


def test_pca_all_dims_reconstructs_and_files_round_trip(model, images, tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((48, 32)) * np.linspace(2, 0.1, 32)
    basis = pca_lib.fit_basis(emb)
    assert basis.num_components == 32
    path = model_lib.save_pca(basis, str(tmp_path / "b.npz"))
    basis = model_lib.load_pca(path)
    z = stages.embed_images(model, images[:1])[0]
    rec = pca_lib.reconstruct_dims(basis, z, [1, 8, 32])
    np.testing.assert_allclose(rec[-1], z, atol=1e-5)
    assert float(jnp.abs(rec[0] - z).max()) > 1e-3
    out = pca_lib.pca_strip(model, images[0], basis, [1, 8, 32], jax.random.key(0), **STEPS)
    assert out["images"].shape == (3, model.output_size, model.output_size, 3)
    assert pca_lib.default_dims(32) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(model_lib.BasisFileError):
        model_lib.load_pca(str(tmp_path / "missing.npz"))


def test_ablation_rows_share_noise(model):
    out = text_to_image.conditioning_ablation(model, "a cat", jax.random.key(0), num=2,
                                              prior_steps=2, **STEPS)
    assert out["images"].shape == (6, model.output_size, model.output_size, 3)
    assert len(out["rows"]) == 3
    assert np.isfinite(np.asarray(out["images"])).all()
    # (random weights barely react to the conditioning, so the rows are not compared)


def test_probe_probabilities_and_panel(model, images):
    labels = ["an apple", "an iPod", "a pizza"]
    out = probes.probe(model, images[0], labels, jax.random.key(0), num=2, **STEPS)
    assert out["probs"].shape == (3,) and out["probs"].sum() == pytest.approx(1, abs=1e-5)
    assert out["variation_probs"].shape == (2, 3)
    panel = out["panel"]
    assert panel.dtype == np.uint8 and panel.shape[0] >= model.output_size
    chart = probes.bar_chart(labels, out["probs"], 60)
    assert chart.shape[0] == 60 and (chart != 255).any()


def test_model_dir_round_trip_keeps_ar_prior_and_pca(model, tmp_path):
    basis = pca_lib.fit_basis(np.random.default_rng(0).standard_normal((40, 32)))
    m = model_lib.UnCLIP(model.config, model.params, random_weights=True, pca=basis)
    path = model_lib.save(m, str(tmp_path / "m"))
    back = model_lib.load(path)
    assert back.has_ar_prior and back.pca is not None
    for a, b in zip(jax.tree_util.tree_leaves(model.params["ar_prior"]),
                    jax.tree_util.tree_leaves(back.params["ar_prior"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.pca.basis, basis.basis)


def test_inpainting_decoder_gets_image_and_keep_mask(model, images):
    """A model whose decoder takes [x_t, image * keep, keep] is fed source and mask (no
    replacement sampling). The paste-back property is tested above."""
    import copy

    from unclip_jax import config as cfg_lib
    from unclip_jax.models import unet as unet_lib

    config = copy.deepcopy(model.config)
    config.decoder.inpaint = True
    dec_cfg = cfg_lib.decoder_config(config)
    params = dict(model.params)
    params["decoder"] = nn.meta.unbox(jax.jit(
        lambda k: unet_lib.init_unet(dec_cfg, k)["params"])(jax.random.key(0)))
    m = model_lib.UnCLIP(config, params, random_weights=True)
    s = m.decoder_size
    src = stages.decoder_pixels(m, images[:1])
    keep = jnp.zeros((1, s, s, 1)).at[:, : s // 2].set(1.0)
    kw = stages.decoder_kwargs(m, jnp.ones((1, 32)), stages.empty_text(m, 1), 1.0,
                               inpaint_image=src, inpaint_mask=keep)
    assert kw["inpaint_image"].shape == (2, s, s, 3) and kw["inpaint_mask"].shape == (2, s, s, 1)
    x = stages.sample_decoder(m, jax.random.key(0), jnp.ones((1, 32)), stages.empty_text(m, 1),
                              steps=1, source=src, mask=keep)
    assert x.shape == (1, s, s, 3) and np.isfinite(np.asarray(x)).all()


def _with_inpaint_decoder(model):
    from unclip_jax import config as cfg_lib
    from unclip_jax.models import unet as unet_lib

    icfg = cfg_lib.inpaint_decoder_config(model.config)
    params = dict(model.params)
    params["inpaint"] = nn.meta.unbox(jax.jit(
        lambda k: unet_lib.init_unet(icfg, k)["params"])(jax.random.key(3)))
    return model_lib.UnCLIP(model.config, params, random_weights=True)


def test_separate_inpainting_decoder_is_used_for_inpainting_only(model, images):
    """A model with params['inpaint'] samples masked regions with that UNet, exactly as a model
    whose decoder *is* that inpainting UNet; plain sampling still uses the plain decoder."""
    import copy

    m = _with_inpaint_decoder(model)
    assert m.has_inpaint_decoder and not model.has_inpaint_decoder
    config = copy.deepcopy(model.config)
    config.decoder.inpaint = True
    only = model_lib.UnCLIP(config, dict(model.params, decoder=m.params["inpaint"]),
                            random_weights=True)
    s = m.decoder_size
    src = stages.decoder_pixels(m, images[:1])
    keep = jnp.zeros((1, s, s, 1)).at[:, : s // 2].set(1.0)
    z, text = jnp.ones((1, 32)), stages.empty_text(m, 1)
    run = lambda mm, **kw: np.asarray(stages.sample_decoder(  # noqa: E731
        mm, jax.random.key(0), z, text, steps=2, **kw))
    np.testing.assert_array_equal(run(m, source=src, mask=keep), run(only, source=src, mask=keep))
    replaced = run(m, source=src, mask=keep, inpaint_decoder=False)
    np.testing.assert_array_equal(replaced, run(model, source=src, mask=keep))
    assert not np.allclose(replaced, run(m, source=src, mask=keep))
    np.testing.assert_array_equal(run(m), run(model))
    with pytest.raises(ValueError, match="no inpainting decoder"):
        run(model, source=src, mask=keep, inpaint_decoder=True)


def test_model_dir_bf16_storage_with_inpaint_decoder(model, tmp_path):
    """bfloat16 storage halves the dir, loads as float32 equal to the bf16-rounded weights
    (prior buffers and AR prior tables exact), and keeps the inpainting decoder."""
    import os

    m = _with_inpaint_decoder(model)
    full = model_lib.save(m, str(tmp_path / "f32"))
    half = model_lib.save(m, str(tmp_path / "bf16"), storage_dtype="bfloat16")
    size = lambda p: sum(os.path.getsize(os.path.join(d, f))  # noqa: E731
                         for d, _, fs in os.walk(os.path.join(p, "params")) for f in fs)
    assert size(half) < 0.6 * size(full)
    back = model_lib.load(half)
    assert back.has_inpaint_decoder and model_lib.read_meta(half)["storage_dtype"] == "bfloat16"
    for stage in ("decoder", "inpaint", "clip"):
        for a, b in zip(jax.tree.leaves(m.params[stage]), jax.tree.leaves(back.params[stage])):
            assert b.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), b)
    for key in ("ar_prior",):
        for a, b in zip(jax.tree.leaves(m.params[key]), jax.tree.leaves(back.params[key])):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(m.params["prior"]["buffers"]),
                    jax.tree.leaves(back.params["prior"]["buffers"])):
        np.testing.assert_array_equal(a, b)
    f32 = model_lib.load(full)
    for a, b in zip(jax.tree.leaves(m.params["inpaint"]), jax.tree.leaves(f32.params["inpaint"])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="storage_dtype"):
        model_lib.save(m, str(tmp_path / "bad"), storage_dtype="float16")
