"""The convention of every number :func:`cellseg.metrics.evaluate_instances` returns, as short text.

A convention is a fact about a number, so it travels with it: ``metrics.json`` holds ``conventions`` (key -> text)
and ``report.md`` prints the text beside each value, in a class-agnostic and a class-aware table. README's metric
table says the same in fewer words.
"""

from __future__ import annotations

# Keys of the headline tables, in print order.
CLASS_AGNOSTIC_KEYS: tuple[str, ...] = (
    "pq", "sq", "rq", "bpq", "bpq_incl_empty_gt", "aji", "aji_plus", "dice",
    "det_precision", "det_recall", "det_f1", "det_centroid_precision", "det_centroid_recall", "det_centroid_f1",
    "ap50_agnostic", "ap75_agnostic", "map_agnostic",
)
CLASS_AWARE_KEYS: tuple[str, ...] = ("mpq", "mpq_gt_or_pred", "mpq_plus", "ap50", "ap75", "map", "miou", "mdice")

_IMAGES = "mean over images (no tissue labels)"

_FIXED: dict[str, str] = {
    "pq": "class-agnostic PQ (IoU > 0.5) per image, mean over images with ground truth or prediction "
          "(an image with only false positives scores 0); never tissue-averaged",
    "sq": "SQ per image (mean IoU of matches, 0 without matches), mean over images as pq",
    "rq": "RQ = F1 at IoU > 0.5 per image, mean over images as pq",
    "aji": "AJI (Kumar 2017) per image, mean over images with ground truth or prediction",
    "aji_plus": "AJI+ (HoVer-Net, one-to-one pairing) per image, mean over images as aji",
    "dice": "binary foreground Dice per image, mean over images as aji",
    "det_precision": "IoU > 0.5 matching, TP/FP/FN summed over the dataset",
    "det_recall": "IoU > 0.5 matching, TP/FP/FN summed over the dataset",
    "det_f1": "IoU > 0.5 matching, TP/FP/FN summed over the dataset",
    "det_centroid_precision": "centroids within match_radius px (one-to-one), counts summed over the dataset",
    "det_centroid_recall": "centroids within match_radius px (one-to-one), counts summed over the dataset",
    "det_centroid_f1": "centroids within match_radius px (one-to-one), counts summed over the dataset",
    "ap50_agnostic": "COCO mask AP at IoU 0.5, one category for all instances, ranked by objectness "
                     "(mean foreground probability); no detection limit",
    "ap75_agnostic": "as ap50_agnostic at IoU 0.75",
    "map_agnostic": "as ap50_agnostic, mean over IoU 0.50:0.05:0.95",
    "mpq_plus": "CoNIC mPQ+: TP/FP/FN/IoU summed per class over the dataset, PQ per class, mean over the classes "
                "that occur (in ground truth or prediction)",
    "ap50": "COCO mask AP at IoU 0.5 per category (= instance class), ranked by class-aware confidence, mean over "
            "the categories present in the ground truth (pycocotools segm, no detection limit)",
    "ap75": "as ap50 at IoU 0.75",
    "map": "as ap50, mean over IoU 0.50:0.05:0.95 and the categories present in the ground truth",
    "miou": "pixel IoU per class from pixel counts summed over the dataset, mean over classes",
    "mdice": "pixel Dice per class from pixel counts summed over the dataset, mean over classes",
    "per_class.iou": "pixel IoU from pixel counts summed over the dataset",
    "per_class.dice": "pixel Dice from pixel counts summed over the dataset",
    "per_class.pq": "PQ from TP/FP/FN/IoU summed over the dataset (as mpq_plus)",
    "per_class.f1": "centroid matching; a misclassified match is an FP of the predicted and an FN of the true class",
    "per_class.ap50": "COCO mask AP of this category at IoU 0.5, ranked by class-aware confidence",
    "per_class.map": "COCO mask AP of this category, mean over IoU 0.50:0.05:0.95",
    "per_tissue": "PanNuke's per-tissue bPQ / mPQ: nanmean of the images' values within the tissue",
}


def conventions(n_tissues: int | None = None) -> dict[str, str]:
    """Key -> convention text for an evaluation with ``n_tissues`` tissue labels (None: without tissues)."""
    over = _IMAGES if not n_tissues else f"mean within each tissue, then over the {n_tissues} tissues (PanNuke)"
    out = {
        "bpq": "PanNuke official: per-image class-agnostic PQ, NaN (left out) when the ground truth is empty; "
               + over,
        "bpq_incl_empty_gt": "stricter: per-image PQ that also scores images with an empty ground truth "
                             "(0 with false positives); " + over,
        "mpq": "PanNuke official: per image, PQ of each class present in the ground truth (absent classes left "
               "out), nanmean over classes; " + over,
        "mpq_gt_or_pred": "stricter: per image, PQ of each class present in the ground truth or the prediction "
                          "(a false positive of an absent class scores it 0), mean over classes; " + over,
    }
    out.update(_FIXED)
    return out
