"""Readers of the public nucleus datasets: PanNuke and CoNSeP.

- PanNuke (Gamper et al., ECDP 2019 / arXiv 2003.10778): fold folders (``Fold 1``, ``fold1``, ``fold_1``...) each with
  ``images.npy`` (N, 256, 256, 3), ``masks.npy`` (N, 256, 256, 6: one instance channel per class, background last) and
  ``types.npy`` (tissue name per image), possibly nested as in the official archive
  (``Fold 1/images/fold1/images.npy``). Channels 0..4 are Neoplastic, Inflammatory, Connective, Dead, Epithelial; an
  instance id is local to its channel, so (channel, id) pairs become instances; where channels overlap, the later
  channel wins. Arrays are memory-mapped, never loaded whole.
- CoNSeP (Graham et al., HoVer-Net, 2019): ``Train/Images/*.png`` with ``Train/Labels/*.mat`` (``inst_map``,
  ``type_map``, ``inst_type``) and the same under ``Test/``. HoVer-Net merges classes 3 & 4 into epithelial and
  5, 6, 7 into spindle-shaped (``consep_merge_classes``); the validation split is carved from Train by fraction.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from cellseg.data.files import read_image
from cellseg.data.records import DatasetSource, Record, seeded_split, split_of
from cellseg.data.safe_pickle import load_npy
from cellseg.data.validate import Problem

log = logging.getLogger(__name__)

PANNUKE_CLASSES: list[str] = ["Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"]
PANNUKE_FOLD_SPLITS: dict[int, str] = {1: "train", 2: "val", 3: "test"}
CONSEP_CLASSES: list[str] = [
    "Other",
    "Inflammatory",
    "Healthy epithelial",
    "Dysplastic/malignant epithelial",
    "Fibroblast",
    "Muscle",
    "Endothelial",
]
CONSEP_MERGED_CLASSES: list[str] = ["Other", "Inflammatory", "Epithelial", "Spindle-shaped"]
CONSEP_MERGE_LUT = np.array(
    [0, 1, 2, 3, 3, 4, 4, 4], dtype=np.int64
)  # HoVer-Net's merge, index = original id
_FOLD_RE = re.compile(r"^fold[\s_-]*(\d+)$", re.IGNORECASE)


def _open_array(path: Path) -> np.ndarray:
    """Memory-map a plain ``.npy``; object arrays go through the restricted unpickler."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        return np.asarray(load_npy(path))


def pannuke_masks_to_maps(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PanNuke's per-class instance channels to an instance map and a type map.

    Shape: (H, W, 6) -> (H, W) int32, (H, W) int32.
    """
    h, w = masks.shape[:2]
    key = np.zeros((h, w), dtype=np.int64)
    type_map = np.zeros((h, w), dtype=np.int32)
    channels = np.asarray(masks[..., : len(PANNUKE_CLASSES)])
    if not np.all(channels == np.round(channels)) or channels.min(initial=0) < 0:
        raise ValueError("PanNuke masks must hold non-negative integer instance ids")
    channels = channels.astype(np.int64)
    stride = int(channels.max(initial=0)) + 1
    for c in range(channels.shape[2]):
        on = channels[..., c] > 0
        key[on] = c * stride + channels[..., c][on]
        type_map[on] = c + 1
    _, inverse = np.unique(key, return_inverse=True)
    inst = inverse.reshape(h, w).astype(np.int32)
    if not (key == 0).any():
        inst += 1  # no background pixel: the smallest key is an instance, not background
    return inst, type_map


def _load_pannuke(images: Path, masks: Path, index: int, tissue: str, name: str) -> dict[str, Any]:
    image = np.asarray(_open_array(images)[index])
    mask = np.asarray(_open_array(masks)[index])
    if mask.ndim != 3 or mask.shape[2] != len(PANNUKE_CLASSES) + 1:
        raise ValueError(
            f"{masks}: image {index} has masks of shape {mask.shape}; PanNuke masks are (H, W, 6)"
        )
    if mask.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"{masks}: image {index} masks are {mask.shape[0]}x{mask.shape[1]} but the image is "
            f"{image.shape[0]}x{image.shape[1]}; masks must have the image's size"
        )
    try:
        inst, type_map = pannuke_masks_to_maps(mask)
    except ValueError as e:
        raise ValueError(f"{masks}: image {index}: {e}") from e
    return {
        "image": image,
        "inst_map": inst,
        "type_map": type_map,
        "meta": {"name": name, "source": f"{images}[{index}]", "tissue": tissue},
    }


def pannuke_source(
    data_root: str | Path | None, *, fold_splits: dict[int, str] | None = None
) -> DatasetSource:
    """List PanNuke images of the folds in ``fold_splits`` (default fold 1 train, 2 val, 3 test)."""
    fold_splits = dict(fold_splits or PANNUKE_FOLD_SPLITS)
    layout = (
        "for DATASET='pannuke' DATA_ROOT must hold the fold folders 'Fold 1', 'Fold 2', 'Fold 3' from "
        "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke, each with images.npy, masks.npy and types.npy"
    )
    if data_root is None or not Path(data_root).is_dir():
        raise FileNotFoundError(f"DATA_ROOT={data_root} is not a folder; {layout}")
    root = Path(data_root)
    folds = {
        int(m.group(1)): p for p in sorted(root.iterdir()) if p.is_dir() and (m := _FOLD_RE.match(p.name))
    }
    if not folds:
        raise FileNotFoundError(f"DATA_ROOT={root} has no fold folders; {layout}")
    problems: list[Problem] = []
    records: list[Record] = []
    tissues: dict[str, str] = {}
    for fold, split in sorted(fold_splits.items()):
        if fold not in folds:
            problems.append(
                Problem(
                    str(root), f"no folder for fold {fold} (split '{split}'); found folds {sorted(folds)}"
                )
            )
            continue
        files = {}
        for stem in ("images", "masks", "types"):
            found = sorted(folds[fold].rglob(f"{stem}.npy"))
            if not found:
                problems.append(Problem(str(folds[fold]), f"no {stem}.npy in the fold folder"))
            else:
                files[stem] = found[0]
        if len(files) < 3:
            continue
        try:
            n_images = len(_open_array(files["images"]))
            n_masks = len(_open_array(files["masks"]))
            types = [str(t) for t in np.asarray(_open_array(files["types"])).reshape(-1)]
        except (ValueError, OSError) as e:
            problems.append(Problem(str(folds[fold]), f"unreadable fold arrays ({e})"))
            continue
        if not n_images == n_masks == len(types):
            problems.append(
                Problem(
                    str(folds[fold]),
                    f"images.npy has {n_images} images, masks.npy {n_masks}, types.npy "
                    f"{len(types)}; they must match",
                )
            )
            continue
        for i in range(n_images):
            name = f"fold{fold}_{i:05d}"
            tissues[f"{split}/{name}"] = types[i]
            load = partial(_load_pannuke, files["images"], files["masks"], i, types[i], name)
            records.append(Record(split, name, f"{files['images']}[{i}]", load))
    return DatasetSource("pannuke", list(PANNUKE_CLASSES), records, problems, {"tissues": tissues})


def _load_consep(image_path: Path, mat_path: Path, name: str, merge: bool) -> dict[str, Any]:
    try:
        mat = scipy.io.loadmat(mat_path)
    except Exception as e:  # scipy raises ValueError, MatReadError, TypeError on broken files
        raise ValueError(f"{mat_path}: unreadable .mat file ({type(e).__name__}: {e})") from e
    for key in ("inst_map", "type_map"):
        if key not in mat:
            raise ValueError(
                f"{mat_path}: no '{key}' (keys: {sorted(k for k in mat if not k.startswith('__'))})"
            )
    type_map = np.asarray(mat["type_map"])
    if merge:
        if (
            not np.issubdtype(type_map.dtype, np.number)
            or type_map.min(initial=0) < 0
            or type_map.max(initial=0) > 7
        ):
            bad = sorted({int(v) for v in np.unique(type_map) if not 0 <= v <= 7})
            raise ValueError(
                f"{mat_path}: unknown class id(s) {bad} in type_map; CoNSeP uses 0 (background) and 1..7"
            )
        type_map = CONSEP_MERGE_LUT[np.round(type_map).astype(np.int64)]
    return {
        "image": read_image(image_path),
        "inst_map": mat["inst_map"],
        "type_map": type_map,
        "meta": {"name": name, "source": str(image_path), "labels": str(mat_path)},
    }


def consep_source(
    data_root: str | Path | None, *, seed: int, val_fraction: float, merge_classes: bool = True
) -> DatasetSource:
    """List CoNSeP: Test/ is the test split, Train/ is split into train and val by ``val_fraction``."""
    root = Path(data_root) if data_root is not None else None
    if root is None or not (root / "Train" / "Images").is_dir():
        raise FileNotFoundError(
            f"DATA_ROOT={data_root} is not a CoNSeP folder: expected Train/Images/*.png, Train/Labels/*.mat, "
            f"Test/Images/*.png and Test/Labels/*.mat (HoVer-Net's layout of "
            f"https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet)"
        )
    problems: list[Problem] = []
    listed: dict[str, list[tuple[str, Path, Path]]] = {"Train": [], "Test": []}
    for part in listed:
        images = sorted((root / part / "Images").glob("*.png")) if (root / part / "Images").is_dir() else []
        if not images:
            problems.append(Problem(str(root / part / "Images"), f"no .png images in CoNSeP's {part}/Images"))
        for image_path in images:
            mat_path = root / part / "Labels" / f"{image_path.stem}.mat"
            if not mat_path.exists():
                problems.append(Problem(str(image_path), f"no label file {mat_path}"))
                continue
            listed[part].append((image_path.stem, image_path, mat_path))
    train_split = split_of(seeded_split([n for n, _, _ in listed["Train"]], val_fraction, 0.0, seed))
    records: list[Record] = []
    for part, items in listed.items():
        for name, image_path, mat_path in items:
            split = "test" if part == "Test" else train_split[name]
            load = partial(_load_consep, image_path, mat_path, name, merge_classes)
            records.append(Record(split, name, str(image_path), load))
    names = CONSEP_MERGED_CLASSES if merge_classes else CONSEP_CLASSES
    return DatasetSource("consep", list(names), records, problems)
