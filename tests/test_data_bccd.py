"""BCCD: boxes become instance masks (real images), degenerate boxes are reported, the download fallback explains itself."""

from __future__ import annotations

import hashlib
import json
import logging
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from cellseg.data import (
    DataValidationError,
    bccd,
    bccd_pin,
    load_manifest,
    load_sample,
    prepare_dataset,
    validate_dataset,
)
from cellseg.data.bccd import Box, box_instance_masks, parse_annotation

SUBSET = {
    "train": [
        "BloodImage_00000",
        "BloodImage_00001",
        "BloodImage_00003",
        "BloodImage_00338",
        "BloodImage_00343",
        "BloodImage_00026",
        "BloodImage_00038",
        "BloodImage_00100",
        "BloodImage_00198",
        "BloodImage_00231",
    ],
    "val": [
        "BloodImage_00033",
        "BloodImage_00045",
        "BloodImage_00143",
        "BloodImage_00397",
        "BloodImage_00398",
        "BloodImage_00037",  # nearly the same field as train's 00038
    ],
    "test": [
        "BloodImage_00046",
        "BloodImage_00063",
        "BloodImage_00344",
        "BloodImage_00366",
        "BloodImage_00364",
        "BloodImage_00284",  # one RBC annotated twice
    ],
}
CLASSES = ["RBC", "WBC", "Platelets"]


def _subset_root(real: Path, target: Path, splits: dict[str, list[str]] = SUBSET) -> Path:
    """A BCCD folder holding links to a few real images, with its own split lists."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (target / d).mkdir(parents=True)
    for split, names in splits.items():
        (target / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            for sub, ext in (("Annotations", "xml"), ("JPEGImages", "jpg")):
                link = target / sub / f"{name}.{ext}"
                if not link.exists():
                    link.symlink_to(real / sub / f"{name}.{ext}")
    return target


def _merged(boxes: list[tuple[int, int, int, int, int]]) -> list[tuple[int, int, int, int, int]]:
    """The test's own duplicate merge: a same-class pair with box IoU > 0.7 becomes its union, at the first's place."""
    out = list(boxes)
    for i in range(len(out)):
        for j in range(len(out) - 1, i, -1):
            a, b = out[i], out[j]
            iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
            if a[4] == b[4] and iw * ih > 0.7 * union:
                out[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]), a[4])
                del out[j]
    return out


def _valid_boxes(xml: Path) -> list[tuple[int, int, int, int, int]]:
    """The test's own reading of a VOC file: 0-based half-open boxes with positive size, clipped to 640x480."""
    out = []
    for obj in ET.parse(xml).getroot().iter("object"):
        b = obj.find("bndbox")
        x0, y0, x1, y1 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 > x0 and y1 > y0:
            out.append(
                (
                    max(int(x0) - 1, 0),
                    max(int(y0) - 1, 0),
                    min(int(x1), 640),
                    min(int(y1), 480),
                    CLASSES.index(obj.findtext("name").strip()) + 1,
                )
            )
    return out


@pytest.fixture(scope="module")
def prepared(bccd_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("bccd")
    root = _subset_root(bccd_root, tmp / "BCCD")
    prepare_dataset("bccd", root, tmp / "cache", qa_dir=tmp / "qa", qa_overlays=3, progress=False)
    return root, tmp / "cache", tmp / "qa"


def test_real_images_one_instance_per_valid_box_inside_it(prepared: tuple[Path, Path, Path]) -> None:
    root, cache, _ = prepared
    manifest = load_manifest(cache)
    assert manifest["class_names"] == CLASSES
    assert {s: manifest["splits"][s] for s in SUBSET} == {s: sorted(v) for s, v in SUBSET.items()}
    ignored = 0
    for split, names in SUBSET.items():
        for name in names:
            s = load_sample(cache, split, name)
            inst, types = s["inst_map"], s["type_map"]
            boxes = _merged(_valid_boxes(root / "Annotations" / f"{name}.xml"))
            assert [tuple(b) for b in s["meta"]["boxes"]] == boxes
            n = int(inst.max())
            assert n == len(boxes), name
            per_class = np.bincount([b[4] for b in boxes], minlength=4)[1:]
            found = np.bincount([int(types[inst == i][0]) for i in range(1, n + 1)], minlength=4)[1:]
            np.testing.assert_array_equal(found, per_class, err_msg=name)
            for i, (x0, y0, x1, y1, cls) in enumerate(boxes, start=1):
                ys, xs = np.nonzero(inst == i)
                assert ys.size > 0, f"{name}: box {i} has no pixel"
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, (
                    f"{name}: box {i}"
                )
                assert (types[ys, xs] == cls).all()
                assert ndi.label(inst == i)[1] == 1, f"{name}: instance {i} in pieces"
            assert not (s["ignore_mask"] & (inst > 0)).any()
            ignored += int(s["ignore_mask"].any())
            assert manifest["image_counts"][f"{split}/{name}"] == per_class.tolist()
    assert ignored >= 15  # unlabelled cells are common in BCCD: most images have an ignore region


def test_masks_follow_the_cells_not_just_the_boxes(prepared: tuple[Path, Path, Path]) -> None:
    _, cache, qa_dir = prepared
    qa = json.loads((qa_dir / "qa.json").read_text())
    rbc = qa["classes"]["RBC"]
    assert rbc["boxes"] == rbc["masks"] == rbc["instances"]
    assert 0.5 < rbc["fill_ratio"]["median"] < 0.9  # a disc fills pi/4 of its box, not all of it
    assert rbc["ellipse_fallbacks"] < 0.2 * rbc["boxes"]
    assert 0.05 < qa["ignore_pixel_fraction"] < 0.4
    s = load_sample(cache, "train", "BloodImage_00100")
    green = s["image"][..., 1].astype(float)
    assert green[s["inst_map"] > 0].mean() < green[(s["inst_map"] == 0) & ~s["ignore_mask"]].mean() - 20


def test_degenerate_boxes_are_reported_and_left_out(prepared: tuple[Path, Path, Path]) -> None:
    root, _, qa_dir = prepared
    qa = json.loads((qa_dir / "qa.json").read_text())
    listed = {
        (Path(d["file"]).name, d["xmin"], d["ymin"], d["xmax"], d["ymax"]) for d in qa["degenerate_boxes"]
    }
    assert listed == {
        ("BloodImage_00338.xml", "504", "337", "504", "337"),
        ("BloodImage_00343.xml", "181", "329", "181", "329"),
    }
    report = (qa_dir / "qa_report.md").read_text()
    assert "BloodImage_00338.xml" in report and "xmin=504" in report
    assert len(qa["overlays"]) == 3
    for png in qa["overlays"]:
        overlay = np.asarray(Image.open(qa_dir / png))
        assert overlay.shape[1] == 640 and overlay.shape[0] > 480


def test_degenerate_box_warning_names_file_and_coordinates(
    bccd_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    splits = {"train": ["BloodImage_00338"], "val": ["BloodImage_00001"], "test": ["BloodImage_00003"]}
    root = _subset_root(bccd_root, tmp_path / "BCCD", splits)
    with caplog.at_level(logging.WARNING, logger="cellseg.data.prepare"):
        prepare_dataset("bccd", root, tmp_path / "cache", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "BloodImage_00338.xml" in warnings[0] and "xmin=504 ymin=337 xmax=504 ymax=337" in warnings[0]
    image = np.zeros((480, 640, 3), np.uint8)
    boxes, degenerate, problems = parse_annotation(
        root / "Annotations" / "BloodImage_00338.xml", image.shape[:2]
    )
    assert (
        problems == []
        and len(degenerate) == 1
        and len(boxes) == len(_valid_boxes(root / "Annotations" / "BloodImage_00338.xml"))
    )


def _voc(path: Path, objects: list[tuple[str, str, str, str, str]]) -> None:
    body = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for n, a, b, c, d in objects
    )
    path.write_text(f"<annotation><size><width>64</width><height>48</height></size>{body}</annotation>")


def test_parse_annotation_clips_and_reports(tmp_path: Path) -> None:
    _voc(
        tmp_path / "a.xml",
        [
            ("RBC", "1", "1", "10", "10"),
            ("wbc ", "50", "40", "80", "60"),
            ("Platelets", "70", "10", "90", "20"),
            ("Monocyte", "1", "1", "5", "5"),
            ("RBC", "x", "1", "5", "5"),
            ("RBC", "9", "9", "3", "12"),
        ],
    )
    boxes, degenerate, problems = parse_annotation(tmp_path / "a.xml", (48, 64))
    assert [(b.x0, b.y0, b.x1, b.y1, b.cls) for b in boxes] == [(0, 0, 10, 10, 1), (49, 39, 64, 48, 2)]
    assert [d["reason"] for d in degenerate] == ["outside the image", "zero or negative size"]
    assert [p.message.split(" (")[0] for p in problems] == [
        "object 3 has unknown class 'Monocyte'; allowed: ['RBC', 'WBC', 'Platelets']",
        "object 4",
    ]
    (tmp_path / "b.xml").write_text("<annotation><object>")
    assert "unreadable VOC annotation" in parse_annotation(tmp_path / "b.xml", (48, 64))[2][0].message


def _discs_image() -> tuple[np.ndarray, list[Box]]:
    image = np.full((80, 120, 3), 210, np.uint8)
    yy, xx = np.mgrid[0:80, 0:120]
    for cy, cx in ((40, 30), (40, 52)):  # two touching RBC-like discs, radius 14
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 14**2] = (190, 140, 150)
    image[(yy - 40) ** 2 + (xx - 100) ** 2 <= 3**2] = (120, 80, 170)  # a platelet
    boxes = [Box(16, 26, 45, 55, 1), Box(38, 26, 67, 55, 1), Box(92, 32, 109, 49, 3), Box(80, 60, 100, 78, 1)]
    return image, boxes


def test_box_masks_on_a_drawn_image() -> None:
    image, boxes = _discs_image()
    inst, types, ignore, stats = box_instance_masks(image, boxes, min_fill=[0.25, 0.25, 0.02, 0.25])
    assert int(inst.max()) == 4
    assert stats["fallback"] == [False, False, False, True]  # the last box holds only background
    for i, b in enumerate(boxes, start=1):
        ys, xs = np.nonzero(inst == i)
        assert b.x0 <= xs.min() and xs.max() < b.x1 and b.y0 <= ys.min() and ys.max() < b.y1
    # the touching discs are split near where they meet (x = 41), each keeps most of its disc
    assert abs(int(np.nonzero(inst[40] == 1)[0].max()) - 41) <= 2
    assert 0.6 < stats["fill"][0] < 0.9 and 0.6 < stats["fill"][1] < 0.9
    assert (types[inst == 3] == 3).all() and not ignore.any()
    image[5:15, 100:110] = (190, 140, 150)  # a cell nobody boxed
    assert box_instance_masks(image, boxes)[2][5:15, 100:110].all()


def test_box_fully_covered_by_others_still_gets_pixels() -> None:
    image, _ = _discs_image()
    boxes = [
        Box(16, 26, 45, 55, 1),
        Box(29, 39, 31, 41, 3),
        Box(29, 39, 31, 41, 3),
    ]  # two identical tiny boxes
    inst, _, _, _ = box_instance_masks(image, boxes)
    assert sorted(np.unique(inst).tolist()) == [0, 1, 2, 3]
    assert box_instance_masks(image, [])[0].max() == 0


def test_missing_data_root_tries_the_download_and_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bccd, "BCCD_URL", "http://127.0.0.1:9/BCCD_Dataset-master.zip")  # refused at once
    target = tmp_path / "data" / "BCCD"
    with pytest.raises(FileNotFoundError) as info:
        prepare_dataset("bccd", target, tmp_path / "cache", progress=False)
    message = str(info.value)
    for fragment in (
        "https://github.com/Shenggan/BCCD_Dataset",
        str(target),
        "JPEGImages/BloodImage_00000.jpg",
        "ImageSets/Main/train.txt",
        "127.0.0.1:9",
    ):
        assert fragment in message
    assert not target.exists()


def _zip_subset(
    real: Path, zpath: Path, names: dict[str, list[str]], top: str = "BCCD_Dataset-master/BCCD"
) -> None:
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr(f"{top}/", "")
        for split, items in names.items():
            zf.writestr(f"{top}/ImageSets/Main/{split}.txt", "\n".join(items) + "\n")
            for name in items:
                zf.write(real / "Annotations" / f"{name}.xml", f"{top}/Annotations/{name}.xml")
                zf.write(real / "JPEGImages" / f"{name}.jpg", f"{top}/JPEGImages/{name}.jpg")
        zf.writestr("BCCD_Dataset-master/README.md", "readme")


def test_download_unpacks_the_archive(
    bccd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = {"train": ["BloodImage_00000"], "val": ["BloodImage_00001"], "test": ["BloodImage_00003"]}
    _zip_subset(bccd_root, tmp_path / "master.zip", names)
    monkeypatch.setattr(bccd, "BCCD_URL", (tmp_path / "master.zip").as_uri())
    # every unpacked file is checked against the pinned manifest: pin this subset's (the real one in test_data_fetch)
    with zipfile.ZipFile(tmp_path / "master.zip") as zf:
        zf.extractall(tmp_path / "subset")
    manifest = tmp_path / "subset.tsv"
    monkeypatch.setattr(bccd_pin, "BCCD_MANIFEST_SHA256",
                        bccd_pin.write_manifest(tmp_path / "subset" / "BCCD_Dataset-master" / "BCCD", manifest))
    monkeypatch.setattr(bccd_pin, "BCCD_MANIFEST", manifest)
    manifest = prepare_dataset("bccd", tmp_path / "data" / "BCCD", tmp_path / "cache", progress=False)
    assert (tmp_path / "data" / "BCCD" / "JPEGImages" / "BloodImage_00000.jpg").exists()
    assert manifest["splits"] == {k: v for k, v in names.items()}


@pytest.mark.parametrize("kind", ["no_bccd", "traversal"])
def test_bad_archives_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        if kind == "no_bccd":
            zf.writestr("something/else.txt", "x")
        else:
            zf.writestr("x/BCCD/../../evil.txt", "x")
    sha = hashlib.sha256((tmp_path / "a.zip").read_bytes()).hexdigest()  # a verified archive, refused for its content
    with pytest.raises(FileNotFoundError, match="could not be downloaded.*" + ("no BCCD/ folder" if kind == "no_bccd"
                                                                                else "unsafe path")):
        bccd.download_bccd(tmp_path / "out", url=(tmp_path / "a.zip").as_uri(), sha256=sha)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


def test_source_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DATA_ROOT is required"):
        prepare_dataset("bccd", None, tmp_path / "cache", progress=False)
    (tmp_path / "notbccd").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a BCCD folder"):
        prepare_dataset("bccd", tmp_path / "notbccd", tmp_path / "cache", progress=False)


def test_listing_problems(bccd_root: Path, tmp_path: Path) -> None:
    splits = {
        "train": ["BloodImage_00000", "BloodImage_00000", "BloodImage_99999"],
        "val": ["BloodImage_00001"],
        "test": ["BloodImage_00003"],
    }
    root = _subset_root(
        bccd_root,
        tmp_path / "BCCD",
        {k: [n for n in v if n != "BloodImage_99999"] for k, v in splits.items()},
    )
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(splits["train"]) + "\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n")
    (root / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(DataValidationError) as info:
        prepare_dataset("bccd", root, tmp_path / "cache", progress=False)
    messages = [str(p) for p in info.value.problems]
    assert any("'BloodImage_99999' is listed but" in m for m in messages)
    assert any("empty split 'val'" in m for m in messages)
    assert any("test.txt: missing" in m for m in messages)
    assert any("train/BloodImage_00000: two source images map to this cache name" in m for m in messages)


def test_unknown_class_in_a_real_layout(bccd_root: Path, tmp_path: Path) -> None:
    root = _subset_root(
        bccd_root,
        tmp_path / "BCCD",
        {"train": ["BloodImage_00000"], "val": ["BloodImage_00001"], "test": ["BloodImage_00003"]},
    )
    xml = root / "Annotations" / "BloodImage_00001.xml"
    text = xml.read_text().replace("<name>RBC</name>", "<name>Neutrophil</name>", 1)
    xml.unlink()
    xml.write_text(text)
    problems = validate_dataset("bccd", root)
    assert len(problems) == 1 and "unknown class 'Neutrophil'" in problems[0].message
    assert problems[0].file == str(xml)


BCCD_DUPLICATES = {  # the cells BCCD annotates twice (same class, box IoU 0.83-0.93), found by reading every XML
    "BloodImage_00013", "BloodImage_00020", "BloodImage_00100", "BloodImage_00104",
    "BloodImage_00251", "BloodImage_00284", "BloodImage_00331", "BloodImage_00403",
}  # fmt: skip


def test_every_duplicate_annotation_of_bccd_is_merged(bccd_root: Path) -> None:
    found = []
    for xml in sorted((bccd_root / "Annotations").glob("*.xml")):
        boxes, _, _ = parse_annotation(xml, (480, 640))
        merged, merges = bccd.merge_duplicate_boxes(boxes)
        assert len(merged) == len(boxes) - sum(len(m["voc_boxes"]) - 1 for m in merges)
        found += [(xml.stem, m) for m in merges]
    assert len(found) == 8 and {stem for stem, _ in found} == BCCD_DUPLICATES
    assert all(m["class"] == "RBC" and len(m["voc_boxes"]) == 2 and 0.8 < m["iou"] < 0.94 for _, m in found)
    assert sorted(m["iou"] for _, m in found)[1] > 0.9  # all but one are ~0.93, the "IoU ~ 0.93"


def test_duplicate_annotations_are_listed_and_become_one_cell(prepared: tuple[Path, Path, Path]) -> None:
    root, cache, qa_dir = prepared
    qa = json.loads((qa_dir / "qa.json").read_text())
    listed = {(d["split"], d["image"]): d for d in qa["duplicate_boxes"]}
    assert set(listed) == {("train", "BloodImage_00100"), ("test", "BloodImage_00284")}
    report = (qa_dir / "qa_report.md").read_text()
    assert "Cells annotated twice" in report and "BloodImage_00100.xml" in report and "BloodImage_00284.xml" in report
    for (split, name), d in listed.items():
        s = load_sample(cache, split, name)
        raw = _valid_boxes(root / "Annotations" / f"{name}.xml")
        assert int(s["inst_map"].max()) == len(raw) - 1, name  # the two boxes gave one instance
        x0, y0, x1, y1 = d["merged_box"]
        # exactly one instance is the cell: no second half-cell shares the merged box
        inside = np.bincount(s["inst_map"][y0:y1, x0:x1].ravel(), minlength=int(s["inst_map"].max()) + 1)
        whole = np.bincount(s["inst_map"].ravel(), minlength=inside.size)
        assert int(((inside[1:] > 0.5 * whole[1:]) & (inside[1:] > 0.3 * (x1 - x0) * (y1 - y0))).sum()) == 1


def test_near_duplicate_images_across_splits_are_listed_and_can_be_dropped(
    prepared: tuple[Path, Path, Path],
) -> None:
    from cellseg.data.duplicates import apply_duplicates

    _, cache, qa_dir = prepared
    qa = json.loads((qa_dir / "qa.json").read_text())
    pairs = [(d["image"], d["other"], d["kind"]) for d in qa["near_duplicate_images"]]
    assert pairs == [("val/BloodImage_00037", "train/BloodImage_00038", "near")]
    assert "val/BloodImage_00037" in (qa_dir / "qa_report.md").read_text()
    manifest = load_manifest(cache)
    assert "BloodImage_00037" in manifest["splits"]["val"]  # DUPLICATES='keep' is the default
    dropped = apply_duplicates(json.loads(json.dumps(manifest)), cache, "drop")
    assert dropped["dropped_duplicates"] == ["val/BloodImage_00037"]
    assert "BloodImage_00037" not in dropped["splits"]["val"] and dropped["splits"]["train"] == manifest["splits"]["train"]
    lost = manifest["image_counts"]["val/BloodImage_00037"]
    assert [dropped["counts"]["val"][c] for c in CLASSES] == [manifest["counts"]["val"][c] - n for c, n in zip(CLASSES, lost)]
    with pytest.raises(ValueError, match="DUPLICATES must be one of"):
        apply_duplicates(manifest, cache, "remove")


def _hovernet_hv(inst: np.ndarray) -> np.ndarray:
    """HoVer-Net's generator written out per instance on a full-image mask (exact centre of mass, each side of the
    centre scaled to [-1, 1] separately): the reference the crop-after-target rule is computed with."""
    hv = np.zeros((2, *inst.shape))
    for i in np.unique(inst)[1:]:
        ys, xs = np.nonzero(inst == i)
        for ch, coord in ((0, xs), (1, ys)):
            off = coord - coord.mean()
            out = np.zeros_like(off, dtype=np.float64)
            if (off < 0).any():
                out[off < 0] = off[off < 0] / -off[off < 0].min()
            if (off > 0).any():
                out[off > 0] = off[off > 0] / off[off > 0].max()
            hv[ch, ys, xs] = out
    return hv


def _locate(patch: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """Where ``patch`` was cut from ``image`` (exact pixels; the crop must be unique)."""
    p = patch.shape[0]
    h, w = image.shape[:2]
    first = np.all(image[: h - p + 1, : w - p + 1] == patch[0, 0], axis=2)
    last = np.all(image[p - 1 :, p - 1 :] == patch[-1, -1], axis=2)
    hits = [(y, x) for y, x in zip(*np.nonzero(first & last)) if np.array_equal(image[y : y + p, x : x + p], patch)]
    assert len(hits) == 1
    return int(hits[0][0]), int(hits[0][1])


def test_training_hv_targets_of_cut_cells_equal_hovernets_crop_after_target(
    prepared: tuple[Path, Path, Path],
) -> None:
    from cellseg.data import AugmentConfig, CellDataset
    from cellseg.data.targets import MIN_FRAGMENT_FRACTION, hv_maps
    from cellseg.imageops import denormalize_image

    _, cache, _ = prepared
    identity = AugmentConfig(flip=0, rot90=0, affine=0, elastic=0, colour=0, hed=0, blur=0, noise=0)
    datasets = [
        CellDataset(cache, "train", patch_size=256, augment=False, seed=0),  # centre crops
        CellDataset(cache, "train", patch_size=256, augment=True, seed=3, augment_config=identity),  # random crops
    ]
    cut_px = fragment_px = 0
    old_error, old_wrong = [], []
    references: dict[int, np.ndarray] = {}
    for ds in datasets:
        for index in range(len(ds)):
            raw, item = ds.load(index), ds[index]
            y0, x0 = _locate(denormalize_image(item["image"]), raw["image"])
            crop = (slice(y0, y0 + 256), slice(x0, x0 + 256))
            inst = raw["inst_map"]
            if index not in references:
                references[index] = _hovernet_hv(inst)
            ref = references[index][:, crop[0], crop[1]]
            visible = inst[crop]
            whole_area = np.bincount(inst.ravel())
            seen_area = np.bincount(visible.ravel(), minlength=whole_area.size)
            cut = (seen_area < whole_area)[visible] & (visible > 0)
            fragment = (seen_area < MIN_FRAGMENT_FRACTION * whole_area)[visible] & cut
            hv, nc = item["hv"].numpy(), item["nc"].numpy()
            np.testing.assert_array_equal(item["inst_map"].numpy() > 0, visible > 0)
            kept = (visible > 0) & ~fragment
            np.testing.assert_allclose(hv[:, kept], ref[:, kept], atol=1e-6)  # whole cells, cropped afterwards
            assert (hv[:, fragment] == 0).all() and (nc[fragment] == 0).all()  # slivers dropped from HV and NC
            assert (nc[kept] > 0).all()
            cut_px += int((cut & ~fragment).sum())
            fragment_px += int(fragment.sum())
            # the former rule (HV of the visible fragment) on the same pixels, so this test can tell the two apart
            old = hv_maps(visible)[:, cut & ~fragment]
            old_error.append(np.abs(old - ref[:, cut & ~fragment]).ravel())
            old_wrong.append((np.sign(old) != np.sign(ref[:, cut & ~fragment])).ravel())
    assert cut_px > 50_000 and fragment_px > 0
    assert np.concatenate(old_error).mean() > 0.05 and np.concatenate(old_wrong).mean() > 0.03
