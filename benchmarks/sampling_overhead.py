"""Overhead of the whole-loop jitted sampler against the model calls it makes.

Builds a small self-contained conv stack (4 x 3x3 convs at 32x32x64, a UNet-sized block),
then times
  * one jitted N-step DDIM loop (`ddim_sample`, lax.scan), against
  * N calls of the same model, jitted on its own, chained from Python,
each as the median over repeats, and prints `loop_overhead=<loop / calls>` (goal <= 1.05 at N=50).
It also compiles the loop at N=10 and N=200 and prints `compile_ratio=<200 / 10>` (goal <= 1.5:
the step count is a scan length, not unrolled code).

    python benchmarks/sampling_overhead.py [--steps 50] [--batch 4] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import create_gaussian_diffusion, ddim_sample

SIZE, WIDTH, CHANNELS = 32, 64, 3


def init_params(key, depth: int = 4):
    keys = jax.random.split(key, depth + 3)
    conv = lambda k, cin, cout: jax.random.normal(k, (3, 3, cin, cout)) * (2.0 / (9 * cin)) ** 0.5
    return {
        "in": conv(keys[0], CHANNELS, WIDTH),
        "hidden": [conv(k, WIDTH, WIDTH) for k in keys[1:depth]],
        "out": conv(keys[depth], WIDTH, CHANNELS) * 0.1,
        "temb": jax.random.normal(keys[depth + 1], (WIDTH,)) * 0.1,
    }


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def model_fn(x, t, params):
    """x [B, 32, 32, 3], t [B] -> eps [B, 32, 32, 3]."""
    temb = jnp.sin(t.astype(jnp.float32)[:, None] / 1000.0 * params["temb"])[:, None, None, :]
    h = jax.nn.silu(_conv(x, params["in"]) + temb)
    for w in params["hidden"]:
        h = h + jax.nn.silu(_conv(h, w))
    return _conv(h, params["out"])


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    params = init_params(jax.random.PRNGKey(0))
    shape = (args.batch, SIZE, SIZE, CHANNELS)
    key = jax.random.PRNGKey(1)
    kw = {"params": params}
    n = args.steps
    diffusion = create_gaussian_diffusion(1000, "cosine", f"ddim{n}")

    def run_loop():
        return ddim_sample(diffusion, model_fn, shape, key, kw).block_until_ready()

    single = jax.jit(model_fn)
    x0 = jax.random.normal(key, shape)
    ts = [jnp.full((args.batch,), int(t), jnp.int32) for t in diffusion.timestep_map[::-1]]

    def run_calls():
        x = x0
        for t in ts:
            x = single(x, t, params)
        return x.block_until_ready()

    # interleave so that load from other processes hits both alike
    loop_times, call_times = [], []
    run_loop(), run_calls()
    for _ in range(args.repeats):
        loop_times.append(median_time(run_loop, 1))
        call_times.append(median_time(run_calls, 1))
    t_loop, t_calls = statistics.median(loop_times), statistics.median(call_times)
    print(f"device={jax.devices()[0].device_kind} batch={args.batch} steps={n}")
    print(f"loop_s={t_loop:.4f} calls_s={t_calls:.4f} per_step_ms={1e3 * t_loop / n:.2f}")
    print(f"loop_overhead={t_loop / t_calls:.3f}")

    def compile_time(steps: int) -> float:
        d = create_gaussian_diffusion(1000, "cosine", f"ddim{steps}")
        fresh = lambda x, t, params: model_fn(x, t, params)  # new static arg: no cache hit
        t0 = time.perf_counter()
        ddim_sample.lower(d, fresh, shape, key, kw).compile()
        return time.perf_counter() - t0

    c10 = statistics.median(compile_time(10) for _ in range(3))
    c200 = statistics.median(compile_time(200) for _ in range(3))
    print(f"compile_10_s={c10:.3f} compile_200_s={c200:.3f}")
    print(f"compile_ratio={c200 / c10:.3f}")


if __name__ == "__main__":
    main()
