"""PanNuke's official bPQ and mPQ (Gamper et al., "PanNuke Dataset Extension, Insights and Baselines", 2020; the
``compute_stats.py`` of the PanNuke evaluation code, used by HoVer-Net's and CellViT's PanNuke tables), and the
stricter variants this project used before, kept under names that say what they are.

Official rules, per image:

* ``bPQ``: class-agnostic PQ; NaN when the image's ground truth is empty (false positives or not).
* per class ``c``: PQ of the instances of class ``c`` (a match needs IoU > 0.5 and the same class); NaN when ``c``
  is absent from the image's ground truth, so false positives of an absent class are not counted.
* ``mPQ`` of the image: mean over its classes, NaN entries left out (``nanmean``).

Over the dataset: with tissue labels, the mean within each tissue (NaN images left out), then the mean over tissues
(PanNuke's "Average mPQ/bPQ" rows); without them, the mean over images (CellViT's headline numbers).

Stricter variants (documented in :data:`cellseg.metrics.conventions.CONVENTIONS`):

* ``bpq_incl_empty_gt``: per-image PQ also on images whose ground truth is empty but the prediction is not
  (they score 0); NaN only for an image with neither.
* ``mpq_gt_or_pred``: per image, the mean over the classes present in the ground truth *or* the prediction, so a
  false positive of an absent class scores that class 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellseg.metrics.panoptic import PanopticCounts


def nanmean(values) -> float:
    """Mean of the non-NaN entries; NaN when there is none (NumPy's ``nanmean`` without its warning)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def image_bpq(counts: PanopticCounts) -> float:
    """PanNuke's per-image bPQ from class-agnostic counts: NaN when the ground truth is empty."""
    if int(counts.tp) + int(counts.fn) == 0:
        return float("nan")
    return float(counts.quality()["pq"])


def image_bpq_incl_empty_gt(counts: PanopticCounts) -> float:
    """Per-image PQ that also scores images with an empty ground truth (0 with false positives; NaN with neither)."""
    return float(counts.quality()["pq"])


def image_class_pq(per_class: PanopticCounts) -> np.ndarray:
    """PanNuke's per-class PQ of one image: NaN for each class absent from the ground truth. Shape: -> (C,)."""
    pq = per_class.quality()["pq"][1:]
    n_gt = (per_class.tp + per_class.fn)[1:]
    return np.where(n_gt > 0, pq, np.nan)


def image_mpq(per_class: PanopticCounts) -> float:
    """PanNuke's per-image mPQ: nanmean of :func:`image_class_pq`."""
    return nanmean(image_class_pq(per_class))


def image_mpq_gt_or_pred(per_class: PanopticCounts) -> float:
    """Per-image mean PQ over the classes present in the ground truth or the prediction."""
    return nanmean(per_class.quality()["pq"][1:])


def tissue_means(values: Sequence[float], tissues: Sequence[str]) -> dict[str, float]:
    """Per tissue (in order of first appearance), the nanmean of the images' values."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(tissues)
    return {t: nanmean(values[labels == t]) for t in dict.fromkeys(tissues)}


def average_over_images(values: Sequence[float], tissues: Sequence[str] | None = None) -> float:
    """Mean over images (NaN entries left out); with tissue labels, mean within each tissue, then over tissues."""
    if tissues is None:
        return nanmean(values)
    return nanmean(list(tissue_means(values, tissues).values()))
