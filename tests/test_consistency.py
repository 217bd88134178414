"""Issue 14's consistency rules: one class vote, one centroid radius, galleries and overlays that follow the metrics,
lossless masks, tiles that overlap by a cell, folder groups and cross-split duplicates."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellseg.cli import main as cli_main
from cellseg.data import prepare_dataset, validate_dataset
from cellseg.data.duplicates import dhash, find_duplicates
from cellseg.data.files import ImageReadError, read_mask
from cellseg.data.folder import image_groups
from cellseg.data.records import grouped_split
from cellseg.data.sample import instance_types, vote_classes
from cellseg.data.validate import Problem, standardize_sample
from cellseg.inference import warn_if_tiles_split_cells
from cellseg.metrics import instance_classes
from cellseg.metrics.detection import centroid_radius
from cellseg.postprocess import classify_instances
from cellseg.report import class_overlay, error_crops, write_report


# ----------------------------------------------------------------------------- one class-vote rule
def _votes_case() -> tuple[np.ndarray, np.ndarray]:
    inst = np.array([[1, 1, 1, 2, 2, 3, 3, 4]])
    # 1: two pixels of type 0, one of class 2 -> 2 (type 0 never votes); 2: tie 1/2 -> 1; 3: all 0 -> 0; 4: 3
    types = np.array([[0, 0, 2, 1, 2, 0, 0, 3]])
    return inst, types


def test_data_checks_metrics_and_postprocessing_vote_classes_alike() -> None:
    inst, types = _votes_case()
    expected = [2, 1, 0, 3]
    assert vote_classes(inst, types, 4).tolist() == expected
    assert instance_types(inst, types).tolist() == [0, *expected]  # the data checks
    assert instance_classes(inst, types, 4).tolist() == expected  # the metrics
    one_hot = np.eye(4, dtype=np.float32)[types[0]].T[:, None, :]  # (C + 1, 1, W)
    post, _, _ = classify_instances(inst, one_hot, np.ones(inst.shape, np.float32))  # post-processing
    assert post.tolist() == expected
    # the data check keeps an instance half labelled 0 (it used to be refused as "no class") and paints its vote
    image = np.zeros((1, 8, 3), np.uint8)
    sample, problems = standardize_sample(
        {"image": image, "inst_map": np.where(inst == 3, 0, inst), "type_map": types}, ["a", "b", "c"], "x.npy"
    )
    assert problems == [] and sample["type_map"].tolist() == [[2, 2, 2, 1, 1, 0, 0, 3]]


# ----------------------------------------------------------------------------- one centroid radius
def test_validation_and_evaluation_share_the_centroid_radius(tmp_path: Path, capsys) -> None:
    from cellseg.data import CellDataset
    from cellseg.metrics.detection import RADIUS_PER_DIAMETER
    from cellseg.training.validation import run_validation

    assert centroid_radius(20.0) == pytest.approx(12.0) and RADIUS_PER_DIAMETER == 0.6
    with pytest.raises(ValueError, match="OBJECT_DIAMETER must be > 0"):
        centroid_radius(0.0)
    prepare_dataset("synthetic", None, tmp_path / "c", synth_num_images=3, synth_image_size=64, progress=False)
    ds = CellDataset(tmp_path / "c", "val", patch_size=None, augment=False, seed=0)

    def model(x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        return {"np": torch.zeros(b, 2, h, w), "hv": torch.zeros(b, 2, h, w), "nc": torch.zeros(b, 4, h, w)}

    val = run_validation(model, ds, lambda out, batch: {"total": torch.zeros(())}, class_names=ds.class_names,
                         device="cpu", object_diameter=15.0)
    assert val["match_radius"] == pytest.approx(centroid_radius(15.0))
    # `cellseg evaluate` derives its default radius from --object-diameter the same way
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
        inst = np.zeros((16, 16), np.int32)
        inst[2:6, 2:6] = 1
        np.save(tmp_path / d / "a.npy", {"inst_map": inst, "type_map": inst.copy(), "scores": np.ones(1)})
    for extra, radius in (([], 12.0), (["--object-diameter", "10"], 6.0)):
        out = tmp_path / f"m{radius}.json"
        assert cli_main(["evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--out",
                         str(out), *extra]) == 0
        assert json.loads(out.read_text())["match_radius"] == pytest.approx(radius)
    assert cli_main(["evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"),
                     "--object-diameter", "0"]) == 2
    assert "--object-diameter must be > 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- galleries and overlays
def test_error_galleries_respect_the_ignore_mask() -> None:
    image = np.zeros((40, 40, 3), np.uint8)
    gt = np.zeros((40, 40), np.int32)
    gt[2:10, 2:10] = 1
    pred = gt.copy()
    pred[25:35, 25:35] = 2  # an unlabelled cell, inside the ignore mask: the metrics do not count it
    ignore = np.zeros((40, 40), bool)
    ignore[22:38, 22:38] = True
    fps, fns = error_crops(image, gt, pred, "img")
    assert len(fps) == 1 and fns == []
    fps, fns = error_crops(image, gt, pred, "img", ignore_mask=ignore)
    assert fps == [] and fns == []


def test_class_overlay_colours_by_class_and_marks_misclassified_matches(tmp_path: Path) -> None:
    from cellseg.data.qa import class_colour

    image = np.full((40, 60, 3), 128, np.uint8)
    gt = np.zeros((40, 60), np.int32)
    gt[5:15, 5:15], gt[5:15, 30:40] = 1, 2
    gt_types = np.where(gt == 1, 1, np.where(gt == 2, 2, 0))
    pred_types = np.where(gt > 0, 1, 0)  # instance 2 predicted as class 1: misclassified match
    out = class_overlay(image, gt, gt_types, gt, pred_types)
    assert (out[8:12, 8:12] == 128).all()  # correct match: no fill
    assert (out[8:12, 33:37, 0] > 180).all() and (out[8:12, 33:37, 1] < 80).all()  # wrong class: red fill
    assert (out[4, 8] == class_colour(1)).all() and (out[4, 33] == class_colour(2)).all()  # GT outline: GT class
    assert (out[5, 33] == class_colour(1)).all()  # prediction outline: predicted class
    metrics = {"n_images": 1, "per_class": {}}
    write_report(tmp_path, metrics, examples=[("img", image, gt, gt, gt_types, pred_types)], class_names=["a", "b"])
    assert (tmp_path / "classes.png").stat().st_size > 1000 and "classes.png" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------- lossless masks
def test_a_jpeg_mask_is_an_error_naming_the_file(tmp_path: Path) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:12] = 1
    Image.fromarray(mask).save(tmp_path / "m.jpg")
    with pytest.raises(ImageReadError, match=r"m\.jpg: masks must be lossless"):
        read_mask(tmp_path / "m.jpg")
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / split / "a.png")
        Image.fromarray(mask).save(root / split / f"a_mask{'.jpg' if split == 'val' else '.png'}")
    problems = validate_dataset("folder", root, progress=False)
    assert [str(p) for p in problems] == [str(Problem(str(root / "val" / "a_mask.jpg"), "masks must be lossless "
                                                      "(PNG, TIFF or NPY); JPEG compression changes instance ids along "
                                                      "every edge. Export the mask again as PNG or TIFF"))]


# ----------------------------------------------------------------------------- tiles
def test_a_warning_when_tiles_overlap_by_less_than_a_cell() -> None:
    with pytest.warns(UserWarning, match=r"TILE_SIZE x TILE_OVERLAP = 256 x 0.25 = 64 px is smaller than "
                                         r"OBJECT_DIAMETER = 100 px.*at least 0.39"):
        assert warn_if_tiles_split_cells(256, 0.25, 100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_tiles_split_cells(256, 0.5, 100.0) and not warn_if_tiles_split_cells(0, 0.0, 100.0)


# ----------------------------------------------------------------------------- folder groups, duplicates
def test_group_key_keeps_the_tiles_of_one_slide_in_one_split(tmp_path: Path) -> None:
    names = [f"slide{s}_tile{t}" for s in range(6) for t in range(4)]
    problems: list[Problem] = []
    groups = image_groups(tmp_path, names, "prefix:_", problems)
    split = grouped_split(groups, 0.2, 0.2, seed=1)
    for s in range(6):
        where = {k for k, v in split.items() for n in v if n.startswith(f"slide{s}_")}
        assert len(where) == 1
    assert all(split[k] for k in ("train", "val", "test")) and sum(map(len, split.values())) == 24
    (tmp_path / "groups.csv").write_text("name,group\n" + "".join(f"{n},p{i % 3}\n" for i, n in enumerate(names[:-1])))
    assert image_groups(tmp_path, names, "groups.csv", problems) is None
    assert "1 image(s) have no group" in problems[-1].message and problems[-1].file.endswith("groups.csv")
    (tmp_path / "groups.csv").write_text("name,group\n" + "".join(f"{n},p{i % 3}\n" for i, n in enumerate(names)))
    assert image_groups(tmp_path, names, "groups.csv", problems)["slide0_tile1"] == "p1"
    (tmp_path / "groups.csv").write_text("image,patient\na,b\n")
    assert image_groups(tmp_path, names, "groups.csv", problems) is None and "header must be" in problems[-1].message
    (tmp_path / "groups.csv").unlink()
    assert image_groups(tmp_path, names, "groups.csv", problems) is None and "missing" in problems[-1].message
    with pytest.raises(ValueError, match="GROUP_KEY must be"):
        image_groups(tmp_path, names, "slide", problems)


def test_group_key_in_a_prepared_folder_dataset(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for s in range(5):
        for t in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"s{s}-t{t}.png")
            mask = np.zeros((32, 32), np.uint8)
            mask[4:12, 4:12] = 1
            Image.fromarray(mask).save(root / f"s{s}-t{t}_mask.png")
    manifest = prepare_dataset("folder", root, tmp_path / "cache", group_key="prefix:-", val_fraction=0.2,
                               test_fraction=0.2, progress=False)
    for s in range(5):
        assert len({k for k, v in manifest["splits"].items() for n in v if n.startswith(f"s{s}-")}) == 1
    assert manifest["near_duplicates"] == []  # random images: nothing repeats across splits
    with pytest.raises(ValueError, match="DUPLICATES must be one of"):
        prepare_dataset("folder", root, tmp_path / "c2", duplicates="delete", progress=False)
    (root / "groups.csv").write_text("name,group\ns0-t0,a\n")
    problems = validate_dataset("folder", root, group_key="groups.csv", progress=False)
    assert len(problems) == 1 and "14 image(s) have no group" in problems[0].message


def test_duplicate_finder_identical_files_and_near_copies() -> None:
    rng = np.random.default_rng(0)
    field = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    noisy = np.clip(field.astype(int) + rng.integers(-6, 7, field.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    hashes = {"train/a": dhash(field), "val/b": dhash(noisy), "test/c": dhash(other), "test/d": dhash(field),
              "train/e": dhash(other)}
    checksums = {"train/a": "x", "val/b": "y", "test/c": "z", "test/d": "x", "train/e": "w"}
    pairs = {(p["image"], p["other"]): p["kind"] for p in find_duplicates(hashes, checksums)}
    assert pairs[("val/b", "train/a")] == "near" and pairs[("test/d", "train/a")] == "identical"
    assert pairs[("test/c", "train/e")] == "near"  # same pixels, different file hash
    assert ("test/c", "train/a") not in pairs and all(k.split("/")[0] != o.split("/")[0] for k, o in pairs)
