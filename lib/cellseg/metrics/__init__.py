"""Instance segmentation and classification metrics, all computed from one sparse table of pairwise intersections
per image ("stats, then reduce"): panoptic quality (PQ/SQ/RQ, bPQ, mPQ, CoNIC mPQ+), AJI and AJI+, detection
P/R/F1 (IoU and centroid matching), semantic IoU/Dice, and COCO mask AP.
"""

from cellseg.metrics.aggregate import ImageStats, evaluate_instances, image_stats, reduce_stats
from cellseg.metrics.aji import aji_plus_totals, aji_totals
from cellseg.metrics.coco import average_precision, image_detections, precision_curve
from cellseg.metrics.detection import match_centroids
from cellseg.metrics.pairwise import PairTable, drop_ignored, instance_classes, pair_table, relabel_sequential
from cellseg.metrics.panoptic import PanopticCounts, match_iou, panoptic_counts, panoptic_from_counts

__all__ = [
    "ImageStats",
    "PairTable",
    "PanopticCounts",
    "aji_plus_totals",
    "aji_totals",
    "average_precision",
    "drop_ignored",
    "evaluate_instances",
    "image_detections",
    "image_stats",
    "instance_classes",
    "match_centroids",
    "match_iou",
    "pair_table",
    "panoptic_counts",
    "panoptic_from_counts",
    "precision_curve",
    "reduce_stats",
    "relabel_sequential",
]
