"""Box detection scores: equal to pycocotools' bbox evaluation on BCCD's real VOC boxes; instance boxes; ignore mask."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg.data.bccd import CLASS_NAMES, merge_duplicate_boxes, parse_annotation
from cellseg.metrics.boxes import BoxScorer, box_image_stats, box_markdown, instance_boxes, reduce_box_stats


def _bccd_boxes(root: Path, n: int) -> list[np.ndarray]:
    out = []
    for xml in sorted((root / "Annotations").glob("*.xml"))[:n]:
        boxes, _, problems = parse_annotation(xml, (480, 640))
        assert not problems
        boxes, _ = merge_duplicate_boxes(boxes)
        out.append(np.array([[b.x0, b.y0, b.x1, b.y1, b.cls] for b in boxes], np.int64).reshape(-1, 5))
    return out


def _perturb(gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions: jittered and resized copies of most boxes, some with a wrong class, plus spurious boxes."""
    keep = gt[rng.random(len(gt)) > 0.2]
    boxes = keep[:, :4].astype(np.float64)
    size = boxes[:, 2:] - boxes[:, :2]
    boxes[:, :2] += rng.normal(0, 0.12, (len(boxes), 2)) * size
    boxes[:, 2:] = boxes[:, :2] + size * rng.uniform(0.7, 1.3, (len(boxes), 2))
    classes = keep[:, 4].copy()
    wrong = rng.random(len(classes)) < 0.15
    classes[wrong] = rng.integers(1, 4, wrong.sum())
    n_fp = int(rng.integers(0, 4))
    xy = rng.uniform(0, 500, (n_fp, 2))
    boxes = np.concatenate([boxes, np.concatenate([xy, xy + rng.uniform(20, 120, (n_fp, 2))], 1)])
    classes = np.concatenate([classes, rng.integers(1, 4, n_fp)])
    scores = np.round(rng.random(len(boxes)), 2)  # rounded: ties across images exercise the stable ranking
    return np.round(boxes).astype(np.int64), classes, scores


def _pycocotools_ap50(gts: list[np.ndarray], preds: list[tuple]) -> tuple[float, list[float]]:
    images, annotations, detections = [], [], []
    for i, (g, (boxes, classes, scores)) in enumerate(zip(gts, preds), start=1):
        images.append({"id": i, "width": 640, "height": 480})
        for x0, y0, x1, y1, c in g:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c), "iscrowd": 0,
                                "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                                "area": float((x1 - x0) * (y1 - y0))})
        for (x0, y0, x1, y1), c, s in zip(boxes, classes, scores):
            detections.append({"image_id": i, "category_id": int(c), "score": float(s),
                               "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASS_NAMES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        det = coco.loadRes(detections)
        ev = COCOeval(coco, det, "bbox")
        ev.params.maxDets = [1000, 1000, 1000]  # stats[0] would keep 100 (FIELD_NOTES): read the precision array
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recall points, every category, area all
    per_class = [float(prec[:, k][prec[:, k] > -1].mean()) if (prec[:, k] > -1).any() else None for k in range(3)]
    present = [ap for ap in per_class if ap is not None]
    return float(np.mean(present)), per_class


@pytest.mark.parametrize("seed", [0, 1])
def test_box_ap50_equals_pycocotools_on_real_bccd_boxes(bccd_root: Path, seed: int) -> None:
    gts = _bccd_boxes(bccd_root, 40)
    rng = np.random.default_rng(seed)
    preds = [_perturb(g, rng) for g in gts]
    stats = [box_image_stats(g[:, :4], g[:, 4], b, c, s, 3) for g, (b, c, s) in zip(gts, preds)]
    ours = reduce_box_stats(stats, CLASS_NAMES)
    ref, ref_per_class = _pycocotools_ap50(gts, preds)
    assert 0.2 < ref < 0.95  # a score the perturbation moved, so the comparison can fail
    assert ours["box_ap50"] == pytest.approx(ref, abs=1e-12)
    for name, ap in zip(CLASS_NAMES, ref_per_class):
        assert ours["box_per_class"][name]["ap50"] == pytest.approx(ap, abs=1e-12)
    # F1 from the same matches: TP + FN = ground truth, TP + FP = detections with a class
    assert ours["box_tp"] + ours["box_fn"] == sum(len(g) for g in gts)
    assert ours["box_tp"] + ours["box_fp"] == sum(len(p[0]) for p in preds)
    tp, fp, fn = ours["box_tp"], ours["box_fp"], ours["box_fn"]
    assert ours["box_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_perfect_boxes_score_one_and_a_class_without_ground_truth_is_left_out() -> None:
    gt = np.array([[0, 0, 10, 10, 1], [20, 20, 40, 30, 2]])
    stats = box_image_stats(gt[:, :4], gt[:, 4], gt[:, :4], gt[:, 4], np.array([0.9, 0.8]), 3)
    out = reduce_box_stats([stats], CLASS_NAMES)
    assert out["box_ap50"] == pytest.approx(1.0) and out["box_f1"] == 1.0
    assert out["box_per_class"]["Platelets"]["ap50"] is None
    assert "| all | 1.0000 | 1.0000 | 2 | 0 | 0 |" in "\n".join(box_markdown(out))
    with pytest.raises(ValueError, match="one entry per predicted instance"):
        box_image_stats(gt[:, :4], gt[:, 4], gt[:, :4], gt[:, 4], np.array([0.9]), 3)


def test_instance_boxes_and_the_scorer_respect_the_ignore_mask() -> None:
    inst = np.zeros((40, 60), np.int32)
    inst[5:15, 10:30] = 1  # a matched cell
    inst[25:35, 40:55] = 2  # a cell in the ignored (unlabelled) region: not a false positive
    np.testing.assert_array_equal(instance_boxes(inst), [[10, 5, 30, 15], [40, 25, 55, 35]])
    types = np.where(inst > 0, 1, 0)
    ignore = np.zeros_like(inst, bool)
    ignore[22:38, 38:58] = True
    sample = {"meta": {"boxes": [[10, 5, 30, 15, 1]]}, "ignore_mask": ignore}
    scorer = BoxScorer(CLASS_NAMES)
    scorer.add(sample, {"inst_map": inst, "type_map": types, "scores": np.array([0.9, 0.8])})
    scorer.add({"meta": {}}, {"inst_map": inst, "type_map": types, "scores": np.array([0.9, 0.8])})  # no boxes
    out = scorer.result()
    assert out["box_tp"] == 1 and out["box_fp"] == 0 and out["box_fn"] == 0 and out["box_ap50"] == pytest.approx(1.0)
    assert BoxScorer(CLASS_NAMES).result() == {}


class _Finder(torch.nn.Module):
    """Returns NP/HV/NC logits of the bright objects of the image (class 1 everywhere): a perfect detector."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from scipy import ndimage as ndi

        from cellseg.data.targets import hv_maps

        out: dict[str, list[torch.Tensor]] = {"np": [], "hv": [], "nc": []}
        for img in x:
            fg = (img[0] > 0).cpu().numpy()
            f = torch.from_numpy(fg).float()
            out["np"].append(torch.stack([2 - 4 * f, 4 * f - 2]))
            out["hv"].append(torch.from_numpy(hv_maps(ndi.label(fg)[0])))
            out["nc"].append(torch.stack([3 - 6 * f, 3 * f]))
        return {k: torch.stack(v).to(x) for k, v in out.items()}


def test_evaluation_scores_boxes_and_labels_box_derived_masks(tmp_path: Path) -> None:
    from cellseg.data.cache import write_manifest, write_sample
    from cellseg.evaluation import evaluate_model

    image = np.full((64, 64, 3), 20, np.uint8)
    inst = np.zeros((64, 64), np.int32)
    inst[8:20, 8:22], inst[36:50, 30:44] = 1, 2
    image[inst > 0] = 220
    boxes = [[8, 8, 22, 20, 1], [30, 36, 44, 50, 1], [50, 2, 60, 10, 1]]  # the last box has no cell: one FN
    for split in ("test",):
        write_sample(tmp_path, split, "a", {"image": image, "inst_map": inst, "type_map": (inst > 0).astype(np.int32),
                                            "meta": {"name": "a", "boxes": boxes}})
    write_manifest(tmp_path, {"class_names": ["cell"], "splits": {"test": ["a"]}})
    metrics = evaluate_model(_Finder(), tmp_path, "test", tmp_path / "eval", class_names=["cell"], device="cpu",
                             pp_params={"object_diameter": 12}, tune_split=None, progress=False)
    assert metrics["box_tp"] == 2 and metrics["box_fp"] == 0 and metrics["box_fn"] == 1
    assert metrics["box_f1"] == pytest.approx(0.8) and metrics["box_ap50"] == pytest.approx(2 / 3, abs=0.01)
    assert metrics["mask_ground_truth"] == "vs box-derived masks"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "vs box-derived masks" in report and "## Box detection vs the VOC boxes" in report
