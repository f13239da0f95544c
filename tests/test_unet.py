"""ADM / GLIDE UNet and decoder conditioning: shapes, cfg null conditions, caption padding,
overfitting, bf16, logical axis names, and parameter counts against Karlo / diffusers."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.diffusion.gaussian import create_gaussian_diffusion, q_sample
from unclip_jax.models import unet as U
from unclip_jax.models.conditioning import draw_cfg_drop_masks
from unclip_jax.parallel.rules import KNOWN_LOGICAL_NAMES

B = 2


def random_params(cfg, seed=0):
    """Random parameters of ``UNet(cfg)`` filled on the host (no init compile: XLA CPU takes tens
    of seconds to compile a UNet's ``init``). Kernels ~ N(0, 1/fan_in), norm scales ~ 1, biases
    and the zero-initialised output layers non-zero, so no layer hides a bug behind zeros."""
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(U.abstract_params(cfg))

    def fill(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        shape = leaf.shape
        if name == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "bias":
            v = 0.1 * rng.standard_normal(shape)
        elif name == "kernel":
            v = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
        else:  # null embedding, token / position tables
            v = rng.standard_normal(shape)
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def decoder_inputs(cfg, key, batch=B):
    ks = jax.random.split(key, 6)
    n, L = cfg.image_size, cfg.text_ctx
    return dict(
        x=jax.random.normal(ks[0], (batch, n, n, cfg.in_channels)),
        t=jax.random.randint(ks[1], (batch,), 0, 1000),
        clip_emb=jax.random.normal(ks[2], (batch, cfg.clip_dim)),
        text_states=jax.random.normal(ks[3], (batch, L, cfg.text_states_dim)),
        text_emb=jax.random.normal(ks[4], (batch, cfg.text_emb_dim)),
        text_mask=jnp.arange(L)[None, :] < jnp.array([3, L - 2])[:batch, None],
        drop_clip=jnp.zeros((batch,), bool),
        drop_text=jnp.zeros((batch,), bool),
    )


@functools.lru_cache(maxsize=None)
def _decoder():
    cfg = U.tiny_config()
    params = random_params(cfg)
    fwd = jax.jit(lambda p, x, t, **kw: U.UNet(cfg).apply({"params": p}, x, t, **kw))
    return cfg, params, fwd


@pytest.fixture(scope="module")
def decoder():
    return _decoder()


def test_decoder_shapes_and_dtype(decoder):
    cfg, params, fwd = decoder
    kw = decoder_inputs(cfg, jax.random.key(3))
    out = fwd(params, **kw)
    assert out.shape == (B, 16, 16, 6) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    # conditioning matters
    out2 = fwd(params, **{**kw, "clip_emb": kw["clip_emb"] + 1.0})
    assert float(jnp.abs(out2 - out).max()) > 1e-4


def test_drop_clip_selects_null_embedding(decoder):
    cfg, params, fwd = decoder
    kw = decoder_inputs(cfg, jax.random.key(4))
    drop = jnp.array([True, False])
    null = params["clip_cond"]["null_emb"]
    out_drop = fwd(params, **{**kw, "drop_clip": drop})
    replaced = jnp.where(drop[:, None], null[None], kw["clip_emb"])
    out_ref = fwd(params, **{**kw, "clip_emb": replaced})
    np.testing.assert_allclose(out_drop, out_ref, atol=1e-6)
    out_keep = fwd(params, **kw)
    assert float(jnp.abs(out_keep[0] - out_drop[0]).max()) > 1e-4  # row 0 changed
    np.testing.assert_allclose(out_keep[1], out_drop[1], atol=1e-6)  # row 1 untouched


def test_drop_text_is_empty_caption(decoder):
    cfg, params, fwd = decoder
    kw = decoder_inputs(cfg, jax.random.key(5))
    drop = jnp.array([False, True])
    out_drop = fwd(params, **{**kw, "drop_text": drop})
    empty = dict(text_mask=kw["text_mask"] & ~drop[:, None],
                 text_emb=jnp.where(drop[:, None], 0.0, kw["text_emb"]),
                 # the dropped caption's states are then irrelevant
                 text_states=kw["text_states"].at[1].set(7.0))
    out_ref = fwd(params, **{**kw, **empty})
    np.testing.assert_allclose(out_drop, out_ref, atol=1e-6)
    np.testing.assert_allclose(fwd(params, **kw)[0], out_drop[0], atol=1e-6)


def test_padded_caption_tokens_do_not_matter(decoder):
    cfg, params, fwd = decoder
    kw = decoder_inputs(cfg, jax.random.key(6))
    noise = 10.0 * jax.random.normal(jax.random.key(7), kw["text_states"].shape)
    states = jnp.where(kw["text_mask"][..., None], kw["text_states"], noise)
    out_a = fwd(params, **kw)
    out_b = fwd(params, **{**kw, "text_states": states})
    np.testing.assert_allclose(out_a, out_b, atol=1e-6)
    # ... while an unmasked token does
    out_c = fwd(params, **{**kw, "text_states": kw["text_states"].at[:, 0].add(1.0)})
    assert float(jnp.abs(out_c - out_a).max()) > 1e-4


def test_bf16_forward_close_to_fp32(decoder):
    cfg, params, fwd = decoder
    kw = decoder_inputs(cfg, jax.random.key(8))
    out32 = fwd(params, **kw)
    cfg16 = cfg.replace(dtype=jnp.bfloat16)
    out16 = jax.jit(lambda p, x, t, **k: U.UNet(cfg16).apply({"params": p}, x, t, **k))(
        params, **kw)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05, rel


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_attention_impls_match_einsum(impl):
    """jax.nn.dot_product_attention (what 'cudnn' runs fused on a GPU) gives our einsum
    attention's output, with a key-padding mask, in fp32 and bf16."""
    from unclip_jax.models.layers import dot_product_attention

    ks = jax.random.split(jax.random.key(11), 3)
    q = jax.random.normal(ks[0], (2, 16, 4, 8))
    k = jax.random.normal(ks[1], (2, 20, 4, 8))
    v = jax.random.normal(ks[2], (2, 20, 4, 8))
    mask = (jnp.arange(20)[None, :] < jnp.array([5, 20])[:, None])[:, None, None, :]
    ref = dot_product_attention(q, k, v, mask=mask)
    got = dot_product_attention(q, k, v, mask=mask, impl=impl)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # the mask is honoured: masked keys of row 0 do not matter
    v2 = v.at[0, 5:].add(100.0)
    np.testing.assert_allclose(dot_product_attention(q, k, v2, mask=mask, impl=impl)[0],
                               ref[0], atol=1e-4)
    b16 = dot_product_attention(q, k, v, mask=mask, dtype=jnp.bfloat16, impl=impl)
    assert b16.dtype == jnp.bfloat16
    np.testing.assert_allclose(b16.astype(jnp.float32), ref, atol=0.05)


def test_unet_attention_impl_xla_matches_einsum(decoder):
    cfg, params, fwd = decoder
    kw = decoder_inputs(cfg, jax.random.key(12))
    cfg_x = cfg.replace(attention_impl="xla")
    out = jax.jit(lambda p, x, t, **k: U.UNet(cfg_x).apply({"params": p}, x, t, **k))(
        params, **kw)
    np.testing.assert_allclose(out, fwd(params, **kw), atol=1e-4)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        cfg.replace(attention_impl="flash")


def variant_config(variant):
    if variant == "inpaint":
        return U.tiny_config(inpaint=True, learn_sigma=False)
    if variant == "upsampler":  # Karlo-SR-like: no attention, no text, no scale-shift
        return U.tiny_config(clip_dim=0, text_encoder="none", context_dim=0, low_res_cond=True,
                             attention_resolutions=(), use_middle_attention=False,
                             learn_sigma=False, use_scale_shift_norm=False,
                             low_res_resize_method="bicubic")
    assert variant == "glide_text"  # paper-style caption transformer
    return U.tiny_config(text_encoder="transformer", vocab_size=64, xf_layers=1, xf_heads=2)


@pytest.mark.parametrize("variant", ["inpaint", "upsampler", "glide_text"])
def test_variant_shapes(variant):
    cfg = variant_config(variant)
    assert cfg.conv_in_channels == {"inpaint": 7, "upsampler": 6, "glide_text": 3}[variant]
    kw = U.dummy_inputs(cfg, B)
    kw["x"] = jax.random.normal(jax.random.key(0), kw["x"].shape)
    if variant == "upsampler":
        assert kw["low_res"].shape == (B, 4, 4, 3)  # resized to 16x16 inside
    x, t = kw.pop("x"), kw.pop("t")
    params = random_params(cfg)
    assert params["conv_in"]["kernel"].shape == (3, 3, cfg.conv_in_channels, cfg.model_channels)
    out = jax.jit(lambda p, x, t, k: U.UNet(cfg).apply({"params": p}, x, t, **k))(
        params, x, t, kw)
    assert out.shape == (B, 16, 16, cfg.output_channels) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_init_zero_output():
    """The real init: output convs are zero (guided-diffusion), so the model starts at 0."""
    cfg = variant_config("upsampler")
    kw = U.dummy_inputs(cfg, B)
    x, t = kw.pop("x"), kw.pop("t")
    model = U.UNet(cfg)
    # the 'rbg' PRNG compiles much faster on CPU than threefry
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t, **kw)["params"]
    params = nn.meta.unbox(params)
    assert not np.any(np.asarray(params["out_conv"]["kernel"]))
    assert not np.any(np.asarray(params["input_blocks_1_res"]["out_conv"]["kernel"]))
    assert np.any(np.asarray(params["input_blocks_1_res"]["in_conv"]["kernel"]))
    out = model.apply({"params": params}, x, t, **kw)
    assert not np.any(np.asarray(out))


def test_dropout_only_in_training(decoder):
    cfg, params, _ = decoder
    cfg = cfg.replace(dropout=0.5)
    kw = decoder_inputs(cfg, jax.random.key(9))
    fwd = jax.jit(lambda p, k, key, **kw: U.UNet(cfg).apply(
        {"params": p}, *k, **kw, train=True, rngs={"dropout": key}))
    x, t = kw.pop("x"), kw.pop("t")
    a = fwd(params, (x, t), jax.random.key(0), **kw)
    b = fwd(params, (x, t), jax.random.key(0), **kw)
    c = fwd(params, (x, t), jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3


def test_cfg_drop_masks():
    drop_clip, drop_text = draw_cfg_drop_masks(jax.random.key(0), 20000, 0.1, 0.5)
    assert drop_clip.dtype == jnp.bool_ and drop_clip.shape == (20000,)
    assert abs(float(drop_clip.mean()) - 0.1) < 0.01
    assert abs(float(drop_text.mean()) - 0.5) < 0.02
    # independent
    assert abs(float((drop_clip & drop_text).mean()) - 0.05) < 0.01


def assert_logical_names(boxed):
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert all(n in KNOWN_LOGICAL_NAMES for n in leaf.names), leaf.names


@pytest.mark.parametrize("variant", ["inpaint", "upsampler", "glide_text"])
def test_every_param_has_logical_axis_names(variant):
    assert_logical_names(U.abstract_params(variant_config(variant)))


def test_unet_overfits_one_batch():
    """eps-MSE on one fixed batch (fixed t and noise) falls by 10x within a few hundred steps."""
    cfg = U.tiny_config(image_size=8, channel_mult=(1, 2), attention_resolutions=(4,),
                        learn_sigma=False)
    ks = jax.random.split(jax.random.key(0), 6)
    n = cfg.image_size
    x0 = jnp.tanh(jax.random.normal(ks[0], (4, n, n, 3)))
    eps = jax.random.normal(ks[1], x0.shape)
    t = jnp.array([50, 300, 600, 900])
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    x_t = q_sample(diffusion, x0, t, eps)
    cond = dict(clip_emb=jax.random.normal(ks[2], (4, cfg.clip_dim)),
                text_states=jax.random.normal(ks[3], (4, cfg.text_ctx, cfg.text_states_dim)),
                text_emb=jax.random.normal(ks[4], (4, cfg.text_emb_dim)),
                text_mask=jnp.ones((4, cfg.text_ctx), bool))
    model = U.UNet(cfg)
    params = random_params(cfg)
    tx = optax.adam(2e-3)
    opt_state = tx.init(params)

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x_t, t, **cond) - eps) ** 2)

    @jax.jit
    def steps(p, s):
        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            upd, s = tx.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss
        (p, s), losses = jax.lax.scan(body, (p, s), None, length=25)
        return p, s, losses

    first = last = None
    for _ in range(12):  # at most 300 steps
        params, opt_state, losses = steps(params, opt_state)
        first = float(losses[0]) if first is None else first  # loss before the first update
        last = float(losses[-1])
        if last < first / 10:
            break
    assert last < first / 10, (first, last)


def test_param_counts_match_karlo_and_diffusers():
    """Our Karlo-scale configs hold exactly Karlo's decoder / SR UNets: same tensor count and the
    same number of parameters as Karlo (counted from kakaobrain/karlo's modules) and as the
    diffusers models built from the conversion script's published configs."""
    # Counts of Karlo's torch modules (PLMImUNet from decoder_900M_vit_l.yaml; SuperResUNetModel
    # from improved_sr_64_256_1.4B.yaml), as (parameters, tensors).
    karlo = {"decoder": (893_318_086, 595), "sr": (691_579_523, 408)}
    dec = U.abstract_params(U.karlo_decoder_config())
    sr = U.abstract_params(U.karlo_sr_config())
    assert_logical_names(dec)
    assert_logical_names(sr)
    assert (U.count_params(dec), len(jax.tree_util.tree_leaves(dec))) == karlo["decoder"]
    assert (U.count_params(sr), len(jax.tree_util.tree_leaves(sr))) == karlo["sr"]

    import torch
    import diffusers
    import accelerate
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel

    # diffusers scripts/convert_kakao_brain_unclip_to_diffusers.py
    decoder_config = {
        "sample_size": 64,
        "layers_per_block": 3,
        "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                             "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        "up_block_types": ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                           "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "block_out_channels": (320, 640, 960, 1280),
        "in_channels": 3,
        "out_channels": 6,
        "cross_attention_dim": 1536,
        "class_embed_type": "identity",
        "attention_head_dim": 64,
        "resnet_time_scale_shift": "scale_shift",
    }
    super_res_config = {  # SUPER_RES_UNET_FIRST_STEPS_CONFIG (LAST_STEP is the same sans size)
        "sample_size": 256,
        "layers_per_block": 3,
        "down_block_types": ("ResnetDownsampleBlock2D",) * 4,
        "up_block_types": ("ResnetUpsampleBlock2D",) * 4,
        "block_out_channels": (320, 640, 960, 1280),
        "in_channels": 6,
        "out_channels": 3,
        "add_attention": False,
    }
    super_res_last = {k: v for k, v in super_res_config.items() if k != "sample_size"}

    def n_params(m):
        return sum(p.numel() for p in m.parameters())

    with accelerate.init_empty_weights():
        d_unet = diffusers.UNet2DConditionModel(**decoder_config)
        d_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=768,
                                     time_embed_dim=4 * 320, cross_attention_dim=1536)
        d_sr_first = diffusers.UNet2DModel(**super_res_config)
        d_sr_last = diffusers.UNet2DModel(**super_res_last)
    assert n_params(d_unet) + n_params(d_proj) == U.count_params(dec)
    assert n_params(d_sr_first) == U.count_params(sr)
    assert n_params(d_sr_last) == U.count_params(sr)


def test_paper_and_emoji_scale_counts():
    counts = {}
    for name in ("paper_decoder", "paper_sr1", "paper_sr2", "emoji_decoder", "emoji_upsampler"):
        boxed = U.abstract_params(U.PRESETS[name]())
        assert_logical_names(boxed)
        counts[name] = U.count_params(boxed)
    print({k: f"{v:,}" for k, v in counts.items()})
    assert 3.3e9 < counts["paper_decoder"] < 3.7e9  # 3.5B incl. the caption transformer
    assert 0.65e9 < counts["paper_sr1"] < 0.75e9  # 700M
    assert 0.25e9 < counts["paper_sr2"] < 0.35e9  # 300M
    assert 3e6 < counts["emoji_decoder"] < 10e6
    assert counts["emoji_upsampler"] < 5e6
