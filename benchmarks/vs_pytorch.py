"""Side-by-side speed: our jitted unCLIP pipeline vs diffusers' ``UnCLIPPipeline`` (PyTorch).

Same converted weights (a random mid-size unCLIP built with diffusers, saved, converted with
``unclip convert diffusers``), same device, same steps, same batch, same guidance. Each side runs
in its own subprocess (so peak RSS is its own): a warm-up call (ours: compile; theirs: first
call; with ``--torch-compile``: the inductor compile) reported separately, then ``--repeats``
timed calls; medians are reported per stage (clip / prior / decoder / sr) and for the whole
pipeline, with ``speedup = theirs / ours``.

    python benchmarks/vs_pytorch.py                 # mid-size CPU config
    python benchmarks/vs_pytorch.py --size small --repeats 2 --torch-compile

Stage times of diffusers come from hooks on its modules (first call of the prior, of
text_proj and of super_res_first mark the stage boundaries); ours from block_until_ready after
each stage.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {
    # width: CLIP text / embedding width; dec / sr: (image size, block channels, layers)
    "small": dict(width=64, clip_layers=2, prior_layers=2, prior_heads=2,
                  dec=(32, (32, 64), 1), ctx=64, sr=(64, (16, 32), 1)),
    "mid": dict(width=256, clip_layers=4, prior_layers=6, prior_heads=4,
                dec=(32, (64, 128, 192), 2), ctx=256, sr=(64, (32, 64, 96), 1)),
}


def build_pipeline(size: str, out: str) -> None:
    """A random diffusers UnCLIPPipeline of the given size, saved at ``out``."""
    import torch
    from diffusers import (PriorTransformer, UnCLIPPipeline, UnCLIPScheduler,
                           UNet2DConditionModel, UNet2DModel)
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from unclip_jax.models.tokenizer import DEFAULT_TOKENIZER_DIR

    s = SIZES[size]
    w = s["width"]
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR, model_max_length=77)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=w, projection_dim=w, intermediate_size=4 * w, num_attention_heads=w // 64 or 1,
        num_hidden_layers=s["clip_layers"], vocab_size=49408, max_position_embeddings=77))
    prior = PriorTransformer(num_attention_heads=s["prior_heads"],
                             attention_head_dim=w // s["prior_heads"],
                             num_layers=s["prior_layers"], embedding_dim=w, num_embeddings=77)
    dsize, dch, dl = s["dec"]
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=w,
                                    time_embed_dim=4 * dch[0], cross_attention_dim=s["ctx"])
    n = len(dch)
    decoder = UNet2DConditionModel(
        sample_size=dsize, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=dch,
        layers_per_block=dl, cross_attention_dim=s["ctx"], attention_head_dim=32,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity",
        norm_num_groups=16)
    ssize, sch, sl = s["sr"]
    sr_kw = dict(sample_size=ssize, in_channels=6, out_channels=3,
                 down_block_types=("ResnetDownsampleBlock2D",) * len(sch),
                 up_block_types=("ResnetUpsampleBlock2D",) * len(sch), block_out_channels=sch,
                 layers_per_block=sl, norm_num_groups=16, add_attention=False)
    mods = [text, prior, text_proj, decoder]
    sr_first, sr_last = UNet2DModel(**sr_kw), UNet2DModel(**sr_kw)
    with torch.no_grad():
        for m in mods + [sr_first, sr_last]:
            for name, p in m.named_parameters():
                if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                    continue
                p.mul_(0.5)
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text, tokenizer=tok,
        super_res_first=sr_first, super_res_last=sr_last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                        prediction_type="sample", clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range",
                                          prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                            prediction_type="epsilon"))
    pipe.save_pretrained(out)


def count_params(model_dir: str) -> dict:
    from unclip_jax.pipelines import model as model_lib
    from unclip_jax.models.unet import count_params as cp

    m = model_lib.load(model_dir)
    return {k: cp(m.params[k]) for k in ("clip", "prior", "decoder")} | {
        "sr(each)": cp(m.params["sr"][0])}


# ------------------------------------------------------------------------------ one side


def _prompts(batch):
    base = ["a red heart", "a cat on a mat", "a bowl of soup", "a green tree"]
    return [base[i % len(base)] for i in range(batch)]


def run_ours(a) -> dict:
    import jax

    from unclip_jax.pipelines import model as model_lib
    from unclip_jax.pipelines import stages

    m = model_lib.load(a.model)
    prompts = _prompts(a.batch)

    def once(seed):
        key = jax.random.PRNGKey(seed)
        k_prior, k_rest = jax.random.split(key)
        k_dec, k_sr = jax.random.split(k_rest)
        t = {}
        t0 = time.perf_counter()
        text = stages.encode_text(m, prompts)
        jax.block_until_ready(text)
        t1 = time.perf_counter()
        emb = jax.block_until_ready(stages.sample_prior(m, k_prior, text, steps=a.prior_steps))
        t2 = time.perf_counter()
        img = jax.block_until_ready(stages.sample_decoder(m, k_dec, emb, text,
                                                          steps=a.decoder_steps))
        t3 = time.perf_counter()
        jax.block_until_ready(stages.upsample(m, k_sr, img, 0, steps=a.sr_steps))
        t4 = time.perf_counter()
        t.update(clip=t1 - t0, prior=t2 - t1, decoder=t3 - t2, sr=t4 - t3, total=t4 - t0)
        return t

    t0 = time.perf_counter()
    first = once(0)
    warm = time.perf_counter() - t0
    runs = [once(i + 1) for i in range(a.repeats)]
    return dict(warmup=warm, warmup_stages=first, runs=runs)


def run_theirs(a) -> dict:
    import torch
    from diffusers import UnCLIPPipeline

    torch.set_grad_enabled(False)
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    pipe = UnCLIPPipeline.from_pretrained(a.src)
    pipe.set_progress_bar_config(disable=True)
    marks: dict = {}

    def mark(module, name):
        orig = module.forward

        def fwd(*args, **kw):
            marks.setdefault(name, time.perf_counter())
            return orig(*args, **kw)
        module.forward = fwd

    compiled = ""
    if a.torch_compile:
        try:
            for n in ("prior", "decoder", "super_res_first", "super_res_last"):
                setattr(pipe, n, torch.compile(getattr(pipe, n)))
            compiled = "torch.compile(prior, decoder, super_res_first, super_res_last)"
        except Exception as e:  # noqa: BLE001
            compiled = f"torch.compile failed: {type(e).__name__}: {e}"
    mark(pipe.prior, "prior")
    mark(pipe.text_proj, "decoder")
    mark(pipe.super_res_first, "sr")
    prompts = _prompts(a.batch)

    def once(seed):
        marks.clear()
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        pipe(prompts, prior_num_inference_steps=a.prior_steps,
             decoder_num_inference_steps=a.decoder_steps,
             super_res_num_inference_steps=a.sr_steps, generator=g, output_type="np")
        t4 = time.perf_counter()
        return dict(clip=marks["prior"] - t0, prior=marks["decoder"] - marks["prior"],
                    decoder=marks["sr"] - marks["decoder"], sr=t4 - marks["sr"], total=t4 - t0)

    t0 = time.perf_counter()
    try:
        first = once(0)
    except Exception as e:  # noqa: BLE001  (torch.compile on CPU may need a C++ toolchain)
        if not a.torch_compile:
            raise
        return dict(error=f"{type(e).__name__}: {str(e)[:300]}", compiled=compiled)
    warm = time.perf_counter() - t0
    runs = [once(i + 1) for i in range(a.repeats)]
    return dict(warmup=warm, warmup_stages=first, runs=runs, compiled=compiled,
                threads=torch.get_num_threads())


# ------------------------------------------------------------------------------ driver


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (per address space, reset by exec; ru_maxrss is not:
    Linux carries the parent's peak into exec'd children)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _side(a, side, extra=()) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--src", a.src,
           "--model", a.model, "--batch", str(a.batch), "--repeats", str(a.repeats),
           "--prior-steps", str(a.prior_steps), "--decoder-steps", str(a.decoder_steps),
           "--sr-steps", str(a.sr_steps), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        return dict(error=(out.stderr or out.stdout)[-800:])
    return json.loads(line[-1][len("RESULT "):])


def _med(runs, k):
    return statistics.median(r[k] for r in runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="mid")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prior-steps", type=int, default=10)
    p.add_argument("--decoder-steps", type=int, default=10)
    p.add_argument("--sr-steps", type=int, default=5)
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    p.add_argument("--workdir", help="keep the built / converted weights here")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's own, = cores); on a loaded "
                        "machine OpenMP oversubscription slows torch down many times, use 1")
    p.add_argument("--also-default-threads", action="store_true",
                   help="with --torch-threads: also time eager with torch's default threads")
    p.add_argument("--side", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.side:
        res = run_ours(a) if a.side == "ours" else run_theirs(a)
        res["peak_rss_mb"] = _peak_rss_mb()
        print("RESULT " + json.dumps(res))
        return 0

    work = a.workdir or tempfile.mkdtemp(prefix="unclip_bench_")
    a.src, a.model = os.path.join(work, "diffusers"), os.path.join(work, "ours")
    if not os.path.isdir(a.src):
        build_pipeline(a.size, a.src)
    if not os.path.isdir(a.model):
        from unclip_jax.convert.diffusers_unclip import convert_diffusers_pipeline

        convert_diffusers_pipeline(a.src, a.model)
    print(f"config {a.size}: params {count_params(a.model)}; batch {a.batch}, steps "
          f"prior {a.prior_steps} / decoder {a.decoder_steps} / sr {a.sr_steps}, guidance 4 / 8, "
          f"repeats {a.repeats}; cpus {os.cpu_count()}, load avg {os.getloadavg()}")
    thr = ["--torch-threads", str(a.torch_threads)] if a.torch_threads else []
    res = {"ours (jax.jit)": _side(a, "ours"), "diffusers eager": _side(a, "theirs", thr)}
    if a.also_default_threads and a.torch_threads:
        res["diffusers eager (default threads)"] = _side(a, "theirs")
    if a.torch_compile:
        res["diffusers torch.compile"] = _side(a, "theirs", ["--torch-compile"] + thr)
    ours = res["ours (jax.jit)"]
    for name, r in res.items():
        if "error" in r:
            print(f"{name:24s} ERROR {r['error']}")
            continue
        steady = _med(r["runs"], "total")
        extra = (f" (~{r['warmup'] - steady:.2f}s of it compile / warm-up)"
                 if r["warmup"] > steady else "")
        print(f"{name:24s} first call {r['warmup']:7.2f}s{extra}, not in the medians;  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB"
              + (f"  threads {r['threads']}" if "threads" in r else ""))
        parts = []
        for k in ("clip", "prior", "decoder", "sr", "total"):
            s = f"{k} {_med(r['runs'], k):.3f}s"
            if name != "ours (jax.jit)" and "error" not in ours:
                s += f" (speedup={_med(r['runs'], k) / _med(ours['runs'], k):.2f})"
            parts.append(s)
        print(f"{'':24s} median " + ", ".join(parts))
    print(f"load avg after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
