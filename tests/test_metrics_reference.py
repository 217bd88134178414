"""Equality of cellseg.metrics with HoVer-Net's reference metrics (get_fast_pq, get_fast_aji, get_fast_aji_plus) and
with PanNuke / CoNIC per-class PQ, on the real DSB2018 tile (perturbed) and on synthetic cases.

The references below are written independently from HoVer-Net's published algorithms (straightforward loops over
instances with full-image masks, remap_label first); they are deliberately slow and literal.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from cellseg.metrics import aji_plus_totals, aji_totals, pair_table, panoptic_counts
from cellseg.metrics.aji import ratio

TOL = 1e-6


# ----------------------------------------------------------------------------- references (HoVer-Net, literal)
def remap_label(x: np.ndarray) -> np.ndarray:
    ids = [i for i in np.unique(x) if i != 0]
    out = np.zeros(x.shape, np.int32)
    for new, old in enumerate(ids):
        out[x == old] = new + 1
    return out


def _pairwise(true: np.ndarray, pred: np.ndarray):
    true_ids = list(np.unique(true))
    pred_ids = list(np.unique(pred))
    true_masks = [None] + [np.array(true == t, np.uint8) for t in true_ids[1:]]
    pred_masks = [None] + [np.array(pred == p, np.uint8) for p in pred_ids[1:]]
    inter_m = np.zeros([len(true_ids) - 1, len(pred_ids) - 1], np.float64)
    union_m = np.zeros([len(true_ids) - 1, len(pred_ids) - 1], np.float64)
    for true_id in true_ids[1:]:
        t_mask = true_masks[true_id]
        for pred_id in np.unique(pred[t_mask > 0]):
            if pred_id == 0:
                continue
            p_mask = pred_masks[pred_id]
            total = (t_mask + p_mask).sum()
            inter = (t_mask * p_mask).sum()
            inter_m[true_id - 1, pred_id - 1] = inter
            union_m[true_id - 1, pred_id - 1] = total - inter
    return true_ids, pred_ids, true_masks, pred_masks, inter_m, union_m


def ref_get_fast_pq(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5):
    true, pred = remap_label(true), remap_label(pred)
    true_ids, pred_ids, _, _, inter_m, union_m = _pairwise(true, pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union_m > 0, inter_m / np.where(union_m > 0, union_m, 1), 0.0)
    iou[iou <= match_iou] = 0.0
    paired_true, paired_pred = np.nonzero(iou)
    paired_iou = iou[paired_true, paired_pred]
    tp = len(paired_true)
    fp = len(pred_ids) - 1 - tp
    fn = len(true_ids) - 1 - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = paired_iou.sum() / (tp + 1.0e-6)
    return dq * sq, sq, dq, (tp, fp, fn, paired_iou.sum())


def ref_get_fast_aji(true: np.ndarray, pred: np.ndarray) -> float:
    true, pred = remap_label(true), remap_label(pred)
    true_ids, pred_ids, true_masks, pred_masks, inter_m, union_m = _pairwise(true, pred)
    iou = inter_m / (union_m + 1.0e-6)
    paired_pred = np.argmax(iou, axis=1)
    best = np.max(iou, axis=1)
    paired_true = np.nonzero(best > 0.0)[0]
    paired_pred = paired_pred[paired_true]
    overall_inter = inter_m[paired_true, paired_pred].sum()
    overall_union = union_m[paired_true, paired_pred].sum()
    paired_true = list(paired_true + 1)
    paired_pred = list(paired_pred + 1)
    for t in true_ids[1:]:
        if t not in paired_true:
            overall_union += true_masks[t].sum()
    for p in pred_ids[1:]:
        if p not in paired_pred:
            overall_union += pred_masks[p].sum()
    return overall_inter / overall_union


def ref_get_fast_aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    true, pred = remap_label(true), remap_label(pred)
    true_ids, pred_ids, true_masks, pred_masks, inter_m, union_m = _pairwise(true, pred)
    iou = inter_m / (union_m + 1.0e-6)
    paired_true, paired_pred = linear_sum_assignment(-iou)
    keep = iou[paired_true, paired_pred] > 0.0
    paired_true, paired_pred = paired_true[keep], paired_pred[keep]
    overall_inter = inter_m[paired_true, paired_pred].sum()
    overall_union = union_m[paired_true, paired_pred].sum()
    paired_true = list(paired_true + 1)
    paired_pred = list(paired_pred + 1)
    for t in true_ids[1:]:
        if t not in paired_true:
            overall_union += true_masks[t].sum()
    for p in pred_ids[1:]:
        if p not in paired_pred:
            overall_union += pred_masks[p].sum()
    return overall_inter / overall_union


# ----------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def dsb_mask(dsb2018_root) -> np.ndarray:
    return tifffile.imread(dsb2018_root / "mask2d.tif").astype(np.int32)


def _erode(m: np.ndarray) -> np.ndarray:
    boundary = ndi.grey_dilation(m, size=3) != ndi.grey_erosion(m, size=3)
    return np.where(boundary, 0, m)


def _split(m: np.ndarray, every: int = 3) -> np.ndarray:
    """Cut every ``every``-th instance in two at its centroid column."""
    out = m.copy()
    next_id = int(m.max()) + 1
    xx = np.broadcast_to(np.arange(m.shape[1]), m.shape)
    for k in np.unique(m)[1::every]:
        sel = m == k
        cx = xx[sel].mean()
        out[sel & (xx > cx)] = next_id
        next_id += 1
    return out


def _drop(m: np.ndarray, every: int = 5) -> np.ndarray:
    ids = np.unique(m)[1::every]
    return np.where(np.isin(m, ids), 0, m)


def _merge(m: np.ndarray) -> np.ndarray:
    """Give every 4th id the previous id: touching neighbours merge, distant ones become two-part instances."""
    out = m.copy()
    ids = np.unique(m)[1:]
    for a, b in zip(ids[::4], ids[1::4]):
        out[m == b] = a
    return out


def _shuffle_ids(m: np.ndarray, seed: int = 0) -> np.ndarray:
    ids = np.unique(m)[1:]
    new = np.random.default_rng(seed).permutation(np.arange(1000, 1000 + ids.size))
    lut = np.zeros(int(m.max()) + 1, np.int64)
    lut[ids] = new
    return lut[m]


PERTURBATIONS = {
    "identity": lambda m: m,
    "erode": _erode,
    "dilate": lambda m: ndi.grey_dilation(m, size=5),
    "drop": _drop,
    "split": _split,
    "shift": lambda m: np.roll(m, (3, -4), axis=(0, 1)),
    "merge": _merge,
    "mixed": lambda m: _shuffle_ids(_drop(_split(np.roll(_erode(m), (2, 2), axis=(0, 1)), 2), 7)),
}


def _disks(shape, centres, radii) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return out


def _synthetic_cases():
    rng = np.random.default_rng(3)
    cases = []
    for _ in range(4):
        n = int(rng.integers(3, 12))
        centres = rng.integers(5, 59, size=(n, 2))
        gt = _disks((64, 64), centres, rng.integers(3, 9, size=n))
        pred = _disks((64, 64), centres + rng.integers(-3, 4, size=(n, 2)), rng.integers(3, 9, size=n))
        cases.append((gt, pred))
    gt = _disks((64, 64), [(20, 20), (40, 40)], [8, 8])
    cases.append((gt, np.zeros_like(gt)[:, ::-1] + _disks((64, 64), [(10, 50)], [5])))  # all false positives
    cases.append((np.zeros((64, 64), np.int32), _disks((64, 64), [(30, 30)], [6])))  # empty ground truth
    # Two predictions with exactly equal IoU (0.4) with one nucleus, different unions: HoVer-Net's 1e-6 in the
    # denominator prefers the larger union, and AJI differs between the two choices (40/175 vs 50/165).
    gt = np.zeros((32, 32), np.int32)
    gt[0:10, 0:10] = 1
    pred = np.zeros_like(gt)
    pred[0:10, 0:4] = 1
    pred[0:15, 4:9] = 2
    cases.append((gt, pred))
    return cases


def _ours(gt, pred):
    table = pair_table(gt, pred)
    counts, _ = panoptic_counts(table)
    q = counts.quality()
    return float(q["pq"]), float(q["sq"]), float(q["rq"]), ratio(*aji_totals(table)), ratio(*aji_plus_totals(table))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_matches_hovernet_on_dsb2018(dsb_mask, name):
    pred = PERTURBATIONS[name](dsb_mask)
    pq, sq, rq, aji, aji_plus = _ours(dsb_mask, pred)
    r_pq, r_sq, r_dq, _ = ref_get_fast_pq(dsb_mask, pred)
    assert pq == pytest.approx(r_pq, abs=TOL)
    assert sq == pytest.approx(r_sq, abs=TOL)
    assert rq == pytest.approx(r_dq, abs=TOL)
    assert aji == pytest.approx(ref_get_fast_aji(dsb_mask, pred), abs=TOL)
    assert aji_plus == pytest.approx(ref_get_fast_aji_plus(dsb_mask, pred), abs=TOL)
    if name != "identity":
        assert pq < 0.999  # the perturbation did change something


def test_matches_hovernet_with_roles_swapped(dsb_mask):
    """AJI is not symmetric: swapping ground truth and prediction must still agree with the reference."""
    pred = _merge(_split(dsb_mask, 2))
    assert _ours(pred, dsb_mask)[3] == pytest.approx(ref_get_fast_aji(pred, dsb_mask), abs=TOL)
    assert _ours(pred, dsb_mask)[4] == pytest.approx(ref_get_fast_aji_plus(pred, dsb_mask), abs=TOL)


@pytest.mark.parametrize("case", range(len(_synthetic_cases())))
def test_matches_hovernet_on_synthetic(case):
    gt, pred = _synthetic_cases()[case]
    pq, sq, rq, aji, aji_plus = _ours(gt, pred)
    r_pq, r_sq, r_dq, _ = ref_get_fast_pq(gt, pred)
    assert (pq, sq, rq) == pytest.approx((r_pq, r_sq, r_dq), abs=TOL)
    assert aji == pytest.approx(ref_get_fast_aji(gt, pred), abs=TOL)
    assert aji_plus == pytest.approx(ref_get_fast_aji_plus(gt, pred), abs=TOL)


def test_empty_prediction_and_both_empty():
    gt = _disks((64, 64), [(20, 20), (40, 40)], [6, 7])
    empty = np.zeros_like(gt)
    pq, sq, rq, aji, aji_plus = _ours(gt, empty)
    assert (pq, sq, rq, aji, aji_plus) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert (pq, sq, rq) == pytest.approx(ref_get_fast_pq(gt, empty)[:3], abs=TOL)
    # Neither ground truth nor prediction: undefined (HoVer-Net divides by zero); left out of means downstream.
    assert all(np.isnan(v) for v in _ours(empty, empty))


def test_per_class_pq_matches_pannuke_and_conic(dsb_mask):
    """Per-class PQ from one table equals running get_fast_pq on class-masked maps (PanNuke), and dataset sums per
    class equal CoNIC's mPQ+ aggregation of the reference's counts."""
    rng = np.random.default_rng(0)
    n_classes = 3
    preds = [_split(dsb_mask, 4), _erode(_drop(dsb_mask, 6)), np.roll(dsb_mask, (2, 1), axis=(0, 1))]
    gt_cls = rng.integers(1, n_classes + 1, size=int(dsb_mask.max()) + 1)
    gt_types = np.where(dsb_mask > 0, gt_cls[dsb_mask], 0)
    sums_ours = np.zeros((n_classes + 1, 4))
    sums_ref = np.zeros((n_classes + 1, 4))
    for pred in preds:
        n_ids = int(pred.max()) + 1
        pred_cls = rng.integers(1, n_classes + 1, size=n_ids)
        common = min(n_ids, gt_cls.size)
        keep = rng.random(common) >= 0.2  # the others are (possibly) misclassified
        pred_cls[:common][keep] = gt_cls[:common][keep]
        pred_types = np.where(pred > 0, pred_cls[pred], 0)
        table = pair_table(dsb_mask, pred, gt_types, pred_types)
        _, per_class = panoptic_counts(table, table.gt_classes, table.pred_classes, n_classes)
        q = per_class.quality()
        for c in range(1, n_classes + 1):
            t_c = np.where(gt_types == c, dsb_mask, 0)
            p_c = np.where(pred_types == c, pred, 0)
            r_pq, r_sq, r_dq, (tp, fp, fn, s) = ref_get_fast_pq(t_c, p_c)
            assert q["pq"][c] == pytest.approx(r_pq, abs=TOL)
            assert q["sq"][c] == pytest.approx(r_sq, abs=TOL)
            sums_ref[c] += (tp, fp, fn, s)
            sums_ours[c] += (per_class.tp[c], per_class.fp[c], per_class.fn[c], per_class.iou_sum[c])
    np.testing.assert_allclose(sums_ours, sums_ref, atol=1e-9)
