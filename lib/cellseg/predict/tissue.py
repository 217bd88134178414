"""Tissue detection on a slide thumbnail, so that prediction windows over bare glass are skipped.

Stained tissue and smears differ from glass by colour (saturation) and darkness. A thumbnail pixel is tissue when its
saturation (max - min channel) or its darkness (255 - mean) exceeds an Otsu threshold computed on the thumbnail, with
floors so that an all-glass slide is not split in two by Otsu; the mask is then dilated by a few thumbnail pixels so
that cells at the edge of a smear keep their context.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

MIN_SATURATION = 20  # glass and its noise stay below this (0-255)
MIN_DARKNESS = 40  # 255 - mean intensity


def tissue_mask(thumb: np.ndarray, dilate: int = 2) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail. Shape: (h, w, 3) -> (h, w)."""
    rgb = thumb.astype(np.int16)
    sat = (rgb.max(axis=2) - rgb.min(axis=2)).astype(np.float32)
    dark = 255.0 - rgb.mean(axis=2)
    masks = []
    for value, floor in ((sat, MIN_SATURATION), (dark, MIN_DARKNESS)):
        thr = floor
        if float(value.max()) > float(value.min()):
            thr = max(floor, float(threshold_otsu(value)))
        masks.append(value > thr)
    mask = masks[0] | masks[1]
    return ndi.binary_dilation(mask, iterations=dilate) if dilate and mask.any() else mask


def window_has_tissue(mask: np.ndarray, scale: float, box: tuple[int, int, int, int]) -> bool:
    """Whether the read-level box (y0, x0, y1, x1) touches tissue in ``mask`` (thumbnail pixels per read pixel:
    ``scale``)."""
    y0, x0, y1, x1 = box
    h, w = mask.shape
    ty0, tx0 = min(h - 1, int(y0 * scale)), min(w - 1, int(x0 * scale))
    ty1, tx1 = max(ty0 + 1, int(np.ceil(y1 * scale))), max(tx0 + 1, int(np.ceil(x1 * scale)))
    return bool(mask[ty0:ty1, tx0:tx1].any())
