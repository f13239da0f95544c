"""Sample quality of the emoji unCLIP on train and held-out test concepts (issue "5 of 6").

    python benchmarks/quality_emoji.py --model MODEL_DIR --eval-clip EVAL_CLIP \
        --data-dir /work/data_cache/tfds --num-concepts 100 --samples-per-concept 4 \
        --guidance-sweep 1,2,3,5,8,10 --out-dir runs/quality

EVAL_CLIP is a CLIP trained *separately* from the model's own (``unclip train clip --config
experiments/emoji_eval_clip.py --workdir runs/eval_clip``; a model dir or ``random:CONFIG.py``
also work), so the decoder cannot game the encoder that scores it; the script refuses the
model's own CLIP. For the train and the test split separately it samples ``--num-concepts``
concepts (seeded), generates ``--samples-per-concept`` images from each concept's first (CLDR)
caption with

  * unCLIP: CLIP text -> diffusion prior -> decoder (-> upsampler),
  * caption only: the decoder with the CLIP image emb dropped (its null embedding),
  * CLIP text emb: the model's CLIP text emb where the image emb goes (the paper's ablation),

and prints one markdown table per split with CLIP R-precision (top-1 among 99 captions of other
concepts of the split), CLIP-FID against real images of the same concepts and CLIP score, with
real images as the ceiling; the decoder guidance sweep (unCLIP and caption only) is a second
table and ``tradeoff.png`` (R-precision vs CLIP-FID). Images are scored after the upsampler(s)
(64 px for the emoji model; ``--score-at decoder``: the decoder's 32 px output, real images
resized to match). Also written: ``results.json``, ``results.md`` and sample grids
``samples_<method>.png`` for the fixed prompts ``GRID_PROMPTS`` (rows; listed in
``samples_prompts.txt``), chosen before any output was looked at.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Mapping, Optional, Sequence

from unclip_jax.eval import quality
from unclip_jax.eval.quality import GRID_PROMPTS


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _methods(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in out if m not in quality.METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad or text!r}; choose from {','.join(quality.METHODS)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model dir (or random:tiny / random:CFG.py)")
    p.add_argument("--eval-clip", required=True,
                   help="evaluation CLIP: CLIP train workdir, `unclip train all` workdir, "
                        "model dir, or random:CONFIG.py")
    p.add_argument("--eval-clip-config", default=None,
                   help="config the eval CLIP workdir was trained with "
                        "(default experiments/emoji_eval_clip.py)")
    p.add_argument("--data-dir", default="/work/data_cache/tfds")
    p.add_argument("--splits", default="train,test")
    p.add_argument("--num-concepts", type=int, default=100, help="concepts per split")
    p.add_argument("--samples-per-concept", type=int, default=4)
    p.add_argument("--guidance", type=float, default=None,
                   help="decoder guidance of the main table (default: the model's)")
    p.add_argument("--guidance-sweep", type=_floats, default=[1, 2, 3, 5, 8, 10])
    p.add_argument("--methods", type=_methods, default=list(quality.METHODS),
                   help="rows of the main table, comma-separated (default all: "
                        f"{','.join(quality.METHODS)})")
    p.add_argument("--num-distractors", type=int, default=99)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prior-guidance", type=float, default=None,
                   help="prior guidance (default: the model's)")
    p.add_argument("--prior-steps", default=None)
    p.add_argument("--decoder-steps", default=None)
    p.add_argument("--sr-steps", default=None)
    p.add_argument("--decoder-candidates", type=int, default=None,
                   help="decoder samples per image, the one the model's own CLIP finds "
                        "closest to the caption kept, in every row (default: the model's "
                        "diffusion.decoder.num_candidates, else 1)")
    p.add_argument("--score-at", choices=quality.SCORE_AT, default="final")
    p.add_argument("--max-real-per-concept", type=int, default=None)
    p.add_argument("--grid-per-prompt", type=int, default=4, help="0: no sample grids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True)
    return p


def emoji_split_data(data_dir: str, split: str) -> tuple[list[dict], dict]:
    """(examples with image + concept, {concept: first caption}) of one emoji split."""
    from unclip_jax.data import emoji
    from unclip_jax.data.pipeline import load_source

    caps = emoji.load_concept_captions(data_dir, split)
    src = load_source("emoji_dataset", split, data_dir)
    examples = []
    for i in range(len(src)):
        ex = src[i]
        examples.append({"image": ex["image"], "concept": ex["concept"]})
    return examples, {c: v[0] for c, v in caps.items()}


def main(argv: Optional[Sequence[str]] = None, *,
         data: Optional[Mapping[str, tuple]] = None, model=None, log=print) -> dict:
    """Run the benchmark. For tests: ``data`` = ``{split: (examples, {concept: caption})}``
    instead of reading the emoji dataset (examples: dicts with ``image`` uint8 [H, W, 3] and
    ``concept``); ``model``: an ``UnCLIP`` object instead of loading ``--model``."""
    import jax

    from unclip_jax import cli
    from unclip_jax.eval import plots
    from unclip_jax.eval.clip_features import load_eval_clip, same_clip
    from unclip_jax.utils.images import save_png

    args = build_parser().parse_args(argv)
    t_start = time.time()
    model = model if model is not None else cli.load_model(args.model)
    if args.decoder_candidates is not None:
        if args.decoder_candidates < 1:
            raise SystemExit("--decoder-candidates must be >= 1")
        with model.config.unlocked():
            model.config.diffusion.decoder["num_candidates"] = args.decoder_candidates
    eval_clip = load_eval_clip(args.eval_clip, args.eval_clip_config,
                               batch_size=args.batch_size, seed=args.seed + 1)
    if same_clip(eval_clip.params, model.params["clip"]):
        raise SystemExit("the evaluation CLIP is the model's own CLIP: train a separate one "
                         "(experiments/emoji_eval_clip.py)")
    os.makedirs(args.out_dir, exist_ok=True)
    log(f"model {model.source} (decoder {model.decoder_size} px, output {model.output_size} px);"
        f" eval CLIP {eval_clip.source}; scoring at "
        f"{'decoder' if args.score_at == 'decoder' else 'final'} resolution")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    key = jax.random.key(args.seed)
    gen_kw = dict(prior_steps=args.prior_steps, prior_guidance=args.prior_guidance,
                  decoder_steps=args.decoder_steps, sr_steps=args.sr_steps)
    results = {}
    for i, split in enumerate(splits):
        t0 = time.time()
        examples, pool = data[split] if data is not None else emoji_split_data(args.data_dir,
                                                                               split)
        cs = quality.concept_set(split, examples, pool, num_concepts=args.num_concepts,
                                 seed=args.seed + i,
                                 max_real_per_concept=args.max_real_per_concept)
        log(f"[{split}] {len(cs.concepts)} concepts, "
            f"{sum(len(r) for r in cs.real_images)} real images, pool of "
            f"{len(cs.pool_concepts)} captions ({time.time() - t0:.1f}s)")
        results[split] = quality.evaluate_split(
            model, eval_clip, cs, jax.random.fold_in(key, i),
            samples_per_concept=args.samples_per_concept, guidance=args.guidance,
            sweep=args.guidance_sweep, num_distractors=args.num_distractors,
            methods=args.methods, sweep_methods=[m for m in ("unclip", "caption_only")
                                                 if m in args.methods],
            batch_size=args.batch_size, score_at=args.score_at, seed=args.seed, log=log,
            **gen_kw)
    table = quality.markdown_table(results)
    log("\n" + table)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    out = {"args": {k: v for k, v in vars(args).items()}, "model": model.source,
           "eval_clip": eval_clip.source, "results": quality.results_json(results)}
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    plot = plots.tradeoff_plot(results, os.path.join(args.out_dir, "tradeoff.png"))
    log(f"wrote {plot}")
    if args.grid_per_prompt > 0:
        grids = quality.sample_grids(model, GRID_PROMPTS, jax.random.fold_in(key, 999),
                                     per_prompt=args.grid_per_prompt, guidance=args.guidance,
                                     batch_size=args.batch_size, score_at=args.score_at,
                                     **gen_kw)
        for m, g in grids.items():
            save_png(g, os.path.join(args.out_dir, f"samples_{m}.png"))
        with open(os.path.join(args.out_dir, "samples_prompts.txt"), "w") as f:
            f.write("\n".join(GRID_PROMPTS) + "\n")
        log(f"wrote samples_{{{','.join(grids)}}}.png ({len(GRID_PROMPTS)} prompts x "
            f"{args.grid_per_prompt})")
    log(f"done in {time.time() - t_start:.0f}s")
    return out


if __name__ == "__main__":
    from unclip_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    main(sys.argv[1:])
