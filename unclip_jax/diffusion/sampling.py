"""Samplers: DDPM ancestral and DDIM(eta) steps, DDIM inversion, masked / RePaint sampling and
classifier-free guidance.

Model functions: `model_fn(x_t [B, ...], t [B] int (original step index), **model_kwargs)
-> [B, ..., C or 2C]`. The whole-loop samplers are `jax.jit`-ed with `model_fn` and the options
static and run a `lax.scan` over the static number of steps N, so there is no Python per step
and compile time does not grow with N. Pass parameters and conditioning (arrays only) through
`model_kwargs` so they are jit arguments, not baked-in constants, and reuse one `model_fn`
object so its compiled loop is reused, e.g.

    model_fn = lambda x, t, params, emb: unet.apply(params, x, t, emb)
    x = ddim_sample(diffusion, model_fn, (4, 64, 64, 3), key,
                    model_kwargs={"params": params, "emb": emb})

`progress(step, total)` (optional, static) is called on the host after each step through
`jax.debug.callback`; when None nothing is traced for it.

Randomness: `key` is split into (init key, loop key) by `init_and_loop_keys`; step i (i = 0 is
the first, noisiest step) uses `step_keys(loop_key, i) = (step key, known-region key)`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import gaussian as gd
from unclip_jax.diffusion.gaussian import GaussianDiffusion

# --------------------------------------------------------------------------------------------
# keys


def init_and_loop_keys(key):
    """key -> (key for x_T, key the per-step keys fold in from)."""
    k_init, k_loop = jax.random.split(key)
    return k_init, k_loop


def step_keys(loop_key, i):
    """Keys of step i: (sampler noise, noise of the known region's q_sample)."""
    k_step, k_known = jax.random.split(jax.random.fold_in(loop_key, i))
    return k_step, k_known


def _batch_t(t, x):
    return jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))


def _call(diffusion, model_fn, x_t, t, model_kwargs):
    return model_fn(x_t, diffusion.timestep_map[t], **(model_kwargs or {}))


# --------------------------------------------------------------------------------------------
# single steps


def ddpm_step(diffusion: GaussianDiffusion, model_fn: Callable, x_t, t, key,
              model_kwargs: Optional[dict] = None, *, clip_denoised: bool = True,
              threshold: Optional[float] = None):
    """Ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise at t = 0).

    x_t [B, ...]; t int scalar or [B] (index into the diffusion's tables).
    Returns (x_{t-1} [B, ...], pred_x0 [B, ...]).
    """
    t = _batch_t(t, x_t)
    out = _call(diffusion, model_fn, x_t, t, model_kwargs)
    p = gd.p_mean_variance(diffusion, out, x_t, t, clip_denoised=clip_denoised, threshold=threshold)
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return p.mean + nonzero * jnp.exp(0.5 * p.log_variance) * noise, p.pred_x0


def ddim_step(diffusion: GaussianDiffusion, model_fn: Callable, x_t, t, key=None,
              model_kwargs: Optional[dict] = None, *, eta: float = 0.0,
              clip_denoised: bool = True, threshold: Optional[float] = None):
    """DDIM step x_t -> x_{t-1} (Song et al. 2020, eq. 12):

        x_{t-1} = sqrt(a') x0^ + sqrt(1 - a' - sigma^2) eps^ + sigma z,
        sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'),   a = alpha_bar_t, a' = alpha_bar_{t-1}.

    eps^ is recomputed from the clipped x0^. `eta` is static; with eta = 0 no noise is drawn
    (key may be None). Returns (x_{t-1}, pred_x0).
    """
    t = _batch_t(t, x_t)
    out = _call(diffusion, model_fn, x_t, t, model_kwargs)
    p = gd.p_mean_variance(diffusion, out, x_t, t, clip_denoised=clip_denoised, threshold=threshold)
    a_prev = gd.extract(diffusion.alphas_cumprod_prev, t, x_t.ndim)
    if eta == 0.0:
        return gd.x_t_from_x0_eps(p.pred_x0, p.pred_eps, a_prev), p.pred_x0
    a = gd.extract(diffusion.alphas_cumprod, t, x_t.ndim)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a)) * jnp.sqrt(1.0 - a / a_prev)
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    x_prev = (jnp.sqrt(a_prev) * p.pred_x0
              + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * p.pred_eps
              + sigma * noise)
    return x_prev, p.pred_x0


def ddim_reverse_step(diffusion: GaussianDiffusion, model_fn: Callable, x_prev, t,
                      model_kwargs: Optional[dict] = None, *, clip_denoised: bool = False):
    """Deterministic DDIM step up, x_{t-1} -> x_t (the inverse of `ddim_step(eta=0)` at t,
    with eps evaluated at x_{t-1}):

        x_t = sqrt(a) x0^ + sqrt(1 - a) eps^,   x0^ = (x_{t-1} - sqrt(1 - a') eps^) / sqrt(a'),

    a = alpha_bar_t, a' = alpha_bar_{t-1} (1 at t = 0, where x_{-1} is the clean data) and
    eps^ the model's eps (converted from x0 / v as the model means it at step t).
    """
    t = _batch_t(t, x_prev)
    out = _call(diffusion, model_fn, x_prev, t, model_kwargs)
    eps = gd.p_mean_variance(diffusion, out, x_prev, t).pred_eps
    a = gd.extract(diffusion.alphas_cumprod, t, x_prev.ndim)
    a_prev = gd.extract(diffusion.alphas_cumprod_prev, t, x_prev.ndim)
    x0 = gd.process_x0(gd.x0_from_eps(x_prev, eps, a_prev), clip_denoised)
    return gd.x_t_from_x0_eps(x0, eps, a)


def replace_known(diffusion: GaussianDiffusion, x_t, t, source, mask, noise):
    """Masked sampling: known region (mask = 1) <- q_sample(source, t, noise); rest kept.
    mask broadcastable to x_t ([B, H, W, 1] for images)."""
    known = gd.q_sample(diffusion, source, _batch_t(t, x_t), noise)
    return mask * known + (1.0 - mask) * x_t


# --------------------------------------------------------------------------------------------
# loops


def _maybe_progress(progress, i, total):
    if progress is not None:
        jax.debug.callback(lambda j: progress(int(j) + 1, total), i)


def _reverse_loop(diffusion, step, x_T, loop_key, progress, source, mask):
    """Run `step(x, t, key) -> (x_prev, pred_x0)` for t = N-1 .. 0 in one lax.scan."""
    n = diffusion.num_timesteps

    def body(x, i):
        t = n - 1 - i
        k_step, k_known = step_keys(loop_key, i)
        if mask is not None:
            noise = jax.random.normal(k_known, x.shape, x.dtype)
            x = replace_known(diffusion, x, t, source, mask, noise)
        x, _ = step(x, t, k_step)
        _maybe_progress(progress, i, n)
        return x, None

    x, _ = jax.lax.scan(body, x_T, jnp.arange(n))
    if mask is not None:
        x = mask * source + (1.0 - mask) * x
    return x


def _initial_noise(k_init, shape, x_T):
    return jax.random.normal(k_init, shape, jnp.float32) if x_T is None else x_T


_STATIC = ("model_fn", "shape", "clip_denoised", "threshold", "progress")


@functools.partial(jax.jit, static_argnames=_STATIC)
def ddpm_sample(diffusion: GaussianDiffusion, model_fn: Callable, shape: Sequence[int], key,
                model_kwargs: Optional[dict] = None, *, x_T=None, source=None, mask=None,
                clip_denoised: bool = True, threshold: Optional[float] = None,
                progress: Optional[Callable[[int, int], None]] = None):
    """DDPM ancestral sampling over all N steps of `diffusion`: x_T -> x_0 [shape].

    x_T: start noise (default N(0, I) from the init key). source [shape], mask (1 = known):
    masked sampling, the known region is replaced by q_sample(source, t) before every step and
    by source at the end. clip_denoised / threshold: x0^ clipping to [-1, 1] / dynamic
    thresholding at that percentile (images; pass clip_denoised=False for embeddings).
    """
    k_init, k_loop = init_and_loop_keys(key)
    step = lambda x, t, k: ddpm_step(diffusion, model_fn, x, t, k, model_kwargs,
                                     clip_denoised=clip_denoised, threshold=threshold)
    return _reverse_loop(diffusion, step, _initial_noise(k_init, shape, x_T), k_loop, progress,
                         source, mask)


@functools.partial(jax.jit, static_argnames=_STATIC + ("eta",))
def ddim_sample(diffusion: GaussianDiffusion, model_fn: Callable, shape: Sequence[int], key,
                model_kwargs: Optional[dict] = None, *, eta: float = 0.0, x_T=None, source=None,
                mask=None, clip_denoised: bool = True, threshold: Optional[float] = None,
                progress: Optional[Callable[[int, int], None]] = None):
    """DDIM(eta) sampling over all N steps of `diffusion` (respace it for fewer); as
    `ddpm_sample` otherwise. eta = 0 is deterministic given x_T."""
    k_init, k_loop = init_and_loop_keys(key)
    step = lambda x, t, k: ddim_step(diffusion, model_fn, x, t, k, model_kwargs, eta=eta,
                                     clip_denoised=clip_denoised, threshold=threshold)
    return _reverse_loop(diffusion, step, _initial_noise(k_init, shape, x_T), k_loop, progress,
                         source, mask)


@functools.partial(jax.jit, static_argnames=("model_fn", "clip_denoised", "progress"))
def ddim_invert(diffusion: GaussianDiffusion, model_fn: Callable, x_start,
                model_kwargs: Optional[dict] = None, *, clip_denoised: bool = False,
                progress: Optional[Callable[[int, int], None]] = None):
    """DDIM inversion: data x_start [B, ...] -> x_{N-1} by N deterministic `ddim_reverse_step`s
    (t = 0 .. N-1). `ddim_sample(eta=0, x_T=...)` maps it back, with an O(1/N) error."""
    n = diffusion.num_timesteps

    def body(x, t):
        x = ddim_reverse_step(diffusion, model_fn, x, t, model_kwargs, clip_denoised=clip_denoised)
        _maybe_progress(progress, t, n)
        return x, None

    x, _ = jax.lax.scan(body, x_start, jnp.arange(n))
    return x


# --------------------------------------------------------------------------------------------
# RePaint (Lugmayr et al. 2022): resampling by jumping back up the chain


def repaint_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10):
    """The RePaint walk over states s = N .. 0 (state s holds x_{s-1}; state 0 the clean sample).

    Going down 1 is a denoising step; at the states s = 1, 1 + j, 1 + 2j, ... (< N - j + 1) the walk
    jumps back up j states (forward noising) jump_n_sample - 1 times. Returns int [L + 1] states.
    """
    remaining = {s: jump_n_sample - 1 for s in range(1, num_steps - jump_length + 1, jump_length)}
    s, states = num_steps, [num_steps]
    while s > 0:
        s -= 1
        states.append(s)
        if remaining.get(s, 0) > 0:
            remaining[s] -= 1
            s += jump_length
            states.append(s)
    return np.asarray(states, np.int32)


@functools.partial(jax.jit, static_argnames=_STATIC + ("jump_length", "jump_n_sample"))
def repaint_sample(diffusion: GaussianDiffusion, model_fn: Callable, shape: Sequence[int], key,
                   model_kwargs: Optional[dict] = None, *, source, mask, jump_length: int = 10,
                   jump_n_sample: int = 10, x_T=None, clip_denoised: bool = True,
                   threshold: Optional[float] = None,
                   progress: Optional[Callable[[int, int], None]] = None):
    """Masked DDPM sampling with RePaint resampling: the known region is q_sample(source, t)
    before every denoising step; jumps up j states draw x_{t+j} ~ q(x_{t+j} | x_t) =
    N(sqrt(a_{t+j} / a_t) x_t, (1 - a_{t+j} / a_t) I). One lax.scan over the static walk."""
    states = repaint_schedule(diffusion.num_timesteps, jump_length, jump_n_sample)
    # alpha_bar of state s is alpha_bar_{s-1}; state 0 (clean) has 1.
    ab_state = jnp.concatenate([jnp.ones((1,), jnp.float32), diffusion.alphas_cumprod])
    k_init, k_loop = init_and_loop_keys(key)
    total = len(states) - 1

    def down(x, s, k_step, k_known):
        t = s - 1
        x = replace_known(diffusion, x, t, source, mask, jax.random.normal(k_known, x.shape, x.dtype))
        return ddpm_step(diffusion, model_fn, x, t, k_step, model_kwargs,
                         clip_denoised=clip_denoised, threshold=threshold)[0]

    def up(x, s_from, s_to, k_step):
        noise = jax.random.normal(k_step, x.shape, x.dtype)
        return gd.x_t_from_x0_eps(x, noise, ab_state[s_to] / ab_state[s_from])

    def body(x, inp):
        i, s_from, s_to = inp
        k_step, k_known = step_keys(k_loop, i)
        x = jax.lax.cond(s_to < s_from, lambda x: down(x, s_from, k_step, k_known),
                         lambda x: up(x, s_from, s_to, k_step), x)
        _maybe_progress(progress, i, total)
        return x, None

    xs = (jnp.arange(total), jnp.asarray(states[:-1]), jnp.asarray(states[1:]))
    x, _ = jax.lax.scan(body, _initial_noise(k_init, shape, x_T), xs)
    return mask * source + (1.0 - mask) * x


# --------------------------------------------------------------------------------------------
# classifier-free guidance


def guidance_combine(scales):
    """eps = eps_u + sum_k s_k (eps_k - eps_u) over groups [cond_1, .., cond_K, uncond].

    `scales`: one scale (K = 1, the usual eps_u + s (eps_c - eps_u)) or a sequence of K scales;
    each may be an array broadcastable to [B, ...] (per-sample scales).
    """
    scales = tuple(scales) if isinstance(scales, (tuple, list)) else (scales,)

    def combine(groups):
        uncond = groups[-1]
        if len(groups) != len(scales) + 1:
            raise ValueError(f"{len(scales)} scales for {len(groups) - 1} condition groups")
        out = uncond
        for s, g in zip(scales, groups[:-1]):
            s = jnp.asarray(s, g.dtype)
            s = s.reshape(s.shape + (1,) * (g.ndim - s.ndim))
            out = out + s * (g - uncond)
        return out

    return combine


def classifier_free_guidance(model_fn: Callable, guidance_scale=None, *, num_groups: int = 2,
                             combine: Optional[Callable] = None,
                             learned_variance: bool = False) -> Callable:
    """Wrap `model_fn` into a guided model function with the same signature.

    The wrapped fn takes x_t [B, ...], t [B] and model_kwargs whose arrays have G * B rows:
    G condition groups stacked on the batch axis (see `stack_condition_groups`), by default
    [conditional, unconditional]. It runs ONE forward on the G * B batch, splits the output into
    groups [G, B, ...] and returns `combine(groups)` [B, ...]; default combine is
    `guidance_combine(guidance_scale)` (eps_u + s (eps_c - eps_u); several scales for G > 2).
    With learned variance the combination applies to the first C channels and the variance
    channels are taken from the first (conditional) group, as GLIDE does.

    Guidance is written for eps; for x0 or v outputs the same combination is exact as well,
    since both are affine in eps at fixed (x_t, t) and the weights sum to one.
    """
    if combine is None:
        if guidance_scale is None:
            raise ValueError("give guidance_scale or combine")
        combine = guidance_combine(guidance_scale)

    def guided(x_t, t, **model_kwargs):
        b = x_t.shape[0]
        x_in = jnp.concatenate([x_t] * num_groups, axis=0)
        t_in = jnp.concatenate([t] * num_groups, axis=0)
        out = model_fn(x_in, t_in, **model_kwargs)
        groups = out.reshape((num_groups, b) + out.shape[1:])
        if learned_variance:
            c = out.shape[-1] // 2
            pred = combine(groups[..., :c])
            return jnp.concatenate([pred, groups[0, ..., c:]], axis=-1)
        return combine(groups)

    return guided


def stack_condition_groups(*groups):
    """Concatenate pytrees of condition arrays [B, ...] on the batch axis -> [G * B, ...];
    pass the conditional group(s) first and the unconditional one last."""
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0), *groups)
