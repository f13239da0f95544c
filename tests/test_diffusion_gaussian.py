"""Forward process, posterior, parameterisations and losses against closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unclip_jax.diffusion as D
from unclip_jax.diffusion import schedules


@pytest.fixture(scope="module")
def diffusion():
    return D.create_gaussian_diffusion(1000, "cosine")


def test_q_sample_monte_carlo(diffusion):
    n, x0 = 100_000, 0.7
    for t in (0, 250, 700, 999):
        x_start = jnp.full((n, 1), x0)
        noise = jax.random.normal(jax.random.PRNGKey(t), (n, 1))
        x_t = np.asarray(D.q_sample(diffusion, x_start, jnp.full((n,), t), noise), np.float64)
        mean, var, _ = D.q_mean_variance(diffusion, x_start[:1], jnp.array([t]))
        ab = float(diffusion.alphas_cumprod[t])
        assert float(mean[0, 0]) == pytest.approx(math.sqrt(ab) * x0, rel=1e-6)
        assert float(var[0, 0]) == pytest.approx(1 - ab, rel=1e-5)
        sd = math.sqrt(1 - ab)
        assert abs(x_t.mean() - math.sqrt(ab) * x0) < 5 * sd / math.sqrt(n) + 1e-6
        assert abs(x_t.var() / (1 - ab) - 1) < 5 * math.sqrt(2 / n)


def test_posterior_is_bayes(diffusion):
    betas = schedules.cosine_betas(1000)
    ab = np.cumprod(1 - betas)
    t = np.array([1, 10, 500, 998])
    x0 = np.array([[0.3], [-0.9], [0.5], [1.0]])
    x_t = np.array([[0.1], [0.4], [-1.2], [2.0]])
    # q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(1-b_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x0, 1-ab_{t-1})
    prec = (1 - betas[t]) / betas[t] + 1 / (1 - ab[t - 1])
    mean = (np.sqrt(1 - betas[t]) / betas[t] * x_t[:, 0]
            + np.sqrt(ab[t - 1]) / (1 - ab[t - 1]) * x0[:, 0]) / prec
    m, v, logv = D.q_posterior_mean_variance(diffusion, jnp.asarray(x0, jnp.float32),
                                             jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(m)[:, 0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v)[:, 0], 1 / prec, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logv)[:, 0], np.log(1 / prec), rtol=1e-5)


def test_eps_x0_v_round_trips(diffusion):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(k1, (6, 4, 4, 3))
    eps = jax.random.normal(k2, (6, 4, 4, 3))
    t = jnp.array([0, 1, 100, 500, 900, 998])
    x_t = D.q_sample(diffusion, x0, t, eps)
    v = D.predict_v(diffusion, x0, t, eps)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3)
    close(D.predict_x0_from_eps(diffusion, x_t[:5], t[:5], eps[:5]), x0[:5])  # ill-posed at T-1
    close(D.predict_eps_from_x0(diffusion, x_t[1:], t[1:], x0[1:]), eps[1:])  # ill-posed at 0
    close(D.predict_x0_from_v(diffusion, x_t, t, v), x0)
    close(D.predict_eps_from_v(diffusion, x_t, t, v), eps)
    a = D.gaussian.extract(diffusion.alphas_cumprod, t, 4)
    close(D.v_from_eps_x0(D.eps_from_v(x_t, v, a), D.x0_from_v(x_t, v, a), a), v)


def test_learned_range_and_fixed_variances():
    d = D.create_gaussian_diffusion(100, "linear", model_var_type="learned_range")
    t = jnp.arange(100)
    x = jnp.zeros((100, 2))
    lo = D.model_log_variance(d, -jnp.ones((100, 2)), t, x)
    hi = D.model_log_variance(d, jnp.ones((100, 2)), t, x)
    mid = D.model_log_variance(d, jnp.zeros((100, 2)), t, x)
    np.testing.assert_allclose(lo[:, 0], d.posterior_log_variance_clipped, rtol=1e-6)
    np.testing.assert_allclose(hi[:, 0], jnp.log(d.betas), rtol=1e-6)
    np.testing.assert_allclose(mid, (lo + hi) / 2, rtol=1e-6)
    small = D.model_log_variance(d.replace(model_var_type="fixed_small"), None, t, x)
    large = D.model_log_variance(d.replace(model_var_type="fixed_large"), None, t, x)
    np.testing.assert_allclose(small[1:, 0], jnp.log(d.posterior_variance[1:]), rtol=1e-5)
    np.testing.assert_allclose(large[1:, 0], jnp.log(d.betas[1:]), rtol=1e-6)
    assert float(large[0, 0]) == pytest.approx(float(jnp.log(d.posterior_variance[1])), rel=1e-6)


def test_clipping_and_dynamic_threshold():
    x = jnp.stack([jnp.linspace(-0.9, 0.9, 100), jnp.linspace(-3.0, 3.0, 100)])
    np.testing.assert_array_equal(D.process_x0(x, clip_denoised=True)[0], x[0])
    assert float(jnp.abs(D.process_x0(x, clip_denoised=True)[1]).max()) == 1.0
    th = D.dynamic_threshold(x, 0.9)
    np.testing.assert_allclose(th[0], x[0])                 # s = max(1, q) = 1: unchanged
    s = float(jnp.quantile(jnp.abs(x[1]), 0.9))
    np.testing.assert_allclose(th[1], jnp.clip(x[1], -s, s) / s, rtol=1e-6)
    assert float(jnp.abs(th).max()) <= 1.0


def test_discretized_likelihood_normalised():
    centers = jnp.linspace(-1.0, 1.0, 256)
    ll = D.discretized_gaussian_log_likelihood(centers, jnp.full_like(centers, 0.2),
                                               jnp.full_like(centers, math.log(0.3)))
    assert float(jnp.exp(ll).sum()) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("var_type", ["fixed_small", "learned_range"])
def test_vlb_of_perfect_model_is_zero(var_type):
    d = D.create_gaussian_diffusion(1000, "cosine", model_var_type=var_type)
    t = jnp.arange(0, 1000, 37)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x0 = jnp.clip(0.5 * jax.random.normal(k1, (t.shape[0], 4, 4, 3)), -1, 1)
    eps = jax.random.normal(k2, x0.shape)
    x_t = D.q_sample(d, x0, t, eps)
    out = eps if var_type == "fixed_small" else jnp.concatenate([eps, -jnp.ones_like(eps)], -1)
    vb = np.asarray(jax.jit(D.vb_terms_bpd)(d, out, x0, x_t, t))
    assert np.abs(vb[1:]).max() < 1e-3, vb          # KL terms, t >= 1
    assert vb[0] > 0                                 # decoder NLL at t = 0
    losses = D.training_losses(d, lambda x, tt: out, x0, t, eps)
    np.testing.assert_allclose(losses["mse"], 0.0, atol=1e-12)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_mse_target_of_perfect_model(kind):
    d = D.create_gaussian_diffusion(100, "cosine", "ddim20", model_output=kind)
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    x0 = jax.random.normal(k1, (5, 8))
    eps = jax.random.normal(k2, (5, 8))
    t = jnp.array([0, 3, 9, 15, 19])
    seen = {}

    def perfect(x_t, t_orig):
        seen["t"] = t_orig
        return {"eps": eps, "x0": x0, "v": D.predict_v(d, x0, t, eps)}[kind]

    losses = D.training_losses(d, perfect, x0, t, eps)
    np.testing.assert_allclose(losses["loss"], 0.0, atol=1e-12)
    np.testing.assert_array_equal(seen["t"], d.timestep_map[t])   # original step indices
    assert set(losses) == {"loss", "mse"}


def test_hybrid_loss_stops_gradient_of_mean_in_vlb():
    d = D.create_gaussian_diffusion(50, "cosine", model_var_type="learned_range")
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    x0 = jnp.clip(jax.random.normal(k1, (4, 4, 4, 3)), -1, 1)
    eps = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 5, 20, 49])
    w = 0.3 * jax.random.normal(k3, (2, 6))

    def model(w, x, tt):
        return jnp.concatenate([w[0, 0] * x, w[1, 0] * jnp.ones_like(x)], -1)

    def terms(w):
        return D.training_losses(d, lambda x, tt: model(w, x, tt), x0, t, eps)

    @jax.jit
    def run(w):
        grad = lambda name: jax.grad(lambda w: terms(w)[name].sum())(w)
        return terms(w), grad("vb"), grad("mse")

    losses, g_vb, g_mse = run(w)
    np.testing.assert_allclose(losses["loss"], losses["mse"] + 0.001 * 50 * losses["vb"], rtol=1e-6)
    assert float(g_vb[0, 0]) == 0.0 and float(g_vb[1, 0]) != 0.0   # VLB only trains the variance
    assert float(g_mse[0, 0]) != 0.0 and float(g_mse[1, 0]) == 0.0
    with pytest.raises(ValueError):
        D.training_losses(d.replace(model_var_type="fixed_small"), lambda x, tt: x, x0, t, eps,
                          loss_type="hybrid")


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_min_snr_weight_is_capped_x0_weight(kind):
    """Min-SNR-gamma: in x_0 space the loss weight is min(SNR, gamma). The eps / v MSE equal the
    x_0 MSE times SNR / (SNR + 1), so weight * (those factors) must give min(SNR, gamma)."""
    d = D.create_gaussian_diffusion(1000, "cosine", model_output=kind)
    t = jnp.arange(0, 1000, 37)
    ab = np.asarray(d.alphas_cumprod, np.float64)[np.asarray(t)]
    s = ab / (1 - ab)
    w = np.asarray(D.min_snr_weight(d, t, 5.0), np.float64)
    to_x0 = {"eps": s, "x0": np.ones_like(s), "v": s + 1}[kind]
    np.testing.assert_allclose(w * to_x0, np.minimum(s, 5.0), rtol=1e-4)
    # eps prediction: weight 1 wherever SNR <= gamma (the noisy half), below 1 elsewhere
    if kind == "eps":
        assert np.all(w[s <= 5.0] == 1.0) and np.all(w[s > 5.0] < 1.0)


def test_snr_gamma_weights_the_simple_loss_only():
    d = D.create_gaussian_diffusion(100, "cosine", model_var_type="learned_range")
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (6, 4, 4, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.array([0, 5, 20, 50, 80, 99])
    model = lambda x, tt: jnp.concatenate([0.5 * x, jnp.zeros_like(x)], -1)  # noqa: E731
    plain = D.training_losses(d, model, x0, t, noise)
    weighted = D.training_losses(d, model, x0, t, noise, snr_gamma=5.0)
    w = D.min_snr_weight(d, t, 5.0)
    np.testing.assert_allclose(weighted["mse"], plain["mse"], rtol=1e-6)
    np.testing.assert_allclose(weighted["loss"] - 0.001 * 100 * weighted["vb"],
                               w * plain["mse"], rtol=1e-5)
