"""CellDataset: tensor contract, determinism across processes and epochs, HV after flips, padding, sample weights."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cellseg.branches import Branch
from cellseg.data import AugmentConfig, CellDataset, prepare_dataset, sample_weights
from cellseg.data.cache import MANIFEST, load_manifest
from cellseg.data.targets import hv_maps
from cellseg.imageops import denormalize_image
from cellseg.memory import TARGET_BYTES_PER_PIXEL

OFF = dict(flip=0.0, rot90=0.0, affine=0.0, elastic=0.0, colour=0.0, hed=0.0, blur=0.0, noise=0.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    prepare_dataset(
        "synthetic", None, path, synth_num_images=6, synth_image_size=64, test_fraction=0.0, progress=False
    )
    return path


def _uncut(inst: np.ndarray) -> np.ndarray:
    """Pixels of the instances that do not touch the patch border (whole in the patch)."""
    border = np.unique(np.concatenate([inst[0], inst[-1], inst[:, 0], inst[:, -1]]))
    return (inst > 0) & ~np.isin(inst, border)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_item_contract(cache: Path) -> None:
    ds = CellDataset(cache, "train", patch_size=48, augment=True, seed=0)
    assert len(ds) == len(load_manifest(cache)["splits"]["train"]) and ds.num_classes == 3
    item = ds[1]
    expected = {
        "image": ((3, 48, 48), torch.float32),
        Branch.NP.value: ((48, 48), torch.int64),
        Branch.HV.value: ((2, 48, 48), torch.float32),
        Branch.NC.value: ((48, 48), torch.int64),
        "ignore": ((48, 48), torch.bool),
        "inst_map": ((48, 48), torch.int64),
        "index": ((), torch.int64),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in item.items()} == expected
    # the memory model counts the targets the training loop holds per pixel
    targets = sum(v.numel() * v.element_size() for k, v in item.items() if k not in ("image", "index"))
    assert targets == TARGET_BYTES_PER_PIXEL * 48 * 48
    assert int(item["index"]) == 1
    assert (
        set(item["np"].unique().tolist()) <= {0, 1}
        and 0 <= int(item["nc"].min()) <= int(item["nc"].max()) <= 3
    )
    assert torch.equal(item["np"], (item["inst_map"] > 0).long())
    # NC is set on every instance pixel except dropped fragments of cut cells, whose HV is 0 as well
    inst, hv, nc = item["inst_map"].numpy(), item["hv"].numpy(), item["nc"].numpy()
    assert not (nc[inst == 0] > 0).any()
    assert (hv[:, (inst > 0) & (nc == 0)] == 0).all()
    # cells not cut by the patch border get their own HV field (cut ones: see test_whole_cell_targets_*)
    inner = _uncut(inst)
    np.testing.assert_array_equal(hv[:, inner], hv_maps(np.where(inner, inst, 0))[:, inner])
    ids = item["inst_map"].unique()
    assert torch.equal(ids, torch.arange(ids.numel()))


def test_whole_image_without_patch_size(cache: Path) -> None:
    ds = CellDataset(cache, "val", patch_size=None, augment=False, seed=0)
    item = ds[0]
    raw = ds.load(0)
    assert item["image"].shape == (3, 64, 64)
    np.testing.assert_array_equal(denormalize_image(item["image"]), raw["image"])
    np.testing.assert_array_equal(item["inst_map"].numpy(), raw["inst_map"])
    assert CellDataset(cache, "val", patch_size=None, augment=True, seed=0)[0]["image"].shape == (3, 64, 64)


def test_centre_crop_without_augmentation(cache: Path) -> None:
    ds = CellDataset(cache, "train", patch_size=32, augment=False, seed=0)
    raw = ds.load(2)
    item = ds[2]
    np.testing.assert_array_equal(denormalize_image(item["image"]), raw["image"][16:48, 16:48])
    assert _equal(item, ds[2])


def test_same_seed_epoch_index_same_tensors_and_epochs_differ(cache: Path) -> None:
    a = CellDataset(cache, "train", patch_size=40, augment=True, seed=7)
    b = CellDataset(cache, "train", patch_size=40, augment=True, seed=7)
    b[0], b[2]  # noqa: B018 - other items in between must not change item 1
    assert _equal(a[1], b[1])
    a.set_epoch(1)
    assert a.epoch == 1 and not _equal(a[1], b[1])
    b.set_epoch(1)
    assert _equal(a[1], b[1])
    assert not _equal(a[1], CellDataset(cache, "train", patch_size=40, augment=True, seed=8)[1])


def test_global_random_state_does_not_matter(cache: Path) -> None:
    ds = CellDataset(cache, "train", patch_size=40, augment=True, seed=3)
    np.random.seed(1)
    torch.manual_seed(1)
    first = ds[0]
    np.random.seed(999)
    torch.manual_seed(999)
    np.random.random(17)
    assert _equal(first, ds[0])


def _items_in_child(dataset_bytes: bytes, epoch: int, indices: list[int]) -> list[dict[str, torch.Tensor]]:
    dataset = pickle.loads(dataset_bytes)
    dataset.set_epoch(epoch)
    return [{k: v.clone() for k, v in dataset[i].items()} for i in indices]


def test_bit_identical_in_a_spawned_process_and_in_persistent_workers(cache: Path) -> None:
    ds = CellDataset(cache, "train", patch_size=40, augment=True, seed=5)
    indices = list(range(len(ds)))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        child = pool.apply(_items_in_child, (pickle.dumps(ds), 2, indices))
    ds.set_epoch(2)
    for i in indices:
        assert _equal(child[i], ds[i]), f"index {i} differs between processes"
    # DataLoader workers (spawned, persistent): set_epoch in the main process must reach them
    loader = DataLoader(
        ds, batch_size=2, num_workers=2, multiprocessing_context="spawn", persistent_workers=True
    )
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        batches = list(loader)
        local = [ds[i] for i in indices]
        got = torch.cat([b["image"] for b in batches])
        assert torch.equal(got, torch.stack([x["image"] for x in local])), f"epoch {epoch}"
        assert torch.equal(torch.cat([b["hv"] for b in batches]), torch.stack([x["hv"] for x in local]))


def test_hv_is_recomputed_after_a_flip(cache: Path) -> None:
    flip = AugmentConfig(**(OFF | {"flip": 1.0}))  # horizontal and vertical flip, always
    ds = CellDataset(cache, "train", patch_size=None, augment=True, seed=0, augment_config=flip)
    plain = CellDataset(cache, "train", patch_size=None, augment=False, seed=0)
    flipped, original = ds[0], plain[0]
    np.testing.assert_array_equal(
        flipped["inst_map"].numpy() > 0, original["inst_map"].numpy()[::-1, ::-1] > 0
    )
    # warping the old HV map would keep its signs; the correct map has them reversed along both axes
    np.testing.assert_array_equal(flipped["hv"].numpy(), -original["hv"].numpy()[:, ::-1, ::-1])


@pytest.mark.parametrize("index", range(4))
def test_hv_signs_agree_with_instance_geometry_under_default_augmentation(cache: Path, index: int) -> None:
    ds = CellDataset(cache, "train", patch_size=48, augment=True, seed=index)
    item = ds[index]
    inst, hv = item["inst_map"].numpy(), item["hv"].numpy()
    yy, xx = np.mgrid[0 : inst.shape[0], 0 : inst.shape[1]]
    uncut = np.unique(inst[_uncut(inst)])
    for i in uncut[uncut > 0]:
        m = inst == i
        dx, dy = xx[m] - xx[m].mean(), yy[m] - yy[m].mean()
        assert np.all(np.sign(hv[0][m][np.abs(dx) > 1e-9]) == np.sign(dx[np.abs(dx) > 1e-9]))
        assert np.all(np.sign(hv[1][m][np.abs(dy) > 1e-9]) == np.sign(dy[np.abs(dy) > 1e-9]))


def test_small_images_are_padded_and_the_padding_ignored(cache: Path) -> None:
    ds = CellDataset(cache, "train", patch_size=96, augment=False, seed=0)
    item, raw = ds[0], ds.load(0)
    assert item["image"].shape == (3, 96, 96)
    ignore = item["ignore"].numpy()
    assert ignore[:16].all() and ignore[-16:].all() and ignore[:, :16].all() and ignore[:, -16:].all()
    assert not ignore[16:80, 16:80].any()
    assert (item["inst_map"].numpy()[ignore] == 0).all() and (item["nc"].numpy()[ignore] == 0).all()
    image = denormalize_image(item["image"])
    np.testing.assert_array_equal(image[16:80, 16:80], raw["image"])
    np.testing.assert_array_equal(
        image[15, 16:80], raw["image"][1]
    )  # reflect padding mirrors row 1 above row 0
    augmented = CellDataset(cache, "train", patch_size=96, augment=True, seed=0)[0]
    assert augmented["image"].shape == (3, 96, 96) and augmented["ignore"].float().mean() > 0.3


def test_dataset_pickles_light(cache: Path) -> None:
    ds = CellDataset(cache, "train", patch_size=32, augment=True, seed=1)
    clone = pickle.loads(pickle.dumps(ds))
    assert _equal(clone[0], ds[0])
    assert len(pickle.dumps(ds)) < 5_000  # paths, names and numbers: no images, no pipeline


def test_empty_split_is_a_clear_error(cache: Path) -> None:
    with pytest.raises(ValueError, match="split 'test' of the cache .* is empty"):
        CellDataset(cache, "test", patch_size=32, augment=False, seed=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "training"}, "split must be one of"),
        ({"patch_size": 0}, "patch_size"),
        ({"seed": -1}, "seed"),
        ({"class_names": ["RBC", "WBC"]}, "class_names"),
    ],
)
def test_bad_arguments(cache: Path, kwargs: dict, match: str) -> None:
    args = {"split": "train", "patch_size": 32, "augment": False, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        CellDataset(cache, **args)


def test_index_and_epoch_errors(cache: Path) -> None:
    ds = CellDataset(
        cache, "val", patch_size=32, augment=False, seed=0, class_names=["RBC", "WBC", "Platelet"]
    )
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


def _weights_cache(root: Path, cache: Path, drop_image_counts: bool = False) -> CellDataset:
    """Three train images: A with four 'common' cells, B with four 'common' and one 'rare', C empty."""
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("common\nrare\n")
    layout = {"A": [1, 1, 1, 1], "B": [1, 1, 1, 1, 2], "C": []}
    for split in ("train", "val", "test"):
        (root / split).mkdir()
        for name, classes in layout.items() if split == "train" else [(f"{split}0", [1])]:
            inst = np.zeros((16, 48), np.int32)
            types = np.zeros((16, 48), np.int32)
            for k, c in enumerate(classes, start=1):
                inst[2:6, 8 * k - 6 : 8 * k - 2] = k
                types[2:6, 8 * k - 6 : 8 * k - 2] = c
            Image.fromarray(np.zeros((16, 48, 3), np.uint8)).save(root / split / f"{name}.png")
            np.save(root / split / f"{name}.npy", {"inst_map": inst, "type_map": types})
    prepare_dataset("folder", root, cache, progress=False)
    if drop_image_counts:
        manifest = load_manifest(cache)
        del manifest["image_counts"]
        (cache / MANIFEST).write_text(__import__("json").dumps(manifest))
    return CellDataset(cache, "train", patch_size=None, augment=False, seed=0)


@pytest.mark.parametrize("drop_image_counts", [False, True])
def test_sample_weights_oversample_rare_classes(tmp_path: Path, drop_image_counts: bool) -> None:
    ds = _weights_cache(tmp_path / "src", tmp_path / "cache", drop_image_counts)
    assert ds.names == ["A", "B", "C"]
    np.testing.assert_array_equal(ds.class_counts_per_image(), [[4, 0], [4, 1], [0, 0]])
    # class shares 8/9 and 1/9: A -> 9/8, B -> max(9/8, 9) = 9, C (empty) -> 1; then normalised
    raw = np.array([9 / 8, 9.0, 1.0])
    np.testing.assert_allclose(sample_weights(ds), raw / raw.sum())
    np.testing.assert_allclose(sample_weights(ds, power=0.5), np.sqrt(raw) / np.sqrt(raw).sum())
    np.testing.assert_allclose(sample_weights(ds, power=0.0), [1 / 3] * 3)
    with pytest.raises(ValueError, match="power"):
        sample_weights(ds, power=-1)


def test_sample_weights_without_any_instance(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / "x.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / split / "x_mask.png")
    prepare_dataset("folder", root, tmp_path / "cache", progress=False)
    ds = CellDataset(tmp_path / "cache", "train", patch_size=None, augment=False, seed=0)
    np.testing.assert_allclose(sample_weights(ds), [1.0])


# ----------------------------------------------------------------------------- issue 16: colour, scale, class weights
def test_colour_and_stain_augmentation_leave_hv_targets_unchanged(cache: Path) -> None:
    plain = CellDataset(cache, "train", patch_size=48, augment=True, seed=3, augment_config=AugmentConfig(**OFF))
    colour = CellDataset(cache, "train", patch_size=48, augment=True, seed=3,
                         augment_config=AugmentConfig(**(OFF | {"colour": 1.0, "hed": 1.0, "hed_scale": 0.3})))
    for i in range(len(plain)):
        a, b = plain[i], colour[i]
        assert not torch.equal(a["image"], b["image"]), "the colour transforms did run"
        for key in (Branch.HV.value, Branch.NP.value, Branch.NC.value, "inst_map", "ignore"):
            assert torch.equal(a[key], b[key]), key


def test_input_scale_resizes_images_and_labels_before_cropping(cache: Path) -> None:
    full = CellDataset(cache, "val", patch_size=None, augment=False, seed=0)
    half = CellDataset(cache, "val", patch_size=None, augment=False, seed=0, scale=0.5)
    a, b = full[0], half[0]
    assert b["image"].shape == (3, 32, 32) and b["inst_map"].shape == (32, 32)
    # HV targets are those of the resized instances (not resampled full-resolution targets)
    np.testing.assert_array_equal(b[Branch.HV.value].numpy(), hv_maps(b["inst_map"].numpy()))
    assert int(b["inst_map"].max()) >= int(a["inst_map"].max()) - 2  # small objects may vanish, most survive
    crops = CellDataset(cache, "train", patch_size=24, augment=True, seed=0, scale=0.5)
    assert crops[0]["image"].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="INPUT_SCALE"):
        CellDataset(cache, "train", patch_size=24, augment=False, seed=0, scale=0.0)


def test_class_weights_from_counts() -> None:
    from cellseg.data.dataset import class_weights_from_counts

    assert class_weights_from_counts(np.array([[160, 10, 0], [0, 0, 0]])) == [1.0, 1.0, 4.0, 1.0]
    assert class_weights_from_counts(np.array([10000, 1])) == [1.0, 1.0, 10.0]  # capped
    assert class_weights_from_counts(np.zeros((3, 2))) == [1.0, 1.0, 1.0]


def _one_image_cache(tmp_path: Path, class_names: list[str], labels: dict[str, np.ndarray]) -> Path:
    """A folder dataset whose train, val and test splits each hold one black image with ``labels`` (inst_map,
    type_map[, ignore_mask]), prepared into a cache; returns the cache folder."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in class_names))
    h, w = labels["inst_map"].shape
    for split in ("train", "val", "test"):
        (root / split).mkdir()
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / split / f"{split}0.png")
        np.save(root / split / f"{split}0.npy", labels)
    prepare_dataset("folder", root, tmp_path / "cache", progress=False)
    return tmp_path / "cache"


def test_default_class_weights_come_from_pixel_frequencies(tmp_path: Path) -> None:
    """One big and one small cell per image (equal instance counts, 100x fewer pixels in the small class): pixel
    counts, which the per-pixel NC loss sees, give the small class sqrt(100) = 10; instance counts would give 1."""
    from cellseg.data.dataset import class_weights_from_counts

    inst = np.zeros((32, 32), np.int32)
    inst[0:20, 0:20], inst[28:30, 28:30] = 1, 2  # 400 px and 4 px
    _one_image_cache(tmp_path, ["big", "small"], {"inst_map": inst, "type_map": inst.copy()})
    ds = CellDataset(tmp_path / "cache", "train", patch_size=None, augment=False, seed=0)
    assert ds.class_pixel_counts().tolist() == [400, 4]
    assert ds.class_counts_per_image().sum(0).tolist() == [1, 1]
    assert class_weights_from_counts(ds.class_pixel_counts()) == [1.0, 1.0, 10.0]


def test_unlabelled_foreground_is_ignored_or_trained_as_background(tmp_path: Path) -> None:
    """IGNORE_UNLABELLED: the cache's ignore_mask (foreground no label claims) is excluded from the loss by default;
    with False it is plain background inside the image, while the padding outside the image stays ignored."""
    inst = np.zeros((32, 32), np.int32)
    inst[2:10, 2:10] = 1
    ignore = np.zeros((32, 32), bool)
    ignore[20:28, 20:28] = True  # an unlabelled cell
    _one_image_cache(tmp_path, ["cell"], {"inst_map": inst, "type_map": inst.copy(), "ignore_mask": ignore})
    kept = CellDataset(tmp_path / "cache", "train", patch_size=None, augment=False, seed=0)[0]["ignore"]
    assert kept[20:28, 20:28].all() and kept.sum() == 64
    trained = CellDataset(tmp_path / "cache", "train", patch_size=None, augment=False, seed=0,
                          ignore_unlabelled=False)[0]["ignore"]
    assert not trained.any()
    padded = CellDataset(tmp_path / "cache", "train", patch_size=48, augment=False, seed=0, ignore_unlabelled=False)
    item = padded[0]["ignore"]  # a 48 px window over a 32 px image: the 8 px border outside it is ignored
    assert item[:8].all() and not item[8:40, 8:40].any()


def test_rare_crops_centre_half_the_crops_on_the_rarest_class(tmp_path: Path) -> None:
    """OVERSAMPLE_RARE's crop rule: a 4 px 'rare' cell in the corner of a 128 px image with large 'common' cells is in
    about 1 of 12 uniformly placed 32 px crops, but in at least half of the crops when rare_crops is on."""
    inst = np.zeros((128, 128), np.int32)
    types = np.zeros((128, 128), np.int32)
    for k, (y, x) in enumerate([(40, 40), (40, 90), (90, 40), (90, 90)], start=1):
        inst[y - 10:y + 10, x - 10:x + 10], types[y - 10:y + 10, x - 10:x + 10] = k, 1
    inst[120:124, 4:8], types[120:124, 4:8] = 5, 2
    _one_image_cache(tmp_path, ["common", "rare"], {"inst_map": inst, "type_map": types})

    def share_with_rare(rare_crops: bool) -> float:
        ds = CellDataset(tmp_path / "cache", "train", patch_size=32, augment=True, seed=0, rare_crops=rare_crops)
        hits = []
        for epoch in range(60):
            ds.set_epoch(epoch)
            hits.append(bool((ds[0]["nc"] == 2).any()))
        return float(np.mean(hits))

    uniform, focused = share_with_rare(False), share_with_rare(True)
    assert uniform < 0.25 and focused >= 0.45, (uniform, focused)


def test_rare_crops_fall_back_to_a_random_crop_on_an_image_without_cells(tmp_path: Path) -> None:
    """No labelled cell to centre on: the crop stays the random one (before the fallback, np.argmax of an empty
    array would raise here)."""
    empty = np.zeros((64, 64), np.int32)
    cache = _one_image_cache(tmp_path, ["cell"], {"inst_map": empty, "type_map": empty.copy()})
    focused = CellDataset(cache, "train", patch_size=32, augment=True, seed=3, rare_crops=True)
    for epoch in range(6):
        focused.set_epoch(epoch)
        item = focused[0]
        assert item["image"].shape == (3, 32, 32) and not item["np"].any()
