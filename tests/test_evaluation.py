"""The evaluation run (cellseg.evaluation) on a tiny prepared cache written here, and the report (cellseg.report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torch import nn

from cellseg.cli import main as cli_main
from cellseg.data.cache import write_manifest, write_sample
from cellseg.data.targets import hv_maps
from cellseg.evaluation import evaluate_model, save_prediction
from cellseg.report import collapse_alarm, error_crops, overlay, report_markdown, write_report

CLASSES = ["round", "square"]


class StandIn(nn.Module):
    """Finds the bright objects of the test images and returns NP/HV/NC logits for them; class 1 where the blue
    channel is low. ``collapse=True`` calls everything class 1."""

    def __init__(self, collapse: bool = False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.collapse = collapse

    def forward(self, x):
        out = {"np": [], "hv": [], "nc": []}
        for img in x:
            fg = (img[0] > 0).cpu().numpy()
            inst, _ = ndi.label(fg)
            fg_t = torch.from_numpy(fg).float()
            cls1 = torch.ones_like(fg_t) if self.collapse else (img[2] < 0).float().cpu()
            out["np"].append(torch.stack([2 - 4 * fg_t, 4 * fg_t - 2]))
            out["hv"].append(torch.from_numpy(hv_maps(inst)))
            out["nc"].append(torch.stack([3 - 6 * fg_t, 3 * cls1 * fg_t, 3 * (1 - cls1) * fg_t]))
        return {k: torch.stack(v).to(x) for k, v in out.items()}


def make_sample(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disks (class 1, red) and squares (class 2, red + blue) that never touch."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 20, np.uint8)
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    yy, xx = np.ogrid[:size, :size]
    k = 0
    for _ in range(20):
        r = int(rng.integers(4, 7))
        cy, cx = rng.integers(r + 1, size - r - 1, 2)
        c = int(rng.integers(1, 3))
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if c == 1 else ((abs(yy - cy) <= r - 1) & (abs(xx - cx) <= r - 1))
        if ndi.binary_dilation(inst > 0, iterations=2)[m].any():
            continue
        k += 1
        inst[m], types[m] = k, c
        image[m] = (220, 40, 40) if c == 1 else (220, 40, 220)
    return image, inst, types


def write_cache(root: Path, splits: dict[str, int], classes=CLASSES) -> Path:
    """A prepared cache (manifest.json + <split>/<name>.png + <split>/<name>.npy), written with the cache writer."""
    manifest = {"class_names": list(classes), "splits": {}}
    seed = 0
    for split, n in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(n):
            image, inst, types = make_sample(seed)
            seed += 1
            name = f"{split}_{i:02d}"
            write_sample(root, split, name, {"image": image, "inst_map": inst, "type_map": types, "meta": {"name": name}})
            names.append(name)
        manifest["splits"][split] = names
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache"), {"val": 2, "test": 3})


@pytest.fixture(scope="module")
def evaluated(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    metrics = evaluate_model(
        StandIn(), cache, "test", out, class_names=CLASSES, device="cpu", tile_size=48, overlap=0.25, tta=False,
        amp="none", pp_params={"object_diameter": 10}, tune_split="val", progress=False,
    )
    return out, metrics


def test_writes_every_output(evaluated):
    out, metrics = evaluated
    for name in ("metrics.json", "report.md", "postprocess.json", "overlays.png", "false_positives.png",
                 "false_negatives.png", "confusion.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["test_00.npy", "test_01.npy", "test_02.npy"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("pq", "sq", "rq", "bpq", "mpq", "mpq_plus", "aji", "aji_plus", "dice", "det_precision",
                "det_recall", "det_f1", "ap50", "map", "per_class", "confusion", "n_images"):
        assert key in metrics, key
    assert metrics["n_images"] == 3 and set(metrics["per_class"]) == set(CLASSES)


def test_stand_in_scores_well_and_tuning_is_recorded(evaluated):
    out, metrics = evaluated
    assert metrics["pq"] > 0.9 and metrics["mpq"] > 0.9 and metrics["det_f1"] > 0.95
    assert metrics["confusion"]["matrix"][0][1] == 0 and metrics["confusion"]["matrix"][1][0] == 0
    tuning = json.loads((out / "postprocess.json").read_text())
    assert tuning["tune_split"] == "val" and tuning["n_images"] == 2 and len(tuning["table"]) == 27
    assert tuning["params"]["object_diameter"] == 10.0  # the fixed base of the grid
    assert metrics["postprocess"] == tuning["params"]
    assert metrics["match_radius"] == pytest.approx(6.0)  # 0.6 x the diameter
    report = (out / "report.md").read_text()
    for heading in ("## Class-agnostic", "## Class-aware", "Per class", "Confusion matrix", "Post-processing"):
        assert heading in report
    # every headline number is printed beside its convention
    assert f"| `bpq` | {metrics['bpq']:.4f} | PanNuke official" in report
    assert "| `ap50_agnostic` |" in report and "ranked by objectness" in report
    assert "CLASS COLLAPSE" not in report


def test_saved_predictions_rescore_identically(evaluated, cache, tmp_path, capsys):
    out, metrics = evaluated
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for p in (cache / "test").glob("*.npy"):
        (gt_dir / p.name).write_bytes(p.read_bytes())
    rc = cli_main(["evaluate", "--gt", str(gt_dir), "--pred", str(out / "predictions"), "--out",
                   str(tmp_path / "m.json"), "--classes", *CLASSES, "--radius", "6"])
    assert rc == 0
    rescored = json.loads((tmp_path / "m.json").read_text())
    for key in ("pq", "sq", "rq", "mpq", "mpq_plus", "aji", "aji_plus", "dice", "det_f1", "ap50", "map",
                "ap50_agnostic", "map_agnostic"):
        assert rescored[key] == pytest.approx(metrics[key]), key
    assert rescored["ap_agnostic_ranked_by"] == ["objectness"]  # saved predictions carry the objectness
    assert rescored["per_class"] == metrics["per_class"]


def test_class_collapse_alarm(cache, tmp_path):
    metrics = evaluate_model(
        StandIn(collapse=True), cache, "test", tmp_path, class_names=CLASSES, pp_params={"object_diameter": 10},
        tune_split=None, max_images=2, progress=False,
    )
    assert metrics["collapsed_classes"] == ["square"] and metrics["n_images"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "CLASS COLLAPSE" in report and "**square**" in report
    assert not (tmp_path / "postprocess.json").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "holdout"}, r"evaluation split 'holdout' is not in .*available: \['empty', 'test', 'val'\]"),
        ({"tune_split": "tune"}, "tuning split 'tune' is not in"),
        ({"split": "empty"}, "holds no images"),
        ({"class_names": ["a", "b"]}, r"differ from the cache's \['round', 'square'\]"),
        ({"max_images": 0}, "max_images must be None"),
        ({"pp_params": {"diameter": 3}}, "unknown post-processing parameter 'diameter'"),
        ({"tune_split": "test"}, "tune_split 'test' is the evaluated split"),
    ],
)
def test_errors(tmp_path, kwargs, match):
    cache = write_cache(tmp_path / "cache", {"val": 1, "test": 1, "empty": 0})
    args = {"split": "test", "class_names": CLASSES, "tune_split": None, **kwargs}
    split = args.pop("split")
    with pytest.raises(ValueError, match=match):
        evaluate_model(StandIn(), cache, split, tmp_path / "out", progress=False, **args)


# ----------------------------------------------------------------------------- report pieces
def test_overlay_and_error_crops():
    image, inst, _ = make_sample(5)
    pred = np.where(inst == 1, 0, inst)  # miss nucleus 1
    pred[2:8, 2:8] = 99  # a spurious one
    fps, fns = error_crops(image, inst, pred, "img")
    assert len(fps) == 1 and len(fns) == 1
    assert fps[0].focus.sum() == 36 and fns[0].focus.sum() == (inst == 1).sum()
    ov = overlay(image, inst, pred)
    assert ov.shape == image.shape and ov.dtype == np.uint8
    assert (ov == (0, 255, 0)).all(axis=2).any() and (ov == (255, 0, 255)).all(axis=2).any()


def test_report_markdown_and_alarm(tmp_path):
    metrics = {
        "n_images": 1, "pq": 0.5, "per_class": {"a": {"n_gt": 3, "n_pred": 0, "pred_pixel_fraction": 0.0, "iou": 0.0,
                                                       "dice": 0.0, "pq": 0.0, "sq": 0.0, "rq": 0.0, "f1": 0.0}},
        "collapsed_classes": ["a"], "confusion": {"labels": ["a"], "matrix": [[0]], "unclassified_matches": 0},
    }
    text = report_markdown(metrics, context={"split": "test"})
    assert text.index("CLASS COLLAPSE") < text.index("## Class-agnostic")
    assert "| a | 3 | 0 |" in text and "–" in text  # missing values shown as a dash
    assert collapse_alarm({"collapsed_classes": []}) == ""
    path = write_report(tmp_path, metrics)
    assert path.read_text().startswith("# Evaluation report")
    assert (tmp_path / "confusion.png").stat().st_size > 1000


def test_save_prediction_format(tmp_path):
    save_prediction(tmp_path / "x.npy", {"inst_map": np.ones((4, 4), np.int64), "type_map": np.ones((4, 4)),
                                         "scores": [0.5]})
    rec = np.load(tmp_path / "x.npy", allow_pickle=True).item()  # our own file, written just above
    assert rec["inst_map"].dtype == np.int32 and rec["scores"].dtype == np.float32 and set(rec) == {
        "inst_map", "type_map", "scores"}


# ----------------------------------------------------------------------------- tuning split and streaming
def test_choose_tune_split_never_picks_the_evaluated_split(caplog):
    from cellseg.tuning import choose_tune_split

    assert choose_tune_split("test", ["train", "val", "test"]) == ("val", "post-processing tuned on 'val'")
    split, note = choose_tune_split("val", ["train", "val", "test"])
    assert split == "train" and "instead of 'val'" in note and "evaluated split" in caplog.text
    assert choose_tune_split("val", ["val", "test"])[0] == "test"
    with pytest.raises(ValueError, match="no other split"):
        choose_tune_split("test", ["test"])


def test_tuning_streams_maps_from_disk_and_matches_in_memory(cache, tmp_path, monkeypatch):
    """The grid search reads memory-mapped maps one image at a time (no list of arrays), gives the in-memory
    result, and leaves no cache folder behind."""
    import cellseg.tuning as tuning
    from cellseg.data import load_sample
    from cellseg.inference import predict_image
    from cellseg.postprocess import DEFAULT_GRID, tune_postprocess

    seen = []
    real = tuning.tune_postprocess

    def spy(samples, *a, **k):
        seen.append((type(samples), len(samples), [type(x) for x in samples[0]]))
        return real(samples, *a, **k)

    monkeypatch.setattr(tuning, "tune_postprocess", spy)
    infer = {"tile_size": None, "overlap": 0.25, "tta": False, "amp": "none", "device": "cpu"}
    out = tuning.tune_on_split(StandIn(), cache, "val", ["val_00", "val_01"], {"object_diameter": 10}, infer,
                               False, tmp_path)
    assert seen[0][:2] == (tuning.DiskMaps, 2)
    assert seen[0][2] == [np.memmap] * 3  # fg_prob, hv, gt read back memory-mapped
    assert list(tmp_path.iterdir()) == []  # the temporary cache is gone
    in_memory = []
    for name in ("val_00", "val_01"):
        sample = load_sample(cache, "val", name)
        maps = predict_image(StandIn(), sample["image"], device="cpu")
        in_memory.append((maps["fg_prob"], maps["hv"], np.asarray(sample["inst_map"])))
    best, table = tune_postprocess(in_memory, DEFAULT_GRID, base_params={"object_diameter": 10})
    assert out["params"] == best and out["table"] == table


def test_rerun_into_a_folder_removes_stale_predictions(cache, tmp_path):
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "old_image.npy").write_bytes(b"stale")
    (tmp_path / "postprocess.json").write_text("{}")
    evaluate_model(StandIn(), cache, "test", tmp_path, class_names=CLASSES, pp_params={"object_diameter": 10},
                   tune_split=None, max_images=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["test_00.npy"]
    assert not (tmp_path / "postprocess.json").exists()
def test_evaluation_at_half_scale_reports_full_resolution_metrics(cache, tmp_path):
    """INPUT_SCALE: the network sees half-size images; predictions are saved and scored on the full grid."""
    metrics = evaluate_model(
        StandIn(), cache, "test", tmp_path, class_names=CLASSES, device="cpu", tta=False, amp="none",
        pp_params={"object_diameter": 10}, tune_split=None, progress=False, scale=0.5,
        training="Phase 1: full network (test)",
    )
    assert metrics["inference"]["input_scale"] == 0.5 and metrics["training_mode"] == "Phase 1: full network (test)"
    pred = np.load(tmp_path / "predictions" / "test_00.npy", allow_pickle=True).item()
    assert pred["inst_map"].shape == (64, 64)
    assert metrics["pq"] > 0.6 and metrics["det_f1"] > 0.8  # 4-6 px objects survive a half-size pass
    report = (tmp_path / "report.md").read_text()
    assert "input scale 0.5 (maps resampled to full resolution)" in report and "Phase 1: full network" in report
