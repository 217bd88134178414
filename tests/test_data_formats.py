"""Round trips of every source format: write a tiny dataset, prepare it, read the cache back, compare maps exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile
from PIL import Image

from cellseg.data import load_manifest, load_sample, prepare_dataset
from cellseg.data.cache import sample_paths
from cellseg.data.files import sha256_file
from cellseg.data.formats import CONSEP_CLASSES, CONSEP_MERGED_CLASSES, PANNUKE_CLASSES, pannuke_masks_to_maps
from cellseg.data.sample import SPLITS


def _maps(
    rng: np.random.Generator, h: int, w: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random image with non-overlapping rectangles as instances (ids 1..N in raster order of their corners)."""
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    inst = np.zeros((h, w), dtype=np.int32)
    types = np.zeros((h, w), dtype=np.int32)
    k = 0
    for y in range(2, h - 8, 10):
        for x in range(2, w - 8, 12):
            if rng.random() < 0.75:
                k += 1
                inst[y : y + 7, x : x + 9] = k
                types[y : y + 7, x : x + 9] = int(rng.integers(1, n_classes + 1))
    return image, inst, types


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def _check_cache_matches(cache: Path, expected: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    manifest = load_manifest(cache)
    cached = {name: split for split in SPLITS for name in manifest["splits"][split]}
    assert set(cached) == set(expected)
    for name, (image, inst, types) in expected.items():
        s = load_sample(cache, cached[name], name)
        np.testing.assert_array_equal(s["image"], image)
        np.testing.assert_array_equal(s["inst_map"], inst)
        np.testing.assert_array_equal(s["type_map"], types)
        assert s["inst_map"].dtype == np.int32 and s["type_map"].dtype == np.int32
        assert manifest["image_sizes"][f"{cached[name]}/{name}"] == list(inst.shape)
        png, npy = sample_paths(cache, cached[name], name)
        assert manifest["checksums"][f"{cached[name]}/{name}"] == {
            "png": sha256_file(png),
            "npy": sha256_file(npy),
        }


def test_folder_split_dirs_with_npy_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    (root / "classes.txt").parent.mkdir()
    (root / "classes.txt").write_text("tumour\nlymphocyte\n")
    expected = {}
    for split in SPLITS:
        (root / split).mkdir()
        for j in range(2):
            name = f"{split}_{j}"
            image, inst, types = _maps(rng, 48, 64, 2)
            ignore = np.zeros(inst.shape, dtype=bool)
            ignore[:5, :5] = True
            _save_png(root / split / f"{name}.png", image)
            np.save(
                root / split / f"{name}.npy", {"inst_map": inst, "type_map": types, "ignore_mask": ignore}
            )
            expected[name] = (image, inst, types)
    manifest = prepare_dataset("folder", root, tmp_path / "cache", progress=False)
    assert manifest["class_names"] == ["tumour", "lymphocyte"]
    assert manifest["splits"] == {s: [f"{s}_0", f"{s}_1"] for s in SPLITS}
    _check_cache_matches(tmp_path / "cache", expected)
    assert load_sample(tmp_path / "cache", "val", "val_1")["ignore_mask"][:5, :5].all()
    counts = {c: sum(manifest["counts"][s][c] for s in SPLITS) for c in manifest["class_names"]}
    truth = [sum(len(np.unique(i[t == c])) for _, i, t in expected.values()) for c in (1, 2)]
    assert [counts["tumour"], counts["lymphocyte"]] == truth


def test_folder_flat_mask_pairs_with_classes_csv_and_relabelling(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "flat"
    root.mkdir()
    (root / "classes.txt").write_text("A\nB\nC\n")
    rows = ["image,instance_id,class"]
    expected = {}
    for j in range(10):
        image, inst, types = _maps(rng, 40, 40, 3)
        sparse = np.where(inst > 0, inst * 10 + 5, 0)  # non-consecutive ids in the file
        _save_png(root / f"img{j}.png", image)
        if j % 2:
            tifffile.imwrite(root / f"img{j}_mask.tif", sparse.astype(np.uint16))
        else:
            _save_png(root / f"img{j}_mask.png", sparse.astype(np.uint16))
        for i in range(1, int(inst.max()) + 1):
            t = int(types[inst == i][0])
            rows.append(f"img{j}.png,{i * 10 + 5},{'ABC'[t - 1] if i % 2 else t}")  # names and ids both work
        expected[f"img{j}"] = (image, inst, types)
    (root / "classes.csv").write_text("\n".join(rows) + "\n")
    manifest = prepare_dataset("folder", root, tmp_path / "cache", seed=3, progress=False)
    assert [len(manifest["splits"][s]) for s in SPLITS] == [7, 2, 1]
    _check_cache_matches(tmp_path / "cache", expected)
    again = prepare_dataset("folder", root, tmp_path / "cache2", seed=3, progress=False)
    assert again["splits"] == manifest["splits"]  # the seeded split is reproducible
    assert (
        prepare_dataset("folder", root, tmp_path / "c3", seed=4, progress=False)["splits"]
        != manifest["splits"]
    )


def test_folder_instance_masks_without_classes_get_one_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "nuclei"
    expected = {}
    for split in SPLITS:
        (root / split).mkdir(parents=True)
        image, inst, _ = _maps(rng, 32, 48, 1)
        grey = image[:, :, 0]
        _save_png(root / split / f"{split}.png", grey)  # grey images become RGB
        tifffile.imwrite(root / split / f"{split}_mask.tif", inst)
        expected[split] = (np.repeat(grey[:, :, None], 3, axis=2), inst, (inst > 0).astype(np.int32))
    manifest = prepare_dataset("folder", root, tmp_path / "cache", progress=False)
    assert manifest["class_names"] == ["cell"]
    _check_cache_matches(tmp_path / "cache", expected)


def test_cache_is_itself_a_folder_dataset(tmp_path: Path) -> None:
    first = prepare_dataset(
        "synthetic", None, tmp_path / "c1", synth_num_images=5, synth_image_size=64, progress=False
    )
    second = prepare_dataset("folder", tmp_path / "c1", tmp_path / "c2", progress=False)
    assert second["class_names"] == first["class_names"] and second["splits"] == first["splits"]
    assert second["counts"] == first["counts"]
    for split in SPLITS:
        for name in first["splits"][split]:
            a, b = load_sample(tmp_path / "c1", split, name), load_sample(tmp_path / "c2", split, name)
            for key in ("image", "inst_map", "type_map"):
                np.testing.assert_array_equal(a[key], b[key])


def _write_pannuke_fold(
    folder: Path, images: np.ndarray, masks: np.ndarray, tissues: list[str], nested: bool
) -> None:
    where = {"images": folder, "masks": folder, "types": folder}
    if nested:  # the official archive: Fold 1/images/fold1/images.npy, Fold 1/masks/fold1/masks.npy
        where = {
            "images": folder / "images" / "fold1",
            "types": folder / "images" / "fold1",
            "masks": folder / "masks" / "fold1",
        }
    for path in where.values():
        path.mkdir(parents=True, exist_ok=True)
    np.save(where["images"] / "images.npy", images)
    np.save(where["masks"] / "masks.npy", masks)
    np.save(where["types"] / "types.npy", np.array(tissues))


def test_pannuke_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    root = tmp_path / "pannuke"
    expected = {}
    for fold, dirname in ((1, "Fold 1"), (2, "fold2"), (3, "fold_3")):
        images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.float64)  # PanNuke stores float64 0..255
        masks = np.zeros((2, 32, 32, 6), dtype=np.float64)
        for i in range(2):
            masks[i, 2:8, 2:8, 0] = 5  # Neoplastic id 5
            masks[i, 10:16, 2:8, 1] = 5  # Inflammatory, same id 5 in another channel: another instance
            masks[i, 20:30, 20:30, 4] = 12 + i  # Epithelial
            masks[i, 20:24, 2:6, 2] = 3  # Connective
            masks[i, ..., 5] = (masks[i, ..., :5].sum(-1) == 0).astype(float)  # background channel
            inst = np.zeros((32, 32), np.int32)
            types = np.zeros((32, 32), np.int32)
            for k, (sl, t) in enumerate(
                [
                    ((slice(2, 8), slice(2, 8)), 1),
                    ((slice(10, 16), slice(2, 8)), 2),
                    ((slice(20, 24), slice(2, 6)), 3),
                    ((slice(20, 30), slice(20, 30)), 5),
                ],
                1,
            ):
                inst[sl], types[sl] = k, t
            expected[f"fold{fold}_{i:05d}"] = (images[i].astype(np.uint8), inst, types)
        _write_pannuke_fold(root / dirname, images, masks, [f"Tissue{fold}", "Colon"], nested=fold == 1)
    manifest = prepare_dataset("pannuke", root, tmp_path / "cache", progress=False)
    assert manifest["class_names"] == PANNUKE_CLASSES
    assert (
        manifest["splits"]["train"] == ["fold1_00000", "fold1_00001"]
        and manifest["splits"]["test"][0] == "fold3_00000"
    )
    assert (
        manifest["tissues"]["val/fold2_00000"] == "Tissue2"
        and manifest["tissues"]["test/fold3_00001"] == "Colon"
    )
    assert load_sample(tmp_path / "cache", "train", "fold1_00000")["meta"]["tissue"] == "Tissue1"
    _check_cache_matches(tmp_path / "cache", expected)
    swapped = prepare_dataset(
        "pannuke",
        root,
        tmp_path / "cache2",
        progress=False,
        pannuke_fold_splits={3: "train", 2: "val", 1: "test"},
    )
    assert swapped["splits"]["train"] == ["fold3_00000", "fold3_00001"]


def test_pannuke_channel_overlap_later_channel_wins() -> None:
    masks = np.zeros((4, 4, 6))
    masks[:2, :, 0] = 1
    masks[1:3, :, 3] = 1
    inst, types = pannuke_masks_to_maps(masks)
    np.testing.assert_array_equal(types[:, 0], [1, 4, 4, 0])
    np.testing.assert_array_equal(inst[:, 0], [1, 2, 2, 0])


def test_consep_round_trip_with_and_without_merging(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    root = tmp_path / "CoNSeP"
    raw = {}
    for part, n in (("Train", 5), ("Test", 2)):
        (root / part / "Images").mkdir(parents=True)
        (root / part / "Labels").mkdir(parents=True)
        for j in range(n):
            name = f"{part.lower()}_{j + 1}"
            image, inst, types = _maps(rng, 40, 50, 7)
            rgba = np.concatenate(
                [image, np.full((40, 50, 1), 255, np.uint8)], axis=2
            )  # CoNSeP PNGs are RGBA
            _save_png(root / part / "Images" / f"{name}.png", rgba)
            scipy.io.savemat(
                root / part / "Labels" / f"{name}.mat",
                {
                    "inst_map": inst.astype(np.float64),
                    "type_map": types.astype(np.float64),
                    "inst_type": np.zeros((int(inst.max()), 1)),
                },
            )
            raw[name] = (image, inst, types)
    merged = prepare_dataset("consep", root, tmp_path / "merged", val_fraction=0.4, progress=False)
    assert merged["class_names"] == CONSEP_MERGED_CLASSES
    assert merged["splits"]["test"] == ["test_1", "test_2"]
    assert len(merged["splits"]["val"]) == 2 and len(merged["splits"]["train"]) == 3
    lut = np.array([0, 1, 2, 3, 3, 4, 4, 4])
    _check_cache_matches(tmp_path / "merged", {k: (i, m, lut[t]) for k, (i, m, t) in raw.items()})
    plain = prepare_dataset(
        "consep", root, tmp_path / "plain", val_fraction=0.4, consep_merge_classes=False, progress=False
    )
    assert plain["class_names"] == CONSEP_CLASSES
    _check_cache_matches(tmp_path / "plain", raw)


def test_manifest_fields(tmp_path: Path) -> None:
    manifest = prepare_dataset(
        "synthetic", None, tmp_path / "c", synth_num_images=6, synth_image_size=64, progress=False
    )
    for key in (
        "dataset",
        "class_names",
        "splits",
        "counts",
        "image_sizes",
        "checksums",
        "created",
        "source",
        "fingerprint",
        "image_counts",
    ):
        assert key in manifest, key
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == manifest
    assert manifest["dataset"] == "synthetic" and manifest["class_names"] == ["RBC", "WBC", "Platelet"]
    for split in SPLITS:
        for name in manifest["splits"][split]:
            s = load_sample(tmp_path / "c", split, name)
            counts = [len(np.unique(s["inst_map"][s["type_map"] == c])) for c in (1, 2, 3)]
            assert manifest["image_counts"][f"{split}/{name}"] == counts


@pytest.mark.parametrize("dataset", ["pannuke", "consep"])
def test_missing_source_folder_is_explained(tmp_path: Path, dataset: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="DATA_ROOT"):
        prepare_dataset(dataset, tmp_path / "empty", tmp_path / "cache", progress=False)


def test_real_fluorescence_tiff_with_instance_mask(dsb2018_root: Path, tmp_path: Path) -> None:
    """DSB2018 (uint16 image, 125 nuclei): the folder format's TIFF path on real data."""
    root = tmp_path / "dsb"
    for split in SPLITS:
        (root / split).mkdir(parents=True)
        (root / split / f"{split}.tif").symlink_to(dsb2018_root / "img2d.tif")
        (root / split / f"{split}_mask.tif").symlink_to(dsb2018_root / "mask2d.tif")
    manifest = prepare_dataset("folder", root, tmp_path / "cache", progress=False)
    raw_image = tifffile.imread(dsb2018_root / "img2d.tif")
    raw_mask = tifffile.imread(dsb2018_root / "mask2d.tif")
    s = load_sample(tmp_path / "cache", "train", "train")
    ids = np.unique(raw_mask)
    relabelled = np.searchsorted(ids, raw_mask) if ids[0] == 0 else np.searchsorted(ids, raw_mask) + 1
    np.testing.assert_array_equal(s["inst_map"], relabelled)
    assert manifest["counts"]["train"] == {"cell": len(ids) - 1} and len(ids) - 1 == 125
    assert s["image"].dtype == np.uint8 and s["image"].shape == raw_image.shape + (3,)
    # min..max rescaled: the brightest pixel maps to 255, the darkest to 0, and the order of values is kept
    assert s["image"].max() == 255 and s["image"].min() == 0
    assert np.corrcoef(s["image"][..., 0].ravel(), raw_image.ravel())[0, 1] > 0.999
