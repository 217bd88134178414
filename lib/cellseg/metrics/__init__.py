"""Instance segmentation and classification metrics, all computed from one sparse table of pairwise intersections
per image ("stats, then reduce"): panoptic quality (PQ/SQ/RQ, bPQ, mPQ, CoNIC mPQ+), AJI and AJI+, detection
P/R/F1 (IoU and centroid matching), semantic IoU/Dice, and COCO mask AP (category-wise and class-agnostic).
Each number's convention is in :mod:`cellseg.metrics.conventions`.
"""

from cellseg.metrics.aggregate import (
    ImageStats,
    evaluate_instances,
    image_stats,
    pannuke_image_scores,
    reduce_stats,
)
from cellseg.metrics.aji import aji_plus_totals, aji_totals
from cellseg.metrics.coco import average_precision, category_average, image_detections, precision_curve
from cellseg.metrics.conventions import CLASS_AGNOSTIC_KEYS, CLASS_AWARE_KEYS, conventions
from cellseg.metrics.detection import match_centroids
from cellseg.metrics.pairwise import PairTable, drop_ignored, instance_classes, pair_table, relabel_sequential
from cellseg.metrics.panoptic import PanopticCounts, match_iou, panoptic_counts, panoptic_from_counts

__all__ = [
    "CLASS_AGNOSTIC_KEYS",
    "CLASS_AWARE_KEYS",
    "ImageStats",
    "PairTable",
    "PanopticCounts",
    "aji_plus_totals",
    "aji_totals",
    "average_precision",
    "category_average",
    "conventions",
    "drop_ignored",
    "evaluate_instances",
    "image_detections",
    "image_stats",
    "instance_classes",
    "match_centroids",
    "match_iou",
    "pair_table",
    "panoptic_counts",
    "pannuke_image_scores",
    "panoptic_from_counts",
    "precision_curve",
    "reduce_stats",
    "relabel_sequential",
]
