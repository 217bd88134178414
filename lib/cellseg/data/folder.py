"""The ``folder`` dataset: images with label files in plain folders (and the layout of the prepared cache itself).

Layout of ``DATA_ROOT``::

    DATA_ROOT/
      classes.txt               optional: class names, one per line (line 1 -> type id 1). Without it the names come
                                from manifest.json ("class_names", so a prepared cache is itself a folder dataset),
                                else instance-only data gets the single class "cell".
      classes.csv               optional, for image + mask pairs: header image,instance_id,class; image = name (file
                                stem), class = a name from the class list or a type id 1..C. May also sit in a split
                                folder.
      train/ val/ test/         optional split folders. Without them the images directly in DATA_ROOT are split by
                                seed (val_fraction, test_fraction); with them all three must hold images.
        <name>.png|.jpg|.jpeg|.tif|.tiff     the RGB image (grey and 16-bit are converted)
        <name>.npy              labels, HoVer-Net/CellViT style: np.save(path, {"inst_map": (H, W) ids,
                                "type_map": (H, W) class ids[, "ignore_mask": (H, W) bool]}); read with a restricted
                                unpickler (cellseg.data.safe_pickle)
        or <name>_mask.png|.tif instance ids, 0 = background; classes from classes.csv (or the single class)

An image with both a ``.npy`` and a ``_mask`` file uses the ``.npy``; an image with neither is a problem. Masks must be
lossless (PNG/TIFF/NPY): a JPEG mask is an error naming the file (JPEG blurs ids at every edge).

Without split folders, ``group_key`` keeps the tiles of one slide or patient in one split: ``prefix:SEP`` groups by
the file name up to the first ``SEP``, ``groups.csv`` (``name,group`` rows in DATA_ROOT) names each image's group.
"""

from __future__ import annotations

import csv
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.data.files import IMAGE_SUFFIXES, read_image, read_mask
from cellseg.data.records import DatasetSource, Record, grouped_split, seeded_split, split_of
from cellseg.data.safe_pickle import load_label_dict
from cellseg.data.sample import SPLITS
from cellseg.data.validate import DataValidationError, Problem

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"


def _class_names(root: Path, problems: list[Problem]) -> list[str] | None:
    txt = root / "classes.txt"
    if txt.exists():
        names = [line.strip() for line in txt.read_text().splitlines() if line.strip()]
        if not names:
            problems.append(Problem(str(txt), "empty: list the class names, one per line"))
        return names
    manifest = root / "manifest.json"
    if manifest.exists():
        try:
            names = json.loads(manifest.read_text())["class_names"]
        except (ValueError, KeyError, TypeError) as e:
            problems.append(Problem(str(manifest), f"unreadable or without 'class_names' ({e})"))
            return None
        return [str(n) for n in names]
    return None


def _images_in(folder: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or path.stem.endswith(MASK_SUFFIX):
            continue
        if path.stem in images:
            log.warning("%s: two images named '%s'; using %s", folder, path.stem, images[path.stem].name)
            continue
        images[path.stem] = path
    return images


def _read_classes_csv(
    path: Path, class_names: list[str], problems: list[Problem]
) -> dict[str, dict[int, int]]:
    """``{image name: {instance id: type id}}`` from a classes.csv."""
    lookup = {name: i + 1 for i, name in enumerate(class_names)}
    table: dict[str, dict[int, int]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "instance_id", "class"} <= set(reader.fieldnames):
            problems.append(
                Problem(str(path), f"header must be image,instance_id,class, got {reader.fieldnames}")
            )
            return table
        for line, row in enumerate(reader, start=2):
            name = Path(row["image"].strip()).stem
            cls = row["class"].strip()
            try:
                inst_id = int(row["instance_id"])
            except ValueError:
                problems.append(
                    Problem(str(path), f"line {line}: instance_id '{row['instance_id']}' is not an integer")
                )
                continue
            if cls in lookup:
                type_id = lookup[cls]
            elif cls.isdigit() and 1 <= int(cls) <= len(class_names):
                type_id = int(cls)
            else:
                problems.append(
                    Problem(
                        str(path),
                        f"line {line}: unknown class '{cls}'; allowed: {class_names} or 1..{len(class_names)}",
                    )
                )
                continue
            table.setdefault(name, {})[inst_id] = type_id
    return table


def _load_npy_pair(image_path: Path, label_path: Path, name: str) -> dict[str, Any]:
    labels = load_label_dict(label_path)
    raw: dict[str, Any] = {
        "image": read_image(image_path),
        "inst_map": labels.get("inst_map"),
        "type_map": labels.get("type_map"),
        "meta": {
            **dict(labels.get("meta") or {}),
            "name": name,
            "source": str(image_path),
            "labels": str(label_path),
        },
    }
    if labels.get("ignore_mask") is not None:
        raw["ignore_mask"] = labels["ignore_mask"]
    return raw


def _load_mask_pair(
    image_path: Path, mask_path: Path, name: str, classes: dict[int, int] | None
) -> dict[str, Any]:
    problems: list[Problem] = []
    try:
        image = read_image(image_path)
    except ValueError as e:
        problems.append(Problem(str(image_path), str(e).removeprefix(f"{image_path}: ")))
        image = None
    try:
        inst = read_mask(mask_path)
    except ValueError as e:
        problems.append(Problem(str(mask_path), str(e).removeprefix(f"{mask_path}: ")))
        inst = None
    if problems:
        raise DataValidationError(problems, name)
    type_map = None
    if classes is not None and np.issubdtype(inst.dtype, np.integer) and inst.min(initial=0) >= 0:
        lut = np.zeros(int(inst.max(initial=0)) + 1, dtype=np.int64)
        for inst_id, type_id in classes.items():
            if 0 < inst_id < lut.size:
                lut[inst_id] = type_id
        type_map = lut[inst]
    return {
        "image": image,
        "inst_map": inst,
        "type_map": type_map,
        "meta": {"name": name, "source": str(image_path), "labels": str(mask_path)},
    }


GROUPS_CSV = "groups.csv"


def image_groups(root: Path, names: list[str], group_key: str, problems: list[Problem]) -> dict[str, str] | None:
    """``name -> group`` by ``group_key``: ``prefix:SEP`` (the name up to the first SEP) or ``groups.csv``.

    ``groups.csv`` in DATA_ROOT has the header ``name,group`` (name = image file stem). Every image needs a group;
    missing ones are problems naming the file. Returns None without a group key.

    Raises:
        ValueError: an unknown group key, naming GROUP_KEY and the allowed forms.
    """
    if not group_key:
        return None
    if group_key.startswith("prefix:") and len(group_key) > len("prefix:"):
        sep = group_key[len("prefix:") :]
        return {n: n.split(sep, 1)[0] for n in names}
    if group_key == GROUPS_CSV:
        path = root / GROUPS_CSV
        if not path.is_file():
            problems.append(Problem(str(path), "missing: GROUP_KEY='groups.csv' needs this file (header name,group)"))
            return None
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and not {"name", "group"} <= set(rows[0]):
            problems.append(Problem(str(path), f"header must be 'name,group', got {list(rows[0])}"))
            return None
        table = {r["name"].strip(): r["group"].strip() for r in rows}
        missing = sorted(set(names) - set(table))
        if missing:
            problems.append(
                Problem(str(path), f"{len(missing)} image(s) have no group, e.g. {missing[:3]}; add a row for each")
            )
            return None
        return {n: table[n] for n in names}
    raise ValueError(
        f"GROUP_KEY must be '' (no groups), 'prefix:SEP' (e.g. 'prefix:_' groups slide1_tile3 under slide1) or "
        f"'{GROUPS_CSV}' (DATA_ROOT/{GROUPS_CSV} with rows name,group), got {group_key!r}. Set it in "
        f"notebooks/00_prepare_data.ipynb's parameters cell or with -p GROUP_KEY ..."
    )


def folder_source(
    data_root: str | Path | None, *, seed: int, val_fraction: float, test_fraction: float, group_key: str = ""
) -> DatasetSource:
    """List a ``folder`` dataset (module docstring for the layout)."""
    if data_root is None:
        raise ValueError(
            "DATA_ROOT is required for DATASET='folder': set it to the dataset folder (see cellseg.data.folder)"
        )
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"DATA_ROOT={root} does not exist or is not a folder; point DATA_ROOT at the dataset"
        )
    problems: list[Problem] = []
    class_names = _class_names(root, problems)
    split_dirs = [root / s for s in SPLITS if (root / s).is_dir()]
    if split_dirs:
        folders = {s: root / s for s in SPLITS}
        assigned: dict[str, str] | None = None
        loose = _images_in(root)
        if loose:
            log.warning(
                "%s: split folders exist, so the %d images directly in it are not used", root, len(loose)
            )
    else:
        folders = {"flat": root}
        names = list(_images_in(root))
        groups = image_groups(root, names, group_key, problems)
        # with groups, every tile of a slide or patient lands in the same split (no leakage through neighbours)
        split = grouped_split(groups, val_fraction, test_fraction, seed) if groups else None
        assigned = split_of(split or seeded_split(names, val_fraction, test_fraction, seed))
    records: list[Record] = []

    def read_csv(path: Path) -> dict[str, dict[int, int]] | None:
        if not path.exists():
            return None
        if class_names is None:
            return {}  # reported below as a missing classes.txt
        return _read_classes_csv(path, class_names, problems)

    csv_root = read_csv(root / "classes.csv")
    needs_names = False
    for key, folder in folders.items():
        images = _images_in(folder) if folder.is_dir() else {}
        if key != "flat" and not images:
            problems.append(
                Problem(
                    str(folder),
                    f"empty split '{key}': no images; add images there or remove the split "
                    f"folders to get a seeded split",
                )
            )
        table = (read_csv(folder / "classes.csv") if key != "flat" else None) or csv_root
        for name, image_path in images.items():
            split = assigned[name] if assigned is not None else key
            label_path = folder / f"{name}.npy"
            mask_path = next(
                (p for p in (folder / f"{name}{MASK_SUFFIX}{s}" for s in IMAGE_SUFFIXES) if p.exists()), None
            )
            if label_path.exists():
                needs_names = True
                load = partial(_load_npy_pair, image_path, label_path, name)
            elif mask_path is not None:
                classes = table.get(name, {}) if table is not None else None
                needs_names = needs_names or table is not None
                load = partial(_load_mask_pair, image_path, mask_path, name, classes)
            else:
                problems.append(
                    Problem(
                        str(image_path),
                        f"no labels: expected {name}.npy or {name}{MASK_SUFFIX}.png/.tif beside it",
                    )
                )
                continue
            records.append(Record(split, name, str(image_path), load))
    if class_names is None:
        if needs_names:
            problems.append(
                Problem(
                    str(root / "classes.txt"),
                    "missing: the labels carry class ids, so name the classes in "
                    "classes.txt, one per line (line 1 = type id 1)",
                )
            )
        class_names = ["cell"]
    return DatasetSource("folder", class_names, records, problems)
