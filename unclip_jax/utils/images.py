"""Image helpers: [-1, 1] float arrays <-> uint8, PNG grids and strips, GIFs.

Images are NHWC: ``[B, H, W, C]`` with C = 3 (RGB).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """``[..., H, W, C]`` floats in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
    """uint8 ``[..., H, W, C]`` -> float32 in [-1, 1]."""
    return np.asarray(images, dtype=np.float32) / 127.5 - 1.0


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """Tile uint8 ``[B, H, W, C]`` into one ``[rows*H + ..., cols*W + ..., C]`` image."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"make_grid wants [B, H, W, C], got shape {images.shape}")
    b, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(b)))
    nrows = int(math.ceil(b / ncols))
    grid = np.full((nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, c),
                   pad_value, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(image: np.ndarray, path: str) -> str:
    """Write one uint8 ``[H, W, C]`` image as PNG (creating parent folders)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image)).save(path, format="PNG")
    return path


def save_grid(images: np.ndarray, path: str, ncols: int | None = None) -> str:
    """Write uint8 ``[B, H, W, C]`` images as one PNG grid (one image is written as is)."""
    images = np.asarray(images)
    return save_png(images[0] if len(images) == 1 else make_grid(images, ncols), path)


def save_gif(frames: Sequence[np.ndarray], path: str, duration_ms: int = 200) -> str:
    """Write uint8 ``[H, W, C]`` frames as a looping GIF."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil = [Image.fromarray(np.asarray(f)) for f in frames]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)
    return path


def load_image(path: str, size: int | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB ``[H, W, 3]`` (alpha composited on white), optionally
    resized (bicubic) to ``size x size``. Raises ``ValueError`` naming the file if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
