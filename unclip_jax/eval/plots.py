"""The guidance-sweep trade-off plot: R-precision (y) against CLIP-FID (x), one line per
decoder, points labelled with the guidance scale, the real-image ceiling as a separate marker; one panel
per split. matplotlib when installed, else drawn with PIL (no extra dependency)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

COLORS = {"unclip": (31, 119, 180), "caption_only": (255, 127, 14), "text_emb": (44, 160, 44),
          "real": (214, 39, 40)}
LABELS = {"unclip": "unCLIP", "caption_only": "caption only", "text_emb": "CLIP text emb",
          "real": "real (ceiling)"}


def _series(res: Mapping) -> tuple[dict, tuple | None]:
    """Per method, (guidance, CLIP-FID, R-precision) points sorted by guidance: the sweep's
    and the main table's rows of the methods that were swept (the main rows are the sweep's
    point at the default guidance)."""
    swept = {r.method for r in res["sweep"]}
    lines: dict = {}
    seen = set()
    for r in list(res["sweep"]) + [r for r in res["rows"] if r.method in swept]:
        if r.guidance is None or (r.method, r.guidance) in seen:
            continue
        seen.add((r.method, r.guidance))
        lines.setdefault(r.method, []).append((r.guidance, r.clip_fid, r.r_precision))
    real = next(((r.clip_fid, r.r_precision) for r in res["rows"] if r.method == "real"), None)
    return {m: sorted(v) for m, v in lines.items()}, real


def tradeoff_plot(results: Mapping[str, Mapping], path: str, *, backend: str = "auto") -> str:
    """Write the plot of ``evaluate_split`` results (``{split: result}``) to ``path`` (PNG).
    ``backend``: 'auto' (matplotlib if importable), 'matplotlib' or 'pil'."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if backend in ("auto", "matplotlib"):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: F401
        except ImportError:
            if backend == "matplotlib":
                raise
        else:
            return _plot_matplotlib(results, path)
    return _plot_pil(results, path)


def _plot_matplotlib(results, path):
    import matplotlib.pyplot as plt

    splits = list(results)
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        lines, real = _series(results[split])
        for m, pts in lines.items():
            c = [v / 255 for v in COLORS.get(m, (0, 0, 0))]
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", color=c,
                    label=LABELS.get(m, m))
            for g, x, y in pts:
                ax.annotate(f"{g:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        if real is not None:
            ax.plot([real[0]], [real[1]], "*", color=[v / 255 for v in COLORS["real"]],
                    markersize=12, label=LABELS["real"])
        ax.set_xlabel("CLIP-FID (lower is better)")
        ax.set_ylabel("CLIP R-precision top-1")
        ax.set_title(f"{split} concepts: decoder guidance sweep")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    import math

    if hi <= lo:
        hi = lo + 1e-6
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-12:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _panel(draw: ImageDraw.ImageDraw, box: Sequence[int], split: str, res: Mapping, font):
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 15, y0 + 44, y1 - 45
    lines, real = _series(res)
    xs = [p[1] for pts in lines.values() for p in pts] + ([real[0]] if real else [])
    ys = [p[2] for pts in lines.values() for p in pts] + ([real[1]] if real else [])
    if not xs:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    xlo, xhi = min(xs), max(xs)
    pad = 0.08 * (xhi - xlo) or 0.05 * (abs(xhi) or 1.0)
    xlo, xhi = xlo - pad, xhi + pad
    ylo, yhi = 0.0, max(1.0, max(ys))
    sx = lambda v: left + (v - xlo) / (xhi - xlo) * (right - left)  # noqa: E731
    sy = lambda v: bottom - (v - ylo) / (yhi - ylo) * (bottom - top)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for t in _nice_ticks(xlo, xhi):
        x = sx(t)
        draw.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        draw.line([x, top, x, bottom], fill=(230, 230, 230))
        draw.text((x - 12, bottom + 6), f"{t:g}", fill=(0, 0, 0), font=font)
    for t in _nice_ticks(ylo, yhi):
        y = sy(t)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.line([left, y, right, y], fill=(230, 230, 230))
        draw.text((left - 40, y - 6), f"{t:g}", fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, y0 + 6), f"{split} concepts: decoder guidance sweep (labels: scale)",
              fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 70, bottom + 24), "CLIP-FID (lower is better)",
              fill=(0, 0, 0), font=font)
    draw.text((x0 + 4, top - 18), "R-precision top-1", fill=(0, 0, 0), font=font)
    legend_y = top + 6
    for m, pts in lines.items():
        col = COLORS.get(m, (0, 0, 0))
        pix = [(sx(x), sy(y)) for _, x, y in pts]
        if len(pix) > 1:
            draw.line(pix, fill=col, width=2)
        for (g, _, _), (px, py) in zip(pts, pix):
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
            draw.text((px + 5, py - 12), f"{g:g}", fill=col, font=font)
        draw.line([right - 110, legend_y + 6, right - 95, legend_y + 6], fill=col, width=2)
        draw.text((right - 90, legend_y), LABELS.get(m, m), fill=col, font=font)
        legend_y += 14
    if real is not None:
        col = COLORS["real"]
        px, py = sx(real[0]), sy(real[1])
        draw.polygon([(px, py - 6), (px + 5, py + 4), (px - 5, py + 4)], fill=col)
        draw.text((right - 90, legend_y), LABELS["real"], fill=col, font=font)
        draw.polygon([(right - 103, legend_y + 1), (right - 98, legend_y + 11),
                      (right - 108, legend_y + 11)], fill=col)


def _plot_pil(results, path, panel_w: int = 480, panel_h: int = 380):
    splits = list(results)
    img = Image.new("RGB", (panel_w * max(1, len(splits)), panel_h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, split in enumerate(splits):
        _panel(draw, (i * panel_w, 0, (i + 1) * panel_w, panel_h), split, results[split], font)
    img.save(path, format="PNG")
    return path




def label_rows(grid, labels, row_height: int, pad: int = 2, width: int = 150):
    """Prefix a ``make_grid`` grid (uint8 ``[H, W, 3]``, rows of ``row_height`` px separated
    by ``pad``) with a white column holding one text label per row."""
    import numpy as np

    grid = np.asarray(grid, np.uint8)
    strip = Image.new("RGB", (width, grid.shape[0]), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for i, text in enumerate(labels):
        y = pad + i * (row_height + pad) + row_height // 2 - 6
        draw.text((4, y), str(text)[:28], fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(strip), grid], axis=1)


__all__ = ["tradeoff_plot", "label_rows"]
