"""Bad data: every problem of a dataset is reported at once, each naming its file and what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from cellseg.data import DataValidationError, prepare_dataset, validate_dataset
from cellseg.data.cache import MANIFEST
from cellseg.data.validate import Problem, standardize_sample


def _good(folder: Path, name: str, size: tuple[int, int] = (24, 32), type_id: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size + (3,), 120, np.uint8)).save(folder / f"{name}.png")
    inst = np.zeros(size, np.int32)
    inst[4:10, 4:12] = 1
    np.save(folder / f"{name}.npy", {"inst_map": inst, "type_map": (inst > 0) * type_id})


def _three_bad_files(root: Path) -> dict[str, Path]:
    """A folder dataset with a corrupted JPEG, a mask of the wrong size and an unknown class id (plus good images)."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("cell\nother\n")
    for split in ("train", "val", "test"):
        _good(root / split, f"{split}_ok")
    jpeg = root / "train" / "broken.jpg"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated: header present, data cut
    np.save(
        root / "train" / "broken.npy",
        {"inst_map": np.zeros((24, 32), np.int32), "type_map": np.zeros((24, 32))},
    )
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / "val" / "wrongsize.png")
    np.save(
        root / "val" / "wrongsize.npy",
        {"inst_map": np.zeros((20, 32), np.int32), "type_map": np.zeros((20, 32))},
    )
    _good(root / "test", "unknownclass", type_id=7)
    return {"jpeg": jpeg, "size": root / "val" / "wrongsize.png", "class": root / "test" / "unknownclass.png"}


def test_one_run_reports_all_three_problems_each_naming_its_file(tmp_path: Path) -> None:
    bad = _three_bad_files(tmp_path / "src")
    problems = validate_dataset("folder", tmp_path / "src")
    by_file: dict[str, str] = {}
    for p in problems:  # the wrong-size file has two problems: its inst_map and its type_map
        by_file[p.file] = by_file.get(p.file, "") + p.message
    assert set(by_file) == {str(p) for p in bad.values()}, problems
    assert "corrupt" in by_file[str(bad["jpeg"])]
    assert "20x32 but the image is 24x32" in by_file[str(bad["size"])]
    assert (
        "unknown class id(s) [7]" in by_file[str(bad["class"])]
        and "['cell', 'other']" in by_file[str(bad["class"])]
    )

    with pytest.raises(DataValidationError) as info:
        prepare_dataset("folder", tmp_path / "src", tmp_path / "cache", progress=False)
    assert info.value.problems == problems
    message = str(info.value)
    assert message.startswith(f"{len(problems)} problem(s)")
    for path in bad.values():
        assert str(path) in message
    assert not (tmp_path / "cache" / MANIFEST).exists()  # nothing half-done looks complete


def _case(root: Path, case: str) -> str:
    """Make one kind of bad folder dataset; returns a fragment the error must contain."""
    for split in ("train", "val", "test"):
        _good(root / split, f"{split}_ok")
    train = root / "train"
    if case == "negative":
        np.save(
            train / "train_ok.npy", {"inst_map": -np.ones((24, 32), np.int32), "type_map": np.zeros((24, 32))}
        )
        return "negative ids"
    if case == "fractional":
        np.save(train / "train_ok.npy", {"inst_map": np.full((24, 32), 1.5), "type_map": np.ones((24, 32))})
        return "non-integer ids"
    if case == "nan":
        np.save(
            train / "train_ok.npy", {"inst_map": np.full((24, 32), np.nan), "type_map": np.ones((24, 32))}
        )
        return "NaN"
    if case == "strings":
        np.save(train / "train_ok.npy", {"inst_map": np.full((24, 32), "a"), "type_map": np.ones((24, 32))})
        return "expected integer ids"
    if case == "3d":
        np.save(
            train / "train_ok.npy",
            {"inst_map": np.zeros((24, 32, 2), np.int32), "type_map": np.ones((24, 32))},
        )
        return "must be 2-D"
    if case == "no_inst":
        np.save(train / "train_ok.npy", {"type_map": np.ones((24, 32))})
        return "no 'inst_map'"
    if case == "ignore_size":
        np.save(
            train / "train_ok.npy",
            {
                "inst_map": np.zeros((24, 32), np.int32),
                "type_map": np.zeros((24, 32)),
                "ignore_mask": np.zeros((3, 3), bool),
            },
        )
        return "ignore_mask is (3, 3)"
    if case == "unclassed":
        inst = np.zeros((24, 32), np.int32)
        inst[2:5, 2:5] = 1
        np.save(train / "train_ok.npy", {"inst_map": inst, "type_map": np.zeros((24, 32))})
        return "have no class"
    if case == "no_labels":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(train / "lonely.png")
        return "no labels"
    if case == "empty_split":
        (root / "test" / "test_ok.png").unlink()
        (root / "test" / "test_ok.npy").unlink()
        return "empty split 'test'"
    if case == "not_an_image":
        (train / "train_ok.png").write_bytes(b"this is not a png")
        return "unreadable or corrupt image"
    if case == "pickle":
        (train / "train_ok.npy").write_bytes(b"garbage")
        return "not a valid .npy"
    raise AssertionError(case)


CASES = [
    "negative",
    "fractional",
    "nan",
    "strings",
    "3d",
    "no_inst",
    "ignore_size",
    "unclassed",
    "no_labels",
    "empty_split",
    "not_an_image",
    "pickle",
]


@pytest.mark.parametrize("case", CASES)
def test_each_kind_of_bad_data_is_reported(tmp_path: Path, case: str) -> None:
    root = tmp_path / "src"
    (root).mkdir()
    (root / "classes.txt").write_text("cell\n")
    fragment = _case(root, case)
    problems = validate_dataset("folder", root)
    assert any(fragment in p.message for p in problems), problems
    assert all(str(root) in p.file for p in problems)


def _broken_manifest(root: Path) -> None:
    (root / "manifest.json").write_text("{not json")
    (root / "classes.txt").unlink()


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda r: (r / "classes.txt").write_text("\n"), "empty: list the class names"),
        (lambda r: (r / "classes.txt").unlink(), "classes.txt"),
        (_broken_manifest, "manifest.json"),
    ],
)
def test_class_list_problems(tmp_path: Path, setup, fragment: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "classes.txt").write_text("cell\n")
    for split in ("train", "val", "test"):
        _good(root / split, f"{split}_ok")
    setup(root)
    problems = validate_dataset("folder", root)
    assert any(fragment in p.message or fragment in p.file for p in problems), problems


def _mask_pairs(root: Path, csv: str, classes: str = "a\nb\n") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    for j in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"im{j}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[2:4, 2:4] = 1
        Image.fromarray(mask).save(root / f"im{j}_mask.png")
    (root / "classes.csv").write_text(csv)


@pytest.mark.parametrize(
    "csv, fragment",
    [
        ("name,id,label\n", "header must be image,instance_id,class"),
        ("image,instance_id,class\nim0,x,a\nim1,1,a\nim2,1,a\n", "instance_id 'x' is not an integer"),
        ("image,instance_id,class\nim0,1,zebra\nim1,1,a\nim2,1,b\n", "unknown class 'zebra'"),
        ("image,instance_id,class\nim0,1,9\nim1,1,a\nim2,1,b\n", "unknown class '9'"),
    ],
)
def test_classes_csv_problems(tmp_path: Path, csv: str, fragment: str) -> None:
    _mask_pairs(tmp_path / "src", csv)
    problems = validate_dataset("folder", tmp_path / "src", val_fraction=0.34, test_fraction=0.33)
    assert any(fragment in p.message for p in problems), problems
    assert any(p.file.endswith("classes.csv") for p in problems)


def test_mask_pair_with_corrupt_image_and_mask_reports_both(tmp_path: Path) -> None:
    _mask_pairs(tmp_path / "src", "image,instance_id,class\nim0,1,a\nim1,1,a\nim2,1,b\n")
    (tmp_path / "src" / "im1.png").write_bytes(b"bad")
    (tmp_path / "src" / "im1_mask.png").write_bytes(b"bad")
    problems = validate_dataset("folder", tmp_path / "src", val_fraction=0.34, test_fraction=0.33)
    assert {Path(p.file).name for p in problems} == {"im1.png", "im1_mask.png"}


def test_rgb_mask_is_refused(tmp_path: Path) -> None:
    _mask_pairs(tmp_path / "src", "image,instance_id,class\nim0,1,a\nim1,1,a\nim2,1,b\n")
    colourful = np.zeros((8, 8, 3), np.uint8)
    colourful[..., 0] = 1
    Image.fromarray(colourful).save(tmp_path / "src" / "im2_mask.png")
    problems = validate_dataset("folder", tmp_path / "src", val_fraction=0.34, test_fraction=0.33)
    assert any("one channel" in p.message for p in problems), problems


def test_multiclass_without_type_map_is_a_problem() -> None:
    raw = {"image": np.zeros((4, 4, 3), np.uint8), "inst_map": np.ones((4, 4), np.int32)}
    sample, problems = standardize_sample(raw, ["a", "b"], "x.png")
    assert sample is None and "no type_map" in problems[0].message
    sample, problems = standardize_sample(raw, ["only"], "x.png")
    assert problems == [] and sample["type_map"].max() == 1


def test_missing_maps_and_bad_image_arrays() -> None:
    sample, problems = standardize_sample({"image": np.zeros((4, 4, 3), np.uint8)}, ["a"], "x.png")
    assert sample is None and problems == [Problem("x.png", "no inst_map")]
    sample, problems = standardize_sample(
        {"image": np.zeros((4, 4, 2)), "inst_map": np.zeros((4, 4))}, ["a"], "y"
    )
    assert sample is None and "expected an RGB, RGBA or grey image" in problems[0].message
    sample, problems = standardize_sample(
        {"image": np.full((4, 4), np.inf), "inst_map": np.zeros((4, 4))}, ["a"], "z"
    )
    assert sample is None and "NaN or infinite" in problems[0].message


def test_instances_take_the_majority_type_and_ids_become_consecutive() -> None:
    inst = np.zeros((6, 6), np.int64)
    inst[0:2, 0:3] = 40
    inst[3:6, 3:6] = 7
    types = np.zeros((6, 6), np.int64)
    types[0:2, 0:3] = 2
    types[0, 0] = 1  # a stray pixel of another class inside instance 40
    types[3:6, 3:6] = 1
    sample, problems = standardize_sample(
        {"image": np.zeros((6, 6, 3), np.uint8), "inst_map": inst, "type_map": types}, ["a", "b"], "m.npy"
    )
    assert problems == []
    assert sample["inst_map"][0, 0] == 2 and sample["inst_map"][4, 4] == 1  # 7 -> 1, 40 -> 2
    assert sample["type_map"][0, 0] == 2 and sample["type_map"][4, 4] == 1


def _consep(root: Path, mat: dict | None, *, bad_bytes: bool = False) -> None:
    for part in ("Train", "Test"):
        (root / part / "Images").mkdir(parents=True)
        (root / part / "Labels").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / part / "Images" / f"{part}_{j}.png")
            scipy.io.savemat(
                root / part / "Labels" / f"{part}_{j}.mat",
                {"inst_map": np.zeros((8, 8)), "type_map": np.zeros((8, 8))},
            )
    target = root / "Train" / "Labels" / "Train_0.mat"
    if mat is None:
        target.unlink()
    elif bad_bytes:
        target.write_bytes(b"MATLAB 5.0 junk")
    else:
        scipy.io.savemat(target, mat)


@pytest.mark.parametrize(
    "mat, bad_bytes, fragment",
    [
        (None, False, "no label file"),
        ({}, True, "unreadable .mat"),
        ({"type_map": np.zeros((8, 8))}, False, "no 'inst_map'"),
        ({"inst_map": np.ones((8, 8)), "type_map": np.full((8, 8), 9.0)}, False, "unknown class id(s) [9]"),
    ],
)
def test_consep_problems(tmp_path: Path, mat: dict | None, bad_bytes: bool, fragment: str) -> None:
    _consep(tmp_path / "c", mat, bad_bytes=bad_bytes)
    problems = validate_dataset("consep", tmp_path / "c", val_fraction=0.34)
    assert len(problems) == 1 and fragment in problems[0].message, problems
    assert "Train_0" in problems[0].file or "Train_0" in problems[0].message


def test_consep_unmerged_reports_unknown_ids_through_the_class_list(tmp_path: Path) -> None:
    _consep(tmp_path / "c", {"inst_map": np.ones((8, 8)), "type_map": np.full((8, 8), 8.0)})
    problems = validate_dataset("consep", tmp_path / "c", val_fraction=0.34, consep_merge_classes=False)
    assert len(problems) == 1 and "unknown class id(s) [8]" in problems[0].message


def _pannuke(
    root: Path,
    fold_dirs: list[str],
    *,
    n_masks: int = 2,
    masks_shape: tuple = (2, 8, 8, 6),
    mask_value: float = 1.0,
    skip: str | None = None,
) -> None:
    for d in fold_dirs:
        (root / d).mkdir(parents=True)
        if skip != "images":
            np.save(root / d / "images.npy", np.zeros((2, 8, 8, 3)))
        masks = np.zeros(masks_shape)
        masks[..., 2:4, 2:4, 0] = mask_value
        np.save(root / d / "masks.npy", masks[:n_masks])
        np.save(root / d / "types.npy", np.array(["Breast", "Colon"]))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"fold_dirs": ["Fold 1", "Fold 2"]}, "no folder for fold 3"),
        ({"fold_dirs": ["Fold 1", "Fold 2", "Fold 3"], "skip": "images"}, "no images.npy"),
        ({"fold_dirs": ["Fold 1", "Fold 2", "Fold 3"], "n_masks": 1}, "they must match"),
        (
            {"fold_dirs": ["Fold 1", "Fold 2", "Fold 3"], "masks_shape": (2, 8, 8, 4)},
            "PanNuke masks are (H, W, 6)",
        ),
        (
            {"fold_dirs": ["Fold 1", "Fold 2", "Fold 3"], "masks_shape": (2, 6, 8, 6)},
            "masks must have the image's size",
        ),
        ({"fold_dirs": ["Fold 1", "Fold 2", "Fold 3"], "mask_value": 0.5}, "non-negative integer"),
    ],
)
def test_pannuke_problems(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    _pannuke(tmp_path / "p", **kwargs)
    problems = validate_dataset("pannuke", tmp_path / "p")
    assert any(fragment in p.message for p in problems), problems


def test_unreadable_fold_arrays(tmp_path: Path) -> None:
    _pannuke(tmp_path / "p", ["Fold 1", "Fold 2", "Fold 3"])
    (tmp_path / "p" / "Fold 2" / "masks.npy").write_bytes(b"junk")
    problems = validate_dataset("pannuke", tmp_path / "p")
    assert any("unreadable fold arrays" in p.message and "Fold 2" in p.file for p in problems), problems


def test_problem_and_error_formatting() -> None:
    error = DataValidationError([Problem("a.png", "bad"), Problem("b.npy", "worse")], "DATASET='folder'")
    assert str(error).splitlines()[:3] == [
        "2 problem(s) found in DATASET='folder':",
        "  - a.png: bad",
        "  - b.npy: worse",
    ]


def test_dataset_without_any_readable_image_fails_before_touching_the_cache(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        (tmp_path / "src" / split).mkdir(parents=True)
    with pytest.raises(DataValidationError, match="empty split 'train'"):
        prepare_dataset("folder", tmp_path / "src", tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_read_image_of_a_missing_file() -> None:
    from cellseg.data.files import ImageReadError, read_image

    with pytest.raises(ImageReadError, match="file not found"):
        read_image("/nonexistent/x.png")


def test_pannuke_without_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        validate_dataset("pannuke", None)
