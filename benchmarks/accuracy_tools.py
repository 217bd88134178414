"""Helpers of ``benchmarks/accuracy.py``: box-level detection scores, the classical baselines, the DSB2018 quadrants.

Box-level scores (BCCD's ground truth is boxes), in PASCAL VOC's convention: every predicted instance becomes its
bounding box with its class and confidence; a prediction matches an unmatched ground-truth box of its class with box
IoU >= 0.5, predictions taken in order of decreasing confidence over the whole split; AP50 is the area under the
precision/recall curve with VOC 2010's all-point interpolation (precision made monotone, summed over recall steps);
F1 counts every prediction the post-processing kept (no confidence threshold), those on unboxed cells included. The
evaluation report's box scores (``cellseg.metrics.boxes``) follow COCO instead (101-point AP, predictions on ignored
pixels left out), so the two differ by design; the box geometry (instance boxes, IoU) is the library's.

Classical baselines (what a user could do without a network): threshold + distance-transform watershed for the cells,
and on BCCD a colour/size rule for the classes, with its sizes fitted on the training split only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.draw import ellipse
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from cellseg.metrics.boxes import box_iou_matrix as box_iou
from cellseg.metrics.boxes import instance_boxes as library_instance_boxes

IOU_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- boxes
def instance_boxes(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes of the instances present, as (x0, y0, x1, y1), half-open, and their ids (the library's boxes,
    ids that do not occur left out). Shape: -> (N, 4) float64, (N,) int64."""
    boxes = library_instance_boxes(np.asarray(inst_map))
    ids = np.flatnonzero(boxes[:, 2] > boxes[:, 0]) + 1
    return boxes[ids - 1].astype(np.float64).reshape(-1, 4), ids.astype(np.int64)


@dataclass
class BoxImage:
    """One image's ground-truth and predicted boxes: (x0, y0, x1, y1), classes 1..C, prediction confidences."""

    gt_boxes: np.ndarray
    gt_classes: np.ndarray
    pred_boxes: np.ndarray
    pred_classes: np.ndarray
    pred_scores: np.ndarray


def prediction_boxes(inst_map: np.ndarray, type_map: np.ndarray, scores: np.ndarray | None) -> tuple:
    """(boxes, classes, scores) of a prediction's instances; the class is the type of the instance's pixels."""
    boxes, ids = instance_boxes(inst_map)
    classes = np.zeros(len(ids), np.int64)
    if len(ids):
        flat = inst_map.ravel()
        sel = flat > 0
        votes = np.zeros((int(inst_map.max()) + 1, int(type_map.max()) + 1), np.int64)
        np.add.at(votes, (flat[sel], type_map.ravel()[sel]), 1)
        classes = votes[ids].argmax(1)
    sc = np.ones(len(ids)) if scores is None or len(scores) < int(inst_map.max()) else np.asarray(scores)[ids - 1]
    return boxes, classes, sc.astype(np.float64)


def fit_box_margins(pairs, n_classes: int, min_iou: float = 0.3) -> dict[int, float]:
    """Per class, the median margin (pixels, mean over the four sides) between an annotator's box and the bounding
    box of the mask derived from it, over ``pairs`` of (inst_map, gt_boxes, gt_classes) of the training split. BCCD's
    boxes are loose (platelet masks fill a median 37 % of their box), so a tight instance box misses IoU 0.5 on a
    perfectly segmented platelet; growing it by this margin puts the model's boxes in the annotators' convention, as
    the baseline's rule does with its own fitted margins."""
    margins: dict[int, list[float]] = {c: [] for c in range(1, n_classes + 1)}
    for inst_map, gt_boxes, gt_classes in pairs:
        boxes, _ = instance_boxes(inst_map)
        if not len(boxes) or not len(gt_boxes):
            continue
        iou = box_iou(boxes, gt_boxes)
        for a, j in enumerate(iou.argmax(1)):
            if iou[a, j] >= min_iou and int(gt_classes[j]) in margins:
                b, g = boxes[a], gt_boxes[j]
                margins[int(gt_classes[j])].append(float(np.mean([b[0] - g[0], b[1] - g[1], g[2] - b[2], g[3] - b[3]])))
    return {c: round(float(np.median(v)), 2) if v else 0.0 for c, v in margins.items()}


def grow_boxes(boxes: np.ndarray, classes: np.ndarray, margins: dict[int, float], shape: tuple[int, int]) -> np.ndarray:
    """Boxes grown on every side by their class's margin, clipped to the image. Shape: (N, 4) -> (N, 4)."""
    if not len(boxes):
        return boxes
    h, w = shape
    m = np.array([margins.get(int(c), 0.0) for c in classes])[:, None] * np.array([-1.0, -1.0, 1.0, 1.0])
    return np.clip(boxes + m, 0, [w, h, w, h])


def _voc_ap(tp: np.ndarray, n_gt: int) -> float:
    if n_gt == 0:
        return float("nan")
    if tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, tp.size + 1)
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # monotone envelope
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def box_scores(images: list[BoxImage], class_names: list[str], iou: float = IOU_THRESHOLD) -> dict:
    """Per-class AP50, precision, recall, F1 (boxes, IoU >= ``iou``), their means, and a box-level confusion matrix
    (class-agnostic greedy matching; rows ground truth, columns prediction, last column/row = missed/spurious)."""
    out: dict = {"per_class": {}, "iou_threshold": iou}
    for c, name in enumerate(class_names, start=1):
        records = []  # (score, image index, pred index)
        n_gt = 0
        for i, im in enumerate(images):
            n_gt += int((im.gt_classes == c).sum())
            for j in np.nonzero(im.pred_classes == c)[0]:
                records.append((-float(im.pred_scores[j]), i, int(j)))
        records.sort()
        taken = [np.zeros(int((im.gt_classes == c).sum()), bool) for im in images]
        tp = np.zeros(len(records))
        for r, (_, i, j) in enumerate(records):
            im = images[i]
            gt_idx = np.nonzero(im.gt_classes == c)[0]
            if gt_idx.size == 0:
                continue
            ious = box_iou(im.pred_boxes[j:j + 1], im.gt_boxes[gt_idx])[0]
            ious[taken[i]] = -1.0
            k = int(np.argmax(ious))
            if ious[k] >= iou:
                taken[i][k] = True
                tp[r] = 1.0
        n_tp, n_pred = int(tp.sum()), len(records)
        prec = n_tp / n_pred if n_pred else float("nan")
        rec = n_tp / n_gt if n_gt else float("nan")
        f1 = 2 * n_tp / (n_pred + n_gt) if n_pred + n_gt else float("nan")
        out["per_class"][name] = {"ap50": _voc_ap(tp, n_gt), "precision": prec, "recall": rec, "f1": f1,
                                  "tp": n_tp, "n_pred": n_pred, "n_gt": n_gt}
    vals = [v for v in out["per_class"].values()]
    out["map50"] = float(np.nanmean([v["ap50"] for v in vals]))
    out["mean_f1"] = float(np.nanmean([v["f1"] for v in vals]))
    out["confusion"] = box_confusion(images, len(class_names), iou)
    return out


def box_confusion(images: list[BoxImage], n_classes: int, iou: float = IOU_THRESHOLD) -> list[list[int]]:
    """(C+1) x (C+1) counts: class-agnostic greedy matching by IoU; row C = spurious, column C = missed."""
    m = np.zeros((n_classes + 1, n_classes + 1), np.int64)
    for im in images:
        ious = box_iou(im.gt_boxes, im.pred_boxes)
        used_g, used_p = set(), set()
        order = np.dstack(np.unravel_index(np.argsort(-ious, axis=None), ious.shape))[0] if ious.size else []
        for g, p in order:
            if ious[g, p] < iou:
                break
            if g in used_g or p in used_p:
                continue
            used_g.add(g)
            used_p.add(p)
            m[im.gt_classes[g] - 1, im.pred_classes[p] - 1] += 1
        for g in set(range(len(im.gt_boxes))) - used_g:
            m[im.gt_classes[g] - 1, n_classes] += 1
        for p in set(range(len(im.pred_boxes))) - used_p:
            m[n_classes, im.pred_classes[p] - 1] += 1
    return m.tolist()


# ----------------------------------------------------------------------------- classical baselines
def split_touching(mask: np.ndarray, diameter: float, min_area: float) -> np.ndarray:
    """Distance-transform watershed: peaks at least 0.35 diameters apart seed the split of touching objects."""
    mask = ndi.binary_fill_holes(mask)
    dist = ndi.distance_transform_edt(mask)
    dist = ndi.gaussian_filter(dist, 1.0)
    labels, _ = ndi.label(mask)
    peaks = peak_local_max(dist, min_distance=max(1, int(0.35 * diameter)), threshold_abs=0.15 * diameter,
                           labels=labels, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    inst = watershed(-dist, markers, mask=mask)
    # components without a peak (small or thin) stay objects of their own
    rest, n_rest = ndi.label(mask & (inst == 0))
    inst = np.where(rest > 0, rest + inst.max(), inst)
    sizes = np.bincount(inst.ravel())
    inst[np.isin(inst, np.nonzero(sizes < min_area)[0])] = 0
    from cellseg.data.sample import relabel_consecutive

    return relabel_consecutive(inst).astype(np.int32)


def classical_nuclei(image: np.ndarray, diameter: float) -> dict:
    """Fluorescence nuclei: Otsu on the grey image, then :func:`split_touching`. One class."""
    grey = ndi.gaussian_filter(image.astype(np.float64).mean(-1), 1.0)
    mask = grey > threshold_otsu(grey)
    inst = split_touching(mask, diameter, min_area=0.05 * diameter**2)
    return {"inst_map": inst, "type_map": (inst > 0).astype(np.int32), "scores": np.ones(int(inst.max()), np.float32)}


def purple_score(image: np.ndarray) -> np.ndarray:
    """Blue minus red, smoothed: high on the stained nuclei of WBCs and on platelets, low on pink RBCs and background."""
    x = image.astype(np.float64)
    return ndi.gaussian_filter(x[..., 2] - x[..., 0], 2.0)


@dataclass
class BCCDRule:
    """The classical BCCD rule's numbers (fitted on the training split by :func:`fit_bccd_rule`)."""

    purple_threshold: float = 25.0  # blue - red above this is stain (nucleus / platelet)
    split_area: float = 1500.0  # purple blobs larger than this are WBC nuclei, smaller ones platelets
    wbc_margin: float = 40.0  # px added around a WBC nucleus's box to reach the cell's box
    platelet_margin: float = 4.0
    rbc_diameter: float = 95.0
    min_blob: float = 40.0


def _purple_blobs(image: np.ndarray, rule: BCCDRule):
    mask = purple_score(image) > rule.purple_threshold
    mask = ndi.binary_opening(mask, iterations=1)
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return labels, sizes


def fit_bccd_rule(samples, boxes_of) -> BCCDRule:
    """Fit the size split and the margins on training images: ``samples`` yields (name, image), ``boxes_of(name)``
    gives that image's GT boxes (x0, y0, x1, y1) and classes (1 RBC, 2 WBC, 3 platelets)."""
    rule = BCCDRule()
    areas: dict[int, list[float]] = {2: [], 3: []}
    margins: dict[int, list[float]] = {2: [], 3: []}
    rbc_sides = []
    for name, image in samples:
        gt_boxes, gt_classes = boxes_of(name)
        labels, sizes = _purple_blobs(image, rule)
        rbc = gt_boxes[gt_classes == 1]
        rbc_sides += list(((rbc[:, 2] - rbc[:, 0]) + (rbc[:, 3] - rbc[:, 1])) / 2)
        for k, sl in enumerate(ndi.find_objects(labels), start=1):
            if sl is None or sizes[k] < rule.min_blob:
                continue
            cy, cx = (sl[0].start + sl[0].stop) / 2, (sl[1].start + sl[1].stop) / 2
            inside = [(i, c) for i, (b, c) in enumerate(zip(gt_boxes, gt_classes))
                      if c in (2, 3) and b[0] <= cx < b[2] and b[1] <= cy < b[3]]
            if not inside:
                continue
            i, c = inside[0]
            b = gt_boxes[i]
            areas[c].append(float(sizes[k]))
            margins[c].append(float(np.mean([sl[1].start - b[0], sl[0].start - b[1], b[2] - sl[1].stop,
                                             b[3] - sl[0].stop])))
    if areas[2] and areas[3]:
        rule.split_area = float(np.sqrt(np.median(areas[2]) * np.median(areas[3])))
    if margins[2]:
        rule.wbc_margin = max(0.0, float(np.median(margins[2])))
    if margins[3]:
        rule.platelet_margin = max(0.0, float(np.median(margins[3])))
    if rbc_sides:
        rule.rbc_diameter = float(np.median(rbc_sides))
    return rule


def classical_bccd(image: np.ndarray, rule: BCCDRule) -> dict:
    """Threshold + distance-transform watershed for the cells, colour/size rule for the classes.

    Purple blobs (stain) are WBC nuclei when large, platelets when small; each becomes the ellipse inscribed in its
    box grown by the fitted margin. The rest of the foreground (green channel below Otsu, holes filled) is split into
    RBCs by the distance-transform watershed.
    """
    h, w = image.shape[:2]
    green = ndi.gaussian_filter(image[..., 1].astype(np.float64), 2.0)
    fg = green < threshold_otsu(green)
    labels, sizes = _purple_blobs(image, rule)
    stain = np.zeros((h, w), bool)
    inst = np.zeros((h, w), np.int32)
    types = np.zeros((h, w), np.int32)
    rbc_mask = fg.copy()
    ellipses = []
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or sizes[k] < rule.min_blob:
            continue
        cls = 2 if sizes[k] >= rule.split_area else 3
        m = rule.wbc_margin if cls == 2 else rule.platelet_margin
        y0, y1 = max(0, int(sl[0].start - m)), min(h, int(sl[0].stop + m))
        x0, x1 = max(0, int(sl[1].start - m)), min(w, int(sl[1].stop + m))
        rr, cc = ellipse((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, max(1, (y1 - y0) / 2), max(1, (x1 - x0) / 2),
                         shape=(h, w))
        ellipses.append((cls, rr, cc))
        stain[rr, cc] = True
    rbc_mask &= ~ndi.binary_dilation(stain, iterations=3)
    rbc = split_touching(rbc_mask, rule.rbc_diameter, min_area=0.1 * rule.rbc_diameter**2)
    inst[:] = rbc
    types[rbc > 0] = 1
    n = int(rbc.max())
    for cls, rr, cc in ellipses:
        n += 1
        inst[rr, cc] = n
        types[rr, cc] = cls
    from cellseg.data.sample import relabel_consecutive

    inst = relabel_consecutive(inst).astype(np.int32)
    types = np.where(inst > 0, types, 0).astype(np.int32)
    return {"inst_map": inst, "type_map": types, "scores": np.ones(int(inst.max()), np.float32)}


# ----------------------------------------------------------------------------- DSB2018 quadrants
def write_dsb_quadrants(image: np.ndarray, mask: np.ndarray, out: Path, *, test_quadrant: int = 3,
                        val_tiles: tuple[int, ...] = (0, 5)) -> Path:
    """Write the tile as a ``DATASET='folder'`` dataset: quadrant ``test_quadrant`` (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right) is the test split; the other three are cut into 2x2 sub-tiles each, of which those
    numbered in ``val_tiles`` validate and the rest train. Instance ids are kept per file (relabelled 1..N).

    Raises:
        ValueError: image and mask of different sizes, or a quadrant out of range.
    """
    from cellseg.data.sample import relabel_consecutive

    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"DSB2018 image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
    if test_quadrant not in range(4):
        raise ValueError(f"test_quadrant must be 0..3, got {test_quadrant}")
    h, w = mask.shape[:2]
    qh, qw = h // 2, w // 2
    for split in ("train", "val", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)

    def save(split: str, name: str, ys: slice, xs: slice) -> None:
        Image.fromarray(np.ascontiguousarray(image[ys, xs])).save(out / split / f"{name}.png")
        Image.fromarray(relabel_consecutive(mask[ys, xs]).astype(np.uint16)).save(out / split / f"{name}_mask.png")

    tile = 0
    for q in range(4):
        y0, x0 = (q // 2) * qh, (q % 2) * qw
        if q == test_quadrant:
            save("test", f"quadrant{q}", slice(y0, y0 + qh), slice(x0, x0 + qw))
            continue
        for s in range(4):
            ys = slice(y0 + (s // 2) * (qh // 2), y0 + (s // 2 + 1) * (qh // 2))
            xs = slice(x0 + (s % 2) * (qw // 2), x0 + (s % 2 + 1) * (qw // 2))
            save("val" if tile in val_tiles else "train", f"quadrant{q}_tile{s}", ys, xs)
            tile += 1
    return out
