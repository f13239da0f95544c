"""Gaussian diffusion: forward process, posterior, model parameterisations, losses.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021): step indices t = 0..N-1 of the (possibly
respaced) process, alpha_bar_t = prod_{s<=t} (1 - beta_s), alpha_bar_{-1} = 1.

    q(x_t | x_0)         = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I)
    v                    = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0   (Salimans & Ho 2022)

All functions are pure and jit-friendly; `GaussianDiffusion` is a pytree of float32 tables (built
in float64) plus static settings. Data is [B, ...] (NHWC images or [B, D] embeddings); `t` is an
int array [B] of indices into the tables. Models are called with `diffusion.timestep_map[t]`, the
original (un-respaced) step index.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from unclip_jax.diffusion import schedules

MODEL_OUTPUTS = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("mse", "hybrid")


@struct.dataclass
class GaussianDiffusion:
    """Schedule tables, each float32 [N] (timestep_map int32 [N]), and static settings.

    model_output: what the model predicts ('eps', 'x0' or 'v').
    model_var_type: 'fixed_small' (beta~_t), 'fixed_large' (beta_t) or 'learned_range' (the model
      outputs 2C channels; the second C interpolate log beta~_t .. log beta_t).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_betas: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timestep_map: jax.Array
    model_output: str = struct.field(pytree_node=False, default="eps")
    model_var_type: str = struct.field(pytree_node=False, default="fixed_small")

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def learned_variance(self) -> bool:
        return self.model_var_type == "learned_range"

    @classmethod
    def from_betas(cls, betas, *, timestep_map=None, model_output: str = "eps",
                   model_var_type: str = "fixed_small") -> "GaussianDiffusion":
        """Build every table in float64 from `betas` [N]; store float32."""
        if model_output not in MODEL_OUTPUTS:
            raise ValueError(f"model_output must be one of {MODEL_OUTPUTS}, got {model_output!r}")
        if model_var_type not in VAR_TYPES:
            raise ValueError(f"model_var_type must be one of {VAR_TYPES}, got {model_var_type!r}")
        b = np.asarray(betas, np.float64)
        if b.ndim != 1 or not ((b > 0) & (b <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        n = b.shape[0]
        ab = np.cumprod(1.0 - b)
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        ab_next = np.concatenate([ab[1:], [0.0]])
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        # beta~_0 = 0: its log is replaced by log beta~_1 (the model's range at t=0 then is sane).
        post_var_for_log = np.concatenate([[post_var[1] if n > 1 else b[0]], post_var[1:]])
        tables = dict(
            betas=b,
            alphas_cumprod=ab,
            alphas_cumprod_prev=ab_prev,
            alphas_cumprod_next=ab_next,
            sqrt_alphas_cumprod=np.sqrt(ab),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ab),
            log_betas=np.log(b),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(post_var_for_log),
            posterior_mean_coef1=b * np.sqrt(ab_prev) / (1.0 - ab),
            posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab),
        )
        tables = {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}
        tmap = np.arange(n) if timestep_map is None else np.asarray(timestep_map)
        return cls(**tables, timestep_map=jnp.asarray(tmap, jnp.int32),
                   model_output=model_output, model_var_type=model_var_type)


def create_gaussian_diffusion(steps: int = 1000, noise_schedule: str = "cosine",
                              timestep_respacing: str | int | None = "",
                              model_output: str = "eps",
                              model_var_type: str = "fixed_small") -> GaussianDiffusion:
    """A `steps`-step schedule ('cosine' or 'linear'), optionally respaced ("ddim25", "27",
    "10,10,5"); tables computed in float64 from the original betas."""
    betas = schedules.get_named_beta_schedule(noise_schedule, steps)
    kept = schedules.space_timesteps(steps, timestep_respacing)
    new_betas, tmap = schedules.respace_betas(betas, kept)
    return GaussianDiffusion.from_betas(new_betas, timestep_map=tmap, model_output=model_output,
                                        model_var_type=model_var_type)


def respace(diffusion: GaussianDiffusion, section_counts) -> GaussianDiffusion:
    """Respace an existing diffusion (its steps are the 'original' ones); timestep maps compose.

    Prefer `create_gaussian_diffusion(..., timestep_respacing=...)`, which starts from float64
    betas; this one starts from the stored float32 betas.
    """
    kept = schedules.space_timesteps(diffusion.num_timesteps, section_counts)
    new_betas, kept = schedules.respace_betas(np.asarray(diffusion.betas, np.float64), kept)
    tmap = np.asarray(diffusion.timestep_map)[kept]
    return GaussianDiffusion.from_betas(new_betas, timestep_map=tmap,
                                        model_output=diffusion.model_output,
                                        model_var_type=diffusion.model_var_type)


# --------------------------------------------------------------------------------------------
# helpers


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] for t [B], reshaped to [B, 1, ..., 1] with `ndim` dims in all."""
    out = table[t]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def split_model_output(diffusion: GaussianDiffusion, output: jax.Array):
    """Model output [..., C or 2C] -> (prediction [..., C], variance values [..., C] or None)."""
    if diffusion.learned_variance:
        c = output.shape[-1] // 2
        return output[..., :c], output[..., c:]
    return output, None


# --------------------------------------------------------------------------------------------
# forward process


def q_mean_variance(diffusion: GaussianDiffusion, x_start, t):
    """q(x_t | x_0): (mean [B, ...], variance [B, 1..], log variance [B, 1..])."""
    nd = x_start.ndim
    mean = extract(diffusion.sqrt_alphas_cumprod, t, nd) * x_start
    var = 1.0 - extract(diffusion.alphas_cumprod, t, nd)
    return mean, var, jnp.log(var)


def x_t_from_x0_eps(x0, eps, alpha_bar):
    """x = sqrt(a) x_0 + sqrt(1 - a) eps: the point at noise level a (also DDIM's eta = 0 update)."""
    return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * eps


def q_sample(diffusion: GaussianDiffusion, x_start, t, noise):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.  x_start, noise [B, ...]."""
    nd = x_start.ndim
    return (extract(diffusion.sqrt_alphas_cumprod, t, nd) * x_start
            + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, nd) * noise)


def q_posterior_mean_variance(diffusion: GaussianDiffusion, x_start, x_t, t):
    """q(x_{t-1} | x_t, x_0) = N(c1 x_0 + c2 x_t, beta~_t):
    (mean [B, ...], variance [B, 1..], log variance clipped [B, 1..])."""
    nd = x_t.ndim
    mean = (extract(diffusion.posterior_mean_coef1, t, nd) * x_start
            + extract(diffusion.posterior_mean_coef2, t, nd) * x_t)
    return (mean, extract(diffusion.posterior_variance, t, nd),
            extract(diffusion.posterior_log_variance_clipped, t, nd))


# --------------------------------------------------------------------------------------------
# eps / x0 / v conversions.  `alpha_bar` is broadcastable to x ([B, 1, ..]); the `predict_*`
# versions look it up at step t.


def x0_from_eps(x_t, eps, alpha_bar):
    """x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def eps_from_x0(x_t, x0, alpha_bar):
    """eps = (x_t - sqrt(a) x_0) / sqrt(1 - a)."""
    return (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)


def v_from_eps_x0(eps, x0, alpha_bar):
    """v = sqrt(a) eps - sqrt(1 - a) x_0."""
    return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def x0_from_v(x_t, v, alpha_bar):
    """x_0 = sqrt(a) x_t - sqrt(1 - a) v."""
    return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * v


def eps_from_v(x_t, v, alpha_bar):
    """eps = sqrt(1 - a) x_t + sqrt(a) v."""
    return jnp.sqrt(1.0 - alpha_bar) * x_t + jnp.sqrt(alpha_bar) * v


def _alpha_bar(diffusion, t, x):
    return extract(diffusion.alphas_cumprod, t, x.ndim)


def predict_x0_from_eps(diffusion: GaussianDiffusion, x_t, t, eps):
    return x0_from_eps(x_t, eps, _alpha_bar(diffusion, t, x_t))


def predict_eps_from_x0(diffusion: GaussianDiffusion, x_t, t, x0):
    return eps_from_x0(x_t, x0, _alpha_bar(diffusion, t, x_t))


def predict_v(diffusion: GaussianDiffusion, x_start, t, eps):
    return v_from_eps_x0(eps, x_start, _alpha_bar(diffusion, t, x_start))


def predict_x0_from_v(diffusion: GaussianDiffusion, x_t, t, v):
    return x0_from_v(x_t, v, _alpha_bar(diffusion, t, x_t))


def predict_eps_from_v(diffusion: GaussianDiffusion, x_t, t, v):
    return eps_from_v(x_t, v, _alpha_bar(diffusion, t, x_t))


def predict_x0(diffusion: GaussianDiffusion, x_t, t, prediction):
    """x_0 implied by the model's prediction (of type `diffusion.model_output`)."""
    if diffusion.model_output == "eps":
        return predict_x0_from_eps(diffusion, x_t, t, prediction)
    if diffusion.model_output == "v":
        return predict_x0_from_v(diffusion, x_t, t, prediction)
    return prediction


def training_target(diffusion: GaussianDiffusion, x_start, t, noise):
    """What the model should output for (x_0, eps): eps, x_0 or v."""
    if diffusion.model_output == "eps":
        return noise
    if diffusion.model_output == "v":
        return predict_v(diffusion, x_start, t, noise)
    return x_start


# --------------------------------------------------------------------------------------------
# x0 processing


def dynamic_threshold(x0, percentile: float = 0.995):
    """Imagen dynamic thresholding, per sample: s = max(1, quantile_p(|x_0|));
    x_0 <- clip(x_0, -s, s) / s.  x0 [B, ...]."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def process_x0(x0, clip_denoised: bool = False, threshold: Optional[float] = None):
    """Dynamic thresholding at percentile `threshold` if given, else clip to [-1, 1] if asked."""
    if threshold is not None:
        return dynamic_threshold(x0, threshold)
    if clip_denoised:
        return jnp.clip(x0, -1.0, 1.0)
    return x0


# --------------------------------------------------------------------------------------------
# reverse process


class PMeanVar(NamedTuple):
    """p(x_{t-1} | x_t): mean [B, ...]; variance, log_variance [B, ...] or [B, 1..];
    pred_x0, pred_eps [B, ...] (after clipping / thresholding)."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array
    pred_eps: jax.Array


def model_log_variance(diffusion: GaussianDiffusion, var_values, t, x_t):
    """log sigma_t^2 of p(x_{t-1} | x_t).

    fixed_small: log beta~_t (clipped at t=0); fixed_large: log beta_t (beta~_1 at t=0);
    learned_range: frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2.
    """
    nd = x_t.ndim
    min_log = extract(diffusion.posterior_log_variance_clipped, t, nd)
    if diffusion.model_var_type == "fixed_small":
        return min_log
    if diffusion.model_var_type == "fixed_large":
        large = jnp.concatenate([diffusion.posterior_log_variance_clipped[:1],
                                 diffusion.log_betas[1:]])
        return extract(large, t, nd)
    max_log = extract(diffusion.log_betas, t, nd)
    frac = (var_values + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def p_mean_variance(diffusion: GaussianDiffusion, model_output, x_t, t, *,
                    clip_denoised: bool = False, threshold: Optional[float] = None) -> PMeanVar:
    """Mean and variance of p(x_{t-1} | x_t) from the raw model output [B, ..., C or 2C].

    The mean is the posterior mean at the (optionally clipped / thresholded) predicted x_0.
    """
    prediction, var_values = split_model_output(diffusion, model_output)
    log_var = model_log_variance(diffusion, var_values, t, x_t)
    pred_x0 = process_x0(predict_x0(diffusion, x_t, t, prediction), clip_denoised, threshold)
    mean, _, _ = q_posterior_mean_variance(diffusion, pred_x0, x_t, t)
    pred_eps = predict_eps_from_x0(diffusion, x_t, t, pred_x0)
    return PMeanVar(mean, jnp.exp(log_var), log_var, pred_x0, pred_eps)


# --------------------------------------------------------------------------------------------
# likelihood terms and losses


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) by the tanh approximation (Page 1977), as in the DDPM code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(means, e^{2 log_scales}),
    with open-ended edge bins; elementwise, in nats."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(diffusion: GaussianDiffusion, model_output, x_start, x_t, t, *,
                 clip_denoised: bool = False):
    """The VLB term L_t in bits per dimension, [B]:
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1, decoder NLL -log p(x_0 | x_1) at t = 0."""
    true_mean, _, true_log_var = q_posterior_mean_variance(diffusion, x_start, x_t, t)
    p = p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(
        x_start, p.mean, 0.5 * jnp.broadcast_to(p.log_variance, x_start.shape))
    nll = mean_flat(nll) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def snr(diffusion: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of x_t, [B] for t [B]."""
    ab = diffusion.alphas_cumprod[t]
    return ab / (1.0 - ab)


def min_snr_weight(diffusion: GaussianDiffusion, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"), [B]: the x_0-space weight min(SNR_t, gamma), expressed for the
    model's target: / SNR_t for eps, as is for x_0, / (SNR_t + 1) for v. It caps the weight of
    the nearly clean timesteps, where x_0 is easy, so the noisy ones that decide shapes learn
    faster."""
    s = snr(diffusion, t)
    w = jnp.minimum(s, gamma)
    if diffusion.model_output == "eps":
        return w / s
    if diffusion.model_output == "v":
        return w / (s + 1.0)
    return w


def training_losses(diffusion: GaussianDiffusion, model_fn: Callable, x_start, t, noise,
                    model_kwargs: Optional[dict] = None, *, loss_type: Optional[str] = None,
                    vlb_weight: float = 0.001, snr_gamma: float = 0.0) -> dict:
    """Per-example losses for one draw of (t, eps); returns {'loss', 'mse'[, 'vb']}, each [B].

    model_fn(x_t, timestep_map[t], **model_kwargs) -> [B, ..., C or 2C].
    loss_type: 'mse' (L_simple against the eps / x0 / v target) or 'hybrid'
      (L_simple + vlb_weight * N * L_t, N = num_timesteps, i.e. lambda * L_vlb with L_vlb
      estimated by N L_t; the mean channels are stop-gradiented in L_t so it only trains the
      variance). Default: 'hybrid' for learned variance, else 'mse'.
    snr_gamma: > 0 weights L_simple per example by `min_snr_weight` (0: unweighted, as in
      DDPM); 'mse' stays the unweighted value for logging.
    """
    if loss_type is None:
        loss_type = "hybrid" if diffusion.learned_variance else "mse"
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "hybrid" and not diffusion.learned_variance:
        raise ValueError("the hybrid loss needs model_var_type='learned_range'")
    x_t = q_sample(diffusion, x_start, t, noise)
    output = model_fn(x_t, diffusion.timestep_map[t], **(model_kwargs or {}))
    prediction, var_values = split_model_output(diffusion, output)
    target = training_target(diffusion, x_start, t, noise)
    mse = mean_flat((target - prediction) ** 2)
    terms = {"mse": mse, "loss": mse}
    if snr_gamma > 0:
        terms["loss"] = min_snr_weight(diffusion, t, snr_gamma) * mse
    if loss_type == "hybrid":
        frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
        vb = vb_terms_bpd(diffusion, frozen, x_start, x_t, t, clip_denoised=False)
        terms["vb"] = vb
        terms["loss"] = terms["loss"] + vlb_weight * diffusion.num_timesteps * vb
    return terms
