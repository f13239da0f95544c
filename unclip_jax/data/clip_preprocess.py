"""CLIP image preprocessing: PIL / numpy images -> ``[B, H, W, 3]`` float32, CLIP-normalised.

As OpenAI CLIP and ``transformers.CLIPImageProcessor`` do it: convert to RGB, resize so the
shortest side is ``size`` with PIL bicubic (long side ``int(size * long / short)``), center crop
``crop_size`` (offsets ``(H - crop) // 2`` as HF; torchvision rounds half-way offsets, which can
shift the crop one pixel for odd margins), scale to [0, 1], subtract the CLIP mean and divide by
the CLIP std. Output is NHWC for ``CLIP.encode_image``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[Image.Image, np.ndarray]


def to_pil(image: ImageLike) -> Image.Image:
    """PIL image or ``[H, W]`` / ``[H, W, C]`` array (uint8, or float in [0, 1]) -> RGB PIL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        return Image.fromarray(arr).convert("RGB")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"expected an [H, W], [H, W, 1|3|4] image, got shape {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def resize_shortest_side(image: Image.Image, size: int,
                         resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so that the shorter side is ``size``; the longer one is ``int(size * long / short)``."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample=resample)


def center_crop(arr: np.ndarray, crop: int) -> np.ndarray:
    """``[H, W, C]`` -> ``[crop, crop, C]`` (zero-padded first if the image is smaller)."""
    h, w = arr.shape[:2]
    if h < crop or w < crop:
        ph, pw = max(crop - h, 0), max(crop - w, 0)
        arr = np.pad(arr, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = arr.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return arr[top:top + crop, left:left + crop]


def preprocess_image(image: ImageLike, size: int = 224, crop_size: Optional[int] = None,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """One image -> ``[crop, crop, 3]`` float32, CLIP-normalised."""
    crop_size = crop_size or size
    pil = resize_shortest_side(to_pil(image), size, resample)
    arr = center_crop(np.asarray(pil, dtype=np.uint8), crop_size)
    x = arr.astype(np.float32) * np.float32(1.0 / 255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess(images: Union[ImageLike, Iterable[ImageLike]], size: int = 224,
               crop_size: Optional[int] = None, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD,
               resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Images (one PIL image / ``[H, W, C]`` array, a list of them, or a uint8 ``[B, H, W, C]``
    batch) -> ``[B, crop, crop, 3]`` float32 for ``CLIP.encode_image`` (``size`` = the vision
    config's ``image_size``)."""
    if isinstance(images, Image.Image):
        images = [images]
    elif isinstance(images, np.ndarray) and images.ndim in (2, 3):
        images = [images]
    out = [preprocess_image(im, size, crop_size, mean, std, resample) for im in images]
    if not out:
        c = crop_size or size
        return np.zeros((0, c, c, 3), np.float32)
    return np.stack(out).astype(np.float32)


def unnormalize(x: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """Inverse of the normalisation: ``[..., 3]`` -> values in [0, 1] (not clipped)."""
    return np.asarray(x, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)


__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess", "preprocess_image", "resize_shortest_side",
           "center_crop", "to_pil", "unnormalize"]
