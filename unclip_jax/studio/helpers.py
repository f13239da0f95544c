"""Pure helpers of the studio (no Gradio import): image conversions, the Edit canvas's mask,
input checks that raise ``StudioInputError`` with the message the page shows, and the bridge
from the pipelines' per-stage progress bars to a Gradio progress tracker.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import uuid
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

MIN_EDIT_SIZE = 256  # images smaller than this are enlarged (nearest) for painting


class StudioInputError(ValueError):
    """Bad input in the page; the message is shown to the user as is."""


# ------------------------------------------------------------------------------ images


def to_rgb(image) -> Optional[np.ndarray]:
    """Any image a Gradio component hands over (uint8 ``[H, W]``, ``[H, W, 3]`` or
    ``[H, W, 4]``, PIL) -> uint8 RGB ``[H, W, 3]``; alpha is composited on white (as
    ``unclip_jax.utils.images.load_image`` does). ``None`` stays ``None``."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGBA"))
    x = np.asarray(image)
    if x.dtype != np.uint8:
        x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    if x.shape[-1] == 4:
        a = x[:, :, 3:4].astype(np.float32) / 255.0
        if (a < 1).any():
            rgb = np.round(x[:, :, :3] * a + 255.0 * (1.0 - a)).clip(0, 255).astype(np.uint8)
            return np.where(a >= 1, x[:, :, :3], rgb)
        return np.ascontiguousarray(x[:, :, :3])
    return np.ascontiguousarray(x[:, :, :3])


def for_editing(image, min_size: int = MIN_EDIT_SIZE) -> np.ndarray:
    """An image to put on the Edit canvas: RGB, enlarged (nearest neighbour, an integer
    factor) when its short side is below ``min_size`` so the brush has room."""
    x = to_rgb(image)
    short = min(x.shape[:2])
    if short >= min_size:
        return x
    f = -(-min_size // short)  # ceil
    return np.repeat(np.repeat(x, f, axis=0), f, axis=1)


def editor_background(value) -> Optional[np.ndarray]:
    """The image under the Edit canvas (RGB), or None when nothing was uploaded (no background,
    or a fully transparent one)."""
    if not value:
        return None
    bg = value.get("background") if isinstance(value, dict) else value
    if bg is None:
        return None
    x = np.asarray(bg)
    if x.size == 0 or (x.ndim == 3 and x.shape[-1] == 4 and not x[:, :, 3].any()):
        return None
    return to_rgb(x)


def editor_mask(value, shape) -> np.ndarray:
    """bool ``[H, W]`` (True = regenerate): every pixel any brush layer touched (alpha > 0).
    Layers of another size than ``shape`` are resized (nearest)."""
    h, w = shape[:2]
    mask = np.zeros((h, w), bool)
    layers = (value or {}).get("layers") or [] if isinstance(value, dict) else []
    for layer in layers:
        if layer is None:
            continue
        x = np.asarray(layer)
        if x.ndim == 3 and x.shape[-1] == 4:
            m = x[:, :, 3] > 0
        elif x.ndim == 3:
            m = x.any(axis=-1)  # no alpha: anything not black was painted
        else:
            m = x > 0
        if m.shape != (h, w):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
                (w, h), Image.NEAREST)) > 0
        mask |= m
    return mask


def mask_preview(mask) -> np.ndarray:
    """bool ``[H, W]`` -> uint8 RGB: white = regenerated, black = kept."""
    m = np.asarray(mask, bool).astype(np.uint8) * 255
    return np.repeat(m[:, :, None], 3, axis=2)


# ------------------------------------------------------------------------------ checks


def check_prompt(prompt: Optional[str], what: str = "prompt") -> str:
    if prompt is None or not str(prompt).strip():
        raise StudioInputError(f"The {what} is empty: type some text first.")
    return str(prompt).strip()


def check_image(image, what: str = "an image") -> np.ndarray:
    x = to_rgb(image)
    if x is None:
        raise StudioInputError(f"No image: upload {what} (or send a result here from another "
                               "tab) first.")
    return x


def check_mask(mask) -> np.ndarray:
    m = np.asarray(mask, bool)
    if not m.any():
        raise StudioInputError("The mask is empty: paint the region to regenerate with the "
                               "brush first.")
    if m.all():
        raise StudioInputError("The mask covers the whole image: leave some of it unpainted "
                               "(that part is kept), or use Generate for a new image.")
    return m


def pick(results: Optional[Sequence], index: Optional[int], what: str = "result"):
    """The selected (else the first) item of a session's results; StudioInputError if none."""
    if not results:
        raise StudioInputError(f"No {what} yet: run this tab first.")
    i = 0 if index is None else int(index)
    return results[i if 0 <= i < len(results) else 0]


# ------------------------------------------------------------------------------ files


def write_pngs(images: Sequence[np.ndarray], folder: str, stem: str,
               grid: Optional[np.ndarray] = None) -> list:
    """Write each uint8 image (and the grid, first) as PNG under a fresh sub-folder of
    ``folder``; returns the paths (what the page offers for download)."""
    from unclip_jax.utils.images import save_png

    d = os.path.join(folder, uuid.uuid4().hex[:12])
    paths = []
    if grid is not None:
        paths.append(save_png(grid, os.path.join(d, f"{stem}_grid.png")))
    for i, im in enumerate(images):
        paths.append(save_png(np.asarray(im), os.path.join(d, f"{stem}_{i + 1}.png")))
    return paths


# ------------------------------------------------------------------------------ progress


class ProgressBridge:
    """Forwards the pipelines' per-stage progress to ``sink(step, total, stage_name)``.

    ``unclip_jax.pipelines.progress.stage`` opens one tqdm bar per stage and the jitted
    samplers move it from JAX's callback threads. While ``active()`` is entered, that module's
    ``tqdm`` is replaced by a small bar object that calls the sink instead (in a copy of the
    caller's ``contextvars`` context, which is where Gradio keeps the running event), so no
    terminal bar is drawn and nothing is shared between events: the studio runs one event at
    a time (queue concurrency 1) and the bar lives only inside ``active()``.

    ``steps=False`` reports stages only: the samplers then get no per-step host callback.
    A jitted loop with a host callback gets a new persistent-cache key in every process, so
    with steps on, every server start compiles the samplers anew (minutes on a small CPU).
    """

    _swap_lock = threading.Lock()

    def __init__(self, sink: Callable[[int, int, str], None], steps: bool = True):
        self._sink = sink
        self._steps = steps
        self._ctx = contextvars.copy_context()
        self._lock = threading.Lock()

    def emit(self, step: int, total: int, name: str) -> None:
        with self._lock:
            try:
                self._ctx.run(self._sink, int(step), int(total), name)
            except Exception:  # noqa: BLE001  progress must never break a job
                pass

    def bar_class(self):
        bridge = self

        class _Bar:
            def __init__(self, *args, total=1, desc="", **kwargs):
                self.total, self.n, self.desc = total, 0, str(desc or "").strip()
                bridge.emit(0, self.total or 1, self.desc)

            def refresh(self):
                bridge.emit(self.n, self.total or 1, self.desc)

            def update(self, n=1):
                self.n += n
                self.refresh()

            def close(self):
                pass
        return _Bar

    @contextlib.contextmanager
    def active(self):
        from unclip_jax.pipelines import progress as progress_lib

        with ProgressBridge._swap_lock:
            old = getattr(progress_lib, "tqdm", None)
            old_callback = progress_lib.callback
            progress_lib.tqdm = self.bar_class()
            if not self._steps:
                # stage names only: no host callback inside the jitted loops, which keeps
                # them cacheable by JAX's persistent compilation cache
                progress_lib.callback = lambda enabled: None
            else:  # per-step bars (--step-progress): the loops report every step
                progress_lib.callback = lambda enabled: progress_lib.report if enabled else None
            try:
                yield self
            finally:
                progress_lib.tqdm = old
                progress_lib.callback = old_callback
