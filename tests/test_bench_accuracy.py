"""benchmarks/accuracy.py's helpers: box-level AP50/F1 (VOC rule), the classical baselines, the DSB quadrant split,
the RESULTS.md block replacement, and the per-class learning curve."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from accuracy import write_results  # noqa: E402
from accuracy_tools import (  # noqa: E402
    BCCDRule,
    BoxImage,
    box_iou,
    box_scores,
    classical_bccd,
    classical_nuclei,
    prediction_boxes,
    write_dsb_quadrants,
)


def _b(*rows):
    return np.asarray(rows, np.float64).reshape(-1, 4)


def test_box_iou():
    iou = box_iou(_b([0, 0, 10, 10]), _b([0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_box_scores_follow_the_voc_rule():
    gt = _b([0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10])
    # a duplicate of box 0 (lower score) is a false positive; box 2 is missed; a wrong-class hit counts for its class
    pred = _b([0, 0, 10, 10], [1, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10])
    im = BoxImage(gt, np.array([1, 1, 1]), pred, np.array([1, 1, 1, 2]), np.array([0.9, 0.8, 0.7, 0.6]))
    out = box_scores([im], ["a", "b"])
    a, b = out["per_class"]["a"], out["per_class"]["b"]
    assert (a["tp"], a["n_pred"], a["n_gt"]) == (2, 3, 3)
    assert a["f1"] == pytest.approx(4 / 6) and a["precision"] == pytest.approx(2 / 3)
    # ranked TP, FP, TP: precision envelope 1 up to recall 1/3, then 2/3 up to 2/3
    assert a["ap50"] == pytest.approx(1 / 3 + (2 / 3) * (1 / 3))
    assert np.isnan(b["ap50"]) and b["f1"] == 0.0  # no ground truth of b: AP undefined, its one prediction is FP
    # class-agnostic confusion: three matches (two a->a, one a->b); the duplicate is spurious
    assert out["confusion"] == [[2, 1, 0], [0, 0, 0], [1, 0, 0]]


def test_prediction_boxes_take_class_by_majority_and_scores_by_id():
    inst = np.zeros((20, 20), np.int32)
    inst[2:6, 3:9] = 1
    inst[10:18, 10:12] = 2
    types = np.where(inst == 1, 2, np.where(inst == 2, 1, 0))
    types[2, 3] = 1  # one stray pixel does not change the class
    boxes, classes, scores = prediction_boxes(inst, types, np.array([0.3, 0.8]))
    np.testing.assert_array_equal(boxes, [[3, 2, 9, 6], [10, 10, 12, 18]])
    np.testing.assert_array_equal(classes, [2, 1])
    np.testing.assert_allclose(scores, [0.3, 0.8])


def test_classical_nuclei_splits_touching_disks():
    img = np.zeros((96, 96, 3), np.uint8)
    truth = np.zeros((96, 96), np.int32)
    for k, (y, x) in enumerate([(30, 30), (30, 50), (70, 60)], start=1):  # the first two touch
        rr, cc = disk((y, x), 11, shape=truth.shape)
        img[rr, cc] = 200
        truth[rr, cc] = k
    out = classical_nuclei(img, diameter=22)
    assert int(out["inst_map"].max()) == 3
    assert out["type_map"].max() == 1 and out["scores"].shape == (3,)


def test_classical_bccd_rule_names_the_classes_by_colour_and_size():
    img = np.full((200, 240, 3), (195, 193, 191), np.uint8)  # BCCD's grey background
    for y, x in ((50, 50), (50, 150)):
        rr, cc = disk((y, x), 30, shape=img.shape[:2])
        img[rr, cc] = (180, 150, 155)  # pink RBCs
    rr, cc = disk((150, 70), 28, shape=img.shape[:2])
    img[rr, cc] = (120, 90, 190)  # a large purple WBC nucleus
    rr, cc = disk((150, 190), 7, shape=img.shape[:2])
    img[rr, cc] = (150, 120, 200)  # a small purple platelet
    rule = BCCDRule(split_area=800.0, wbc_margin=5.0, platelet_margin=2.0, rbc_diameter=60.0)
    out = classical_bccd(img, rule)
    inst, types = out["inst_map"], out["type_map"]
    assert types[150, 70] == 2 and types[150, 190] == 3 and types[50, 50] == 1 and types[50, 150] == 1
    assert int(inst.max()) == 4


def test_dsb_quadrants_make_a_folder_dataset(tmp_path):
    from cellseg.data.folder import folder_source

    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.int32)
    mask[4:10, 4:10] = 7
    mask[40:50, 40:50] = 9
    write_dsb_quadrants(img, mask, tmp_path / "d")
    src = folder_source(tmp_path / "d", seed=0, val_fraction=0.2, test_fraction=0.1)
    splits = {}
    for r in src.records:
        splits.setdefault(r.split, []).append(r.name)
    assert sorted(splits["test"]) == ["quadrant3"] and len(splits["val"]) == 2 and len(splits["train"]) == 10
    test = next(r for r in src.records if r.split == "test").load()
    assert int(np.asarray(test["inst_map"]).max()) == 1  # relabelled 1..N within the file
    with pytest.raises(ValueError, match="differ in size"):
        write_dsb_quadrants(img, mask[:10], tmp_path / "e")
    with pytest.raises(ValueError, match="test_quadrant must be 0..3"):
        write_dsb_quadrants(img, mask, tmp_path / "f", test_quadrant=4)


def test_results_blocks_are_replaced_not_duplicated(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Other\n\nkeep me\n")
    write_results("dsb", "first", path)
    write_results("bccd", "bccd text", path)
    write_results("dsb", "second", path)
    text = path.read_text()
    assert "keep me" in text and "second" in text and "first" not in text and "bccd text" in text
    assert text.count("## Accuracy on real data") == 1


def test_plot_history_draws_per_class_f1(tmp_path):
    from cellseg.plots import plot_history

    history = [{"epoch": e, "step": e, "lr": {"decoder": 1e-3}, "train_loss": {"total": 1.0 / (e + 1)},
                "val": {"pq": 0.1 * e, "per_class": {"RBC": {"f1": 0.5}, "WBC": {"f1": None}}}} for e in range(3)]
    paths = plot_history(history, tmp_path)
    assert (tmp_path / "class_f1_curves.png") in paths and (tmp_path / "class_f1_curves.png").stat().st_size > 0


def test_model_predictions_are_read_from_the_latest_evaluation_and_scored(tmp_path):
    """The benchmark reads the notebooks' own evaluation folder (eval/<phase-checkpoint-split>/ named by eval/latest)
    and scores predictions with the library's metrics: ground truth given back as prediction scores PQ 1."""
    from accuracy import mask_metrics, model_predictions

    from cellseg.data import load_manifest, load_sample, prepare_dataset
    from cellseg.evaluation import save_prediction

    cache = tmp_path / "cache"
    prepare_dataset("synthetic", None, cache, synth_num_images=6, synth_image_size=64, test_fraction=0.34,
                    progress=False)
    manifest = load_manifest(cache)
    names = list(manifest["splits"]["test"])
    folder = tmp_path / "run" / "eval" / "phase1-best-test"
    (folder / "predictions").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "latest").write_text("phase1-best-test\n")
    for n in names:
        s = load_sample(cache, "test", n)
        n_inst = int(s["inst_map"].max())
        save_prediction(folder / "predictions" / f"{n}.npy",
                        {"inst_map": s["inst_map"], "type_map": s["type_map"], "scores": np.ones(n_inst)})
    preds = model_predictions(tmp_path / "run", names)
    assert sorted(preds) == sorted(names)
    metrics = mask_metrics(cache, "test", preds, list(manifest["class_names"]), diameter=20.0)
    assert metrics["pq"] == pytest.approx(1.0)


def test_box_margins_fitted_on_training_masks_put_tight_boxes_in_the_annotators_convention():
    """A 10 px platelet mask inside an 18 px annotator's box: its tight box has IoU 0.31 with the box (a miss at 0.5);
    grown by the fitted margin (4 px) it is the annotator's box again."""
    from accuracy_tools import fit_box_margins, grow_boxes, instance_boxes

    inst = np.zeros((64, 64), np.int32)
    inst[20:30, 20:30] = 1
    gt_boxes, gt_classes = np.array([[16.0, 16.0, 34.0, 34.0]]), np.array([3])
    margins = fit_box_margins([(inst, gt_boxes, gt_classes)], n_classes=3)
    assert margins == {1: 0.0, 2: 0.0, 3: 4.0}
    tight, ids = instance_boxes(inst)
    assert box_iou(tight, gt_boxes)[0, 0] == pytest.approx(100 / 324)
    grown = grow_boxes(tight, np.array([3]), margins, inst.shape)
    np.testing.assert_array_equal(grown, gt_boxes)
    np.testing.assert_array_equal(grow_boxes(np.array([[0.0, 0.0, 5.0, 5.0]]), np.array([3]), margins, (64, 64)),
                                  [[0.0, 0.0, 9.0, 9.0]])  # clipped to the image
