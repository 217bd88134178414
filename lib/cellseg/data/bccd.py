"""BCCD (Shenggan/BCCD_Dataset): blood-smear JPEGs with Pascal VOC boxes, turned into instance masks.

BCCD has boxes only. Each valid box becomes the mask of the cell inside it:

1. foreground: cells absorb green light (RBCs are pink, nuclei and platelets purple) while the smear background is
   bright grey, so the green channel, smoothed (sigma 2 px against JPEG noise), is thresholded with Otsu's method;
2. overlapping boxes: a marker-controlled watershed (Beucher & Meyer) on the negated distance transform of the
   foreground, seeded by an ellipse at every box's centre (smaller boxes' seeds on top) and by the distance-transform
   peaks that no box covers (unlabelled cells, so that they do not flood into the boxed cells they touch), splits
   touching cells; a pixel that the watershed gives to a box not containing it goes to the containing box with the
   nearest (box-normalised) centre, so every instance lies inside its box and no two overlap;
3. each instance keeps its largest connected piece and takes its convex hull minus pixels of other instances (blood
   cells are convex; the pale centre of an RBC is part of the cell even where it touches the background);
4. fallback: when a mask fills less than ``MIN_FILL_BY_CLASS`` of its box (pale cells the threshold misses, empty boxes), the
   inscribed ellipse, minus pixels already owned by other instances, is used instead.

Foreground claimed by no box becomes ``ignore_mask`` (BCCD leaves many cells unlabelled). Degenerate boxes (zero or
negative size, outside the image) are reported with file and coordinates and left out; same-class boxes with IoU above
``DUPLICATE_BOX_IOU`` (one cell annotated twice) are merged into one box and listed in the QA report; nothing else is
dropped, so every image has as many instances per class as valid, merged boxes per class.

VOC coordinates are 1-based and inclusive; a box ``xmin..xmax`` covers the 0-based half-open columns
``[xmin - 1, xmax)``.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image
from skimage.segmentation import watershed

from cellseg.data.files import read_image
from cellseg.data.sample import SPLITS
from cellseg.data.validate import Problem

log = logging.getLogger(__name__)

CLASS_NAMES: list[str] = ["RBC", "WBC", "Platelets"]
# A pinned commit, not a branch: the data under a published result must not change. Its content is pinned file by
# file (cellseg.data.bccd_pin: bccd_manifest.tsv, 364 images), not by the archive's hash, which GitHub can change
# by re-compressing the same commit.
BCCD_COMMIT = "d272fb1"
BCCD_URL = f"https://github.com/Shenggan/BCCD_Dataset/archive/{BCCD_COMMIT}.zip"
DOWNLOAD_TIMEOUT_S = 60.0
# below this mask/box fill the segmentation is taken as failed; platelets are small in loose boxes
MIN_FILL_BY_CLASS: dict[str, float] = {"RBC": 0.25, "WBC": 0.25, "Platelets": 0.05}
# Same-class boxes overlapping more than this are one cell annotated twice. On BCCD the duplicates have IoU 0.83-0.93
# (8 cells, mostly copies shifted by 2 px) and distinct touching cells at most 0.59: the threshold sits in that gap.
DUPLICATE_BOX_IOU = 0.7
LAYOUT_HELP = (
    "DATA_ROOT must contain Annotations/BloodImage_XXXXX.xml, JPEGImages/BloodImage_XXXXX.jpg and "
    "ImageSets/Main/{train,val,test}.txt (the BCCD/ folder of the repository)"
)


@dataclass
class Box:
    """A VOC box in 0-based half-open pixel coordinates, with its class id (1..3) and the raw VOC values."""

    x0: int
    y0: int
    x1: int
    y1: int
    cls: int
    raw: tuple[str, str, str, str] = field(default=("", "", "", ""))


def parse_annotation(path: Path, image_hw: tuple[int, int]) -> tuple[list[Box], list[dict], list[Problem]]:
    """Read a VOC XML file; boxes are clipped to the image of size ``image_hw`` (the JPEG's, not the XML's claim).

    Returns:
        ``(valid boxes, degenerate boxes, problems)``; a degenerate box is a dict with file, class and VOC coordinates.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        return [], [], [Problem(str(path), f"unreadable VOC annotation ({e})")]
    problems: list[Problem] = []
    h, w = image_hw
    lookup = {name.lower(): i + 1 for i, name in enumerate(CLASS_NAMES)}
    valid: list[Box] = []
    degenerate: list[dict] = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        cls = lookup.get(name.lower())
        if cls is None:
            problems.append(
                Problem(str(path), f"object {k} has unknown class '{name}'; allowed: {CLASS_NAMES}")
            )
            continue
        bnd = obj.find("bndbox")
        raw = tuple(
            (bnd.findtext(t) or "").strip() if bnd is not None else ""
            for t in ("xmin", "ymin", "xmax", "ymax")
        )
        try:
            xmin, ymin, xmax, ymax = (float(v) for v in raw)
        except ValueError:
            problems.append(Problem(str(path), f"object {k} ({name}) has a non-numeric bndbox {raw}"))
            continue
        x0, y0 = max(int(round(xmin)) - 1, 0), max(int(round(ymin)) - 1, 0)
        x1, y1 = min(int(round(xmax)), w), min(int(round(ymax)), h)
        if xmax <= xmin or ymax <= ymin or x1 <= x0 or y1 <= y0:
            reason = "zero or negative size" if (xmax <= xmin or ymax <= ymin) else "outside the image"
            degenerate.append(
                {
                    "file": str(path),
                    "object": k,
                    "class": name,
                    "xmin": raw[0],
                    "ymin": raw[1],
                    "xmax": raw[2],
                    "ymax": raw[3],
                    "reason": reason,
                }
            )
            continue  # logged by prepare_dataset in the main process, listed in the QA report
        valid.append(Box(x0, y0, x1, y1, cls, raw))  # type: ignore[arg-type]
    return valid, degenerate, problems


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two half-open pixel boxes."""
    iw = max(0, min(a.x1, b.x1) - max(a.x0, b.x0))
    ih = max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = iw * ih
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def merge_duplicate_boxes(
    boxes: list[Box], iou_threshold: float = DUPLICATE_BOX_IOU
) -> tuple[list[Box], list[dict[str, Any]]]:
    """Merge same-class boxes overlapping with IoU above ``iou_threshold`` into one box (their union).

    A cell annotated twice would otherwise become two half-cells in the masks and the training targets. Groups are
    transitive (connected components of the "same class and IoU above the threshold" graph); the merged box takes the
    place of the group's first box.

    Returns:
        ``(boxes, merges)``: each merge lists the class id, the VOC values of the merged boxes, their largest pairwise
        IoU and the merged box (0-based half-open ``[x0, y0, x1, y1]``).
    """
    n = len(boxes)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if boxes[i].cls == boxes[j].cls and box_iou(boxes[i], boxes[j]) > iou_threshold:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    out: list[Box] = []
    merges: list[dict[str, Any]] = []
    for _, members in sorted(groups.items()):
        group = [boxes[i] for i in members]
        if len(group) == 1:
            out.append(group[0])
            continue
        merged = Box(
            min(b.x0 for b in group), min(b.y0 for b in group), max(b.x1 for b in group), max(b.y1 for b in group),
            group[0].cls, group[0].raw,
        )  # fmt: skip
        out.append(merged)
        merges.append(
            {
                "class": CLASS_NAMES[merged.cls - 1],
                "voc_boxes": [list(b.raw) for b in group],
                "iou": round(max(box_iou(a, b) for k, a in enumerate(group) for b in group[k + 1 :]), 4),
                "merged_box": [merged.x0, merged.y0, merged.x1, merged.y1],
            }
        )
    return out, merges


def foreground_mask(image: np.ndarray, sigma: float = 2.0, lift: float = 0.35) -> np.ndarray:
    """Cells vs bright smear background on the smoothed green channel. Shape: (H, W, 3) -> (H, W) bool.

    Otsu's threshold sits between the RBC rims and the background and misses the pale WBC cytoplasm and RBC centres,
    so it is lifted by ``lift`` of the way towards the background's median.
    """
    green = ndi.gaussian_filter(image[:, :, 1].astype(np.float32), sigma)
    otsu = float(threshold_otsu(green))
    background = green[green > otsu]
    level = otsu + lift * (float(np.median(background)) - otsu) if background.size else otsu
    fg = green < level
    # specks of dust and JPEG noise are not cells
    fg = ndi.binary_opening(fg, iterations=1)
    return fg


def _ellipse(h: int, w: int, scale: float = 1.0) -> np.ndarray:
    """Inscribed ellipse of an h x w box (scaled about the centre). Shape: -> (h, w) bool."""
    yy = (np.arange(h) + 0.5 - h / 2) / (h / 2 * scale)
    xx = (np.arange(w) + 0.5 - w / 2) / (w / 2 * scale)
    return yy[:, None] ** 2 + xx[None, :] ** 2 <= 1.0


def box_instance_masks(
    image: np.ndarray, boxes: list[Box], *, min_fill: float | list[float] = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Instance masks for the boxes of one image (module docstring for the method).

    Returns:
        ``(inst_map, type_map, ignore_mask, stats)``; instance ``i + 1`` belongs to ``boxes[i]``. ``stats`` holds per
        box ``fill`` (mask area / box area, of the mask kept) and ``fallback`` (bool).

    Shape: (H, W, 3) -> (H, W) int32, (H, W) int32, (H, W) bool.
    """
    h, w = image.shape[:2]
    fg = foreground_mask(image)
    n = len(boxes)
    min_fills = [min_fill] * n if isinstance(min_fill, float | int) else list(min_fill)
    inst = np.zeros((h, w), dtype=np.int32)
    if n == 0:
        return inst, inst.copy(), fg.copy(), {"fill": [], "fallback": []}
    # paint larger boxes first so that the seeds of small boxes inside them (platelets on RBCs) stay on top
    order = sorted(range(n), key=lambda i: -(boxes[i].x1 - boxes[i].x0) * (boxes[i].y1 - boxes[i].y0))
    markers = np.zeros((h, w), dtype=np.int32)
    in_box = np.zeros((h, w), dtype=bool)
    for i in order:
        b = boxes[i]
        seed = _ellipse(b.y1 - b.y0, b.x1 - b.x0, 0.3)
        if not seed.any():
            seed[(b.y1 - b.y0) // 2, (b.x1 - b.x0) // 2] = True
        markers[b.y0 : b.y1, b.x0 : b.x1][seed] = i + 1
        in_box[b.y0 : b.y1, b.x0 : b.x1] = True
    region = fg | (markers > 0)
    distance = ndi.distance_transform_edt(region)
    # unlabelled cells (BCCD misses many) get seeds of their own at distance-transform peaks that no box covers, so
    # they do not flood into the boxed cells they touch; their pixels end up ignored
    side = float(np.median([min(b.x1 - b.x0, b.y1 - b.y0) for b in boxes]))
    peaks = peak_local_max(
        distance,
        min_distance=max(3, int(0.25 * side)),
        threshold_abs=max(2.0, 0.2 * side),
        exclude_border=False,
    )
    unlabelled = n + 1
    for y, x in peaks:
        if not _mostly_boxed(y, x, float(distance[y, x]), boxes):
            markers[y, x] = unlabelled
    labels = watershed(-distance, markers, mask=region)
    foreign = (
        labels == unlabelled
    )  # cells without a box: no instance may take them, not even through its hull
    labels[foreign] = 0
    labels = _enforce_containment(labels, boxes)
    fills: list[float] = [0.0] * n
    fallback: list[bool] = [False] * n
    masks: dict[int, tuple[Box, np.ndarray]] = {}
    for i, b in enumerate(boxes):
        window = labels[b.y0 : b.y1, b.x0 : b.x1]
        own = _largest_piece(window == i + 1)
        others = ((window > 0) & (window != i + 1)) | foreign[b.y0 : b.y1, b.x0 : b.x1]
        # blood cells are convex discs: the hull closes the pale centre of an RBC even where it meets the background
        own = (convex_hull_image(own) if own.any() else own) & ~others
        if float(own.sum()) / float(own.size) < min_fills[i]:
            fallback[i] = True
        else:
            masks[i] = (b, own)
    # hulls of neighbours may overlap where the watershed left background: larger boxes first, smaller on top
    for i in order:
        if i in masks:
            b, own = masks[i]
            inst[b.y0 : b.y1, b.x0 : b.x1][own] = i + 1
    for i in order:  # fallbacks: large first, so a small box's ellipse is not hidden under a large one's
        if not fallback[i]:
            continue
        b = boxes[i]
        window = inst[b.y0 : b.y1, b.x0 : b.x1]
        ellipse = _ellipse(b.y1 - b.y0, b.x1 - b.x0)
        free = ellipse & (window == 0)
        window[_largest_piece(free) if free.any() else ellipse] = i + 1
    _ensure_every_box(inst, boxes)
    # overwriting can cut an instance: every instance keeps its largest 4-connected piece
    for i, b in enumerate(boxes):
        window = inst[b.y0 : b.y1, b.x0 : b.x1]
        own = window == i + 1
        kept = _largest_piece(own)
        window[own & ~kept] = 0
        fills[i] = float(kept.sum()) / float(kept.size)
    types = np.zeros(n + 1, dtype=np.int32)
    types[1:] = [b.cls for b in boxes]
    type_map = types[inst]
    ignore = fg & (inst == 0)
    return inst, type_map, ignore, {"fill": fills, "fallback": fallback}


def _mostly_boxed(y: int, x: int, radius: float, boxes: list[Box], share: float = 0.3) -> bool:
    """Does a box cover more than ``share`` of the square around a cell centre? (Then the cell is a boxed one.)"""
    y0, y1, x0, x1 = y - radius, y + radius + 1, x - radius, x + radius + 1
    area = (y1 - y0) * (x1 - x0)
    for b in boxes:
        overlap = max(0.0, min(y1, b.y1) - max(y0, b.y0)) * max(0.0, min(x1, b.x1) - max(x0, b.x0))
        if overlap > share * area:
            return True
    return False


def _enforce_containment(labels: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """Give every pixel labelled with a box that does not contain it to the containing box with the nearest centre."""
    h, w = labels.shape
    x0 = np.array([b.x0 for b in boxes])
    x1 = np.array([b.x1 for b in boxes])
    y0 = np.array([b.y0 for b in boxes])
    y1 = np.array([b.y1 for b in boxes])
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs] - 1
    outside = (xs < x0[lab]) | (xs >= x1[lab]) | (ys < y0[lab]) | (ys >= y1[lab])
    if not outside.any():
        return labels
    ys, xs = ys[outside], xs[outside]
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    hw, hh = (x1 - x0) / 2.0, (y1 - y0) / 2.0
    px, py = xs[:, None] + 0.5, ys[:, None] + 0.5
    dist = ((px - cx) / hw) ** 2 + ((py - cy) / hh) ** 2  # (pixels, boxes)
    contains = (xs[:, None] >= x0) & (xs[:, None] < x1) & (ys[:, None] >= y0) & (ys[:, None] < y1)
    dist[~contains] = np.inf
    best = dist.argmin(axis=1)
    out = labels.copy()
    out[ys, xs] = np.where(np.isfinite(dist.min(axis=1)), best + 1, 0)
    return out


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax()


def _ensure_every_box(inst: np.ndarray, boxes: list[Box]) -> None:
    """Last resort: a box left with no pixel (hidden under smaller boxes' ellipses) takes its centre pixel."""
    present = np.bincount(inst.ravel(), minlength=len(boxes) + 1)
    for i in np.flatnonzero(present[1:] == 0):
        b = boxes[i]
        inst[(b.y0 + b.y1 - 1) // 2, (b.x0 + b.x1 - 1) // 2] = i + 1


def download_bccd(data_root: Path, url: str | None = None, timeout: float = DOWNLOAD_TIMEOUT_S,
                  sha256: str | None = None, verify: bool = True) -> None:
    """Fetch the pinned BCCD repository archive, unpack its ``BCCD/`` folder and check every file against the pinned
    manifest (:mod:`cellseg.data.bccd_pin`) before moving it to ``data_root``.

    ``url`` another source of the same commit (a mirror); ``sha256`` also checks the archive's bytes; ``verify=False``
    moves data that differs from the manifest into place anyway, marked ``UNVERIFIED.txt`` (loud warning).

    Raises:
        FileNotFoundError: the download, unpacking or the content check failed; the message says why (the files
            that differ, by name), what to download, from where and where to put it.
    """
    from cellseg.data.bccd_pin import fetch_pinned_bccd

    url = url or BCCD_URL
    help_text = (
        f"BCCD is not at DATA_ROOT={data_root} and could not be downloaded from {url} ({{reason}}). On a login node "
        f"(with internet) run `cellseg data fetch bccd {data_root}`, or download {BCCD_URL} (commit {BCCD_COMMIT} of "
        f"https://github.com/Shenggan/BCCD_Dataset), copy its BCCD/ folder to {data_root}, so that "
        f"{data_root}/Annotations/BloodImage_00000.xml, {data_root}/JPEGImages/BloodImage_00000.jpg and "
        f"{data_root}/ImageSets/Main/train.txt exist, and check it with `cellseg data verify bccd {data_root}`; or "
        "set DATA_ROOT to where that folder already is."
    )
    try:
        fetch_pinned_bccd(data_root, url, timeout=timeout, archive_sha256=sha256, verify=verify)
    except Exception as e:  # URLError, timeouts, checksums, content, bad archives: all end in the same instructions
        raise FileNotFoundError(help_text.format(reason=f"{type(e).__name__}: {e}")) from e


def _load_bccd(image_path: Path, xml_path: Path, name: str) -> dict[str, Any]:
    from cellseg.data.validate import DataValidationError

    image = read_image(image_path)
    boxes, degenerate, problems = parse_annotation(xml_path, image.shape[:2])
    if problems:
        raise DataValidationError(problems, str(xml_path))
    boxes, merges = merge_duplicate_boxes(boxes)
    for m in merges:
        m["file"] = str(xml_path)
    min_fill = [MIN_FILL_BY_CLASS[CLASS_NAMES[b.cls - 1]] for b in boxes]
    inst, type_map, ignore, stats = box_instance_masks(image, boxes, min_fill=min_fill)
    return {
        "image": image,
        "inst_map": inst,
        "type_map": type_map,
        "ignore_mask": ignore,
        "meta": {
            "name": name,
            "source": str(image_path),
            "annotation": str(xml_path),
            "boxes": [[b.x0, b.y0, b.x1, b.y1, b.cls] for b in boxes],
            "fill": [round(f, 4) for f in stats["fill"]],
            "fallback": [bool(f) for f in stats["fallback"]],
            "degenerate_boxes": degenerate,
            "duplicate_boxes": merges,
        },
    }


def bccd_source(data_root: str | Path | None) -> Any:
    """List BCCD's images by official split (``ImageSets/Main/{train,val,test}.txt``); downloads when absent."""
    from cellseg.data.records import DatasetSource, Record

    if data_root is None:
        raise ValueError(
            f"DATA_ROOT is required for DATASET='bccd': {LAYOUT_HELP}. Set DATA_ROOT in the parameters."
        )
    root = Path(data_root)
    if not root.exists():
        download_bccd(root)
    missing = [d for d in ("Annotations", "JPEGImages", "ImageSets/Main") if not (root / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"DATA_ROOT={root} is not a BCCD folder (missing {missing}): {LAYOUT_HELP}.")
    records: list[Record] = []
    problems: list[Problem] = []
    for split in SPLITS:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.exists():
            problems.append(Problem(str(listing), f"missing: BCCD's official '{split}' split list"))
            continue
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not names:
            problems.append(Problem(str(listing), f"empty split '{split}': the list names no image"))
        for name in names:
            image_path = root / "JPEGImages" / f"{name}.jpg"
            xml_path = root / "Annotations" / f"{name}.xml"
            absent = [str(p) for p in (image_path, xml_path) if not p.exists()]
            if absent:
                problems.append(Problem(str(listing), f"'{name}' is listed but {absent} do(es) not exist"))
                continue
            records.append(
                Record(split, name, str(image_path), partial(_load_bccd, image_path, xml_path, name))
            )
    return DatasetSource("bccd", list(CLASS_NAMES), records, problems)
