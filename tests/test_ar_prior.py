"""PCA, quantiser and autoregressive prior (unclip_jax/models/{pca,ar_prior}.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax.models.ar_prior import (
    ARPrior,
    ARPriorConfig,
    ar_prior_loss,
    ar_sample,
    decode_codes,
    encode_targets,
    fit_dot_quantizer,
    init_ar_prior,
    sample_logits,
    top_half_mask,
    top_p_filter,
)
from unclip_jax.models.pca import (
    dequantize,
    fit_pca,
    fit_quantizer,
    project,
    quantize,
    reconstruct,
    uniform_quantizer,
)

CFG = ARPriorConfig.tiny()
B = 4


def _data(n=64, d=12, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(n, d) * np.linspace(3, 0.1, d)) @ np.linalg.qr(rng.randn(d, d))[0] + 1.5


# ---- PCA / quantiser ------------------------------------------------------------------------

def test_pca_full_reconstruction_orthonormal_ordered():
    z = _data()
    pca = fit_pca(z)
    assert pca.basis.shape == (12, 12)
    np.testing.assert_allclose(reconstruct(pca, project(pca, z)), z, atol=1e-5)
    np.testing.assert_allclose(pca.basis.T @ pca.basis, np.eye(12), atol=1e-5)
    ev = np.asarray(pca.explained_variance)
    assert np.all(np.diff(ev) <= 1e-6)
    np.testing.assert_allclose(float(pca.explained_variance_ratio.sum()), 1.0, atol=1e-5)
    np.testing.assert_allclose(ev, np.var(np.asarray(project(pca, z)), axis=0, ddof=1),
                               rtol=1e-4)
    # truncation: first k coefficients; error = dropped variance
    pca4 = fit_pca(z, 4)
    np.testing.assert_allclose(pca4.basis, pca.basis[:, :4], atol=1e-5)
    r = reconstruct(pca, project(pca, z), 4)
    np.testing.assert_allclose(r, reconstruct(pca4, project(pca4, z)), atol=1e-4)
    resid = np.sum((np.asarray(r) - z) ** 2) / (len(z) - 1)
    np.testing.assert_allclose(resid, ev[4:].sum(), rtol=1e-3)


@pytest.mark.parametrize("method", ["quantile", "uniform"])
def test_quantize_roundtrip_within_half_bucket(method):
    x = np.asarray(project(fit_pca(_data(200)), _data(200)))
    q = fit_quantizer(x, 32, method=method)
    codes = quantize(q, x)
    assert codes.dtype == jnp.int32 and codes.shape == x.shape
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    err = np.abs(np.asarray(dequantize(q, codes)) - x)
    width = np.asarray(q.widths)[np.arange(x.shape[1])[None], np.asarray(codes)]
    assert np.all(err <= width / 2 + 1e-5)
    # out-of-range values clamp into the end buckets
    c = quantize(q, jnp.full((1, x.shape[1]), 1e6))
    assert np.all(np.asarray(c) == 31)


def test_uniform_quantizer_codes():
    q = uniform_quantizer(-1.0, 1.0, 4)
    c = quantize(q, jnp.array([[-0.9], [-0.1], [0.1], [0.99]]))
    np.testing.assert_array_equal(np.asarray(c)[:, 0], [0, 1, 2, 3])
    np.testing.assert_allclose(dequantize(q, c)[:, 0], [-0.75, -0.25, 0.25, 0.75])


# ---- sampling primitives --------------------------------------------------------------------

def test_top_p_and_top_half():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]]))
    assert np.isfinite(np.asarray(top_p_filter(logits, 1e-6))).sum() == 2
    keep = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(keep, [[0, 1, 0, 1], [1, 1, 0, 0]])
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(sample_logits(key, logits, 1.0, 1e-6), [1, 0])
    np.testing.assert_array_equal(sample_logits(key, logits, 0.0), [1, 0])
    # cdfs: [.1 .6 .75 1], [.4 .7 .9 1] -> buckets at/above the median
    np.testing.assert_array_equal(top_half_mask(logits), [[0, 1, 1, 1], [0, 1, 1, 1]])


# ---- the AR prior ---------------------------------------------------------------------------

def _inputs(cfg=CFG, b=B, seed=1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    codes = jax.random.randint(ks[0], (b, cfg.pca_dims), 0, cfg.num_buckets)
    dot = jax.random.randint(ks[1], (b,), 0, cfg.dot_buckets)
    emb = jax.random.normal(ks[2], (b, cfg.clip_dim))
    states = jax.random.normal(ks[3], (b, cfg.num_text_tokens, cfg.states_dim))
    lengths = jnp.arange(b) % cfg.num_text_tokens + 1
    mask = jnp.arange(cfg.num_text_tokens)[None] < lengths[:, None]
    return codes, dot, emb, states, mask


@pytest.fixture(scope="module")
def variables():
    return jax.jit(init_ar_prior, static_argnums=0)(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def apply():
    return jax.jit(ARPrior(CFG).apply)


def test_shapes_names_causality_padding(variables, apply):
    codes, dot, emb, states, mask = _inputs()
    dl, cl = apply(variables, codes, dot, emb, states, mask)
    assert dl.shape == (B, CFG.dot_buckets) and cl.shape == (B, CFG.pca_dims, CFG.num_buckets)
    assert dl.dtype == cl.dtype == jnp.float32
    boxed = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    # code j's logits see only codes[:, :j]
    j = 3
    _, cl2 = apply(variables, codes.at[:, j].set((codes[:, j] + 1) % CFG.num_buckets), dot, emb,
                   states, mask)
    np.testing.assert_allclose(cl[:, :j + 1], cl2[:, :j + 1], atol=1e-5)
    assert np.abs(np.asarray(cl[:, j + 1:] - cl2[:, j + 1:])).max() > 1e-4
    # dot token feeds every code but not its own logits
    dl3, cl3 = apply(variables, codes, (dot + 1) % CFG.dot_buckets, emb, states, mask)
    np.testing.assert_allclose(dl, dl3, atol=1e-5)
    assert np.abs(np.asarray(cl - cl3)).max() > 1e-4
    # padded caption tokens are ignored
    states4 = jnp.where(mask[..., None], states, 9.0)
    dl4, cl4 = apply(variables, codes, dot, emb, states4, mask)
    np.testing.assert_allclose(cl, cl4, atol=1e-5)
    np.testing.assert_allclose(dl, dl4, atol=1e-5)
    # dropped rows use the learned null text
    p = nn.meta.unbox(variables["params"])
    drop = jnp.array([True, False, True, False])
    _, cl5 = apply(variables, codes, dot, emb, states, mask, drop)
    _, cl6 = apply(variables, codes, dot, jnp.broadcast_to(p["null_text_emb"], emb.shape),
                   jnp.broadcast_to(p["null_text_states"], states.shape), None)
    np.testing.assert_allclose(cl5[::2], cl6[::2], atol=1e-5)
    np.testing.assert_allclose(cl5[1::2], cl[1::2], atol=1e-5)


def test_bf16_forward_close_to_fp32(variables):
    codes, dot, emb, states, mask = _inputs()
    _, c32 = jax.jit(ARPrior(CFG).apply)(variables, codes, dot, emb, states, mask)
    _, c16 = jax.jit(ARPrior(ARPriorConfig.tiny(dtype=jnp.bfloat16)).apply)(
        variables, codes, dot, emb, states, mask)
    assert float(jnp.abs(c16 - c32).max()) < 0.05 * float(jnp.abs(c32).max()) + 0.02


def test_targets_overfit_and_greedy_sampling(variables, apply):
    # data: CLIP-like image / text embeddings -> PCA -> codes
    rng = np.random.RandomState(3)
    img = _data(256, CFG.clip_dim, seed=4)
    txt = img + rng.randn(*img.shape) * 2
    pca = fit_pca(img, CFG.pca_dims)
    quant = fit_quantizer(project(pca, img), CFG.num_buckets)
    dq = fit_dot_quantizer(img, txt, CFG.dot_buckets)
    codes, dot = encode_targets(pca, quant, dq, jnp.asarray(img[:B]), jnp.asarray(txt[:B]))
    assert codes.shape == (B, CFG.pca_dims) and dot.shape == (B,)
    dec = decode_codes(pca, quant, codes)
    np.testing.assert_allclose(
        dec, reconstruct(pca, dequantize(quant, quantize(quant, project(pca, img[:B], 6)))),
        atol=1e-5)

    _, _, _, states, mask = _inputs()
    emb = jnp.asarray(txt[:B], jnp.float32)
    model = ARPrior(CFG)
    params = variables["params"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def train_step(params, opt):
        def loss_fn(p):
            dl, cl = model.apply({"params": p}, codes, dot, emb, states, mask)
            return ar_prior_loss(dl, cl, dot, codes)[0]
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for _ in range(60):
        params, opt, loss = train_step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    trained = {"params": params}

    # temperature -> 0 reproduces a python loop of greedy steps (given the data's dot token)
    ref = np.zeros((B, CFG.pca_dims), np.int32)
    for j in range(CFG.pca_dims):
        _, cl = apply(trained, jnp.asarray(ref), dot, emb, states, mask)
        ref[:, j] = np.argmax(np.asarray(cl[:, j]), axis=-1)
    key = jax.random.PRNGKey(5)
    greedy, d0 = ar_sample(model, trained, key, emb, states, mask, dot, temperature=0.0)
    np.testing.assert_array_equal(greedy, ref)
    np.testing.assert_array_equal(d0, dot)
    cold, _ = ar_sample(model, trained, key, emb, states, mask, dot, temperature=1e-4)
    np.testing.assert_array_equal(cold, ref)
    nucleus, _ = ar_sample(model, trained, key, emb, states, mask, dot, top_p=1e-6)
    np.testing.assert_array_equal(nucleus, ref)
    # overfit: greedy decoding recovers the training codes
    assert np.mean(np.asarray(greedy) == np.asarray(codes)) > 0.9

    # sampled dot tokens lie in the top half of the predicted dot distribution
    rows = 32
    rep = lambda x: jnp.repeat(x[:1], rows, axis=0)  # noqa: E731
    codes_s, dot_s = ar_sample(model, trained, jax.random.PRNGKey(6), rep(emb), rep(states),
                               rep(mask), temperature=1.0, guidance_scale=2.0)
    assert codes_s.shape == (rows, CFG.pca_dims) and dot_s.shape == (rows,)
    dl, _ = apply(trained, codes[:1], dot[:1], emb[:1], states[:1], mask[:1])
    allowed = np.asarray(top_half_mask(dl))[0]
    assert allowed[np.asarray(dot_s)].all()
    assert decode_codes(pca, quant, codes_s).shape == (rows, CFG.clip_dim)
