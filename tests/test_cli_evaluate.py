"""``cellseg evaluate --gt DIR --pred DIR [--out FILE] [--classes NAME ...]``: output, conventions, rejections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellseg.cli import main

KEYS = ("pq", "sq", "rq", "bpq", "mpq", "mpq_plus", "aji", "aji_plus", "dice", "det_precision", "det_recall",
        "det_f1", "ap50", "map", "per_class", "confusion", "n_images")


def disks(shape, centres, radii) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return out


def record(inst: np.ndarray, classes: list[int], scores=None) -> dict:
    lut = np.array([0, *classes], np.int32)
    rec = {"inst_map": inst, "type_map": lut[inst]}
    if scores is not None:
        rec["scores"] = np.asarray(scores, np.float32)
    return rec


CENTRES = [(16, 16), (16, 48), (48, 16), (48, 48)]


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt = disks((64, 64), CENTRES, [7, 7, 6, 6])
    np.save(gt_dir / "a.npy", record(gt, [1, 1, 2, 2]), allow_pickle=True)
    np.save(pred_dir / "a.npy", record(gt, [1, 2, 2, 2], scores=[0.9, 0.8, 0.7, 0.6]), allow_pickle=True)
    gt_b = disks((48, 40), [(20, 20)], [8])
    np.save(gt_dir / "b.npy", record(gt_b, [2]), allow_pickle=True)
    np.save(pred_dir / "b.npy", record(np.zeros_like(gt_b), []), allow_pickle=True)  # a miss, no scores
    return gt_dir, pred_dir


def test_prints_table_and_writes_json(dirs, tmp_path, capsys):
    gt_dir, pred_dir = dirs
    out = tmp_path / "res" / "metrics.json"
    assert main(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(out),
                 "--classes", "lymph", "tumour"]) == 0
    res = json.loads(out.read_text())
    for key in KEYS:
        assert key in res, key
    assert res["n_images"] == 2 and res["files"] == ["a.npy", "b.npy"]
    # image a: 4/4 matched (PQ 1); image b: 1 miss (PQ 0) -> mean over images 0.5
    assert res["pq"] == pytest.approx(0.5)
    # detection sums over the dataset: TP 4, FP 0, FN 1
    assert (res["det_precision"], res["det_recall"]) == (1.0, pytest.approx(0.8))
    assert res["confusion"] == {"labels": ["lymph", "tumour"], "matrix": [[1, 1], [0, 2]], "unclassified_matches": 0}
    assert res["per_class"]["tumour"]["n_gt"] == 3 and res["per_class"]["lymph"]["n_pred"] == 1
    printed = capsys.readouterr().out
    assert "pq" in printed and "lymph" in printed and "tumour" in printed and str(out) in printed


def test_defaults_out_file_and_class_names(dirs):
    gt_dir, pred_dir = dirs
    assert main(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir)]) == 0
    res = json.loads((pred_dir / "metrics.json").read_text())
    assert res["class_names"] == ["class1", "class2"]


def _expect_error(argv, capsys, *fragments) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_mismatched_file_sets_are_named(dirs, capsys):
    gt_dir, pred_dir = dirs
    np.save(gt_dir / "only_gt.npy", record(disks((8, 8), [(4, 4)], [2]), [1]), allow_pickle=True)
    np.save(pred_dir / "only_pred.npy", record(disks((8, 8), [(4, 4)], [2]), [1]), allow_pickle=True)
    _expect_error(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir)], capsys,
                  "only_gt.npy", "only_pred.npy", "same file names")


def test_shape_mismatch_is_named(dirs, capsys):
    gt_dir, pred_dir = dirs
    np.save(pred_dir / "b.npy", record(np.zeros((40, 48), np.int32), []), allow_pickle=True)
    _expect_error(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir)], capsys,
                  "shapes differ", str(gt_dir / "b.npy"), str(pred_dir / "b.npy"), "(48, 40)", "(40, 48)")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"inst_map": np.zeros((48, 40), np.int32)}, "lacks ['type_map']"),
        (np.zeros((48, 40), np.int32), "expected a dict"),
        ({"type_map": np.zeros((48, 40), np.int32)}, "no 'inst_map'"),
        ({"inst_map": np.zeros((48, 40), np.int32), "type_map": np.zeros((48, 40), np.int32),
          "scores": np.ones(3, np.float32)}, "'scores' must be 1-D"),
        ({"inst_map": disks((48, 40), [(20, 20)], [5]), "type_map": disks((48, 40), [(20, 20)], [5]) * 7},
         "class ids [7]"),
    ],
)
def test_bad_prediction_files_are_named(dirs, capsys, content, fragment):
    gt_dir, pred_dir = dirs
    np.save(pred_dir / "b.npy", content, allow_pickle=True)
    _expect_error(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--classes", "x", "y"], capsys,
                  fragment, "b.npy")


def test_malicious_pickle_is_refused(dirs, capsys, tmp_path):
    """A .npy whose pickle would call a function is refused by the restricted unpickler, and nothing runs."""
    gt_dir, pred_dir = dirs
    target = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (target,))

    payload = np.empty((), dtype=object)
    payload[()] = {"inst_map": np.zeros((48, 40), np.int32), "type_map": Exploit()}
    with open(pred_dir / "b.npy", "wb") as f:
        np.lib.format.write_array(f, payload, allow_pickle=True)
    _expect_error(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir)], capsys, "cannot read", "b.npy")
    assert not target.exists()


@pytest.mark.parametrize(
    "argv_tail, fragment",
    [
        (["--radius", "0"], "--radius must be > 0"),
        (["--gt", "/nonexistent/folder"], "is not a folder"),
    ],
)
def test_bad_arguments(dirs, capsys, argv_tail, fragment):
    gt_dir, pred_dir = dirs
    _expect_error(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), *argv_tail], capsys, fragment)


def test_empty_gt_folder(tmp_path, capsys):
    (tmp_path / "g").mkdir()
    (tmp_path / "p").mkdir()
    _expect_error(["evaluate", "--gt", str(tmp_path / "g"), "--pred", str(tmp_path / "p")], capsys, "holds no .npy")


def test_runs_as_a_module(dirs):
    gt_dir, pred_dir = dirs
    proc = subprocess.run([sys.executable, "-m", "cellseg", "evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mpq_plus" in proc.stdout


def _add_third_image(gt_dir: Path, pred_dir: Path, meta_tissue: str | None) -> None:
    gt_c = disks((32, 32), [(16, 16)], [6])
    rec = record(gt_c, [1])
    if meta_tissue is not None:
        rec["meta"] = {"name": "c", "tissue": meta_tissue}
    np.save(gt_dir / "c.npy", rec, allow_pickle=True)
    np.save(pred_dir / "c.npy", record(gt_c, [1], scores=[0.5]), allow_pickle=True)


def test_tissues_from_the_gt_files_and_from_a_file(dirs, tmp_path):
    """bPQ averaged per tissue, then over tissues: a, c perfect (bPQ 1), b a miss (bPQ 0)."""
    gt_dir, pred_dir = dirs
    _add_third_image(gt_dir, pred_dir, "Colon")
    for name, tissue in (("a", "Colon"), ("b", "Breast")):
        rec = np.load(gt_dir / f"{name}.npy", allow_pickle=True).item()
        rec["tissue"] = tissue  # a plain 'tissue' key works as well as the cache's meta['tissue']
        np.save(gt_dir / f"{name}.npy", rec, allow_pickle=True)
    out = tmp_path / "m.json"
    assert main(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_tissues"] == 2 and res["bpq"] == pytest.approx((1.0 + 0.0) / 2)  # over images it would be 2/3
    assert res["per_tissue"]["Colon"]["bpq"] == 1.0 and res["per_tissue"]["Colon"]["n_images"] == 2
    tissues = tmp_path / "tissues.csv"
    tissues.write_text("# file,tissue\na.npy,Lung\nb,Lung\nc.npy,Skin\n")  # --tissues wins over the files
    assert main(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(out),
                 "--tissues", str(tissues)]) == 0
    res = json.loads(out.read_text())
    assert set(res["per_tissue"]) == {"Lung", "Skin"} and res["bpq"] == pytest.approx((0.5 + 1.0) / 2)
    (tmp_path / "t.json").write_text(json.dumps({"a.npy": "x", "b.npy": "x", "c.npy": "x"}))
    assert main(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--out", str(out),
                 "--tissues", str(tmp_path / "t.json")]) == 0
    assert json.loads(out.read_text())["n_tissues"] == 1


@pytest.mark.parametrize(
    "content, suffix, fragment",
    [
        ("a.npy,Lung\n", ".csv", "no tissue for 1 of 2 files: b.npy"),
        ("a.npy Lung\n", ".csv", "line 1: expected 'file name,tissue'"),
        ("{not json", ".json", "is not valid JSON"),
        ("[1, 2]", ".json", "must hold a JSON object"),
        (None, ".csv", "cannot read it"),
    ],
)
def test_bad_tissue_files_are_named(dirs, tmp_path, capsys, content, suffix, fragment):
    gt_dir, pred_dir = dirs
    path = tmp_path / f"tissues{suffix}"
    if content is not None:
        path.write_text(content)
    _expect_error(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir), "--tissues", str(path)], capsys,
                  fragment, str(path))


def test_tissue_labels_on_only_some_gt_files_are_an_error(dirs, capsys):
    gt_dir, pred_dir = dirs
    _add_third_image(gt_dir, pred_dir, "Colon")
    _expect_error(["evaluate", "--gt", str(gt_dir), "--pred", str(pred_dir)], capsys,
                  "2 of 3 files", "carry no tissue label", "a.npy, b.npy", "--tissues FILE")
