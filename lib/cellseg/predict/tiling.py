"""Prediction windows over a large image and the seam rule that makes every instance appear exactly once, whole.

**The seam rule.** The read level is cut into a grid of disjoint *cores* (``PREDICT_WINDOW - 2 * margin`` pixels
square); each core is predicted inside a *window* that extends it by ``margin`` pixels on every side (clipped at the
image border), with ``margin >= OBJECT_DIAMETER``. Each window is predicted and post-processed on its own
(:func:`cellseg.inference.predict_instances`, with the usual ``TILE_SIZE`` / ``TILE_OVERLAP`` sliding window inside),
and an instance is kept by the window whose core holds its centroid (the mean of its pixel indices; cores are
half-open boxes, so exactly one core holds any point of the image). An instance whose centroid lies in the core
reaches at most about one diameter beyond it, so it lies whole inside the window: it is never cut, and the
neighbouring window, which sees the same cell with its centroid outside its own core, drops it: it is never
duplicated. Where two windows' predictions of the same cell differ enough to move its centroid across the core
border, both may keep it: :func:`resolve_overlaps` then drops the later copy when more than half of it is covered by
instances already kept (the IoU-style overlap rule), and otherwise gives shared pixels to the earlier instance, so
the kept instances are disjoint and ``instances.tif``, the polygons and the table agree pixel for pixel. Instances
touching a window edge inside the image are counted (``cut_at_window_edge`` in ``summary.json``); with a margin of
one diameter there are none unless a predicted object is much larger than ``OBJECT_DIAMETER``.

Each window's kept instances are stored as one small part file (bounding box, packed mask, class, confidence, class
probabilities), written atomically, so a stopped prediction resumes at the next window and memory never holds more
than a window's maps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class Window:
    """One prediction window: its core (kept instances' centroids lie here) and the box read around it, both as
    (y0, x0, y1, x1) in read-level pixels, half-open."""

    index: int
    core: tuple[int, int, int, int]
    box: tuple[int, int, int, int]


def window_margin(object_diameter: float) -> int:
    """The context kept around each core: at least one object diameter (in read-level pixels)."""
    return int(math.ceil(object_diameter))


def plan_windows(height: int, width: int, window: int, margin: int) -> list[Window]:
    """The windows covering a ``height`` x ``width`` image, row by row. An image no larger than ``window`` is one
    window whose core is the whole image (the same as predicting it in one pass).

    Raises:
        ValueError: ``window`` leaves no core after the margins (names PREDICT_WINDOW and the smallest value).
    """
    if height <= window and width <= window:
        return [Window(0, (0, 0, height, width), (0, 0, height, width))]
    core = window - 2 * margin
    if core < 16:
        raise ValueError(f"PREDICT_WINDOW={window} leaves a core of {core} px after the {margin} px margins on both "
                         f"sides (margin = OBJECT_DIAMETER, so that a cell whose centre lies in the core is seen whole); "
                         f"set PREDICT_WINDOW to at least {2 * margin + 16}, better {2 * margin + 512}.")
    out = []
    for y0 in range(0, height, core):
        for x0 in range(0, width, core):
            y1, x1 = min(y0 + core, height), min(x0 + core, width)
            box = (max(0, y0 - margin), max(0, x0 - margin), min(height, y1 + margin), min(width, x1 + margin))
            out.append(Window(len(out), (y0, x0, y1, x1), box))
    return out


def owned_instances(pred: dict, win: Window, image_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The instances of one window's prediction that the seam rule gives to this window.

    Args:
        pred: :func:`cellseg.inference.predict_instances` output for the window's box.
        win: the window.
        image_shape: (height, width) of the read level, to tell image borders from window edges.

    Returns:
        Arrays over the kept instances, in the order of their ids in ``pred``: ``bbox`` (n, 4) int64 (y0, x0, h, w)
        in read-level pixels, ``centroid`` (n, 2) float64 (y, x) mean pixel index, ``area`` (n,) int64, ``cls``
        (n,) int32, ``confidence`` (n,) float32, ``probs`` (n, C) float32, ``masks`` packed bits of every box's mask,
        concatenated, with ``mask_offsets`` (n + 1,) int64, and ``cut`` (the number of kept instances touching a
        window edge that is not an image border).
    """
    inst = np.asarray(pred["inst_map"])
    n = int(inst.max()) if inst.size else 0
    by, bx, _, _ = win.box
    cy0, cx0, cy1, cx1 = win.core
    n_classes = np.asarray(pred["class_probs"]).shape[1] if n else np.asarray(pred["class_probs"]).reshape(0, -1).shape[1]
    empty = {"bbox": np.zeros((0, 4), np.int64), "centroid": np.zeros((0, 2)), "area": np.zeros(0, np.int64),
             "cls": np.zeros(0, np.int32), "confidence": np.zeros(0, np.float32),
             "probs": np.zeros((0, n_classes), np.float32), "masks": np.zeros(0, np.uint8),
             "mask_offsets": np.zeros(1, np.int64), "cut": np.int64(0)}
    if n == 0:
        return empty
    ids = inst.ravel()
    area = np.bincount(ids, minlength=n + 1)[1:]
    rows, cols = np.indices(inst.shape)
    safe = np.maximum(area, 1)
    cy = np.bincount(ids, weights=rows.ravel(), minlength=n + 1)[1:] / safe + by
    cx = np.bincount(ids, weights=cols.ravel(), minlength=n + 1)[1:] / safe + bx
    keep = (area > 0) & (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    slices = ndi.find_objects(inst, max_label=n)
    h_img, w_img = image_shape
    bbox, masks, offsets, cut = [], [], [0], 0
    kept = np.flatnonzero(keep)
    for k in kept:
        sl = slices[k]
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        bbox.append((y0 + by, x0 + bx, y1 - y0, x1 - x0))
        packed = np.packbits(inst[sl] == k + 1)
        masks.append(packed)
        offsets.append(offsets[-1] + packed.size)
        touches = ((y0 == 0 and by > 0) or (x0 == 0 and bx > 0) or (y1 == inst.shape[0] and win.box[2] < h_img)
                   or (x1 == inst.shape[1] and win.box[3] < w_img))
        cut += int(touches)
    if not len(kept):
        return empty
    return {
        "bbox": np.asarray(bbox, np.int64),
        "centroid": np.stack([cy[kept], cx[kept]], axis=1),
        "area": area[kept].astype(np.int64),
        "cls": np.asarray(pred["inst_types"], np.int32)[kept],
        "confidence": np.asarray(pred["scores"], np.float32)[kept],
        "probs": np.asarray(pred["class_probs"], np.float32)[kept],
        "masks": np.concatenate(masks),
        "mask_offsets": np.asarray(offsets, np.int64),
        "cut": np.int64(cut),
    }


def instance_mask(part: dict, i: int) -> np.ndarray:
    """The boolean mask of the ``i``-th instance of a part, in its bounding box. Shape: (h, w)."""
    h, w = (int(v) for v in part["bbox"][i, 2:])
    packed = part["masks"][part["mask_offsets"][i]:part["mask_offsets"][i + 1]]
    return np.unpackbits(packed, count=h * w).reshape(h, w).astype(bool)


def part_path(parts_dir: Path, index: int) -> Path:
    return Path(parts_dir) / f"window_{index:07d}.npz"


def save_part(parts_dir: Path, index: int, part: dict) -> None:
    """Write one window's instances atomically (temporary file, then rename: a crash leaves no half part)."""
    path = part_path(parts_dir, index)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_part(parts_dir: Path, index: int) -> dict[str, np.ndarray]:
    """Read one window's instances (plain arrays, no pickle)."""
    with np.load(part_path(parts_dir, index), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def boxes_meet(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def resolve_overlaps(part: dict, win: Window, earlier: list[dict]) -> tuple[dict, int]:
    """Make a window's kept instances disjoint from those already kept by earlier windows: an instance mostly
    (more than half) covered by earlier ones is the same cell seen twice and is dropped; one partly covered loses
    the shared pixels (the earlier instance keeps them). So ``instances.tif``, the polygons and the table describe the
    same pixels. Returns (part, number dropped)."""
    n = len(part["area"])
    if n == 0 or not earlier:
        return part, 0
    by, bx, by1, bx1 = win.box
    taken = np.zeros((by1 - by, bx1 - bx), bool)
    for other in earlier:
        for i in range(len(other["area"])):
            y0, x0, h, w = (int(v) for v in other["bbox"][i])
            if not boxes_meet((y0, x0, y0 + h, x0 + w), win.box):
                continue
            m = instance_mask(other, i)
            ty0, tx0, ty1, tx1 = max(y0, by), max(x0, bx), min(y0 + h, by1), min(x0 + w, bx1)
            taken[ty0 - by:ty1 - by, tx0 - bx:tx1 - bx] |= m[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]
    if not taken.any():
        return part, 0
    keep, bbox, centroid, area, masks, offsets = [], [], [], [], [], [0]
    for i in range(n):
        y0, x0, h, w = (int(v) for v in part["bbox"][i])
        mask = instance_mask(part, i)
        free = mask & ~taken[y0 - by:y0 - by + h, x0 - bx:x0 - bx + w]
        if free.sum() * 2 < mask.sum() or not free.any():
            continue  # the same cell, already kept by an earlier window
        keep.append(i)
        if free.sum() == mask.sum():
            bbox.append(part["bbox"][i])
            centroid.append(part["centroid"][i])
            area.append(part["area"][i])
            packed = part["masks"][part["mask_offsets"][i]:part["mask_offsets"][i + 1]]
        else:
            rows, cols = np.nonzero(free)
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            bbox.append(np.array([y0 + r0, x0 + c0, r1 - r0, c1 - c0], np.int64))
            centroid.append(np.array([rows.mean() + y0, cols.mean() + x0]))
            area.append(np.int64(free.sum()))
            packed = np.packbits(free[r0:r1, c0:c1])
        masks.append(packed)
        offsets.append(offsets[-1] + packed.size)
    dropped = n - len(keep)
    idx = np.asarray(keep, np.int64)
    out = {
        "bbox": np.asarray(bbox, np.int64).reshape(-1, 4), "centroid": np.asarray(centroid, np.float64).reshape(-1, 2),
        "area": np.asarray(area, np.int64), "cls": part["cls"][idx], "confidence": part["confidence"][idx],
        "probs": part["probs"][idx], "masks": np.concatenate(masks) if masks else np.zeros(0, np.uint8),
        "mask_offsets": np.asarray(offsets, np.int64), "cut": part["cut"], "duplicates": np.int64(dropped),
    }
    return out, dropped
