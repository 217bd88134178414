"""Dataset evaluation of instance segmentation and classification: per-image statistics, then reductions.

The convention of every key is stated in :data:`cellseg.metrics.conventions` and travels with the numbers
(``metrics["conventions"]``). In short:

* ``pq, sq, rq``: class-agnostic panoptic quality (IoU > 0.5), mean over images; an image with neither ground truth
  nor prediction is left out of every mean over images.
* ``bpq`` and ``mpq``: PanNuke's official rules (:mod:`cellseg.metrics.pannuke`): per image, bPQ is NaN when the
  ground truth is empty and each class's PQ is NaN when the class is absent from the image's ground truth; NaNs
  are left out; with tissue labels the means are per tissue and then over tissues (``per_tissue`` holds the
  tissue values), else over images. ``bpq_incl_empty_gt`` and ``mpq_gt_or_pred`` are the stricter variants.
* ``mpq_plus``: CoNIC's multi-class PQ+: TP, FP, FN and IoU sums per class over the whole dataset, PQ per class,
  mean over the classes that occur (in ground truth or prediction) at all.
* ``aji, aji_plus, dice`` (binary foreground Dice): means over images.
* ``det_precision, det_recall, det_f1``: IoU > 0.5 matching, TP/FP/FN summed over the dataset;
  ``det_centroid_*``: centroid matching within ``match_radius`` pixels, summed likewise.
* ``ap50, ap75, map``: COCO mask AP per category (the instance's class), ranked by the class-aware ``scores``,
  averaged over the categories present in the ground truth (:mod:`cellseg.metrics.coco`);
  ``ap50_agnostic, ap75_agnostic, map_agnostic``: one category, ranked by ``objectness``.
* ``per_class[name]``: pixel ``iou``/``dice`` (dataset pixel sums), ``pq``/``sq``/``rq`` (dataset sums, as
  ``mpq_plus``), ``f1`` (centroid matching, misclassified matches count as FP and FN), ``ap50``/``map``,
  ``n_gt``/``n_pred`` instances, and ``pred_pixel_fraction``: the share of predicted foreground pixels given this
  class (0 for a class that collapsed).
* ``confusion``: classes of the IoU > 0.5 matched pairs, rows ground truth, columns prediction.
* Undefined values (e.g. AP without any ground truth) are ``None`` (JSON ``null``), never NaN.

The instance class is the majority vote of ``type_map`` inside the instance (ties to the smaller id). Predicted
``scores`` hold one class-aware confidence per instance id: ``scores[k - 1]`` for id ``k``, length = the largest
id; the optional ``objectness`` (same layout, e.g. the mean foreground probability) ranks the class-agnostic AP,
which falls back to ``scores`` without it (``metrics["ap_agnostic_ranked_by"]`` says which was used).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cellseg.metrics.aji import aji_plus_totals, aji_totals, ratio
from cellseg.metrics.coco import ImageDetections, average_precision, category_average, image_detections
from cellseg.metrics.conventions import conventions
from cellseg.metrics.detection import class_detection_counts, f1_from_counts, match_centroids
from cellseg.metrics.pairwise import drop_ignored, pair_table
from cellseg.metrics.pannuke import (
    average_over_images,
    image_bpq,
    image_bpq_incl_empty_gt,
    image_mpq,
    image_mpq_gt_or_pred,
    nanmean,
    tissue_means,
)
from cellseg.metrics.panoptic import PanopticCounts, match_iou, panoptic_counts
from cellseg.metrics.semantic import confusion_counts, foreground_dice_counts, iou_dice_per_class

log = logging.getLogger(__name__)


@dataclass
class ImageStats:
    """Everything the dataset reductions need from one image (counts and sums only)."""

    panoptic: PanopticCounts  # class-agnostic, scalars
    panoptic_class: PanopticCounts  # (C+1,) per class, index 0 = unclassified
    aji: tuple[float, float]  # (intersection, union)
    aji_plus: tuple[float, float]
    dice: tuple[int, int]  # (2 |G n P|, |G| + |P|)
    semantic: np.ndarray  # (C+1, C+1) pixel confusion
    centroid: np.ndarray  # (C+1, 3) per-class TP/FP/FN of centroid matching
    centroid_agnostic: tuple[int, int, int]
    match_confusion: np.ndarray  # (C+1, C+1) classes of IoU > 0.5 matches
    coco: ImageDetections | None  # class-agnostic, ranked by objectness (or scores)
    coco_class: list[ImageDetections | None]  # classes 1..C, ranked by the class-aware scores
    agnostic_ranking: str = "scores"  # what ranked ``coco``: objectness | scores | constant


def _label(name: str | None, index: int) -> str:
    return repr(name) if name is not None else f"image #{index}"


def _check_pair(gt: dict, pred: dict, where: str) -> None:
    for role, d in (("ground truth", gt), ("prediction", pred)):
        for key in ("inst_map", "type_map"):
            if key not in d:
                raise ValueError(f"{where}: the {role} lacks {key!r}; each entry needs 'inst_map' and 'type_map'")
            arr = np.asarray(d[key])
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{where}: the {role}'s {key} must be a 2-D integer array, got {arr.dtype} {arr.shape}")
    shape = np.asarray(gt["inst_map"]).shape
    for role, d in (("ground truth", gt), ("prediction", pred)):
        for key in ("inst_map", "type_map"):
            if np.asarray(d[key]).shape != shape:
                raise ValueError(
                    f"{where}: shapes differ: ground-truth inst_map {shape} vs the {role}'s {key} "
                    f"{np.asarray(d[key]).shape}"
                )
    if gt.get("ignore_mask") is not None and np.asarray(gt["ignore_mask"]).shape != shape:
        raise ValueError(f"{where}: ignore_mask has shape {np.asarray(gt['ignore_mask']).shape}, expected {shape}")


def _scores(pred: dict, n_ids: int, where: str, key: str = "scores") -> np.ndarray | None:
    """``pred[key]`` indexed by id - 1 (length = largest id), checked; None when absent."""
    if pred.get(key) is None:
        return None
    scores = np.asarray(pred[key], dtype=np.float64)
    if scores.ndim != 1 or scores.shape[0] != n_ids:
        raise ValueError(
            f"{where}: {key!r} must be 1-D with one value per instance id ({key}[k - 1] for id k), i.e. "
            f"length {n_ids} = the largest id in inst_map; got shape {scores.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{where}: {key!r} holds NaN or infinite values")
    return scores


def image_stats(
    gt: dict, pred: dict, n_classes: int, *, match_radius: float = 12.0, where: str = "image"
) -> ImageStats:
    """The statistics of one image. ``where`` names the image in error messages.

    Raises:
        ValueError: missing keys, shapes that differ, class ids above ``n_classes``, or scores of the wrong length.
    """
    _check_pair(gt, pred, where)
    gt_inst = np.asarray(gt["inst_map"])
    gt_types = np.asarray(gt["type_map"])
    pred_inst = np.asarray(pred["inst_map"])
    pred_types = np.asarray(pred["type_map"])
    if (pred_inst.size and pred_inst.min() < 0) or (gt_inst.size and gt_inst.min() < 0):
        raise ValueError(f"{where}: instance ids must be >= 0 (0 = background)")
    n_ids = int(pred_inst.max()) if pred_inst.size else 0
    scores_by_id = _scores(pred, n_ids, where)
    objectness_by_id = _scores(pred, n_ids, where, "objectness")
    # Class-agnostic AP ranks by objectness; class-aware AP by the class-aware confidence (COCO's per category).
    ranking = "objectness" if objectness_by_id is not None else "scores" if scores_by_id is not None else "constant"
    if scores_by_id is None:
        scores_by_id = np.ones(n_ids)
    if objectness_by_id is None:
        objectness_by_id = scores_by_id
    ignore = gt.get("ignore_mask")
    valid = None
    if ignore is not None:
        ignore = np.asarray(ignore).astype(bool)
        valid = ~ignore
        kept = drop_ignored(pred_inst, ignore)
        pred_types = np.where((pred_inst > 0) & (kept == 0), 0, pred_types)
        pred_inst = kept
        gt_inst = np.where(ignore, 0, gt_inst)
    try:
        semantic = confusion_counts(gt_types, pred_types, n_classes, valid)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    table = pair_table(gt_inst, pred_inst, gt_types, pred_types, with_centroids=True)
    assert table.gt_classes is not None and table.pred_classes is not None
    assert table.gt_centroids is not None and table.pred_centroids is not None
    agnostic, per_class = panoptic_counts(table, table.gt_classes, table.pred_classes, n_classes)
    assert per_class is not None
    gi, pi, _ = match_iou(table)
    k = n_classes + 1
    match_conf = np.bincount(table.gt_classes[gi] * k + table.pred_classes[pi], minlength=k * k).reshape(k, k)
    cg, cp = match_centroids(table.gt_centroids, table.pred_centroids, match_radius)
    pred_scores = scores_by_id[table.pred_ids - 1] if table.n_pred else np.zeros(0)
    pred_objectness = objectness_by_id[table.pred_ids - 1] if table.n_pred else np.zeros(0)
    return ImageStats(
        panoptic=agnostic,
        panoptic_class=per_class,
        aji=aji_totals(table),
        aji_plus=aji_plus_totals(table),
        dice=foreground_dice_counts(table),
        semantic=semantic,
        centroid=class_detection_counts(table.gt_classes, table.pred_classes, cg, cp, n_classes),
        centroid_agnostic=(int(cg.size), table.n_pred - int(cg.size), table.n_gt - int(cg.size)),
        match_confusion=match_conf.astype(np.int64),
        coco=image_detections(table, pred_objectness),
        coco_class=[
            image_detections(table, pred_scores, table.gt_classes == c, table.pred_classes == c)
            for c in range(1, k)
        ],
        agnostic_ranking=ranking,
    )


def _finite(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def reduce_stats(
    stats: Sequence[ImageStats],
    class_names: Sequence[str],
    tissues: Sequence[str] | None = None,
    *,
    match_radius: float = 12.0,
) -> dict:
    """Dataset metrics from per-image statistics (see the module docstring for the conventions).

    Raises:
        ValueError: ``tissues`` with a label count other than the number of images.
    """
    n_classes = len(class_names)
    if tissues is not None and len(tissues) != len(stats):
        raise ValueError(f"tissues has {len(tissues)} labels for {len(stats)} images; give one per image or None")
    pq_img = np.array([[float(v) for v in s.panoptic.quality().values()] for s in stats]).reshape(-1, 3)
    pannuke = pannuke_image_scores(stats)
    total_class = PanopticCounts(*(np.zeros(n_classes + 1) for _ in range(4)))
    for s in stats:
        total_class = total_class + s.panoptic_class
    class_quality = total_class.quality()
    tp = sum(int(s.panoptic.tp) for s in stats)
    fp = sum(int(s.panoptic.fp) for s in stats)
    fn = sum(int(s.panoptic.fn) for s in stats)
    det_p, det_r, det_f1 = f1_from_counts(tp, fp, fn)
    ctp, cfp, cfn = (sum(s.centroid_agnostic[i] for s in stats) for i in range(3))
    cen_p, cen_r, cen_f1 = f1_from_counts(ctp, cfp, cfn)
    semantic = sum((s.semantic for s in stats), np.zeros((n_classes + 1,) * 2, np.int64))
    sem_iou, sem_dice = iou_dice_per_class(semantic)
    centroid = sum((s.centroid for s in stats), np.zeros((n_classes + 1, 3), np.int64))
    _, _, class_f1 = f1_from_counts(centroid[:, 0], centroid[:, 1], centroid[:, 2])
    match_conf = sum((s.match_confusion for s in stats), np.zeros((n_classes + 1,) * 2, np.int64))
    coco = average_precision([s.coco for s in stats])
    ap_class = [average_precision([s.coco_class[c] for s in stats]) for c in range(n_classes)]
    coco_class = category_average(ap_class)
    pred_pixels = semantic[:, 1:].sum()
    n_gt_c = (total_class.tp + total_class.fn).astype(np.int64)
    n_pred_c = (total_class.tp + total_class.fp).astype(np.int64)
    per_class = {}
    for c, name in enumerate(class_names, start=1):
        ap_c = ap_class[c - 1]
        per_class[name] = {
            "iou": _finite(sem_iou[c - 1]),
            "dice": _finite(sem_dice[c - 1]),
            "pq": _finite(class_quality["pq"][c]),
            "sq": _finite(class_quality["sq"][c]),
            "rq": _finite(class_quality["rq"][c]),
            "f1": _finite(class_f1[c]),
            "ap50": None if ap_c is None else ap_c["ap50"],
            "map": None if ap_c is None else ap_c["map"],
            "n_gt": int(n_gt_c[c]),
            "n_pred": int(n_pred_c[c]),
            "pred_pixel_fraction": _finite(semantic[:, c].sum() / pred_pixels) if pred_pixels else 0.0,
        }
    collapsed = [name for name, v in per_class.items() if v["n_gt"] > 0 and v["n_pred"] == 0]
    if collapsed:
        log.warning("class collapse: %s present in the ground truth but never predicted", collapsed)
    unclassified = int(match_conf[0, :].sum() + match_conf[:, 0].sum() - match_conf[0, 0])
    n_tissues = len(set(tissues)) if tissues is not None else None
    per_tissue = None
    if tissues is not None:
        bpq_t = tissue_means(pannuke["bpq"], tissues)
        mpq_t = tissue_means(pannuke["mpq"], tissues)
        labels = list(tissues)
        per_tissue = {t: {"bpq": _finite(bpq_t[t]), "mpq": _finite(mpq_t[t]), "n_images": labels.count(t)}
                      for t in bpq_t}
    return {
        "n_images": len(stats),
        "pq": _finite(nanmean(pq_img[:, 0])),
        "sq": _finite(nanmean(pq_img[:, 1])),
        "rq": _finite(nanmean(pq_img[:, 2])),
        "bpq": _finite(average_over_images(pannuke["bpq"], tissues)),
        "mpq": _finite(average_over_images(pannuke["mpq"], tissues)),
        "bpq_incl_empty_gt": _finite(average_over_images(pannuke["bpq_incl_empty_gt"], tissues)),
        "mpq_gt_or_pred": _finite(average_over_images(pannuke["mpq_gt_or_pred"], tissues)),
        "n_tissues": n_tissues,
        "per_tissue": per_tissue,
        "mpq_plus": _finite(nanmean(class_quality["pq"][1:])),
        "aji": _finite(nanmean(np.array([ratio(*s.aji) for s in stats]))),
        "aji_plus": _finite(nanmean(np.array([ratio(*s.aji_plus) for s in stats]))),
        "dice": _finite(nanmean(np.array([ratio(*s.dice) for s in stats]))),
        "det_precision": _finite(det_p),
        "det_recall": _finite(det_r),
        "det_f1": _finite(det_f1),
        "det_tp": tp,
        "det_fp": fp,
        "det_fn": fn,
        "det_centroid_precision": _finite(cen_p),
        "det_centroid_recall": _finite(cen_r),
        "det_centroid_f1": _finite(cen_f1),
        "match_radius": float(match_radius),
        "ap50": None if coco_class is None else coco_class["ap50"],
        "ap75": None if coco_class is None else coco_class["ap75"],
        "map": None if coco_class is None else coco_class["map"],
        "ap_categories": [name for name, ap in zip(class_names, ap_class) if ap is not None],
        "ap50_agnostic": None if coco is None else coco["ap50"],
        "ap75_agnostic": None if coco is None else coco["ap75"],
        "map_agnostic": None if coco is None else coco["map"],
        "ap_agnostic_ranked_by": sorted({s.agnostic_ranking for s in stats if s.coco is not None}),
        "miou": _finite(nanmean(sem_iou)),
        "mdice": _finite(nanmean(sem_dice)),
        "per_class": per_class,
        "confusion": {
            "labels": list(class_names),
            "matrix": match_conf[1:, 1:].tolist(),
            "unclassified_matches": unclassified,
        },
        "collapsed_classes": collapsed,
        "class_names": list(class_names),
        "conventions": conventions(n_tissues),
    }


def pannuke_image_scores(stats: Sequence[ImageStats]) -> dict[str, np.ndarray]:
    """Per-image values (NaN = left out) of PanNuke's ``bpq`` and ``mpq`` and of the stricter variants
    ``bpq_incl_empty_gt`` and ``mpq_gt_or_pred`` (:mod:`cellseg.metrics.pannuke`). Shape: -> (N,) each."""
    return {
        "bpq": np.array([image_bpq(s.panoptic) for s in stats], np.float64),
        "mpq": np.array([image_mpq(s.panoptic_class) for s in stats], np.float64),
        "bpq_incl_empty_gt": np.array([image_bpq_incl_empty_gt(s.panoptic) for s in stats], np.float64),
        "mpq_gt_or_pred": np.array([image_mpq_gt_or_pred(s.panoptic_class) for s in stats], np.float64),
    }


def evaluate_instances(
    gts: Sequence[dict],
    preds: Sequence[dict],
    class_names: Sequence[str],
    tissues: Sequence[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    match_radius: float = 12.0,
) -> dict:
    """Evaluate predicted instance and type maps against the ground truth; returns JSON-serialisable metrics.

    Args:
        gts: per image ``inst_map`` (ids, 0 = background), ``type_map`` (0 = background, class ids 1..C;
            ``class_names[i]`` is id ``i + 1``), optional ``ignore_mask`` (bool; pixels excluded everywhere, and
            predicted instances lying mostly inside it are dropped).
        preds: per image ``inst_map``, ``type_map``, optional ``scores`` (``scores[k - 1]`` = confidence of id k,
            length = largest id; default 1.0).
        class_names: the C class names.
        tissues: per image tissue label for PanNuke's tissue-averaged bPQ / mPQ.
        names: per image names (file names) used in error messages.
        match_radius: centroid matching radius in pixels.

    Raises:
        ValueError: lists of different lengths, no class names, or a malformed image (named in the message).
    """
    if len(gts) != len(preds):
        raise ValueError(f"got {len(gts)} ground-truth images but {len(preds)} predictions; they must pair up")
    if len(class_names) == 0:
        raise ValueError("class_names is empty: give the C class names (type ids 1..C)")
    if tissues is not None and len(tissues) != len(gts):
        raise ValueError(f"tissues has {len(tissues)} labels for {len(gts)} images; give one per image or None")
    if names is not None and len(names) != len(gts):
        raise ValueError(f"names has {len(names)} entries for {len(gts)} images")
    stats = [
        image_stats(
            gt, pred, len(class_names), match_radius=match_radius,
            where=_label(None if names is None else names[i], i),
        )
        for i, (gt, pred) in enumerate(zip(gts, preds))
    ]
    return reduce_stats(stats, class_names, tissues, match_radius=match_radius)

