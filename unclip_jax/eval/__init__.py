"""Sample-quality evaluation (issue 5, "Measure quality honestly").

metrics        R-precision, Frechet distance (numpy float64, tested against closed forms)
clip_features  EvalCLIP: a separately trained CLIP that embeds images / captions in batches
quality        per-split scoring of unCLIP and its conditioning ablations, guidance sweep,
               markdown table, sample grids (driven by benchmarks/quality_emoji.py)
plots          the R-precision vs CLIP-FID trade-off plot (matplotlib, else PIL)
"""
from unclip_jax.eval.metrics import frechet_distance, r_precision  # noqa: F401
