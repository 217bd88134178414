"""COCO-style mask AP (Lin et al., ECCV 2014), re-implemented from pycocotools' ``COCOeval`` for instance maps.

Per image, detections are ranked by confidence and each, in turn, takes the still unmatched ground-truth instance
of highest IoU >= t (ties: the later ground truth, as COCOeval), for t in 0.50:0.05:0.95. Over the dataset, all
detections are ranked (a stable sort, images in order), precision is made monotone and read at 101 recall
thresholds; AP@t is the mean of these 101 values and mAP the mean over the 10 thresholds. No crowd regions, no area
ranges, and no per-image detection limit: pycocotools' ``maxDets=100`` default silently truncates images with more
nuclei than that, and its ``stats[0]`` keeps using 100 even when ``maxDets`` is raised (FIELD_NOTES), which is why
equality with COCOeval is tested on ``eval["precision"]`` at a raised limit.

For t >= 0.5 a detection can overlap at most one ground truth with IoU > t, so the greedy matching is a vectorised
selection; only exact IoU ties at 0.5 fall back to the sequential loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellseg.metrics.pairwise import PairTable

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)


@dataclass
class ImageDetections:
    """Per-image COCO statistics: detection scores in rank order and which are true positives per threshold."""

    scores: np.ndarray  # (D,) float64, descending (stable)
    matched: np.ndarray  # (T, D) bool
    n_gt: int


def image_detections(
    table: PairTable,
    pred_scores: np.ndarray,
    gt_select: np.ndarray | None = None,
    pred_select: np.ndarray | None = None,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
) -> ImageDetections | None:
    """Match the detections of one image (optionally only the selected gt / pred instances, e.g. one class).

    Args:
        table: the image's pair table.
        pred_scores: confidence per predicted instance in table order. Shape: (n_pred,).
        gt_select, pred_select: boolean masks over the gt / pred instances to keep.

    Returns:
        None when the image has neither ground truth nor detections (COCOeval skips such images).
    """
    gt_keep = np.ones(table.n_gt, bool) if gt_select is None else gt_select
    pred_keep = np.ones(table.n_pred, bool) if pred_select is None else pred_select
    n_gt = int(gt_keep.sum())
    det_ids = np.flatnonzero(pred_keep)
    if n_gt == 0 and det_ids.size == 0:
        return None
    scores = np.asarray(pred_scores, dtype=np.float64)[det_ids]
    order = np.argsort(-scores, kind="mergesort")
    rank = np.full(table.n_pred, -1, np.int64)
    rank[det_ids[order]] = np.arange(det_ids.size)
    gt_pos = np.cumsum(gt_keep) - 1  # position among the kept gts (COCOeval's gt order)
    pair = gt_keep[table.gt_index] & pred_keep[table.pred_index]
    p_rank = rank[table.pred_index[pair]]
    p_gt = gt_pos[table.gt_index[pair]]
    p_iou = table.iou[pair]
    matched = np.zeros((len(iou_thresholds), det_ids.size), bool)
    for ti, t in enumerate(iou_thresholds):
        cand = p_iou >= min(float(t), 1 - 1e-10)
        r, g, v = p_rank[cand], p_gt[cand], p_iou[cand]
        if r.size == 0:
            continue
        if np.bincount(r).max() <= 1 and np.bincount(g).max() <= 1:
            matched[ti, r] = True
        else:
            matched[ti] = _greedy(r, g, v, det_ids.size)
    return ImageDetections(scores=scores[order], matched=matched, n_gt=n_gt)


def _greedy(rank: np.ndarray, gt: np.ndarray, iou: np.ndarray, n_det: int) -> np.ndarray:
    """COCOeval's sequential matching over candidate pairs (only needed with exact IoU ties)."""
    out = np.zeros(n_det, bool)
    taken: set[int] = set()
    order = np.lexsort((gt, rank))
    best: dict[int, tuple[float, int]] = {}
    current = -1
    for k in order:
        r = int(rank[k])
        if r != current:
            if current >= 0 and current in best:
                out[current] = True
                taken.add(best[current][1])
            current = r
        g = int(gt[k])
        if g in taken:
            continue
        if r not in best or iou[k] >= best[r][0]:
            best[r] = (float(iou[k]), g)
    if current >= 0 and current in best:
        out[current] = True
    return out


def precision_curve(images: list[ImageDetections | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """COCOeval's ``accumulate`` for one category: interpolated precision at 101 recall thresholds per IoU
    threshold, and the final recall. Shape: -> (T, 101), (T,). None when there is no ground truth at all."""
    used = [im for im in images if im is not None]
    n_gt = sum(im.n_gt for im in used)
    if n_gt == 0:
        return None
    n_t = used[0].matched.shape[0]
    scores = np.concatenate([im.scores for im in used]) if used else np.zeros(0)
    matched = np.concatenate([im.matched for im in used], axis=1) if used else np.zeros((n_t, 0), bool)
    order = np.argsort(-scores, kind="mergesort")
    matched = matched[:, order]
    tp = np.cumsum(matched, axis=1).astype(np.float64)
    fp = np.cumsum(~matched, axis=1).astype(np.float64)
    n_det = matched.shape[1]
    precision = np.zeros((n_t, RECALL_THRESHOLDS.size))
    recall = np.zeros(n_t)
    for t in range(n_t):
        if n_det == 0:
            continue
        rc = tp[t] / n_gt
        pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        recall[t] = rc[-1]
        idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        valid = idx < n_det
        precision[t, valid] = pr[idx[valid]]
    return precision, recall


def average_precision(images: list[ImageDetections | None]) -> dict[str, float] | None:
    """``ap50``, ``ap75`` and ``map`` (mean over IoU 0.50:0.95) for one category; None without ground truth."""
    curve = precision_curve(images)
    if curve is None:
        return None
    precision, _ = curve
    ap = precision.mean(axis=1)
    return {"ap50": float(ap[0]), "ap75": float(ap[5]), "map": float(ap.mean())}


def category_average(per_category: list[dict[str, float] | None]) -> dict[str, float] | None:
    """COCO's mAP over categories: the mean of each AP over the categories with ground truth (those given as None
    have none, as pycocotools' ``-1`` entries, and are left out); None when no category has ground truth."""
    used = [ap for ap in per_category if ap is not None]
    if not used:
        return None
    return {k: float(np.mean([ap[k] for ap in used])) for k in ("ap50", "ap75", "map")}
