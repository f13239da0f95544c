"""Sample-quality evaluation: metrics (R-precision, Frechet distance), an evaluation CLIP,
the per-split quality report and its plots (``benchmarks/quality_emoji.py``)."""
from unclip_jax.eval.metrics import frechet_distance, r_precision  # noqa: F401
