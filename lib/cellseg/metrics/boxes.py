"""Box-level detection scores against box annotations (BCCD's Pascal VOC boxes), from predicted instances.

BCCD's only ground truth is boxes; its masks are derived from them (:mod:`cellseg.data.bccd`), so mask scores there
measure agreement with the derivation as much as with the cells. These scores compare the bounding box of every
predicted instance with the VOC boxes directly, following COCO's ``bbox`` evaluation (pycocotools ``COCOeval``):

- per class (category = the instance's class), detections ranked by their confidence, each matched greedily to the
  unmatched ground-truth box of highest IoU >= 0.5; no per-image detection limit;
- AP50: the 101-point interpolated precision at IoU 0.5, per class; ``box_ap50`` is the mean over the classes present
  in the ground truth (COCO's category average), equal to pycocotools' with ``maxDets`` raised (tests);
- F1 at IoU 0.5 from the same matches, TP/FP/FN summed over images, per class and summed over classes (``box_f1``);
- predicted instances lying mostly in the ignore mask are left out, as for the mask metrics
  (:func:`cellseg.metrics.pairwise.drop_ignored`); unclassified instances (class 0) belong to no category.

Boxes are 0-based, half-open ``[x0, y0, x1, y1]`` (width ``x1 - x0``, COCO's ``w``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from cellseg.metrics.pairwise import drop_ignored

IOU_THRESHOLD = 0.5
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recall thresholds


def instance_boxes(inst_map: np.ndarray) -> np.ndarray:
    """Bounding box ``[x0, y0, x1, y1]`` (half-open) of every instance 1..N; zeros for absent ids.

    Shape: (H, W) -> (N, 4) int64.
    """
    n = int(inst_map.max(initial=0))
    out = np.zeros((n, 4), np.int64)
    for i, sl in enumerate(ndi.find_objects(inst_map.astype(np.int64), max_label=n)):
        if sl is not None:
            out[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair of half-open boxes. Shape: (A, 4), (B, 4) -> (A, B) float64."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@dataclass
class BoxStats:
    """One image's box matches per class: detection scores, TP flags (in ranking order) and ground-truth counts."""

    scores: list[np.ndarray] = field(default_factory=list)  # per class 1..C
    tp: list[np.ndarray] = field(default_factory=list)
    n_gt: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def box_image_stats(
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    pred_boxes: np.ndarray,
    pred_classes: np.ndarray,
    pred_scores: np.ndarray,
    n_classes: int,
) -> BoxStats:
    """COCO's per-image, per-category greedy matching at IoU >= 0.5.

    Shape: (G, 4), (G,), (P, 4), (P,), (P,) -> BoxStats with C entries.
    """
    gt_boxes, pred_boxes = np.asarray(gt_boxes).reshape(-1, 4), np.asarray(pred_boxes).reshape(-1, 4)
    gt_classes, pred_classes = np.asarray(gt_classes).ravel(), np.asarray(pred_classes).ravel()
    pred_scores = np.asarray(pred_scores, np.float64).ravel()
    if not len(pred_boxes) == len(pred_classes) == len(pred_scores):
        raise ValueError(
            f"pred_boxes ({len(pred_boxes)}), pred_classes ({len(pred_classes)}) and pred_scores "
            f"({len(pred_scores)}) must have one entry per predicted instance"
        )
    stats = BoxStats(n_gt=np.bincount(gt_classes.astype(np.int64), minlength=n_classes + 1)[1 : n_classes + 1])
    for c in range(1, n_classes + 1):
        g = gt_boxes[gt_classes == c]
        sel = np.flatnonzero(pred_classes == c)
        order = sel[np.argsort(-pred_scores[sel], kind="mergesort")]  # pycocotools' stable ranking
        ious = box_iou_matrix(pred_boxes[order], g)
        taken = np.zeros(len(g), bool)
        tp = np.zeros(len(order), bool)
        for d in range(len(order)):
            best, m = min(IOU_THRESHOLD, 1 - 1e-10), -1
            for j in range(len(g)):
                if not taken[j] and ious[d, j] >= best:
                    best, m = ious[d, j], j
            if m >= 0:
                taken[m] = tp[d] = True
        stats.scores.append(pred_scores[order])
        stats.tp.append(tp)
    return stats


def _ap(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float | None:
    """COCO's 101-point interpolated AP of one category over the dataset (None without ground truth)."""
    if n_gt == 0:
        return None
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tps = np.cumsum(tp[order])
    fps = np.cumsum(~tp[order])
    recall = tps / n_gt
    precision = tps / (tps + fps + np.spacing(1))  # pycocotools' form, to the last bit
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.where(idx < precision.size, precision[np.minimum(idx, precision.size - 1)], 0.0)
    return float(q.mean())


def _f1(tp: int, fp: int, fn: int) -> float | None:
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None


def reduce_box_stats(stats: list[BoxStats], class_names: list[str]) -> dict:
    """Dataset box scores: ``box_ap50``, ``box_f1``, counts and ``box_per_class`` (AP50, F1, TP, FP, FN)."""
    per_class: dict[str, dict] = {}
    aps, totals = [], np.zeros(3, np.int64)
    for k, name in enumerate(class_names):
        scores = np.concatenate([s.scores[k] for s in stats]) if stats else np.zeros(0)
        tp = np.concatenate([s.tp[k] for s in stats]).astype(bool) if stats else np.zeros(0, bool)
        n_gt = int(sum(int(s.n_gt[k]) for s in stats))
        ap = _ap(scores, tp, n_gt)
        n_tp = int(tp.sum())
        counts = np.array([n_tp, tp.size - n_tp, n_gt - n_tp])
        totals += counts
        if ap is not None:
            aps.append(ap)
        per_class[name] = {"ap50": ap, "f1": _f1(*counts.tolist()), "tp": int(counts[0]), "fp": int(counts[1]),
                           "fn": int(counts[2]), "n_gt": n_gt}
    return {
        "box_ap50": float(np.mean(aps)) if aps else None,
        "box_f1": _f1(*totals.tolist()),
        "box_tp": int(totals[0]), "box_fp": int(totals[1]), "box_fn": int(totals[2]),
        "box_per_class": per_class,
        "box_convention": "COCO bbox AP at IoU 0.5 (101-point, per class, mean over classes in the ground truth, no "
        "detection limit) and F1 at IoU >= 0.5, predicted instances' bounding boxes vs the VOC boxes",
    }


class BoxScorer:
    """Accumulates box scores over an evaluation: ``add`` per image, ``result`` at the end (empty without boxes).

    The ground-truth boxes come from the prepared sample's ``meta["boxes"]`` (``[x0, y0, x1, y1, class_id]``, kept in
    the cache for datasets annotated with boxes); predictions are ``inst_map``/``type_map``/``scores`` dicts.
    """

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        self.stats: list[BoxStats] = []

    def add(self, sample: dict, pred: dict) -> None:
        boxes = (sample.get("meta") or {}).get("boxes")
        if boxes is None:
            return
        gt = np.asarray(boxes, np.int64).reshape(-1, 5)
        inst = np.asarray(pred["inst_map"])
        kept = drop_ignored(inst, sample.get("ignore_mask"))
        n = int(inst.max(initial=0))
        present = np.bincount(kept.ravel(), minlength=n + 1)[1:] > 0
        from cellseg.data.sample import vote_classes

        classes = vote_classes(inst, np.asarray(pred["type_map"]), n)
        scores = np.asarray(pred["scores"], np.float64).ravel()[:n]
        keep = np.flatnonzero(present)
        self.stats.append(
            box_image_stats(gt[:, :4], gt[:, 4], instance_boxes(inst)[keep], classes[keep], scores[keep],
                            len(self.class_names))
        )

    def result(self) -> dict:
        return reduce_box_stats(self.stats, self.class_names) if self.stats else {}


def box_markdown(metrics: dict) -> list[str]:
    """Report lines for the box scores (none when ``metrics`` has none)."""
    if metrics.get("box_ap50") is None and not metrics.get("box_per_class"):
        return []

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.4f}"

    lines = [
        "## Box detection vs the VOC boxes (the dataset's own ground truth)",
        "",
        metrics.get("box_convention", ""),
        "",
        "| class | AP50 | F1 | TP | FP | FN |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| all | {fmt(metrics.get('box_ap50'))} | {fmt(metrics.get('box_f1'))} | {metrics.get('box_tp')} | "
        f"{metrics.get('box_fp')} | {metrics.get('box_fn')} |",
    ]
    for name, v in metrics.get("box_per_class", {}).items():
        lines.append(f"| {name} | {fmt(v['ap50'])} | {fmt(v['f1'])} | {v['tp']} | {v['fp']} | {v['fn']} |")
    return lines + [""]
