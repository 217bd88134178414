"""Pixel-level semantic metrics from type maps: a per-image confusion matrix, reduced over the dataset.

Per-class IoU and Dice are computed from pixel counts summed over all images (micro average over pixels, as smp's
``reduction="micro"``), so that small images do not weigh as much as large ones; the mean is over classes present
in ground truth or prediction. Binary foreground Dice is per image (averaged over images by the caller).
"""

from __future__ import annotations

import numpy as np

from cellseg.metrics.pairwise import PairTable


def confusion_counts(
    gt_types: np.ndarray, pred_types: np.ndarray, n_classes: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """Pixel confusion matrix, rows ground truth, columns prediction, index 0 = background.

    Shape: (H, W), (H, W)[, (H, W) bool] -> (C+1, C+1) int64.

    Raises:
        ValueError: a class id outside 0..n_classes, or shapes that differ.
    """
    if gt_types.shape != pred_types.shape:
        raise ValueError(f"type maps differ in shape: {gt_types.shape} vs {pred_types.shape}")
    k = n_classes + 1
    g = gt_types.ravel().astype(np.int64)
    p = pred_types.ravel().astype(np.int64)
    if valid is not None:
        keep = valid.ravel().astype(bool)
        g, p = g[keep], p[keep]
    for name, arr in (("ground-truth", g), ("predicted", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= k):
            raise ValueError(
                f"the {name} type map holds class ids {sorted(set(np.unique(arr).tolist()) - set(range(k)))} "
                f"outside 0..{n_classes} (0 = background, then one id per class name); "
                f"pass all {n_classes}+ class names or fix the map"
            )
    return np.bincount(g * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def iou_dice_per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice (classes 1..C; NaN when the class is in neither map). Shape: (C+1, C+1) -> (C,), (C,)."""
    tp = np.diag(confusion)[1:].astype(np.float64)
    gt = confusion.sum(axis=1)[1:].astype(np.float64)
    pred = confusion.sum(axis=0)[1:].astype(np.float64)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(gt + pred > 0, 2 * tp / (gt + pred), np.nan)
    return iou, dice


def foreground_dice_counts(table: PairTable) -> tuple[int, int]:
    """(2 |G ∩ P|, |G| + |P|) of the binary foreground, read from the pair table (no second pass over pixels)."""
    return 2 * int(table.inter.sum()), int(table.gt_areas.sum() + table.pred_areas.sum())
