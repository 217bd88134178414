"""Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017) as HoVer-Net's ``get_fast_aji`` and ``get_fast_aji_plus``.

AJI pairs every ground-truth instance with the prediction of highest IoU (a prediction may be reused), sums the
intersections and unions of these pairs and adds the areas of everything left unpaired to the union. AJI+ pairs by a
maximum-IoU one-to-one assignment instead, so that no prediction is counted twice. Both are computed per image from
the :class:`~cellseg.metrics.pairwise.PairTable`; the IoU used for pairing is HoVer-Net's ``inter / (union + 1e-6)``
so that ties resolve as in the reference (lowest prediction id).
"""

from __future__ import annotations

import numpy as np

from cellseg.metrics.assignment import assign_max_weight
from cellseg.metrics.pairwise import PairTable


def _pairing_iou(table: PairTable) -> np.ndarray:
    return table.inter / (table.union + 1.0e-6)


def _totals(table: PairTable, sel: np.ndarray) -> tuple[float, float]:
    """Summed intersection and union over the chosen pairs plus the areas of all unpaired instances."""
    inter = float(table.inter[sel].sum())
    union = float(table.union[sel].sum())
    paired_gt = np.zeros(table.n_gt, bool)
    paired_gt[table.gt_index[sel]] = True
    paired_pred = np.zeros(table.n_pred, bool)
    paired_pred[table.pred_index[sel]] = True
    union += float(table.gt_areas[~paired_gt].sum()) + float(table.pred_areas[~paired_pred].sum())
    return inter, union


def aji_totals(table: PairTable) -> tuple[float, float]:
    """(overall intersection, overall union) of AJI for one image; AJI = their ratio (undefined when both are 0)."""
    if table.inter.size == 0:
        return _totals(table, np.zeros(0, np.int64))
    iou = _pairing_iou(table)
    order = np.lexsort((table.pred_index, -iou, table.gt_index))  # per gt: highest IoU, then lowest pred id
    _, first = np.unique(table.gt_index[order], return_index=True)
    return _totals(table, order[first])


def aji_plus_totals(table: PairTable) -> tuple[float, float]:
    """(overall intersection, overall union) of AJI+ for one image (one-to-one maximum-IoU pairing)."""
    if table.inter.size == 0:
        return _totals(table, np.zeros(0, np.int64))
    iou = _pairing_iou(table)
    gi, pi = assign_max_weight(table.gt_index, table.pred_index, iou, table.n_gt, table.n_pred)
    # Pairs are sorted by (gt, pred): locate the chosen edges.
    stride = max(table.n_pred, 1)
    keys = table.gt_index * stride + table.pred_index
    sel = np.searchsorted(keys, gi * stride + pi)
    return _totals(table, sel)


def ratio(inter: float, union: float) -> float:
    """inter / union, NaN when the image has neither ground truth nor prediction."""
    return inter / union if union > 0 else float("nan")
