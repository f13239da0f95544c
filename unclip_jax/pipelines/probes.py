"""CLIP probes: zero-shot label probabilities of an image beside decoded variations of it (the
paper's typographic-attack figure: the probabilities say "iPod", the variations still show an
apple)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unclip_jax.pipelines import stages
from unclip_jax.pipelines.model import UnCLIP
from unclip_jax.pipelines.progress import stage as progress_stage
from unclip_jax.pipelines.variations import as_batch, variations


def label_probs(model: UnCLIP, images_uint8, labels: Sequence[str]) -> np.ndarray:
    """CLIP zero-shot probabilities ``[B, L]`` of uint8 images for the labels."""
    z = stages.embed_images(model, images_uint8)
    t = stages.encode_text(model, list(labels)).emb
    return np.asarray(stages.zero_shot_probs(model, z, t))


def bar_chart(labels: Sequence[str], probs: Sequence[float], height: int,
              bar_width: int = 120) -> np.ndarray:
    """A horizontal bar chart (uint8 ``[H, W, 3]``, white background): per label its name, a
    bar of length ``prob * bar_width`` and the probability in percent; the most likely label's
    bar in red."""
    font = ImageFont.load_default()
    n, row = len(labels), 14
    height = max(int(height), n * row + 8)
    label_w = max(int(font.getlength(lab)) for lab in labels)
    pct_w = int(font.getlength("100.0%"))
    width = 4 + label_w + 6 + bar_width + 6 + pct_w + 4
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    top = (height - n * row) // 2
    best = int(np.argmax(probs))
    x0 = 4 + label_w + 6
    for i, (lab, p) in enumerate(zip(labels, probs)):
        y = top + i * row
        w = max(int(round(float(p) * bar_width)), 1)
        d.text((4, y + 1), lab, fill="black", font=font)
        d.rectangle([x0, y + 2, x0 + w, y + row - 3],
                    fill=(230, 80, 70) if i == best else (120, 150, 210))
        d.text((x0 + w + 6, y + 1), f"{100 * float(p):.1f}%", fill="black", font=font)
    return np.asarray(im)


def probe_panel(source_uint8, variations_uint8, labels: Sequence[str], probs,
                pad: int = 2) -> np.ndarray:
    """One image: [source | variations ... | bar chart of ``probs``] on white."""
    from unclip_jax.utils.images import make_grid

    size = variations_uint8.shape[1]
    src = stages.resize_uint8(as_batch(source_uint8), size)
    strip = make_grid(np.concatenate([src, variations_uint8], 0),
                      ncols=1 + len(variations_uint8), pad=pad)
    chart = bar_chart(labels, probs, strip.shape[0])
    h = max(strip.shape[0], chart.shape[0])
    panel = np.full((h, strip.shape[1] + chart.shape[1], 3), 255, np.uint8)
    panel[(h - strip.shape[0]) // 2:][:strip.shape[0], :strip.shape[1]] = strip
    panel[(h - chart.shape[0]) // 2:][:chart.shape[0], strip.shape[1]:] = chart
    return panel


def probe(model: UnCLIP, image, labels: Sequence[str], key, *, num: int = 4,
          decoder_steps=None, decoder_guidance: Optional[float] = None, sr_steps=None,
          progress: bool = False) -> dict:
    """Zero-shot probabilities of a uint8 image ``[H, W, 3]`` for ``labels`` and ``num``
    variations of it. Returns ``{'probs' [L], 'variation_probs' [num, L], 'images' (the
    variations, [-1, 1]), 'panel' uint8}``."""
    from unclip_jax.utils.images import to_uint8

    img = as_batch(image)
    with progress_stage("probe", progress):
        probs = label_probs(model, img, labels)[0]
    out = variations(model, img[0], key, num=num, decoder_steps=decoder_steps,
                     decoder_guidance=decoder_guidance, sr_steps=sr_steps, progress=progress)
    var = to_uint8(np.asarray(out["images"]))
    out["probs"] = probs
    out["variation_probs"] = label_probs(model, var, labels)
    out["panel"] = probe_panel(img[0], var, labels, probs)
    return out
