"""Dataset conventions of cellseg.metrics.evaluate_instances and the building blocks (pair table, matching,
assignment, semantic counts), with every error path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from cellseg.metrics import (
    drop_ignored,
    evaluate_instances,
    instance_classes,
    match_centroids,
    match_iou,
    pair_table,
    relabel_sequential,
)
from cellseg.metrics.aggregate import average_over_images
from cellseg.metrics.assignment import assign_max_weight
from cellseg.metrics.semantic import confusion_counts, iou_dice_per_class


def disks(shape, centres, radii, ids=None) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii)):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k + 1 if ids is None else ids[k]
    return out


def typed(inst: np.ndarray, classes: dict[int, int]) -> dict:
    types = np.zeros_like(inst)
    for k, c in classes.items():
        types[inst == k] = c
    return {"inst_map": inst, "type_map": types}


CENTRES = [(16, 16), (16, 48), (48, 16), (48, 48)]


@pytest.fixture
def two_class_pair():
    """GT: 4 nuclei (classes 1, 1, 2, 2). Prediction: nucleus 4 missed, nucleus 3 called class 1, one FP."""
    gt = typed(disks((64, 64), CENTRES, [7, 7, 7, 7]), {1: 1, 2: 1, 3: 2, 4: 2})
    pred_inst = disks((64, 64), CENTRES[:3] + [(5, 32)], [7, 7, 7, 3])
    pred = typed(pred_inst, {1: 1, 2: 1, 3: 1, 4: 2})
    return gt, pred


def test_perfect_prediction_scores_one():
    gt = typed(disks((64, 64), CENTRES, [7, 6, 5, 7]), {1: 1, 2: 2, 3: 1, 4: 2})
    res = evaluate_instances([gt], [dict(gt)], ["a", "b"])
    for key in ("pq", "sq", "rq", "bpq", "mpq", "mpq_plus", "aji", "aji_plus", "dice", "det_f1", "ap50", "map", "miou"):
        assert res[key] == pytest.approx(1.0), key
    assert res["per_class"]["a"]["n_gt"] == 2 and res["per_class"]["b"]["pred_pixel_fraction"] == pytest.approx(
        (gt["type_map"] == 2).sum() / (gt["type_map"] > 0).sum()
    )
    json.dumps(res, allow_nan=False)


def test_counts_and_class_metrics_by_hand(two_class_pair):
    gt, pred = two_class_pair
    res = evaluate_instances([gt], [pred], ["a", "b"])
    # class-agnostic: 3 TP (IoU 1), 1 FP, 1 FN
    assert (res["det_tp"], res["det_fp"], res["det_fn"]) == (3, 1, 1)
    assert res["rq"] == pytest.approx(3 / 4) and res["sq"] == pytest.approx(1.0)
    assert res["det_precision"] == pytest.approx(0.75) and res["det_recall"] == pytest.approx(0.75)
    # class a: GT {1, 2}, pred {1, 2, 3}: TP 2, FP 1 -> RQ 2 / 2.5; class b: GT {3, 4}, pred {FP}: TP 0
    a, b = res["per_class"]["a"], res["per_class"]["b"]
    assert a["rq"] == pytest.approx(2 / 2.5) and a["pq"] == pytest.approx(2 / 2.5)
    assert b["pq"] == 0.0 and b["n_gt"] == 2 and b["n_pred"] == 1
    assert res["mpq"] == pytest.approx((2 / 2.5 + 0.0) / 2)
    assert res["mpq_plus"] == pytest.approx((2 / 2.5 + 0.0) / 2)
    # Matched pairs' classes: (a, a) twice, (b -> a) once.
    assert res["confusion"]["matrix"] == [[2, 0], [1, 0]]
    # Centroid F1 per class: a: TP 2, FP 1 (the misclassified one) -> 4/5; b: TP 0.
    assert a["f1"] == pytest.approx(4 / 5) and b["f1"] == 0.0
    # Pixel IoU of class a: predicted a = nuclei 1, 2, 3; GT a = nuclei 1, 2.
    area = (disks((64, 64), [CENTRES[0]], [7]) > 0).sum()
    assert a["iou"] == pytest.approx(2 * area / (3 * area))
    assert res["collapsed_classes"] == []


def test_mpq_plus_sums_over_images_while_mpq_averages_images():
    gt1 = typed(disks((64, 64), CENTRES, [7] * 4), {1: 1, 2: 1, 3: 1, 4: 1})
    pred1 = dict(gt1)  # class 1 perfect, 4 instances
    gt2 = typed(disks((64, 64), CENTRES[:1], [7]), {1: 1})
    pred2 = typed(np.zeros((64, 64), np.int32), {})  # one miss
    res = evaluate_instances([gt1, gt2], [pred1, pred2], ["a"])
    assert res["mpq"] == pytest.approx((1.0 + 0.0) / 2)
    assert res["mpq_plus"] == pytest.approx(4 / (4 + 0.5))  # TP 4, FN 1, SQ 1


def test_image_without_gt_or_prediction_is_left_out_of_means(two_class_pair):
    gt, pred = two_class_pair
    empty = typed(np.zeros((64, 64), np.int32), {})
    with_empty = evaluate_instances([gt, empty], [pred, dict(empty)], ["a", "b"])
    without = evaluate_instances([gt], [pred], ["a", "b"])
    for key in ("pq", "sq", "rq", "bpq", "mpq", "aji", "aji_plus", "dice", "ap50", "map"):
        assert with_empty[key] == pytest.approx(without[key]), key
    assert with_empty["n_images"] == 2
    all_empty = evaluate_instances([empty], [dict(empty)], ["a", "b"])
    assert all_empty["pq"] is None and all_empty["ap50"] is None and all_empty["per_class"]["a"]["pq"] is None
    json.dumps(all_empty, allow_nan=False)


def test_false_positives_on_empty_ground_truth_count():
    empty = typed(np.zeros((64, 64), np.int32), {})
    fp = typed(disks((64, 64), CENTRES[:1], [6]), {1: 1})
    res = evaluate_instances([empty], [fp], ["a"])
    assert res["pq"] == 0.0 and res["aji"] == 0.0 and res["det_precision"] == 0.0 and res["det_recall"] is None


def test_tissue_average_for_bpq_and_mpq():
    perfect = typed(disks((64, 64), CENTRES, [7] * 4), {1: 1, 2: 1, 3: 1, 4: 1})
    miss = typed(np.zeros((64, 64), np.int32), {})
    gts = [perfect, perfect, perfect]
    preds = [dict(perfect), dict(perfect), miss]
    plain = evaluate_instances(gts, preds, ["a"])
    tissue = evaluate_instances(gts, preds, ["a"], tissues=["x", "x", "y"])
    assert plain["bpq"] == pytest.approx(2 / 3) and plain["pq"] == pytest.approx(2 / 3)
    assert tissue["bpq"] == pytest.approx(0.5) and tissue["mpq"] == pytest.approx(0.5)
    assert tissue["pq"] == pytest.approx(2 / 3)  # pq stays the plain mean over images
    assert average_over_images([1.0, float("nan"), 0.0], ["x", "x", "y"]) == pytest.approx(0.5)


def test_ignore_mask_drops_mostly_ignored_predictions_and_pixels():
    gt = typed(disks((64, 64), CENTRES[:2], [7, 7]), {1: 1, 2: 1})
    pred_inst = disks((64, 64), CENTRES[:2] + [(50, 50), (50, 20)], [7, 7, 6, 6])
    pred = typed(pred_inst, {1: 1, 2: 1, 3: 1, 4: 1})
    ignore = np.zeros((64, 64), bool)
    ignore[40:, 40:] = True  # covers all of prediction 3
    ignore[40:, :20] = True  # covers less than half of prediction 4 (x <= 19 of a disk centred at x = 20)
    res = evaluate_instances([{**gt, "ignore_mask": ignore}], [pred], ["a"])
    assert (res["det_tp"], res["det_fp"], res["det_fn"]) == (2, 1, 0)
    no_ignore = evaluate_instances([gt], [pred], ["a"])
    assert no_ignore["det_fp"] == 2
    kept = drop_ignored(pred_inst, ignore)
    assert 3 not in kept and 4 in kept and not kept[ignore].any()
    assert drop_ignored(pred_inst, None) is pred_inst


def test_scores_rank_instances_for_ap():
    gt = typed(disks((64, 64), CENTRES[:2], [7, 7]), {1: 1, 2: 1})
    pred = typed(disks((64, 64), CENTRES[:2] + [(5, 32)], [7, 7, 3]), {1: 1, 2: 1, 3: 1})
    good = evaluate_instances([gt], [{**pred, "scores": np.array([0.9, 0.8, 0.1])}], ["a"])
    bad = evaluate_instances([gt], [{**pred, "scores": np.array([0.2, 0.3, 0.9])}], ["a"])
    assert good["ap50"] == pytest.approx(1.0)
    assert bad["ap50"] < 0.8
    assert good["pq"] == bad["pq"]


def test_class_collapse_is_reported(two_class_pair, caplog):
    gt, pred = two_class_pair
    pred = {**pred, "type_map": np.where(pred["type_map"] > 0, 1, 0)}
    res = evaluate_instances([gt], [pred], ["a", "b"])
    assert res["collapsed_classes"] == ["b"]
    assert res["per_class"]["b"]["pred_pixel_fraction"] == 0.0
    assert "class collapse" in caplog.text


# ----------------------------------------------------------------------------- errors of evaluate_instances
def _ok():
    return typed(disks((32, 32), [(10, 10)], [4]), {1: 1})


@pytest.mark.parametrize(
    "gt, pred, match",
    [
        ({"inst_map": _ok()["inst_map"]}, _ok(), "lacks 'type_map'"),
        (_ok(), {"type_map": _ok()["type_map"]}, "lacks 'inst_map'"),
        (_ok(), {**_ok(), "inst_map": _ok()["inst_map"].astype(float)}, "2-D integer"),
        (_ok(), {**_ok(), "inst_map": np.zeros((16, 16), np.int32)}, "shapes differ"),
        ({**_ok(), "ignore_mask": np.zeros((8, 8), bool)}, _ok(), "ignore_mask"),
        (_ok(), {**_ok(), "scores": np.array([0.5, 0.5])}, "scores"),
        (_ok(), {**_ok(), "scores": np.array([[0.5]])}, "scores"),
        (_ok(), {**_ok(), "scores": np.array([np.nan])}, "NaN"),
        (_ok(), {**_ok(), "type_map": _ok()["type_map"] * 3}, r"class ids \[3\]"),
        ({**_ok(), "type_map": _ok()["type_map"] - 2}, _ok(), r"class ids \[-2, -1\]"),
        (_ok(), {**_ok(), "inst_map": -_ok()["inst_map"]}, ">= 0"),
    ],
)
def test_bad_images_are_named_in_errors(gt, pred, match):
    with pytest.raises(ValueError, match=match) as err:
        evaluate_instances([_ok(), gt], [_ok(), pred], ["a"], names=["first.npy", "second.npy"])
    assert "'second.npy'" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gts": [_ok()], "preds": [], "class_names": ["a"]}, "pair up"),
        ({"gts": [_ok()], "preds": [_ok()], "class_names": []}, "class_names"),
        ({"gts": [_ok()], "preds": [_ok()], "class_names": ["a"], "tissues": ["x", "y"]}, "tissues"),
        ({"gts": [_ok()], "preds": [_ok()], "class_names": ["a"], "names": []}, "names"),
        ({"gts": [_ok()], "preds": [_ok()], "class_names": ["a"], "match_radius": 0.0}, "radius"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_instances(**kwargs)


def test_unnamed_images_are_numbered():
    with pytest.raises(ValueError, match="image #1"):
        evaluate_instances([_ok(), _ok()], [_ok(), {**_ok(), "scores": np.ones(3)}], ["a"])


# ----------------------------------------------------------------------------- building blocks
def test_pair_table_counts_every_overlap():
    gt = np.array([[1, 1, 0, 7], [1, 1, 0, 7], [0, 0, 0, 7]])
    pred = np.array([[3, 3, 3, 0], [0, 5, 5, 5], [0, 0, 0, 5]])
    t = pair_table(gt, pred)
    assert t.gt_ids.tolist() == [1, 7] and t.pred_ids.tolist() == [3, 5]
    assert t.gt_areas.tolist() == [4, 3] and t.pred_areas.tolist() == [3, 4]
    assert list(zip(t.gt_index.tolist(), t.pred_index.tolist(), t.inter.tolist())) == [(0, 0, 2), (0, 1, 1), (1, 1, 2)]
    assert t.iou.tolist() == pytest.approx([2 / 5, 1 / 7, 2 / 5])
    with pytest.raises(ValueError, match="shape"):
        pair_table(gt, pred[:, :2])


def test_pair_table_sparse_path_equals_dense(monkeypatch):
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 40, size=(64, 64))
    pred = rng.integers(0, 40, size=(64, 64))
    dense = pair_table(gt, pred)
    monkeypatch.setattr("cellseg.metrics.pairwise._DENSE_PAIR_LIMIT", 0)
    sparse = pair_table(gt, pred)
    for field in ("gt_index", "pred_index", "inter", "gt_areas", "pred_areas"):
        np.testing.assert_array_equal(getattr(dense, field), getattr(sparse, field))


def test_relabel_sequential():
    x = np.array([[0, 5, 5], [9, 0, 2]])
    out, ids = relabel_sequential(x)
    assert ids.tolist() == [2, 5, 9] and out.tolist() == [[0, 2, 2], [3, 0, 1]]
    big = np.array([[0, 10**12], [3, 3]])  # ids far above the pixel count: the np.unique path
    out, ids = relabel_sequential(big)
    assert ids.tolist() == [3, 10**12] and out.tolist() == [[0, 2], [1, 1]]
    out, ids = relabel_sequential(np.array([[4, 10**12]]))  # no background at all
    assert out.tolist() == [[1, 2]]
    assert relabel_sequential(np.zeros((0, 3), np.int32))[1].size == 0
    with pytest.raises(ValueError, match=">= 0"):
        relabel_sequential(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="integer"):
        relabel_sequential(np.array([[0.5]]))


def test_instance_classes_majority_vote():
    inst = np.array([[1, 1, 1, 2, 2, 3]])
    types = np.array([[2, 2, 1, 1, 2, 0]])
    # instance 1: majority 2; instance 2: tie 1 vs 2 -> smaller id; instance 3: no type -> 0
    assert instance_classes(inst, types, 3).tolist() == [2, 1, 0]
    assert instance_classes(inst, np.zeros_like(types), 3).tolist() == [0, 0, 0]
    assert instance_classes(np.zeros_like(inst), types, 0).size == 0


def test_match_iou_threshold_is_checked():
    t = pair_table(np.array([[1, 1]]), np.array([[1, 0]]))
    assert match_iou(t, 0.5)[0].size == 0  # IoU exactly 0.5 is not a match (> 0.5)
    with pytest.raises(ValueError, match=r"\[0.5, 1\)"):
        match_iou(t, 0.3)


def test_drop_ignored_checks_shape():
    with pytest.raises(ValueError, match="ignore_mask"):
        drop_ignored(np.zeros((4, 4), np.int32), np.zeros((3, 3), bool))


def test_centroid_matching_maximises_matches():
    """HoVer-Net's pair_coordinates (Hungarian on all distances, then drop pairs beyond the radius) keeps one pair
    here; the matching restricted to the radius keeps two."""
    gt = np.array([[0.0, 0.0], [0.0, 9.9]])
    pred = np.array([[0.0, 0.0], [8.96, 4.43]])
    dist = np.linalg.norm(gt[:, None] - pred[None], axis=2)
    assert dist[0, 1] <= 10 < dist[1, 1] and dist[1, 0] <= 10
    ri, ci = linear_sum_assignment(dist)
    assert (dist[ri, ci] <= 10).sum() == 1  # the reference's way
    gi, pi = match_centroids(gt, pred, radius=10.0)
    assert sorted(zip(gi.tolist(), pi.tolist())) == [(0, 1), (1, 0)]
    # Among matchings of equal size, the one of least total distance.
    gi, pi = match_centroids(np.array([[0.0, 0.0], [0.0, 5.0]]), np.array([[0.0, 4.0], [0.0, 1.0]]), radius=10.0)
    assert sorted(zip(gi.tolist(), pi.tolist())) == [(0, 1), (1, 0)]
    assert match_centroids(gt, np.zeros((0, 2)), 5.0)[0].size == 0
    assert match_centroids(gt, gt + 100, 5.0)[0].size == 0
    with pytest.raises(ValueError, match="radius"):
        match_centroids(gt, pred, -1.0)


@pytest.mark.parametrize("seed", range(5))
def test_sparse_assignment_equals_dense_hungarian(seed):
    rng = np.random.default_rng(seed)
    n_r, n_c = 30, 25
    dense = np.where(rng.random((n_r, n_c)) < 0.08, rng.random((n_r, n_c)), 0.0)
    rows, cols = np.nonzero(dense)
    r, c = assign_max_weight(rows, cols, dense[rows, cols], n_r, n_c)
    ri, ci = linear_sum_assignment(dense, maximize=True)
    assert dense[r, c].sum() == pytest.approx(dense[ri, ci].sum())
    assert len(set(r.tolist())) == r.size and len(set(c.tolist())) == c.size
    assert (dense[r, c] > 0).all()


def test_semantic_counts_and_errors():
    gt = np.array([[0, 1, 1, 2]])
    pred = np.array([[1, 1, 2, 2]])
    conf = confusion_counts(gt, pred, 2)
    assert conf.tolist() == [[0, 1, 0], [0, 1, 1], [0, 0, 1]]
    iou, dice = iou_dice_per_class(conf)
    assert iou.tolist() == pytest.approx([1 / 3, 1 / 2]) and dice.tolist() == pytest.approx([2 / 4, 2 / 3])
    valid = np.array([[False, True, True, True]])
    assert confusion_counts(gt, pred, 2, valid)[0].sum() == 0
    assert np.isnan(iou_dice_per_class(confusion_counts(gt, pred, 3))[0][2])
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(gt, pred[:, :2], 2)
    with pytest.raises(ValueError, match=r"outside 0..1"):
        confusion_counts(gt, pred, 1)
