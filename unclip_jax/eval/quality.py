"""Sample quality of an unCLIP on held-in and held-out concepts, scored by an evaluation CLIP
(``unclip_jax.eval.clip_features``) that the model never conditioned on.

For one split (a set of concepts, each with one prompt and its real images):

* generated rows: ``unclip`` (prior image emb -> decoder), ``caption_only`` (the CLIP emb
  dropped: the decoder's null embedding) and ``text_emb`` (the model's CLIP *text* emb fed
  where the image emb goes) -- the paper's conditioning ablation -- each at a decoder guidance
  scale; ``unclip`` and ``caption_only`` also over a guidance sweep;
* the ``image_emb`` row: the decoder conditioned on the model's own CLIP embedding of a real
  image of the concept (the paper's reconstructions; an oracle prior). It separates the two
  halves of the system: unCLIP below it means the prior loses what the decoder could use,
  image_emb itself low means the decoder cannot draw the concept even from a true embedding;
* the ``real`` row: real images of the same concepts (the ceiling);
* the ``real_sr`` row (scoring after the upsamplers): the same real images shrunk to the
  decoder's size and upsampled by the model's own upsamplers -- the ceiling of a perfect
  decoder at this resolution with these upsamplers. Near the ``real`` row, neither the
  decoder's resolution nor the upsamplers limit the system; the decoder does.

Every row gets CLIP R-precision (top-1 among ``num_distractors`` first captions of *other*
concepts of the split, the same draw for every generated row), CLIP-FID (Frechet distance of
L2-normalised eval-CLIP image features) against a fixed reference half of the real images
(the ``real`` row is the other half, so its FID is the real-vs-real floor), and CLIP score
(100 x mean cosine of image and true caption).

Generation is batched at a fixed batch size (the last batch padded), with common random
numbers: batch ``i`` uses the same prior and decoder keys in every row and at every guidance
scale, and the prior runs once per split (its embeddings are reused by every decoder run).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.eval import metrics
from unclip_jax.eval.clip_features import EvalCLIP
from unclip_jax.utils.batching import padded_batches

METHODS = ("unclip", "caption_only", "text_emb", "image_emb")
# rows that need only prompts (``image_emb`` also needs real images to embed)
PROMPT_METHODS = ("unclip", "caption_only", "text_emb")
METHOD_LABELS = {"unclip": "unCLIP (prior image emb)", "caption_only": "caption only",
                 "text_emb": "CLIP text emb", "image_emb": "real image emb (oracle prior)",
                 "real": "real images (ceiling)",
                 "real_sr": "real images at decoder size, upsampled (decoder ceiling)"}
SCORE_AT = ("final", "decoder")
REAL_SR_KEY = 7  # fold_in index of the real_sr row's upsampler noise

# Prompts for the sample grids, fixed before any model output was looked at: eight concepts of
# the train split and eight held-out (test split) concepts of the emoji dataset.
GRID_PROMPTS_TRAIN = ("red heart", "grinning face", "thumbs up", "dog face", "pizza", "rocket",
                      "fire", "snowman")
GRID_PROMPTS_TEST = ("fox", "tiger", "cupcake", "black heart", "partying face", "astronaut",
                     "turtle", "flag: sweden")
GRID_PROMPTS = GRID_PROMPTS_TRAIN + GRID_PROMPTS_TEST


@dataclasses.dataclass
class ConceptSet:
    """One split's evaluation data. ``concepts``: the evaluated concept ids; ``prompts``: one
    caption per evaluated concept; ``real_images``: uint8 ``[M_c, H, W, 3]`` per evaluated
    concept; ``pool_concepts`` / ``pool_captions``: one caption per concept of the whole split
    (the R-precision distractor pool; contains the evaluated concepts)."""

    name: str
    concepts: list
    prompts: list
    real_images: list
    pool_concepts: list
    pool_captions: list

    def __post_init__(self):
        missing = [c for c in self.concepts if c not in set(self.pool_concepts)]
        if missing:
            raise ValueError(f"evaluated concepts {missing[:5]} are not in the caption pool")


def concept_set(name: str, examples: Iterable[Mapping], caption_pool: Mapping[str, str], *,
                num_concepts: Optional[int] = None, seed: int = 0,
                max_real_per_concept: Optional[int] = None) -> ConceptSet:
    """Build a ``ConceptSet`` from examples (dicts with ``image`` uint8 [H, W, 3] and
    ``concept``) and ``caption_pool`` (concept -> prompt caption, every concept of the split).
    ``num_concepts`` concepts with at least one image are drawn with ``seed`` (all if None)."""
    by_concept: dict = {}
    for ex in examples:
        c = ex["concept"]
        c = c.decode() if isinstance(c, bytes) else str(c)
        by_concept.setdefault(c, []).append(np.asarray(ex["image"], np.uint8))
    have = sorted(c for c in by_concept if c in caption_pool)
    if not have:
        raise ValueError(f"{name}: no examples of any concept in the caption pool")
    if num_concepts is not None and num_concepts < len(have):
        rng = np.random.default_rng(seed)
        have = sorted(rng.choice(have, size=int(num_concepts), replace=False).tolist())
    real = []
    for c in have:
        ims = by_concept[c]
        if max_real_per_concept:
            ims = ims[:int(max_real_per_concept)]
        real.append(np.stack(ims))
    pool = sorted(caption_pool)
    return ConceptSet(name, have, [caption_pool[c] for c in have], real, pool,
                      [caption_pool[c] for c in pool])


def split_real(cs: ConceptSet) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Real images split per concept into a reference half (even positions) and a ceiling half
    (odd positions): ``(reference, ceiling, reference_labels, ceiling_labels)``."""
    ref, ceil, lr, lc = [], [], [], []
    for c, ims in zip(cs.concepts, cs.real_images):
        ref.extend(ims[0::2])
        lr.extend([c] * len(ims[0::2]))
        ceil.extend(ims[1::2])
        lc.extend([c] * len(ims[1::2]))
    return np.stack(ref), (np.stack(ceil) if ceil else None), lr, lc


# ------------------------------------------------------------------------------ generation


class Generator:
    """Batched, seeded generation for one list of prompts with one model: text encoding and
    the prior run once (``prepare``); ``decode(method, guidance)`` runs the decoder (and the
    upsamplers when ``score_at='final'``) and returns uint8 images ``[N, S, S, 3]``.
    ``cond_images``: uint8 ``[N, H, W, 3]``, one real image per prompt, whose model-CLIP
    embeddings condition the ``image_emb`` method."""

    def __init__(self, model, prompts: Sequence[str], key, *, batch_size: int = 32,
                 prior_steps=None, prior_guidance=None, decoder_steps=None, sr_steps=None,
                 score_at: str = "final", cond_images: Optional[np.ndarray] = None):
        if score_at not in SCORE_AT:
            raise ValueError(f"score_at must be one of {SCORE_AT}")
        if cond_images is not None and len(cond_images) != len(prompts):
            raise ValueError(f"cond_images: {len(cond_images)} images for {len(prompts)} "
                             "prompts; give one per prompt")
        self.model, self.prompts, self.score_at = model, list(prompts), score_at
        self.cond_images = cond_images
        self.batch_size = int(batch_size)
        self.decoder_steps, self.sr_steps = decoder_steps, sr_steps
        self.k_prior, self.k_dec = jax.random.split(key)
        self.prior_steps, self.prior_guidance = prior_steps, prior_guidance
        self._batches = None

    @property
    def n(self) -> int:
        return len(self.prompts)

    def prepare(self):
        """CLIP text conditions, prior image embeddings and (with ``cond_images``) CLIP
        embeddings of the real images, of every batch."""
        from unclip_jax.pipelines import stages

        if self._batches is None:
            self._batches = []
            for i, n, idx in padded_batches(self.n, self.batch_size):
                text = stages.encode_text(self.model, [self.prompts[j] for j in idx])
                z = stages.sample_image_emb(self.model, jax.random.fold_in(self.k_prior, i),
                                            text, steps=self.prior_steps,
                                            guidance=self.prior_guidance)
                z_real = None if self.cond_images is None else \
                    stages.embed_images(self.model, np.asarray(self.cond_images)[idx])
                self._batches.append((n, text, z, z_real))
        return self._batches

    def decode(self, method: str, guidance: float) -> np.ndarray:
        from unclip_jax.pipelines import stages
        from unclip_jax.utils.images import to_uint8

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "image_emb" and self.cond_images is None:
            raise ValueError("method 'image_emb' needs cond_images (one real image per prompt)")
        out = []
        for i, (n, text, z, z_real) in enumerate(self.prepare()):
            emb = {"unclip": z, "caption_only": jnp.zeros_like(z), "text_emb": text.emb,
                   "image_emb": z_real}[method]
            res = stages.decode_and_upsample(
                self.model, jax.random.fold_in(self.k_dec, i), emb, text,
                decoder_steps=self.decoder_steps, decoder_guidance=float(guidance),
                drop_clip_cond=(method == "caption_only"), sr_steps=self.sr_steps,
                stop_after="decoder" if self.score_at == "decoder" else None,
                num_candidates=stages.decoder_candidates(self.model))
            out.append(to_uint8(jax.device_get(res["images"]))[:n])
        return np.concatenate(out, 0)

    @property
    def image_size(self) -> int:
        return self.model.decoder_size if self.score_at == "decoder" else self.model.output_size


def upsample_real(model, images: np.ndarray, key, *, sr_steps=None,
                  batch_size: int = 32) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` real images -> uint8 ``[N, S, S, 3]``: shrunk to the decoder's
    size, then through every upsampler of the model in turn (batch ``i`` with key
    ``fold_in(key, i)``, the last batch padded)."""
    from unclip_jax.pipelines import stages
    from unclip_jax.utils.images import to_uint8

    x = stages.decoder_pixels(model, images)
    out = []
    for i, n, idx in padded_batches(len(x), batch_size):
        batch = x[np.asarray(idx)]
        for j, k in enumerate(jax.random.split(jax.random.fold_in(key, i),
                                               len(model.upsamplers))):
            batch = stages.upsample(model, k, batch, j, steps=sr_steps)
        out.append(to_uint8(jax.device_get(batch))[:n])
    return np.concatenate(out, 0)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from unclip_jax.pipelines.stages import resize_uint8

    return resize_uint8(images, size)


# ------------------------------------------------------------------------------ evaluation


@dataclasses.dataclass
class Row:
    split: str
    method: str        # 'real' or one of METHODS
    guidance: Optional[float]
    n: int
    r_precision: float
    clip_fid: float
    clip_score: float
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate_split(model, eval_clip: EvalCLIP, cs: ConceptSet, key, *,
                   samples_per_concept: int = 4, guidance: Optional[float] = None,
                   sweep: Sequence[float] = (), sweep_methods: Sequence[str] = ("unclip",
                                                                                  "caption_only"),
                   methods: Sequence[str] = METHODS, num_distractors: int = 99,
                   batch_size: int = 32, prior_steps=None, prior_guidance=None,
                   decoder_steps=None, sr_steps=None, score_at: str = "final", seed: int = 0,
                   log: Callable[[str], None] = print, keep_images: bool = False,
                   ceilings: bool = True) -> dict:
    """Score one split. ``guidance``: the decoder scale of the main table rows (default: the
    model's ``diffusion.decoder.guidance``); ``sweep``: extra scales for ``sweep_methods``.
    ``num_distractors`` is capped at the number of other concepts in the pool (the cap is
    reported). ``ceilings=False`` leaves out the ``real`` and ``real_sr`` rows (for settings
    sweeps, where they repeat). Returns ``{'rows': [Row], 'sweep': [Row], 'num_distractors',
    'images'?}``."""
    if guidance is None:
        guidance = float(model.stage_options("decoder").guidance)
    k = int(samples_per_concept)
    # sample j of a concept is conditioned (image_emb row) on its real image j mod M
    cond = np.stack([ims[j % len(ims)] for ims in cs.real_images for j in range(k)]) \
        if "image_emb" in methods else None
    gen = Generator(model, [p for p in cs.prompts for _ in range(k)], key,
                    batch_size=batch_size, prior_steps=prior_steps,
                    prior_guidance=prior_guidance, decoder_steps=decoder_steps,
                    sr_steps=sr_steps, score_at=score_at, cond_images=cond)
    size = gen.image_size
    labels = [c for c in cs.concepts for _ in range(k)]
    nd = min(int(num_distractors), len(cs.pool_concepts) - 1)
    if nd < num_distractors:
        log(f"[{cs.name}] only {len(cs.pool_concepts)} concepts in the pool: "
            f"R-precision uses {nd} distractors (chance {1 / (nd + 1):.3f})")
    pool_feats = eval_clip.embed_captions(cs.pool_captions)
    index = {c: i for i, c in enumerate(cs.pool_concepts)}
    true_of = lambda labs: pool_feats[[index[c] for c in labs]]  # noqa: E731
    rng = np.random.default_rng(seed)
    gen_distractors = metrics.sample_distractors(labels, cs.pool_concepts, rng, nd)

    ref, ceil, _, ceil_labels = split_real(cs)
    ref_feats = eval_clip.embed_images(_resize(ref, size))

    def score(method, g, images, labs, distractors, t0):
        feats = eval_clip.embed_images(images)
        r = metrics.r_precision(feats, true_of(labs), pool_feats, distractors=distractors)
        fid = metrics.frechet_distance(feats, ref_feats)
        cs_ = float(100.0 * np.mean(np.sum(feats * true_of(labs), -1)))
        row = Row(cs.name, method, g, len(images), r, fid, cs_, time.time() - t0)
        log(f"[{cs.name}] {METHOD_LABELS.get(method, method)}"
            f"{'' if g is None else f' @ guidance {g:g}'}: R-precision {r:.3f}, "
            f"CLIP-FID {fid:.4f}, CLIP score {cs_:.2f} (n={len(images)}, {row.seconds:.1f}s)")
        return row, feats

    rows, sweep_rows, images = [], [], {}
    t0 = time.time()
    if ceilings and (ceil is None or len(ceil) < 2):
        log(f"[{cs.name}] fewer than 2 real images outside the reference half: no real row")
    elif ceilings:
        real_dis = metrics.sample_distractors(ceil_labels, cs.pool_concepts,
                                              np.random.default_rng(seed + 1), nd)
        rows.append(score("real", None, _resize(ceil, size), ceil_labels, real_dis, t0)[0])
        if score_at == "final" and len(model.upsamplers):
            t0 = time.time()
            # a key of its own, apart from the generator's prior / decoder keys
            up = upsample_real(model, ceil, jax.random.fold_in(key, REAL_SR_KEY),
                               sr_steps=sr_steps, batch_size=batch_size)
            rows.append(score("real_sr", None, up, ceil_labels, real_dis, t0)[0])

    t0 = time.time()
    gen.prepare()
    log(f"[{cs.name}] CLIP text + prior for {gen.n} samples: {time.time() - t0:.1f}s")
    done: dict = {}
    runs = [(m, float(guidance)) for m in methods]
    runs += [(m, float(g)) for m in sweep_methods for g in sweep if (m, float(g)) not in runs]
    for m, g in runs:
        t0 = time.time()
        ims = gen.decode(m, g)
        done[(m, g)], _ = score(m, g, ims, labels, gen_distractors, t0)
        if keep_images:
            images[(m, g)] = ims
    rows += [done[(m, float(guidance))] for m in methods]
    sweep_rows = [done[(m, float(g))] for m in sweep_methods for g in sweep]
    out = {"rows": rows, "sweep": sweep_rows, "num_distractors": nd, "guidance": float(guidance),
           "samples_per_concept": k, "num_concepts": len(cs.concepts), "score_at": score_at,
           "image_size": size, "num_reference": len(ref)}
    if keep_images:
        out["images"] = images
    return out


# ------------------------------------------------------------------------------ reporting


def markdown_table(results: Mapping[str, dict], goal: Optional[float] = 0.6) -> str:
    """Main table (one block per split) and the guidance sweep, as markdown; with ``goal``, a
    line saying whether unCLIP's R-precision on train concepts reaches it (issue 5: 0.6)."""
    lines = ["| split | row | decoder guidance | n | R-precision top-1 | CLIP-FID | CLIP score |",
             "|---|---|---|---|---|---|---|"]
    for split, res in results.items():
        for r in res["rows"]:
            g = "-" if r.guidance is None else f"{r.guidance:g}"
            lines.append(f"| {split} | {METHOD_LABELS.get(r.method, r.method)} | {g} | {r.n} | "
                         f"{r.r_precision:.3f} | {r.clip_fid:.4f} | {r.clip_score:.2f} |")
    sweep = [(s, r) for s, res in results.items() for r in res["sweep"]]
    if sweep:
        lines += ["", "| split | decoder | guidance | R-precision top-1 | CLIP-FID |",
                  "|---|---|---|---|---|"]
        for s, r in sweep:
            lines.append(f"| {s} | {METHOD_LABELS.get(r.method, r.method)} | {r.guidance:g} | "
                         f"{r.r_precision:.3f} | {r.clip_fid:.4f} |")
    if results:
        k = ", ".join(f"{s} {r['num_distractors']}" for s, r in results.items())
        first = next(iter(results.values()))
        where = ("after the upsampler(s)" if first["score_at"] == "final"
                 else "decoder output; real images resized to match")
        lines += ["", (f"R-precision: each image's true caption ranked against k captions of "
                       f"other concepts of its split (k: {k}; chance 1/(k+1)). CLIP-FID: "
                       "Frechet distance of L2-normalised evaluation-CLIP image features "
                       "against one half of the real images of the same concepts (the real "
                       "row is the other half). CLIP score: 100 x mean cosine(image, true "
                       f"caption). Images scored at {first['image_size']} px ({where}).")]
    train = results.get("train")
    if goal is not None and train:
        r = next((x for x in train["rows"] if x.method == "unclip"), None)
        if r is not None:
            verdict = "met" if r.r_precision >= goal else "NOT met"
            lines += ["", (f"Goal: unCLIP R-precision on train concepts >= {goal:g}: {verdict} "
                           f"({r.r_precision:.3f} at decoder guidance {r.guidance:g}).")]
    return "\n".join(lines)


def results_json(results: Mapping[str, dict]) -> dict:
    out = {}
    for split, res in results.items():
        out[split] = {k: v for k, v in res.items() if k not in ("rows", "sweep", "images")}
        out[split]["rows"] = [r.as_dict() for r in res["rows"]]
        out[split]["sweep"] = [r.as_dict() for r in res["sweep"]]
    return out


def sample_grids(model, prompts: Sequence[str], key, *, per_prompt: int = 4,
                 guidance: Optional[float] = None, methods: Sequence[str] = PROMPT_METHODS,
                 batch_size: int = 32, **gen_kw) -> dict:
    """``{method: uint8 grid}`` with one row per prompt (labelled on the left), ``per_prompt``
    samples per row; the same prior / decoder noise in every method's grid."""
    from unclip_jax.utils.images import make_grid

    if guidance is None:
        guidance = float(model.stage_options("decoder").guidance)
    gen = Generator(model, [p for p in prompts for _ in range(per_prompt)], key,
                    batch_size=batch_size, **gen_kw)
    from unclip_jax.eval.plots import label_rows

    out = {}
    for m in methods:
        ims = gen.decode(m, guidance)
        out[m] = label_rows(make_grid(ims, ncols=per_prompt), prompts, ims.shape[1])
    return out


__all__ = ["ConceptSet", "concept_set", "split_real", "Generator", "Row", "evaluate_split",
           "markdown_table", "results_json", "sample_grids", "METHODS", "PROMPT_METHODS",
           "GRID_PROMPTS", "GRID_PROMPTS_TRAIN", "GRID_PROMPTS_TEST"]
