"""Seconds for `unclip sample` of 4 images at default steps, cold and warm (issue "5 of 6").

Runs the real command line three ways, each as a fresh process, and prints a table:

  * cold: an empty JAX compilation cache (a first run on a fresh machine: imports, model load,
    every compile, sampling);
  * warm: the same command again, now with the persistent compilation cache filled;
  * no-op: `python -c "import unclip_jax.cli"` plus model load only (what is left when nothing
    is compiled or sampled), to say what dominates.

For each: wall seconds and CPU seconds (user + sys of the child process; on 2 cores CPU can exceed
wall). Repeats warm runs `--repeats` times and reports the median. Also prints the sampling
time measured inside one warm process (second call, everything compiled), per stage.

    python benchmarks/sample_time.py [--model DIR] [--prompt "a red heart"] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall s, child CPU s) of one subprocess run; raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _in_process(model_dir: str | None, prompt: str, num: int) -> dict[str, float]:
    """Per-stage seconds of a warm call inside one process (first call compiles)."""
    import jax
    import numpy as np

    from unclip_jax import cli
    from unclip_jax.pipelines import stages
    from unclip_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    model = cli.load_model(model_dir or cli.default_model())
    key = jax.random.key(0)

    def once() -> dict[str, float]:
        t = {}
        t0 = time.perf_counter()
        text = stages.encode_text(model, [prompt] * num)
        jax.block_until_ready(text.emb)
        t["clip text"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        z = jax.block_until_ready(stages.sample_image_emb(model, key, text))
        t["prior"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = jax.block_until_ready(stages.sample_decoder(model, key, z, text))
        t["decoder"] = time.perf_counter() - t0
        for i in range(len(model.upsamplers)):
            t0 = time.perf_counter()
            x = jax.block_until_ready(stages.upsample(model, key, x, i))
            t[f"sr{i + 1}"] = time.perf_counter() - t0
        assert np.isfinite(np.asarray(x)).all()
        return t

    first = once()
    second = once()
    return {"compile+run": first, "run": second}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: the shipped model)")
    ap.add_argument("--prompt", default="a red heart")
    ap.add_argument("--num", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, UNCLIP_JAX_CACHE=os.path.join(tmp, "cache"))
        out = os.path.join(tmp, "s.png")
        cmd = ["unclip", "sample", args.prompt, "--num", str(args.num), "--out", out,
               "--no-progress"] + (["--model", args.model] if args.model else [])
        cold = _run(cmd, env)
        warm = [_run(cmd, env) for _ in range(max(1, args.repeats))]
        load_code = ("import sys; from unclip_jax import cli; "
                     "cli.load_model(sys.argv[1] if len(sys.argv) > 1 else cli.default_model())")
        noop = _run([sys.executable, "-c", load_code] + ([args.model] if args.model else []), env)
    med = lambda i: statistics.median(w[i] for w in warm)  # noqa: E731
    print(f"| `unclip sample` ({args.num} images, default steps) | wall s | CPU s |")
    print("|---|---:|---:|")
    print(f"| cold (empty compilation cache) | {cold[0]:.1f} | {cold[1]:.1f} |")
    print(f"| warm (persistent cache; median of {len(warm)}) | {med(0):.1f} | {med(1):.1f} |")
    print(f"| imports + model load only | {noop[0]:.1f} | {noop[1]:.1f} |")
    stages_t = _in_process(args.model, args.prompt, args.num)
    print()
    print("| stage (in one process) | first call (compile + run) s | second call s |")
    print("|---|---:|---:|")
    for k in stages_t["run"]:
        print(f"| {k} | {stages_t['compile+run'][k]:.2f} | {stages_t['run'][k]:.2f} |")
    print(f"\ncold_seconds={cold[0]:.1f} warm_seconds={med(0):.1f} "
          f"load_seconds={noop[0]:.1f} goal_cold<=60: {'met' if cold[0] <= 60 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
