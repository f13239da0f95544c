"""Training throughput: images (or embeddings) per second and model FLOPs utilisation (MFU).

Builds the real train step of a stage (the loss of ``unclip_jax.train.losses``, AdamW, EMA,
compute dtype from ``--dtype``), jits it, counts the FLOPs of one step (forward + backward +
optimizer) from the *lowered*, backend-independent HLO (``unclip_jax.utils.flops``: the compiled
executable's count misses the convolutions that XLA hands to cuDNN on GPUs, ~15x too low for a
UNet), and times ``--steps`` steps after a warm-up (median). MFU = FLOPs per step / step time /
peak FLOP/s of the device (``--peak-tflops``, or a table of known accelerators; none on CPU).

    python benchmarks/train_throughput.py --config experiments/tiny.py --stage decoder --batch 8
    python benchmarks/train_throughput.py --config experiments/karlo.py --stage decoder \
        --batch 8 --dtype bfloat16           # on one H100 / TPU chip
    ... --config.decoder.attention_resolutions="()"  # a variant (any --config.KEY=VALUE)
    ... --config.decoder.attention_impl=cudnn        # fused (flash) attention on NVIDIA GPUs
    ... --profile /tmp/trace                         # + a jax.profiler trace of 3 steps
    ... --count-only                                 # FLOPs per step only (any machine)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import config as cfg_lib
from unclip_jax.train.cli import load_config, split_overrides
from unclip_jax.train.losses import build_stage
from unclip_jax.train.optim import make_optimizer
from unclip_jax.train.state import TrainState
from unclip_jax.train.step import make_train_step
from unclip_jax.utils.flops import compiled_flops, lowered_flops

# Dense bf16 peak FLOP/s per chip, most specific name first: device_kind is e.g.
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "TPU v5 lite"; the first table entry contained in it wins.
PEAK_TFLOPS = (("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h200 nvl", 835.0), ("h100", 989.0),
               ("h200", 989.0), ("a100", 312.0), ("tpu v4", 275.0), ("tpu v5 lite", 197.0),
               ("tpu v5e", 197.0), ("tpu v5p", 459.0), ("tpu v5", 459.0), ("tpu v6", 918.0))


def peak_tflops(device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None for an unknown one (e.g. a CPU)."""
    kind = device.device_kind.lower()
    for name, tf in PEAK_TFLOPS:
        if name in kind:
            return tf
    return None


def synthetic_batch(config, stage: str, batch: int, rng: np.random.Generator) -> dict:
    """Random arrays with the keys and shapes the stage's loss reads."""
    ccfg = cfg_lib.clip_config(config)
    d, L = ccfg.projection_dim, ccfg.text_config.max_position_embeddings
    w = ccfg.text_config.hidden_size
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    cond = dict(image_emb=f(batch, d), text_emb=f(batch, d), text_states=f(batch, L, w),
                text_mask=np.ones((batch, L), bool))
    if stage == "prior":
        return cond
    size = cfg_lib.decoder_config(config).image_size if stage == "decoder" else \
        cfg_lib.sr_configs(config)[0].image_size
    return dict(cond, image=np.clip(f(batch, size, size, 3), -1, 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/tiny.py")
    ap.add_argument("--stage", choices=("decoder", "prior", "sr"), default="decoder")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the config's)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--wait-for", default=None, metavar="PATH",
                    help="compile and warm up, then time the steps only once PATH exists (lets "
                         "the compile overlap other work on the device; the timing does not)")
    ap.add_argument("--count-only", action="store_true",
                    help="only count the model FLOPs of one step (abstract shapes: no weights, no "
                         "compile; seconds on a CPU even for the Karlo decoder), then exit")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing, trace 3 more steps with jax.profiler into DIR (open with "
                         "TensorBoard's profile plugin or Perfetto: which ops take the time)")
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(rest)

    # --config.KEY=VALUE overrides, as for `unclip train` (e.g. time a variant without attention:
    # --config.decoder.attention_resolutions="()" --config.decoder.use_middle_attention=false)
    config = load_config(args.config, overrides)
    if overrides:
        print("overrides: " + " ".join(f"{k}={v}" for k, v in overrides.items()))
    if args.dtype:
        config.dtype = args.dtype
    dtype = cfg_lib.compute_dtype(config)
    stage = build_stage(args.stage, config)
    optimizer = make_optimizer(dict(learning_rate=1e-4, warmup_steps=0, total_steps=10_000))
    import flax.linen as nn

    step = jax.jit(make_train_step(stage.make_loss(stage.frozen), optimizer, ema_decay=0.999,
                                   compute_dtype=dtype), donate_argnums=0)
    host = stage.prepare(synthetic_batch(config, args.stage, args.batch,
                                         np.random.default_rng(0)))
    if args.count_only:
        params = nn.meta.unbox(jax.eval_shape(stage.init, jax.random.key(0, impl="rbg")))
        state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                               params)
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            host)
        flops = lowered_flops(step.lower(state, spec))
        n_params = sum(x.size for x in jax.tree.leaves(params))
        print(f"stage={args.stage} config={config.get('name')} params={n_params:,} "
              f"batch={args.batch} dtype={jnp.dtype(dtype).name}")
        print(f"tflops_per_step={flops / 1e12:.4f} "
              f"gflops_per_example={flops / args.batch / 1e9:.2f}")
        return
    params = jax.jit(lambda k: jax.tree.map(lambda x: x, stage.init(k)))(
        jax.random.key(0, impl="rbg"))
    params = nn.meta.unbox(params)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
    batch = jax.tree.map(jnp.asarray, host)

    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    flops = lowered_flops(lowered)  # the model's FLOPs, the same count on every backend
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    xla_flops = compiled_flops(compiled)  # what the backend counts (misses cuDNN convs on GPU)

    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    if args.wait_for:
        print(f"compiled in {compile_s:.1f} s; waiting for {args.wait_for}", flush=True)
        while not os.path.exists(args.wait_for):
            time.sleep(0.5)
        for _ in range(2):  # warm up again after the wait (clocks, caches)
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    if args.profile:
        with jax.profiler.trace(args.profile):
            for _ in range(3):
                state, m = compiled(state, batch)
            jax.block_until_ready(m)
        print(f"profile of 3 steps written to {args.profile}")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    dev = jax.devices()[0]
    peak = args.peak_tflops or peak_tflops(dev)
    print(f"device={dev.device_kind} ({dev.platform}) x{jax.device_count()} stage={args.stage} "
          f"config={config.get('name')} params={n_params:,} batch={args.batch} "
          f"dtype={jnp.dtype(dtype).name}")
    print(f"compile_s={compile_s:.1f} step_s={step_s:.4f} (median of {args.steps})")
    print(f"images_per_s={args.batch / step_s:.1f}")
    print(f"tflops_per_step={flops / 1e12:.4f} achieved_tflops={flops / step_s / 1e12:.3f} "
          f"(compiled executable's own count: {xla_flops / 1e12:.4f} TFLOP)")
    if peak:
        print(f"mfu={flops / step_s / (peak * 1e12):.3f} (peak {peak} TFLOP/s)")
    else:
        print("mfu=n/a (no known peak for this device; pass --peak-tflops)")


if __name__ == "__main__":
    main()
