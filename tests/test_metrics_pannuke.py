"""bPQ and mPQ equal PanNuke's official evaluation, written out independently below (per-class instance maps,
``get_fast_pq`` on each, NaN rules, ``nanmean`` per image, per tissue, then over tissues), on perturbed predictions of
the real DSB2018 tile with empty images and absent classes; and the stricter variants keep their own names."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from cellseg.metrics import evaluate_instances, image_stats, pannuke_image_scores
from cellseg.metrics.conventions import CLASS_AGNOSTIC_KEYS, CLASS_AWARE_KEYS

TOL = 1e-6
CLASSES = ["neoplastic", "inflammatory", "connective"]


# ----------------------------------------------------------------------------- PanNuke's evaluation, literal
def remap_label(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape, np.int32)
    for new, old in enumerate(i for i in np.unique(x) if i != 0):
        out[x == old] = new + 1
    return out


def get_fast_pq(true: np.ndarray, pred: np.ndarray) -> float:
    """HoVer-Net's get_fast_pq (PanNuke's compute_stats), PQ only: IoU > 0.5 pairs are unique matches."""
    true_ids = [i for i in np.unique(true) if i != 0]
    pred_ids = [i for i in np.unique(pred) if i != 0]
    ious = []
    matched_pred = set()
    for t in true_ids:
        t_mask = true == t
        for p in np.unique(pred[t_mask]):
            if p == 0:
                continue
            p_mask = pred == p
            iou = (t_mask & p_mask).sum() / (t_mask | p_mask).sum()
            if iou > 0.5:
                ious.append(iou)
                matched_pred.add(p)
    tp = len(ious)
    fp = len(pred_ids) - len(matched_pred)
    fn = len(true_ids) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum(ious) / tp if tp else 0.0  # HoVer-Net divides by tp + 1e-6 (a difference below 1e-6)
    return dq * sq


def pannuke_official(gts, preds, n_classes, tissues):
    """compute_stats.py of the PanNuke evaluation: per image bPQ (NaN on empty GT) and per-class PQ (NaN when the
    class is absent from the GT), nanmean per image, then per tissue, then over tissues."""
    bpq_all, mpq_all = [], []
    for gt, pred in zip(gts, preds):
        true_bin = remap_label(gt["inst_map"])
        pred_bin = remap_label(pred["inst_map"])
        bpq_all.append(np.nan if len(np.unique(true_bin)) == 1 else get_fast_pq(true_bin, pred_bin))
        pq = []
        for c in range(1, n_classes + 1):  # one channel per class, as PanNuke's masks
            true_c = remap_label(np.where(gt["type_map"] == c, gt["inst_map"], 0))
            pred_c = remap_label(np.where(pred["type_map"] == c, pred["inst_map"], 0))
            pq.append(np.nan if len(np.unique(true_c)) == 1 else get_fast_pq(true_c, pred_c))
        mpq_all.append(pq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN rows, as in PanNuke's script
        mpq_img = np.array([np.nanmean(pq) for pq in mpq_all])
        bpq_img = np.array(bpq_all, np.float64)
        labels = np.asarray(tissues)
        per_tissue = {t: (np.nanmean(bpq_img[labels == t]), np.nanmean(mpq_img[labels == t]))
                      for t in dict.fromkeys(tissues)}
        bpq = np.nanmean([v[0] for v in per_tissue.values()])
        mpq = np.nanmean([v[1] for v in per_tissue.values()])
        plain = (np.nanmean(bpq_img), np.nanmean(mpq_img))
    return {"bpq_img": bpq_img, "mpq_img": mpq_img, "per_tissue": per_tissue, "bpq": bpq, "mpq": mpq,
            "plain": plain}


# ----------------------------------------------------------------------------- data: perturbed real masks
def _typed(inst: np.ndarray, cls_of_id: np.ndarray) -> dict:
    return {"inst_map": inst.astype(np.int32), "type_map": np.where(inst > 0, cls_of_id[inst], 0).astype(np.int32)}


@pytest.fixture(scope="module")
def pannuke_like(dsb2018_root):
    """16 crops of the real tile: classes drawn per nucleus (some crops lack a class), perturbed predictions (shift,
    dilation, drops, class flips, false positives), 2 empty-GT crops (one with a false positive, one without)."""
    mask = tifffile.imread(dsb2018_root / "mask2d.tif").astype(np.int32)
    rng = np.random.default_rng(14)
    n_ids = int(mask.max()) + 1
    gts, preds, tissues = [], [], []
    for i in range(16):
        y, x = rng.integers(0, mask.shape[0] - 96), rng.integers(0, mask.shape[1] - 96)
        gt_inst = mask[y : y + 96, x : x + 96]
        gt_cls = rng.integers(1, 4, n_ids)
        if i % 4 == 1:
            gt_cls[gt_cls == 3] = 1  # class 3 absent from this image's ground truth
        if i in (5, 11):
            gt_inst = np.zeros_like(gt_inst)  # empty ground truth
        pred_inst = np.roll(gt_inst, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
        if i % 3 == 0:
            pred_inst = ndi.grey_dilation(pred_inst, size=3)
        ids = np.unique(pred_inst)[1:]
        pred_inst = np.where(np.isin(pred_inst, ids[rng.random(ids.size) < 0.15]), 0, pred_inst)
        pred_cls = np.where(rng.random(n_ids) < 0.2, rng.integers(1, 4, n_ids), gt_cls)
        if i not in (11,):  # a false positive of class 3 in an empty corner-ish spot
            yy, xx = np.ogrid[:96, :96]
            blob = ((yy - 90) ** 2 + (xx - 90) ** 2 <= 9) & (pred_inst == 0)
            pred_inst = np.where(blob, n_ids - 1, pred_inst)
            pred_cls[n_ids - 1] = 3
        gts.append(_typed(gt_inst, gt_cls))
        preds.append(_typed(pred_inst, pred_cls))
        tissues.append(["Breast", "Colon", "Lung"][i % 3])
    return gts, preds, tissues


def test_bpq_mpq_equal_pannuke_official_per_image_and_tissue(pannuke_like):
    gts, preds, tissues = pannuke_like
    ref = pannuke_official(gts, preds, len(CLASSES), tissues)
    assert np.isnan(ref["bpq_img"]).sum() == 2 and np.isnan(ref["mpq_img"]).sum() == 2  # empty-GT images
    stats = [image_stats(g, p, len(CLASSES)) for g, p in zip(gts, preds)]
    per_img = pannuke_image_scores(stats)
    np.testing.assert_allclose(per_img["bpq"], ref["bpq_img"], atol=TOL)
    np.testing.assert_allclose(per_img["mpq"], ref["mpq_img"], atol=TOL)
    res = evaluate_instances(gts, preds, CLASSES, tissues)
    assert res["bpq"] == pytest.approx(ref["bpq"], abs=TOL) and res["mpq"] == pytest.approx(ref["mpq"], abs=TOL)
    assert res["n_tissues"] == 3 and set(res["per_tissue"]) == {"Breast", "Colon", "Lung"}
    for t, (b, m) in ref["per_tissue"].items():
        assert res["per_tissue"][t]["bpq"] == pytest.approx(b, abs=TOL)
        assert res["per_tissue"][t]["mpq"] == pytest.approx(m, abs=TOL)
    plain = evaluate_instances(gts, preds, CLASSES)
    assert plain["bpq"] == pytest.approx(ref["plain"][0], abs=TOL)
    assert plain["mpq"] == pytest.approx(ref["plain"][1], abs=TOL)
    assert plain["per_tissue"] is None
    # The stricter variants punish the false positives PanNuke leaves out.
    assert res["bpq_incl_empty_gt"] < res["bpq"] and res["mpq_gt_or_pred"] < res["mpq"]
    assert 0.3 < res["mpq"] < 0.95  # a non-trivial score
    json.dumps(res, allow_nan=False)


def _disk(shape, centre, r, value):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.where((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r, value, 0)


def test_two_image_example_of_issue_14():
    """Two images: two nuclei found exactly plus a false positive of an absent class; an empty image with one false
    positive. PanNuke: bPQ 0.80, mPQ 1.00; the stricter variants: 0.40 and 0.25."""
    shape = (64, 64)
    gt1 = _disk(shape, (16, 16), 6, 1) + _disk(shape, (16, 48), 6, 2)
    pred1 = gt1 + _disk(shape, (48, 32), 6, 3)
    cls1 = np.array([0, 1, 1, 2])  # ids 1, 2: class 1; id 3 (false positive): class 2, absent from the GT
    empty = np.zeros(shape, np.int32)
    pred2 = _disk(shape, (32, 32), 6, 1)
    gts = [_typed(gt1, cls1), _typed(empty, np.array([0]))]
    preds = [_typed(pred1, cls1), _typed(pred2, np.array([0, 1]))]
    res = evaluate_instances(gts, preds, ["a", "b"])
    assert res["bpq"] == pytest.approx(0.80) and res["mpq"] == pytest.approx(1.00)
    assert res["bpq_incl_empty_gt"] == pytest.approx(0.40) and res["mpq_gt_or_pred"] == pytest.approx(0.25)
    ref = pannuke_official(gts, preds, 2, ["t", "t"])
    assert (ref["bpq"], ref["mpq"]) == (pytest.approx(0.80), pytest.approx(1.00))


def test_conventions_travel_with_the_numbers():
    gt = _typed(_disk((32, 32), (16, 16), 5, 1), np.array([0, 1]))
    res = evaluate_instances([gt], [dict(gt)], ["a"], tissues=["x"])
    conv = res["conventions"]
    for key in (*CLASS_AGNOSTIC_KEYS, *CLASS_AWARE_KEYS):
        assert key in res and conv.get(key), key
    assert "PanNuke official" in conv["bpq"] and "1 tissues" in conv["mpq"]
    assert "mean over images" in evaluate_instances([gt], [dict(gt)], ["a"])["conventions"]["bpq"]
    assert "categor" in conv["ap50"] and "objectness" in conv["ap50_agnostic"]


def test_tissue_count_must_match_images():
    gt = _typed(_disk((32, 32), (16, 16), 5, 1), np.array([0, 1]))
    from cellseg.metrics import reduce_stats

    with pytest.raises(ValueError, match="tissues has 2 labels for 1 images"):
        reduce_stats([image_stats(gt, dict(gt), 1)], ["a"], ["x", "y"])
