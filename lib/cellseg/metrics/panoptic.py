"""Panoptic quality (Kirillov et al., CVPR 2019) as used for nuclei by HoVer-Net's ``get_fast_pq``.

A ground-truth and a predicted instance match when their IoU exceeds 0.5, which makes the matching unique without
any assignment step. Per image and class we keep the counts (TP, FP, FN, sum of matched IoUs) and reduce later:
``DQ = RQ = TP / (TP + FP/2 + FN/2)``, ``SQ = sum IoU / TP`` (0 without TP), ``PQ = DQ * SQ``. HoVer-Net divides by
``TP + 1e-6`` in SQ; we divide exactly, which differs by less than 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellseg.metrics.pairwise import PairTable


def match_iou(table: PairTable, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique matches at IoU > ``threshold``: (gt_index, pred_index, iou), each (M,).

    Raises:
        ValueError: ``threshold`` below 0.5, where matches are no longer unique.
    """
    if not 0.5 <= threshold < 1.0:
        raise ValueError(
            f"match threshold must be in [0.5, 1) for the matching to be unique, got {threshold}; "
            "use coco_image_detections for lower thresholds"
        )
    iou = table.iou
    keep = iou > threshold
    return table.gt_index[keep], table.pred_index[keep], iou[keep]


@dataclass
class PanopticCounts:
    """TP/FP/FN counts and the sum of matched IoUs, per class (arrays) or for one image (scalars)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou_sum: np.ndarray

    def __add__(self, other: PanopticCounts) -> PanopticCounts:
        return PanopticCounts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum
        )

    def quality(self) -> dict[str, np.ndarray]:
        """PQ, SQ, RQ from the counts; NaN where there is neither ground truth nor prediction."""
        return panoptic_from_counts(self.tp, self.fp, self.fn, self.iou_sum)


def panoptic_from_counts(tp, fp, fn, iou_sum) -> dict[str, np.ndarray]:
    """PQ/SQ/RQ from counts (scalars or arrays); NaN where TP + FP + FN == 0."""
    tp, fp, fn, iou_sum = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn, iou_sum))
    denom = tp + 0.5 * fp + 0.5 * fn
    with np.errstate(invalid="ignore", divide="ignore"):
        rq = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
        sq = np.where(tp > 0, iou_sum / np.where(tp > 0, tp, 1), np.where(denom > 0, 0.0, np.nan))
    return {"pq": rq * sq, "sq": sq, "rq": rq}


def panoptic_counts(
    table: PairTable,
    gt_classes: np.ndarray | None = None,
    pred_classes: np.ndarray | None = None,
    n_classes: int = 0,
) -> tuple[PanopticCounts, PanopticCounts | None]:
    """Class-agnostic counts (scalars) and, when classes are given, per-class counts (arrays of length
    ``n_classes + 1``, index 0 = unclassified) where a match also needs equal classes (PanNuke/CoNIC per-class PQ).
    """
    gi, pi, iou = match_iou(table)
    tp = gi.size
    agnostic = PanopticCounts(
        tp=np.int64(tp),
        fp=np.int64(table.n_pred - tp),
        fn=np.int64(table.n_gt - tp),
        iou_sum=np.float64(iou.sum()),
    )
    if gt_classes is None or pred_classes is None:
        return agnostic, None
    k = n_classes + 1
    same = gt_classes[gi] == pred_classes[pi]
    tp_c = np.bincount(gt_classes[gi][same], minlength=k)[:k]
    iou_c = np.bincount(gt_classes[gi][same], weights=iou[same], minlength=k)[:k]
    n_gt_c = np.bincount(gt_classes, minlength=k)[:k]
    n_pred_c = np.bincount(pred_classes, minlength=k)[:k]
    per_class = PanopticCounts(tp=tp_c, fp=n_pred_c - tp_c, fn=n_gt_c - tp_c, iou_sum=iou_c)
    return agnostic, per_class
