"""Diffusion prior (unclip_jax/models/prior.py): shapes, masking, null conditioning, parity."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models.prior import (
    DiffusionPrior,
    PriorConfig,
    count_params,
    denormalize,
    init_prior,
    normalize,
    select_best,
    set_clip_stats,
    set_null_condition,
    split_fused_qkv,
)

CFG = PriorConfig.tiny()
B = 3


@functools.lru_cache(maxsize=None)
def _jitted(cfg, deterministic=True):
    def run(v, x, t, emb, states, mask, drop, rng):
        return DiffusionPrior(cfg).apply(v, x, t, emb, states, mask, drop, deterministic,
                                         return_hidden=True, rngs={"dropout": rng})
    return jax.jit(run)


def _apply(cfg, deterministic=True):
    """Jitted forward with one signature per config (mask / drop filled in): one compile each
    instead of hundreds of eager op compiles. Returns a function ``(v, x, t, emb, states,
    mask=None, drop=None, return_hidden=False, rngs=None)``."""
    def f(v, x, t, emb, states, mask=None, drop=None, return_hidden=False, rngs=None):
        b, nt = states.shape[:2]
        mask = jnp.ones((b, nt), bool) if mask is None else jnp.asarray(mask, bool)
        drop = jnp.zeros((b,), bool) if drop is None else jnp.asarray(drop, bool)
        rng = (rngs or {}).get("dropout", jax.random.PRNGKey(0))
        out, h = _jitted(cfg, deterministic)(v, x, t, emb, states, mask, drop, rng)
        return (out, h) if return_hidden else out
    return f


def _init(cfg, seed=0):
    return jax.jit(init_prior, static_argnums=0)(cfg, jax.random.PRNGKey(seed))


def _random_variables(cfg, seed=0):
    """Variables with the structure / boxes of ``init_prior`` (abstract init) filled with numpy
    noise: skips compiling the initialisers (XLA CPU takes seconds on threefry)."""
    abstract = jax.eval_shape(lambda k: init_prior(cfg, k), jax.random.PRNGKey(0))
    rng = np.random.RandomState(seed)

    def fill(path, box):
        x = box.value
        name = jax.tree_util.keystr(path)
        if x.dtype == jnp.bool_:
            val = np.ones(x.shape, bool)
        elif "scale" in name or "clip_std" in name:
            val = 1.0 + 0.1 * rng.randn(*x.shape)
        else:
            val = 0.3 * rng.randn(*x.shape)
        return box.replace_boxed(jnp.asarray(val, x.dtype))

    return jax.tree_util.tree_map_with_path(
        fill, abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _inputs(cfg=CFG, seed=1, b=B):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(ks[0], (b, cfg.clip_dim))
    t = jnp.arange(b) * 97 + 5
    emb = jax.random.normal(ks[1], (b, cfg.clip_dim))
    states = jax.random.normal(ks[2], (b, cfg.num_text_tokens, cfg.states_dim))
    mask = jnp.arange(cfg.num_text_tokens)[None] < jnp.array([8, 5, 2])[:b, None]
    return x, t, emb, states, mask


@pytest.fixture(scope="module")
def variables():
    v = _init(CFG)
    # non-trivial stats so normalisation is exercised
    return set_clip_stats(v, jnp.linspace(-1, 1, CFG.clip_dim), jnp.linspace(0.5, 2, CFG.clip_dim))


def test_shapes_dtypes_and_logical_names(variables):
    model = _apply(CFG)
    out = model(variables, *_inputs())
    assert out.shape == (B, CFG.clip_dim) and out.dtype == jnp.float32
    out, h = model(variables, *_inputs(), return_hidden=True)
    assert h.shape == (B, CFG.seq_len, CFG.width)
    boxed = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
    for x in boxed:
        assert len(x.names) == x.value.ndim
    assert set(variables) == {"params", "buffers"}


def test_causal_mask_is_causal(variables):
    model = _apply(CFG)
    x, t, emb, states, _ = _inputs()
    _, h0 = model(variables, x, t, emb, states, return_hidden=True)
    # perturb the noised image embedding (position T + 2)
    _, h1 = model(variables, x + 1.0, t, emb, states, return_hidden=True)
    p = CFG.num_text_tokens + 2
    np.testing.assert_allclose(h0[:, :p], h1[:, :p], atol=1e-6)
    assert np.abs(np.asarray(h0[:, p:] - h1[:, p:])).max() > 1e-3
    # perturb caption token 3
    _, h2 = model(variables, x, t, emb, states.at[:, 3].add(1.0), return_hidden=True)
    np.testing.assert_allclose(h0[:, :3], h2[:, :3], atol=1e-6)
    assert np.abs(np.asarray(h0[:, 3:] - h2[:, 3:])).max() > 1e-3


def test_padding_tokens_do_not_affect_output(variables):
    model = _apply(CFG)
    x, t, emb, states, mask = _inputs()
    out0 = model(variables, x, t, emb, states, mask)
    noise = jax.random.normal(jax.random.PRNGKey(7), states.shape) * 5
    states2 = jnp.where(mask[..., None], states, noise)
    out1 = model(variables, x, t, emb, states2, mask)
    np.testing.assert_allclose(out0, out1, atol=1e-5)
    # ...but they do when unmasked (rows 1, 2 have padding)
    out2 = model(variables, x, t, emb, states2, None)
    assert np.abs(np.asarray(out2[1:] - out0[1:])).max() > 1e-3


def test_drop_selects_learned_null(variables):
    model = _apply(CFG)
    x, t, emb, states, mask = _inputs()
    drop = jnp.array([True, False, True])
    out = model(variables, x, t, emb, states, mask, drop)
    p = nn.meta.unbox(variables["params"])
    null_emb = jnp.broadcast_to(p["null_text_emb"], emb.shape)
    null_states = jnp.broadcast_to(p["null_text_states"], states.shape)
    ref = model(variables, x, t, null_emb, null_states, None)
    keep = model(variables, x, t, emb, states, mask)
    np.testing.assert_allclose(out[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(out[2], ref[2], atol=1e-5)
    np.testing.assert_allclose(out[1], keep[1], atol=1e-5)


def test_drop_selects_buffer_null_condition():
    cfg = PriorConfig.tiny(null_cond="buffer")
    v = _random_variables(cfg, 3)
    assert "null_text_emb" not in v["params"]
    x, t, emb, states, mask = _inputs(cfg)
    n_emb, n_states = emb[2] * 0.3, states[2] * 0.7
    n_mask = jnp.arange(cfg.num_text_tokens) < 2  # [SOT, EOT] of the empty caption
    v = set_null_condition(v, n_emb, n_states, n_mask)
    model = _apply(cfg)
    out = model(v, x, t, emb, states, mask, jnp.array([True, True, False]))
    ref = model(v, x, t, jnp.broadcast_to(n_emb, emb.shape),
                      jnp.broadcast_to(n_states, states.shape),
                      jnp.broadcast_to(n_mask, mask.shape))
    np.testing.assert_allclose(out[:2], ref[:2], atol=1e-5)


def test_normalize_roundtrip(variables):
    model = DiffusionPrior(CFG)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, CFG.clip_dim)) * 3
    z = normalize(variables["buffers"], x)
    np.testing.assert_allclose(model.apply(variables, x, method="normalize"), z, atol=1e-6)
    np.testing.assert_allclose(denormalize(variables["buffers"], z), x, atol=1e-5)
    np.testing.assert_allclose(model.apply(variables, z, method="denormalize"), x, atol=1e-5)
    b = nn.meta.unbox(variables["buffers"])
    np.testing.assert_allclose(z, (x - b["clip_mean"]) / b["clip_std"], atol=1e-6)


def test_select_best_picks_argmax():
    k = jax.random.split(jax.random.PRNGKey(4), 2)
    cands = jax.random.normal(k[0], (5, 3, 8))
    text = jax.random.normal(k[1], (5, 8))
    best = select_best(cands, text)
    idx = np.argmax(np.einsum("bkd,bd->bk", np.asarray(cands), np.asarray(text)), axis=1)
    np.testing.assert_array_equal(best, np.asarray(cands)[np.arange(5), idx])
    assert best.shape == (5, 8)


def test_bf16_forward_close_to_fp32(variables):
    x, t, emb, states, mask = _inputs()
    out32 = _apply(CFG)(variables, x, t, emb, states, mask)
    out16 = _apply(PriorConfig.tiny(dtype=jnp.bfloat16))(
        variables, x, t, emb, states, mask)
    assert out16.dtype == jnp.float32
    scale = float(jnp.abs(out32).max())
    assert float(jnp.abs(out16 - out32).max()) < 0.05 * scale


def test_dropout_is_stochastic_only_in_training():
    cfg = PriorConfig.tiny(dropout=0.5)
    v = _random_variables(cfg)
    args = _inputs(cfg)
    a = _apply(cfg)(v, *args)
    np.testing.assert_allclose(a, _apply(cfg)(v, *args), atol=1e-6)
    c = _apply(cfg, False)(v, *args, rngs={"dropout": jax.random.PRNGKey(1)})
    assert np.abs(np.asarray(a - c)).max() > 1e-4


# ---- structure vs diffusers' PriorTransformer (what the issue-6 converter will map) ----------

def _diffusers_to_ours(sd, cfg):
    """diffusers PriorTransformer state dict (numpy) -> our params / buffers (unboxed)."""
    h, w = cfg.num_heads, cfg.width
    dh = w // h

    def lin(name):
        return {"dense": {"kernel": sd[name + ".weight"].T, "bias": sd[name + ".bias"]}}

    def ln(name):
        return {"ln": {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}}

    params = {
        "time_embed": {"fc1": lin("time_embedding.linear_1"),
                       "fc2": lin("time_embedding.linear_2")},
        "clip_img_proj": lin("proj_in"),
        "text_emb_proj": lin("embedding_proj"),
        "text_enc_proj": lin("encoder_hidden_states_proj"),
        "positional_embedding": sd["positional_embedding"][0],
        "prd_emb": sd["prd_embedding"][0, 0],
        "final_ln": ln("norm_out"),
        "out_proj": lin("proj_to_clip_embeddings"),
        "transformer": {},
    }
    for i in range(cfg.num_layers):
        p = f"transformer_blocks.{i}."
        attn = {}
        for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
            attn[ours] = {
                "kernel": sd[p + f"attn1.{theirs}.weight"].reshape(h, dh, w).transpose(2, 0, 1),
                "bias": sd[p + f"attn1.{theirs}.bias"].reshape(h, dh),
            }
        attn["out"] = {"kernel": sd[p + "attn1.to_out.0.weight"].T.reshape(h, dh, w),
                       "bias": sd[p + "attn1.to_out.0.bias"]}
        params["transformer"][f"layers_{i}"] = {
            "ln1": ln(p + "norm1"), "ln2": ln(p + "norm3"), "attn": attn,
            "mlp": {"fc1": lin(p + "ff.net.0.proj"), "fc2": lin(p + "ff.net.2")},
        }
    return params, {"clip_mean": sd["clip_mean"][0], "clip_std": sd["clip_std"][0]}


def test_matches_diffusers_prior_transformer():
    import torch
    import diffusers
    cfg = PriorConfig(clip_dim=16, width=16, num_layers=2, num_heads=2, num_text_tokens=6,
                      null_cond="buffer")
    torch.manual_seed(0)
    ref = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                     embedding_dim=16, num_embeddings=6).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
        ref.clip_std.abs_().add_(0.5)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}

    v = _random_variables(cfg)
    ours, stats = _diffusers_to_ours(sd, cfg)
    # same tree structure and shapes (up to the documented reshapes), one tensor each
    shapes = jax.tree_util.tree_map(lambda x: x.shape, nn.meta.unbox(v["params"]))
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, ours)
    assert count_params(ours) + count_params(stats) == sum(x.size for x in sd.values())
    v = set_clip_stats(v, stats["clip_mean"], stats["clip_std"])
    v = {"params": jax.tree_util.tree_map(jnp.asarray, ours), "buffers": v["buffers"]}

    rng = np.random.RandomState(0)
    b, nt = 3, cfg.num_text_tokens
    x = rng.randn(b, 16).astype(np.float32)
    emb = rng.randn(b, 16).astype(np.float32)
    states = rng.randn(b, nt, 16).astype(np.float32)
    mask = np.arange(nt)[None] < np.array([6, 4, 2])[:, None]
    t = np.array([0, 17, 999])
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(emb),
                   torch.from_numpy(states), torch.from_numpy(mask)).predicted_image_embedding
        want_post = ref.post_process_latents(want)
    got = _apply(cfg)(v, x, t, emb, states, mask)
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(denormalize(v["buffers"], got), want_post.numpy(), atol=1e-4)


def test_karlo_scale_param_count_equals_diffusers():
    import torch  # noqa: F841
    import diffusers
    import accelerate
    cfg = PriorConfig.karlo()
    abstract = jax.eval_shape(lambda k: init_prior(cfg, k), jax.random.PRNGKey(0))
    ours = count_params(abstract["params"]) + 2 * cfg.clip_dim  # + clip_mean, clip_std
    # diffusers' convert_kakao_brain_unclip_to_diffusers.py: PRIOR_CONFIG = {} (the defaults),
    # = Karlo configs/prior_1B_vit_l.yaml (77 tokens, width 2048, 20 layers, 32 heads, 768).
    with accelerate.init_empty_weights():
        ref = diffusers.PriorTransformer()
    theirs = sum(p.numel() for p in ref.parameters())
    assert ours == theirs == 1_022_030_080


def test_split_fused_qkv_matches_karlo_attention_layout():
    """Karlo's QKVMultiheadAttention: qkv = x W^T + b viewed [B, L, H, 3 Dh], split q|k|v."""
    from unclip_jax.models.layers import MultiHeadAttention

    rng = np.random.RandomState(0)
    bsz, length, w, heads = 2, 5, 12, 3
    dh = w // heads
    wq, bq = rng.randn(3 * w, w) * 0.3, rng.randn(3 * w) * 0.3
    wo, bo = rng.randn(w, w) * 0.3, rng.randn(w) * 0.3
    x = rng.randn(bsz, length, w)
    qkv = (x @ wq.T + bq).reshape(bsz, length, heads, 3 * dh)
    q, k, v = np.split(qkv, 3, axis=-1)
    logits = np.einsum("bthc,bshc->bhts", q, k) / np.sqrt(dh)
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshc->bthc", p, v).reshape(bsz, length, w) @ wo.T + bo

    params = split_fused_qkv(wq, bq, heads)
    params["out"] = {"kernel": wo.T.reshape(heads, dh, w), "bias": bo}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    got = MultiHeadAttention(heads).apply({"params": params}, jnp.asarray(x, jnp.float32),
                                          jnp.tril(jnp.ones((length, length), bool)))
    np.testing.assert_allclose(got, want, atol=1e-4)
