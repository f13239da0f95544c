"""Samplers on toy problems whose optimal model is known in closed form."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unclip_jax.diffusion as D

BASE = D.create_gaussian_diffusion(1000, "cosine")


def gaussian_eps(mu, s):
    """eps*(x_t, t) = E[eps | x_t] for data ~ N(mu, s^2):
    sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""
    def model(x, t):
        a = BASE.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)
    return model


W, MUS, SS = jnp.array([0.3, 0.7]), jnp.array([-0.6, 0.4]), jnp.array([0.1, 0.2])


def mixture_eps(x, t):
    """Optimal eps of the 1-D mixture sum_k w_k N(mu_k, s_k^2): -sqrt(1-a) d/dx log p_t(x)."""
    a = BASE.alphas_cumprod[t][:, None]
    var = a * SS ** 2 + 1 - a
    m = jnp.sqrt(a) * MUS
    r = jax.nn.softmax(jnp.log(W) - 0.5 * jnp.log(var) - 0.5 * (x - m) ** 2 / var, axis=-1)
    return jnp.sqrt(1 - a) * jnp.sum(r * (x - m) / var, axis=-1, keepdims=True)


def test_ddim_inversion_reconstructs_with_error_falling_as_1_over_n():
    mu, s = 0.3, 0.5
    model = gaussian_eps(mu, s)
    x0 = mu + s * jax.random.normal(jax.random.PRNGKey(0), (128, 4))
    errs = {}
    for n in (10, 100, 1000):
        d = D.create_gaussian_diffusion(1000, "cosine", f"ddim{n}" if n < 1000 else "")
        x_T = D.ddim_invert(d, model, x0)
        rec = D.ddim_sample(d, model, x0.shape, jax.random.PRNGKey(1), x_T=x_T, clip_denoised=False)
        errs[n] = float(jnp.max(jnp.abs(rec - x0)))
        assert abs(float(jnp.std(x_T)) - 1.0) < 0.1          # inverted latents look like noise
    assert errs[1000] < 1e-2, errs
    for lo, hi in ((10, 100), (100, 1000)):
        assert 4 < errs[lo] / errs[hi] < 25, errs            # ~ 1/N


def test_ddpm_and_ddim_match_mixture_moments():
    mean = float(jnp.sum(W * MUS))
    var = float(jnp.sum(W * (SS ** 2 + MUS ** 2))) - mean ** 2
    p_neg = sum(float(w) * 0.5 * (1 + math.erf(-float(m) / (float(s) * math.sqrt(2))))
                for w, m, s in zip(W, MUS, SS))
    n = 8000
    runs = {
        "ddpm": D.ddpm_sample(BASE, mixture_eps, (n, 1), jax.random.PRNGKey(0), clip_denoised=False),
        "ddim": D.ddim_sample(D.create_gaussian_diffusion(1000, "cosine", "ddim200"), mixture_eps,
                              (n, 1), jax.random.PRNGKey(1), clip_denoised=False),
    }
    for name, x in runs.items():
        x = np.asarray(x, np.float64)[:, 0]
        assert abs(x.mean() - mean) < 0.02, name                 # std err 0.0055
        assert abs(x.var() / var - 1) < 0.06, name               # std err ~0.015
        assert abs((x < 0).mean() - p_neg) < 0.025, name         # std err 0.005


def toy_model(x, t, scale=None):
    """A smooth non-trivial model with 2C outputs (learned variance)."""
    tt = (t.astype(jnp.float32) / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    eps = jnp.tanh(x * (1 + tt)) * 0.5 + 0.1 * tt
    if scale is not None:
        eps = eps * scale.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.concatenate([eps, jnp.sin(3 * x + tt)], axis=-1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_jitted_loop_equals_python_loop(sampler):
    d = D.create_gaussian_diffusion(1000, "cosine", "8", model_var_type="learned_range")
    shape, key = (2, 4, 4, 3), jax.random.PRNGKey(4)
    kw = {"scale": jnp.array([1.0, 0.5])}
    if sampler == "ddpm":
        fast = D.ddpm_sample(d, toy_model, shape, key, kw, threshold=0.9)
        step = jax.jit(lambda x, t, k, kw: D.ddpm_step(d, toy_model, x, t, k, kw, threshold=0.9))
    else:
        fast = D.ddim_sample(d, toy_model, shape, key, kw, eta=0.5, threshold=0.9)
        step = jax.jit(lambda x, t, k, kw: D.ddim_step(d, toy_model, x, t, k, kw, eta=0.5,
                                                       threshold=0.9))
    k_init, k_loop = D.init_and_loop_keys(key)
    x = jax.random.normal(k_init, shape)
    for i in range(d.num_timesteps):
        x, _ = step(x, d.num_timesteps - 1 - i, D.step_keys(k_loop, i)[0], kw)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(x), atol=1e-5)


def test_progress_callback_only_traced_when_on():
    d = D.create_gaussian_diffusion(1000, "cosine", "5")
    model = gaussian_eps(0.0, 0.5)
    args = (d, model, (2, 3), jax.random.PRNGKey(0))
    off = str(jax.make_jaxpr(lambda: D.ddim_sample(*args))())
    assert "callback" not in off
    calls = []
    progress = lambda i, n: calls.append((i, n))
    assert "callback" in str(jax.make_jaxpr(lambda: D.ddim_sample(*args, progress=progress))())
    x = D.ddim_sample(*args, progress=progress)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert calls == [(i, 5) for i in range(1, 6)]


def test_masked_sampling_keeps_known_region():
    d = D.create_gaussian_diffusion(1000, "cosine", "6")
    shape, key = (2, 4, 4, 1), jax.random.PRNGKey(5)
    source = jnp.linspace(-1, 1, 32).reshape(shape)
    mask = jnp.zeros(shape).at[:, :2].set(1.0)
    seen = []

    def model(x, t):
        jax.debug.callback(lambda x, t: seen.append((np.asarray(x), np.asarray(t))), x, t)
        return 0.3 * x

    out = D.ddpm_sample(d, model, shape, key, source=source, mask=mask)
    jax.effects_barrier()
    assert len(seen) == 6
    _, k_loop = D.init_and_loop_keys(key)
    known = np.broadcast_to(np.asarray(mask, bool), shape)

    @jax.jit
    def expected(i):
        t = d.num_timesteps - 1 - i
        noise = jax.random.normal(D.step_keys(k_loop, i)[1], shape)
        return D.q_sample(d, source, jnp.full((2,), t), noise), d.timestep_map[t]

    for i, (x_in, t_orig) in enumerate(seen):
        expect, t_expect = expected(i)
        np.testing.assert_array_equal(t_orig, t_expect)
        np.testing.assert_allclose(x_in[known], np.asarray(expect)[known], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(source)[known])
    assert not np.allclose(np.asarray(out)[~known], np.asarray(source)[~known])


def test_repaint_schedule_and_sample():
    states = D.repaint_schedule(20, jump_length=5, jump_n_sample=3)
    steps = np.diff(states)
    assert states[0] == 20 and states[-1] == 0
    assert set(steps.tolist()) == {-1, 5}
    assert (steps == 5).sum() == 2 * len(range(1, 16, 5))
    np.testing.assert_array_equal(D.repaint_schedule(7, 3, 1), np.arange(7, -1, -1))

    d = D.create_gaussian_diffusion(1000, "cosine", "10")
    shape = (1, 4, 4, 2)
    source = jnp.full(shape, 0.5)
    mask = jnp.zeros(shape[:-1] + (1,)).at[:, :, :2].set(1.0)
    calls = []
    out = D.repaint_sample(d, lambda x, t: 0.2 * x, shape, jax.random.PRNGKey(0), source=source,
                           mask=mask, jump_length=3, jump_n_sample=2,
                           progress=lambda i, n: calls.append(n))
    jax.effects_barrier()
    assert len(calls) == len(D.repaint_schedule(10, 3, 2)) - 1
    np.testing.assert_array_equal(np.asarray(out)[:, :, :2], 0.5)
    assert np.isfinite(np.asarray(out)).all()


def test_classifier_free_guidance():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
    t = jnp.array([5, 500, 900])
    cond = {"scale": jnp.array([1.0, 2.0, 0.5])}
    other = {"scale": jnp.array([-1.0, 0.3, 0.0])}
    uncond = {"scale": jnp.zeros(3)}
    s2 = jnp.array([0.5, 1.0, 2.0])
    shapes = []

    def model(x, t, scale):
        shapes.append(x.shape)
        return toy_model(x, t, scale)

    @jax.jit
    def run(x, t):
        both = D.stack_condition_groups(cond, uncond)
        g1 = D.classifier_free_guidance(model, 1.0, learned_variance=True)(x, t, **both)
        g3 = D.classifier_free_guidance(model, 3.0, learned_variance=True)(x, t, **both)
        # several condition groups with their own scales (one of them per sample)
        groups = D.stack_condition_groups(cond, other, uncond)
        g = D.classifier_free_guidance(model, (2.0, s2), num_groups=3)(x, t, **groups)
        refs = [toy_model(x, t, c["scale"]) for c in (cond, other, uncond)]
        return g1, g3, g, refs

    g1, g3, g, (c, o, u) = run(x, t)
    assert shapes == [(6, 4, 4, 2), (6, 4, 4, 2), (9, 4, 4, 2)]   # one batched forward each
    np.testing.assert_allclose(g1, c, atol=1e-6)                  # scale 1 == conditional model
    np.testing.assert_allclose(g3[..., :2], u[..., :2] + 3.0 * (c[..., :2] - u[..., :2]), atol=1e-5)
    np.testing.assert_array_equal(g3[..., 2:], c[..., 2:])        # variance from the conditional half
    np.testing.assert_allclose(
        g, u + 2.0 * (c - u) + s2[:, None, None, None] * (o - u), atol=1e-5)


def test_output_types_sample_identically():
    """The same denoiser expressed as eps, x0 or v gives the same DDIM samples."""
    eps_fn = gaussian_eps(0.2, 0.4)
    ab = BASE.alphas_cumprod

    def as_kind(kind):
        def model(x, t):
            a = ab[t][:, None]
            eps = eps_fn(x, t)
            x0 = D.x0_from_eps(x, eps, a)
            return {"eps": eps, "x0": x0, "v": D.v_from_eps_x0(eps, x0, a)}[kind]
        return model

    outs = []
    for kind in ("eps", "x0", "v"):
        d = D.create_gaussian_diffusion(1000, "cosine", "ddim20", model_output=kind)
        outs.append(D.ddim_sample(d, as_kind(kind), (64, 3), jax.random.PRNGKey(2),
                                  clip_denoised=False))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-4)
