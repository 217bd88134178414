"""COCO mask AP of cellseg.metrics.coco equals pycocotools' COCOeval (precision array at a raised maxDets) to 1e-6,
on real DSB2018 masks and on crafted tie cases."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import tifffile
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage as ndi

from cellseg.metrics import evaluate_instances, image_detections, pair_table, precision_curve
from cellseg.metrics.coco import average_precision

TOL = 1e-6


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def cocoeval_precision(
    gts: list[np.ndarray], preds: list[np.ndarray], scores: list[np.ndarray],
    gt_cats: list[np.ndarray] | None = None, pred_cats: list[np.ndarray] | None = None, n_cats: int = 1,
) -> np.ndarray:
    """COCOeval's precision array (T, R, K) for area 'all' at maxDets above the largest instance count.

    Instances are added in id order, as cellseg ranks ties (stable sort) in id order too."""
    images, gt_anns, dt_anns = [], [], []
    max_dets = 1
    for i, (gt, pred, sc) in enumerate(zip(gts, preds, scores), start=1):
        images.append({"id": i, "height": gt.shape[0], "width": gt.shape[1]})
        gt_ids = [k for k in np.unique(gt) if k]
        pred_ids = [k for k in np.unique(pred) if k]
        max_dets = max(max_dets, len(pred_ids) + 1)
        for k in gt_ids:
            rle = _rle(gt == k)
            cat = 1 if gt_cats is None else int(gt_cats[i - 1][k])
            gt_anns.append({
                "id": len(gt_anns) + 1, "image_id": i, "category_id": cat, "segmentation": rle,
                "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0,
            })
        for k in pred_ids:
            cat = 1 if pred_cats is None else int(pred_cats[i - 1][k])
            dt_anns.append({"image_id": i, "category_id": cat, "segmentation": _rle(pred == k), "score": float(sc[k - 1])})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": images, "annotations": gt_anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 1)],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dt_anns) if dt_anns else COCO()
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"][:, :, :, 0, -1]


def ours_precision(gts, preds, scores, select=None) -> np.ndarray:
    images = []
    for gt, pred, sc in zip(gts, preds, scores):
        table = pair_table(gt, pred)
        s = sc[table.pred_ids - 1] if table.n_pred else np.zeros(0)
        if select is None:
            images.append(image_detections(table, s))
        else:
            images.append(image_detections(table, s, *select(table)))
    curve = precision_curve(images)
    assert curve is not None
    return curve[0]


@pytest.fixture(scope="module")
def dsb_images(dsb2018_root):
    m = tifffile.imread(dsb2018_root / "mask2d.tif").astype(np.int32)
    rng = np.random.default_rng(0)
    preds = []
    for shift, grow in [((0, 0), 1), ((2, -1), 3), ((-3, 2), 5), ((1, 1), 1)]:
        p = np.roll(m, shift, axis=(0, 1))
        p = ndi.grey_dilation(p, size=grow) if grow > 1 else p
        ids = np.unique(p)[1:]
        p = np.where(np.isin(p, ids[rng.random(ids.size) < 0.1]), 0, p)  # drop ~10 %
        preds.append(p)
    gts = [m, m, m[:256], m[:, 100:]]
    preds = [preds[0], preds[1], preds[2][:256], preds[3][:, 100:]]
    # Scores with many ties (one decimal) so that the stable ordering matters.
    scores = [np.round(rng.random(int(p.max())), 1) for p in preds]
    return gts, preds, scores


def test_equals_cocoeval_on_dsb2018(dsb_images):
    gts, preds, scores = dsb_images
    ref = cocoeval_precision(gts, preds, scores)[:, :, 0]
    ours = ours_precision(gts, preds, scores)
    np.testing.assert_allclose(ours, ref, atol=TOL)
    assert 0.2 < ours.mean() < 0.95  # a non-trivial curve


def test_equals_cocoeval_per_category(dsb_images):
    """Two categories: per-class AP from the same tables with class selections equals COCOeval per category."""
    gts, preds, scores = dsb_images
    rng = np.random.default_rng(1)
    gt_cats = [rng.integers(1, 3, size=int(g.max()) + 1) for g in gts]
    pred_cats = []
    for p, gc in zip(preds, gt_cats):
        pc = rng.integers(1, 3, size=int(p.max()) + 1)
        n = min(pc.size, gc.size)
        keep = rng.random(n) < 0.8
        pc[:n][keep] = gc[:n][keep]
        pred_cats.append(pc)
    ref = cocoeval_precision(gts, preds, scores, gt_cats, pred_cats, n_cats=2)
    for c in (1, 2):
        images = []
        for g, p, sc, gc, pc in zip(gts, preds, scores, gt_cats, pred_cats):
            table = pair_table(g, p, np.where(g > 0, gc[g], 0), np.where(p > 0, pc[p], 0))
            images.append(image_detections(table, sc[table.pred_ids - 1], table.gt_classes == c, table.pred_classes == c))
        np.testing.assert_allclose(precision_curve(images)[0], ref[:, :, c - 1], atol=TOL)


def _tie_cases():
    """IoU exactly 0.5, where several candidates compete at t = 0.5 and COCOeval's sequential rule decides."""
    # One nucleus, two halves detected: both have IoU 0.5, only the higher-scored one may match.
    gt_a = np.zeros((20, 40), np.int32)
    gt_a[0:10, 0:20] = 1
    pred_a = np.zeros_like(gt_a)
    pred_a[0:10, 0:10] = 1
    pred_a[0:10, 10:20] = 2
    # One detection covering two equal nuclei (IoU 0.5 with each), plus an ordinary pair elsewhere.
    gt_b = np.zeros((20, 60), np.int32)
    gt_b[:, 0:10] = 1
    gt_b[:, 10:20] = 2
    gt_b[:, 40:50] = 3
    pred_b = np.zeros_like(gt_b)
    pred_b[:, 0:20] = 1
    pred_b[:, 41:50] = 2
    return [
        ([gt_a], [pred_a], [np.array([0.5, 0.9])]),
        ([gt_b], [pred_b], [np.array([0.9, 0.7])]),
        ([gt_a, gt_b], [pred_a, pred_b], [np.array([0.7, 0.7]), np.array([0.7, 0.8])]),
    ]


@pytest.mark.parametrize("case", range(3))
def test_exact_iou_ties_follow_cocoeval(case):
    g, p, s = _tie_cases()[case]
    ref = cocoeval_precision(g, p, s)[:, :, 0]
    np.testing.assert_allclose(ours_precision(g, p, s), ref, atol=TOL)


def test_tie_falls_back_to_sequential_matching():
    (gt_a,), (pred_a,), (scores,) = _tie_cases()[0]
    det = image_detections(pair_table(gt_a, pred_a), scores)
    # Ranked by score: instance 2 (0.9) first takes the nucleus; instance 1 is a false positive.
    assert det.scores.tolist() == [0.9, 0.5]
    assert det.matched[0].tolist() == [True, False]
    assert not det.matched[1:].any()  # IoU 0.5 fails every higher threshold


def test_images_without_ground_truth_or_detections(dsb_images):
    gts, preds, scores = dsb_images
    empty = np.zeros((64, 64), np.int32)
    some = np.zeros((64, 64), np.int32)
    some[10:20, 10:20] = 1
    g = [gts[0], empty, some, empty]
    p = [preds[0], some, empty, empty]
    s = [scores[0], np.array([0.95]), np.zeros(0), np.zeros(0)]
    ref = cocoeval_precision(g, p, s)[:, :, 0]
    np.testing.assert_allclose(ours_precision(g, p, s), ref, atol=TOL)
    assert precision_curve([None, image_detections(pair_table(empty, some), np.array([1.0]))]) is None


def test_perfect_prediction_of_many_nuclei_scores_one(dsb2018_root):
    """The FIELD_NOTES trap: 4x4 mosaic with ~2000 nuclei, perfect prediction -> AP 1, which pycocotools' stats[0]
    (maxDets 100) would report as far less."""
    m = tifffile.imread(dsb2018_root / "mask2d.tif").astype(np.int64)
    tiles = [[np.where(m > 0, m + (4 * r + c) * 1000, 0) for c in range(4)] for r in range(4)]
    mosaic = np.block(tiles)
    res = evaluate_instances([{"inst_map": mosaic, "type_map": (mosaic > 0).astype(np.int32)}],
                             [{"inst_map": mosaic, "type_map": (mosaic > 0).astype(np.int32)}], ["nucleus"])
    assert res["ap50"] == pytest.approx(1.0) and res["map"] == pytest.approx(1.0)
    assert average_precision([None]) is None


def _summarize(precision: np.ndarray, t: int | None) -> float:
    """COCOeval.summarize's mean over categories and recall thresholds of the valid (> -1) entries."""
    s = precision if t is None else precision[t]
    return float(np.mean(s[s > -1]))


def test_ap_is_category_wise_and_equals_cocoeval_segm(dsb_images):
    """ap50 / ap75 / map of evaluate_instances = pycocotools' category-wise segm evaluation (categories = instance
    classes, class-aware scores; a category only predicted is left out), and the *_agnostic keys = one category
    ranked by objectness."""
    gts, preds, scores = dsb_images
    rng = np.random.default_rng(2)
    gt_cats = [rng.integers(1, 3, size=int(g.max()) + 1) for g in gts]  # classes 1, 2 in the GT
    pred_cats = []
    for p, gc in zip(preds, gt_cats):
        pc = np.where(rng.random(int(p.max()) + 1) < 0.85, gc[: int(p.max()) + 1], rng.integers(1, 4, int(p.max()) + 1))
        pred_cats.append(pc)  # class 3 only ever predicted
    objectness = [np.round(rng.random(s.size), 1) for s in scores]
    ref = cocoeval_precision(gts, preds, scores, gt_cats, pred_cats, n_cats=3)
    assert (ref[:, :, 2] == -1).all() and (ref[:, :, :2] > -1).all()
    ref_agnostic = cocoeval_precision(gts, preds, objectness)
    g_dicts = [{"inst_map": g, "type_map": np.where(g > 0, gc[g], 0)} for g, gc in zip(gts, gt_cats)]
    p_dicts = [{"inst_map": p, "type_map": np.where(p > 0, pc[p], 0), "scores": s, "objectness": o}
               for p, pc, s, o in zip(preds, pred_cats, scores, objectness)]
    res = evaluate_instances(g_dicts, p_dicts, ["a", "b", "c"])
    assert res["ap50"] == pytest.approx(_summarize(ref, 0), abs=TOL)
    assert res["ap75"] == pytest.approx(_summarize(ref, 5), abs=TOL)
    assert res["map"] == pytest.approx(_summarize(ref, None), abs=TOL)
    assert res["ap_categories"] == ["a", "b"] and res["per_class"]["c"]["ap50"] is None
    assert res["ap50_agnostic"] == pytest.approx(_summarize(ref_agnostic, 0), abs=TOL)
    assert res["map_agnostic"] == pytest.approx(_summarize(ref_agnostic, None), abs=TOL)
    assert res["ap_agnostic_ranked_by"] == ["objectness"]
    assert res["ap50"] < res["ap50_agnostic"]  # misclassified detections cost category-wise AP
