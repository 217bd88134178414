"""The prepared cache: manifest, reuse by fingerprint, rebuilds, integrity checks and parameter errors."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from cellseg.data import (
    DataValidationError,
    load_manifest,
    load_sample,
    prepare_dataset,
    validate_dataset,
    verify_cache,
)
from cellseg.data.cache import MANIFEST, MARKER, write_manifest
from cellseg.data.records import seeded_split

TINY = {"synth_num_images": 5, "synth_image_size": 64, "progress": False}


def test_reuse_when_inputs_match_and_say_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = prepare_dataset("synthetic", None, tmp_path / "c", **TINY)
    stamp = (tmp_path / "c" / "train" / f"{first['splits']['train'][0]}.png").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="cellseg.data.prepare"):
        t = time.perf_counter()
        second = prepare_dataset("synthetic", None, tmp_path / "c", consep_merge_classes=False, **TINY)
        elapsed = time.perf_counter() - t
    assert second == first  # an option that does not affect synthetic data does not rebuild
    assert elapsed < 0.5
    assert any("reusing the prepared cache" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "c" / "train" / f"{first['splits']['train'][0]}.png").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change", [{"seed": 1}, {"synth_num_images": 6}, {"val_fraction": 0.4}])
def test_changed_parameters_rebuild(tmp_path: Path, change: dict) -> None:
    first = prepare_dataset("synthetic", None, tmp_path / "c", **TINY)
    second = prepare_dataset("synthetic", None, tmp_path / "c", **(TINY | change))
    assert second["fingerprint"] != first["fingerprint"]
    assert load_manifest(tmp_path / "c") == second
    assert verify_cache(tmp_path / "c") == []


def _folder_source(root: Path) -> None:
    rng = np.random.default_rng(0)
    root.mkdir()
    for j in range(4):
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"a{j}.png")
        inst = np.zeros((16, 16), np.int32)
        inst[4:8, 4:8] = 1
        Image.fromarray(inst.astype(np.uint8)).save(root / f"a{j}_mask.png")


def test_changed_source_files_rebuild(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _folder_source(tmp_path / "src")
    first = prepare_dataset(
        "folder", tmp_path / "src", tmp_path / "c", val_fraction=0.25, test_fraction=0.25, progress=False
    )
    path = tmp_path / "src" / "a0_mask.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="cellseg.data.prepare"):
        second = prepare_dataset(
            "folder", tmp_path / "src", tmp_path / "c", val_fraction=0.25, test_fraction=0.25, progress=False
        )
    assert second["fingerprint"] != first["fingerprint"]
    assert not any("reusing" in r.getMessage() for r in caplog.records)


def test_incomplete_cache_is_rebuilt(tmp_path: Path) -> None:
    first = prepare_dataset("synthetic", None, tmp_path / "c", **TINY)
    name = first["splits"]["val"][0]
    (tmp_path / "c" / "val" / f"{name}.npy").unlink()
    prepare_dataset("synthetic", None, tmp_path / "c", **TINY)
    assert (tmp_path / "c" / "val" / f"{name}.npy").exists()
    assert verify_cache(tmp_path / "c") == []


def test_broken_manifest_is_rebuilt(tmp_path: Path) -> None:
    prepare_dataset("synthetic", None, tmp_path / "c", **TINY)
    (tmp_path / "c" / MANIFEST).write_text("{")
    assert prepare_dataset("synthetic", None, tmp_path / "c", **TINY)["dataset"] == "synthetic"


def test_refuses_to_fill_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a cellseg cache"):
        prepare_dataset("synthetic", None, tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_verify_cache_finds_modified_and_missing_files(tmp_path: Path) -> None:
    manifest = prepare_dataset("synthetic", None, tmp_path / "c", **TINY)
    assert verify_cache(tmp_path / "c") == []
    a, b = manifest["splits"]["train"][:2]
    with open(tmp_path / "c" / "train" / f"{a}.png", "ab") as fh:
        fh.write(b"\0")
    (tmp_path / "c" / "train" / f"{b}.npy").unlink()
    problems = verify_cache(tmp_path / "c")
    assert [(Path(p.file).name, p.message.split(" ")[0]) for p in problems] == [
        (f"{a}.png", "checksum"),
        (f"{b}.npy", "missing"),
    ]


def test_missing_or_broken_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run notebooks/00_prepare_data.ipynb first"):
        load_manifest(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path / "bad")


def test_load_sample_missing_file(tmp_path: Path) -> None:
    prepare_dataset("synthetic", None, tmp_path / "c", **TINY)
    with pytest.raises(FileNotFoundError, match="missing from the cache"):
        load_sample(tmp_path / "c", "train", "no_such_image")


def test_manifest_write_is_atomic(tmp_path: Path) -> None:
    write_manifest(tmp_path, {"dataset": "x"})
    with pytest.raises(TypeError):
        write_manifest(tmp_path, {"dataset": object()})  # not JSON-serialisable: fails half-way
    assert json.loads((tmp_path / MANIFEST).read_text()) == {"dataset": "x"}
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temp file left behind


def test_marker_and_layout(tmp_path: Path) -> None:
    manifest = prepare_dataset("synthetic", None, tmp_path / "c", **TINY)
    assert (tmp_path / "c" / MARKER).exists()
    files = sorted(p.name for p in (tmp_path / "c" / "train").iterdir())
    assert files == sorted(
        [f"{n}.png" for n in manifest["splits"]["train"]] + [f"{n}.npy" for n in manifest["splits"]["train"]]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "imagenet"}, "DATASET must be one of"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
        ({"seed": -3}, "seed"),
        ({"synth_num_images": 0}, "synth_num_images"),
        ({"synth_image_size": 8}, "synth_image_size"),
        ({"pannuke_fold_splits": {1: "training"}}, "pannuke_fold_splits"),
    ],
)
def test_bad_parameters_name_themselves(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"dataset": "synthetic", "data_root": None, "cache_dir": tmp_path / "c"} | TINY | kwargs
    with pytest.raises(ValueError, match=match):
        prepare_dataset(**args)


def test_unknown_dataset_lists_allowed_values_in_validate_too() -> None:
    with pytest.raises(ValueError, match=r"\['synthetic', 'bccd', 'folder', 'pannuke', 'consep'\]"):
        validate_dataset("coco", None)


def test_folder_needs_an_existing_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DATA_ROOT is required"):
        prepare_dataset("folder", None, tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_dataset("folder", tmp_path / "nope", tmp_path / "c", progress=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        validate_dataset("folder", tmp_path / "file.txt")


def test_too_few_images_for_the_splits_is_an_empty_split_error(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="empty split 'val'"):
        prepare_dataset(
            "synthetic", None, tmp_path / "c", synth_num_images=2, synth_image_size=64, progress=False
        )


def test_zero_fraction_means_an_intentionally_empty_split(tmp_path: Path) -> None:
    manifest = prepare_dataset("synthetic", None, tmp_path / "c", test_fraction=0.0, **TINY)
    assert manifest["splits"]["test"] == [] and len(manifest["splits"]["val"]) == 1


def test_seeded_split_is_stable_and_covers_every_name() -> None:
    names = [f"n{i}" for i in range(20)]
    split = seeded_split(names, 0.2, 0.1, seed=5)
    assert sorted(sum(split.values(), [])) == sorted(names)
    assert [len(split[s]) for s in ("train", "val", "test")] == [14, 4, 2]
    assert seeded_split(list(reversed(names)), 0.2, 0.1, seed=5) == split


def test_qa_report_for_synthetic(tmp_path: Path) -> None:
    prepare_dataset("synthetic", None, tmp_path / "c", qa_dir=tmp_path / "qa", qa_overlays=2, **TINY)
    qa = json.loads((tmp_path / "qa" / "qa.json").read_text())
    assert set(qa["classes"]) == {"RBC", "WBC", "Platelet"} and not qa["has_boxes"]
    assert (
        qa["classes"]["WBC"]["instance_area_px"]["median"]
        > qa["classes"]["Platelet"]["instance_area_px"]["median"]
    )
    assert len(qa["overlays"]) == 2 and all((tmp_path / "qa" / p).exists() for p in qa["overlays"])
    report = (tmp_path / "qa" / "qa_report.md").read_text()
    assert "| RBC |" in report and qa["overlays"][0] in report


def test_qa_report_is_reused_with_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    prepare_dataset("synthetic", None, tmp_path / "c", qa_dir=tmp_path / "qa", qa_overlays=1, **TINY)
    stamp = (tmp_path / "qa" / "qa.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="cellseg.data.prepare"):
        prepare_dataset("synthetic", None, tmp_path / "c", qa_dir=tmp_path / "qa", qa_overlays=1, **TINY)
    assert (tmp_path / "qa" / "qa.json").stat().st_mtime_ns == stamp
    assert any("reusing the QA report" in r.getMessage() for r in caplog.records)
    prepare_dataset("synthetic", None, tmp_path / "c", qa_dir=tmp_path / "qa", qa_overlays=2, **TINY)
    assert len(json.loads((tmp_path / "qa" / "qa.json").read_text())["overlays"]) == 2
