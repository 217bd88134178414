"""Exports of one predicted input, streamed from the windows' part files: ``instances.tif``, ``cells.geojson``,
``cells.csv`` and ``overlay.png``.

Conventions (also written into ``summary.json``):

* Instance ids are 1..N over the whole input, in window order, then in the order of each window's own ids; 0 is
  background. ``instances.tif`` is uint32, tiled 256 x 256, zlib-compressed, at the predicted level, with its
  resolution in the TIFF resolution tags (pixels per centimetre) when known.
* Coordinates in ``cells.geojson`` and ``cells.csv`` are level-0 pixels, x then y, with the origin at the top-left
  corner of the top-left pixel (QuPath's convention): pixel (row r, column c) covers [c, c + 1) x [r, r + 1), its
  centre is (c + 0.5, r + 0.5). A polygon is the 0.5 iso-line of the instance mask (marching squares), which runs
  between the centres of inside and outside pixels, so rasterising it (pixel inside when its centre is) gives the
  mask back.
* QuPath GeoJSON: a FeatureCollection of Polygon features whose ``properties`` hold ``objectType: "detection"``,
  ``classification: {"name", "color": [r, g, b]}`` and ``measurements`` (a name -> number mapping).
"""

from __future__ import annotations

import csv
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from skimage.measure import approximate_polygon, find_contours

from cellseg.predict.tiling import Window, instance_mask, load_part

OUTPUT_TILE = 256
PALETTE = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (181, 137, 0), (42, 161, 152),
           (108, 113, 196), (203, 75, 22), (88, 110, 117), (255, 127, 14)]


def class_color(index: int) -> list[int]:
    """[r, g, b] of class ``index`` (1-based)."""
    return list(PALETTE[(index - 1) % len(PALETTE)])


def mask_polygon(mask: np.ndarray) -> np.ndarray:
    """The outer boundary of the largest connected piece of a boolean mask, as a closed ring of (x, y) vertices in
    the mask's pixel-edge coordinates (pixel (r, c) spans [c, c+1) x [r, r+1)). Shape: (h, w) -> (k, 2)."""
    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5, fully_connected="high")
    ring = max(contours, key=lambda c: _ring_area(c))
    ring = approximate_polygon(ring, tolerance=0.0)  # drop collinear vertices only: the shape is unchanged
    xy = np.stack([ring[:, 1] - 1 + 0.5, ring[:, 0] - 1 + 0.5], axis=1)  # (row, col) of the padded array -> (x, y)
    if not np.array_equal(xy[0], xy[-1]):
        xy = np.concatenate([xy, xy[:1]])
    return xy


def _ring_area(ring: np.ndarray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


def iter_cells(parts_dir: Path, windows: list[Window], counts: list[int]) -> Iterator[tuple[int, dict, int]]:
    """(global id, part, index within the part) of every instance, in id order."""
    next_id = 1
    for win, n in zip(windows, counts):
        if n == 0:
            continue
        part = load_part(parts_dir, win.index)
        for i in range(n):
            yield next_id, part, i
            next_id += 1


def write_tables(out_dir: Path, parts_dir: Path, windows: list[Window], counts: list[int], *, class_names: list[str],
                 downsample: float, mpp0: float | None, name: str = "") -> dict:
    """Write ``cells.geojson`` and ``cells.csv`` (one feature and one row per instance). Returns counts per class
    and the number of cells. Feature ids are UUIDs (QuPath reads ``id`` as one), derived from ``name`` and the cell id
    so that a resumed run writes the same file."""
    prob_cols = [f"prob_{c}" for c in class_names]
    header = ["id", "centroid_x", "centroid_y"] + (["centroid_x_um", "centroid_y_um"] if mpp0 else []) + \
        ["area"] + (["area_um2"] if mpp0 else []) + ["class", "confidence"] + prob_cols
    per_class = dict.fromkeys(class_names, 0)
    n_cells = 0
    with open(out_dir / "cells.csv", "w", newline="") as fcsv, open(out_dir / "cells.geojson", "w") as fgeo:
        writer = csv.writer(fcsv)
        writer.writerow(header)
        fgeo.write('{"type": "FeatureCollection", "features": [\n')
        for cid, part, i in iter_cells(parts_dir, windows, counts):
            y0, x0 = (int(v) for v in part["bbox"][i, :2])
            ring = mask_polygon(instance_mask(part, i))
            ring = (ring + [x0, y0]) * downsample
            cy, cx = ((part["centroid"][i] + 0.5) * downsample).tolist()
            area = float(part["area"][i]) * downsample * downsample
            cls = int(part["cls"][i])
            name = class_names[cls - 1] if 1 <= cls <= len(class_names) else "unclassified"
            conf = float(part["confidence"][i])
            probs = [float(p) for p in part["probs"][i]]
            row = [cid, round(cx, 3), round(cy, 3)]
            if mpp0:
                row += [round(cx * mpp0, 3), round(cy * mpp0, 3)]
            row.append(round(area, 3))
            if mpp0:
                row.append(round(area * mpp0 * mpp0, 3))
            row += [name, round(conf, 5)] + [round(p, 5) for p in probs]
            writer.writerow(row)
            measurements = {"id": cid, "area_px": area, "confidence": conf,
                            **{f"prob {c}": p for c, p in zip(class_names, probs)}}
            if mpp0:
                measurements["area_um2"] = area * mpp0 * mpp0
            feature = {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cellseg:{name}:{cid}")),
                "geometry": {"type": "Polygon", "coordinates": [[[round(x, 3), round(y, 3)] for x, y in ring]]},
                "properties": {"objectType": "detection", "classification": {"name": name, "color": class_color(cls)},
                               "measurements": measurements},
            }
            fgeo.write(("" if n_cells == 0 else ",\n") + json.dumps(feature))
            per_class[name] = per_class.get(name, 0) + 1
            n_cells += 1
        fgeo.write("\n]}\n")
    return {"n_cells": n_cells, "per_class": per_class}


def _label_bands(parts_dir: Path, windows: list[Window], counts: list[int], height: int, width: int,
                 band: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Label bands of ``band`` rows (uint32 ids; lower ids win shared pixels) and the matching class bands."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cache: dict[int, dict] = {}
    for y in range(0, height, band):
        h = min(band, height - y)
        labels = np.zeros((h, width), np.uint32)
        classes = np.zeros((h, width), np.uint8)
        active = [w for w in windows if counts[w.index] and w.box[0] < y + h and w.box[2] > y]
        for key in [k for k in cache if windows[k].box[2] <= y]:
            del cache[key]  # bands only move down: windows above are done
        for win in active:
            if win.index not in cache:
                cache[win.index] = load_part(parts_dir, win.index)
            part = cache[win.index]
            bb = part["bbox"]
            hit = np.flatnonzero((bb[:, 0] < y + h) & (bb[:, 0] + bb[:, 2] > y))
            for i in hit:
                y0, x0, hh, ww = (int(v) for v in bb[i])
                mask = instance_mask(part, i)
                top, bottom = max(y0, y), min(y0 + hh, y + h)
                m = mask[top - y0:bottom - y0]
                view = labels[top - y:bottom - y, x0:x0 + ww]
                free = m & (view == 0)
                view[free] = offsets[win.index] + i + 1
                classes[top - y:bottom - y, x0:x0 + ww][free] = min(int(part["cls"][i]), 255)
        yield y, labels, classes


def write_instances(out_dir: Path, parts_dir: Path, windows: list[Window], counts: list[int], *, height: int,
                    width: int, mpp: float | None, thumb_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Write ``instances.tif`` tile by tile (one band of 256 rows in memory). Returns strided label and class
    thumbnails (every ``thumb_step``-th pixel) for the overlay."""
    import tifffile

    thumbs_l, thumbs_c = [], []

    def tiles() -> Iterator[np.ndarray]:
        for y, labels, classes in _label_bands(parts_dir, windows, counts, height, width, OUTPUT_TILE):
            rows = np.arange(-y % thumb_step, labels.shape[0], thumb_step)
            thumbs_l.append(labels[rows, ::thumb_step])
            thumbs_c.append(classes[rows, ::thumb_step])
            for x in range(0, width, OUTPUT_TILE):
                tile = np.zeros((OUTPUT_TILE, OUTPUT_TILE), np.uint32)
                piece = labels[:, x:x + OUTPUT_TILE]
                tile[:piece.shape[0], :piece.shape[1]] = piece
                yield tile

    kw = {}
    if mpp:
        kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tmp = out_dir / "instances.tif.tmp"
    with tifffile.TiffWriter(str(tmp), bigtiff=height * width * 4 > 2**31) as tw:
        tw.write(tiles(), shape=(height, width), dtype=np.uint32, tile=(OUTPUT_TILE, OUTPUT_TILE),
                 compression="zlib", photometric="minisblack", **kw)
    tmp.replace(out_dir / "instances.tif")
    return np.concatenate(thumbs_l), np.concatenate(thumbs_c)


def write_overlay(path: Path, image: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> None:
    """Instances drawn over the image: outlines in their class colour, the inside lightly tinted. All three arrays
    share one grid (the image is resized to the labels' size)."""
    import cv2
    from PIL import Image

    if image.shape[:2] != labels.shape:
        image = cv2.resize(image, (labels.shape[1], labels.shape[0]), interpolation=cv2.INTER_AREA)
    out = image.astype(np.float32)
    lut = np.array([[0, 0, 0]] + [class_color(i) for i in range(1, 256)], np.float32)
    color = lut[classes]
    inside = labels > 0
    edge = np.zeros_like(inside)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge &= inside
    out[inside] = 0.75 * out[inside] + 0.25 * color[inside]
    out[edge] = color[edge]
    Image.fromarray(out.round().clip(0, 255).astype(np.uint8)).save(path)


def density_per_mm2(n: int, area_px0: float, mpp0: float | None) -> float | None:
    """Cells per mm² of analysed area (level-0 pixels), or None without a resolution."""
    if not mpp0 or area_px0 <= 0:
        return None
    return n / (area_px0 * (mpp0 * 1e-3) ** 2)


def thumb_step_for(height: int, width: int, max_side: int = 2048) -> int:
    return max(1, int(math.ceil(max(height, width) / max_side)))
