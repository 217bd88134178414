"""Detection: matching by IoU > 0.5 (from the panoptic counts) and by centroid distance.

Centroid matching follows HoVer-Net's ``pair_coordinates`` in spirit but solves the problem it means to: among the
pairs closer than ``radius`` pixels, a one-to-one matching of maximum size, and among those the one of least total
distance (Hungarian algorithm on each connected component of the "within radius" graph). HoVer-Net instead runs the
Hungarian algorithm on all distances and discards the far pairs afterwards, which can lose matches. The per-class
F1 counts a matched pair with different classes as a false positive of the predicted class and a false negative of
the true one (HoVer-Net's type F1 with unit weights).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from cellseg.metrics.assignment import assign_max_weight

# Centroid matching radius as a fraction of the object diameter: HoVer-Net's 12 px for ~20 px nuclei at 40x. The one
# radius of validation during training, the evaluation notebook and `cellseg evaluate`.
RADIUS_PER_DIAMETER = 0.6


def centroid_radius(object_diameter: float) -> float:
    """The centroid matching radius in pixels for objects of ``object_diameter`` pixels (OBJECT_DIAMETER).

    Raises:
        ValueError: a non-positive diameter.
    """
    if not object_diameter > 0:
        raise ValueError(f"OBJECT_DIAMETER must be > 0 pixels, got {object_diameter!r}")
    return RADIUS_PER_DIAMETER * float(object_diameter)


def match_centroids(gt_xy: np.ndarray, pred_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-cardinality, then minimum-distance, one-to-one matching of points closer than ``radius``
    (distance <= radius). Shape: (G, 2), (P, 2) -> (M,), (M,) indices.

    Raises:
        ValueError: a non-positive radius.
    """
    if not radius > 0:
        raise ValueError(f"the centroid matching radius must be > 0 pixels, got {radius!r}")
    if len(gt_xy) == 0 or len(pred_xy) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dist = cKDTree(gt_xy).sparse_distance_matrix(cKDTree(pred_xy), radius, output_type="ndarray")
    if dist.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    gi, pi, d = dist["i"].astype(np.int64), dist["j"].astype(np.int64), dist["v"]
    # Every edge outweighs any saving in distance, so cardinality comes first, then total distance.
    big = (min(len(gt_xy), len(pred_xy)) + 1) * radius + 1.0
    return assign_max_weight(gi, pi, big - d, len(gt_xy), len(pred_xy))


def class_detection_counts(
    gt_classes: np.ndarray, pred_classes: np.ndarray, gi: np.ndarray, pi: np.ndarray, n_classes: int
) -> np.ndarray:
    """Per-class (TP, FP, FN) of matched points; a match with different classes is FP of the predicted class and
    FN of the true one. Shape: -> (n_classes + 1, 3) int64 (row 0 = unclassified)."""
    k = n_classes + 1
    same = gt_classes[gi] == pred_classes[pi]
    tp = np.bincount(gt_classes[gi][same], minlength=k)[:k]
    n_gt = np.bincount(gt_classes, minlength=k)[:k]
    n_pred = np.bincount(pred_classes, minlength=k)[:k]
    return np.stack([tp, n_pred - tp, n_gt - tp], axis=1).astype(np.int64)


def f1_from_counts(tp, fp, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 (NaN where undefined)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return precision, recall, f1
