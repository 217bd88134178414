"""Working resolution: the ``INPUT_SCALE`` parameter.

Large objects (BCCD blood cells are ~100 px across) need neither the full resolution nor a receptive field that
wide: at half size a 256 px crop holds four times the cells and a step costs a quarter. Training resizes each image
and its label maps by ``scale`` before cropping; inference resizes the image, runs the network, and maps the per-pixel
outputs back onto the full-resolution grid (bilinear for probabilities and HV maps), so that post-processing, metrics
and saved predictions are always in the pixels of the original image. HV maps hold offsets *normalised* to [-1, 1] per
instance, so they need no rescaling of their values, only of their grid.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def check_scale(scale: float) -> float:
    """Validate an input scale factor.

    Raises:
        ValueError: not a finite number in (0, 4].
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or not 0 < scale <= 4:
        raise ValueError(f"scale (INPUT_SCALE) must be a number in (0, 4] (0.5 halves each side), got {scale!r}")
    return float(scale)


def scaled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (height, width) of an image resized by ``scale`` (at least 1 pixel each)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize an RGB image by ``scale`` (area averaging when shrinking, so no aliasing). Shape: (H, W, 3) -> (h, w, 3)."""
    if scale == 1.0:
        return image
    h, w = scaled_shape(image.shape[0], image.shape[1], scale)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)


def resize_labels(labels: np.ndarray, scale: float) -> np.ndarray:
    """Resize a label map (instance ids, classes, masks) by ``scale`` with nearest neighbours, so ids survive.

    Shape: (H, W) -> (h, w), same dtype.
    """
    if scale == 1.0:
        return labels
    h, w = scaled_shape(labels.shape[0], labels.shape[1], scale)
    dtype = labels.dtype
    src = labels.astype(np.int32) if dtype != np.int32 else labels  # cv2 cannot resize bool / int64
    out = cv2.resize(np.ascontiguousarray(src), (w, h), interpolation=cv2.INTER_NEAREST)
    return out.astype(dtype)


def maps_to_full_resolution(maps: dict[str, torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
    """Resample per-pixel network outputs (probabilities, HV maps) onto the (height, width) grid of the original image.

    ``align_corners=False`` treats pixels as areas, matching how :func:`resize_image` shrank the image, so a pixel
    centre of the small grid lands on the centre of the block of full-resolution pixels it came from.

    Shape: each (B, K, h, w) -> (B, K, height, width).
    """
    out = {}
    for key, v in maps.items():
        if v.shape[-2:] == (height, width):
            out[key] = v
        else:
            out[key] = F.interpolate(v, size=(height, width), mode="bilinear", align_corners=False)
    return out


__all__ = ["check_scale", "scaled_shape", "resize_image", "resize_labels", "maps_to_full_resolution"]
