"""Metrics benchmark: cellseg.metrics vs HoVer-Net's get_fast_pq / get_fast_aji / get_fast_aji_plus (re-written here
from the published algorithms), MONAI's and torchmetrics' PanopticQuality and pycocotools' COCOeval, on the same
inputs: the real DSB2018 tile (512x512, 125 nuclei) and a 2048x2048 mosaic of it (4x4 tiles relabelled, ~2000 nuclei).

Usage:
    CELLSEG_DSB2018_ROOT=/path/to/dsb2018_nuclei python benchmarks/bench_metrics.py [--repeats 5] [--skip-slow]

The prediction is the ground truth perturbed (shifted, eroded, every 3rd nucleus split, every 7th dropped) so that
matching is not trivial. Prints a markdown table: median wall time and the value each tool reports. Optional
comparators (MONAI, torchmetrics, pycocotools) print a row saying so when they are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from cellseg.metrics import aji_plus_totals, aji_totals, image_detections, pair_table, panoptic_counts
from cellseg.metrics.aji import ratio
from cellseg.metrics.coco import average_precision


# ----------------------------------------------------------------------------- HoVer-Net (literal re-implementation)
def remap_label(x: np.ndarray) -> np.ndarray:
    ids = [i for i in np.unique(x) if i != 0]
    out = np.zeros(x.shape, np.int32)
    for new, old in enumerate(ids):
        out[x == old] = new + 1
    return out


def _hovernet_pairwise(true: np.ndarray, pred: np.ndarray):
    """HoVer-Net's loop: one full-image mask per instance (computed on demand here, the same number of full-image
    passes as HoVer-Net's precomputed lists, which would need 2 x 2000 x 4 MB at 2048^2)."""
    true_ids = list(np.unique(true))
    pred_ids = list(np.unique(pred))
    inter_m = np.zeros([len(true_ids) - 1, len(pred_ids) - 1])
    union_m = np.zeros_like(inter_m)
    for true_id in true_ids[1:]:
        t_mask = (true == true_id).astype(np.uint8)
        for pred_id in np.unique(pred[t_mask > 0]):
            if pred_id == 0:
                continue
            p_mask = (pred == pred_id).astype(np.uint8)
            total = (t_mask + p_mask).sum()
            inter = (t_mask * p_mask).sum()
            inter_m[true_id - 1, pred_id - 1] = inter
            union_m[true_id - 1, pred_id - 1] = total - inter
    return true_ids, pred_ids, inter_m, union_m


def hovernet_pq(true: np.ndarray, pred: np.ndarray) -> float:
    true, pred = remap_label(true), remap_label(pred)
    true_ids, pred_ids, inter_m, union_m = _hovernet_pairwise(true, pred)
    iou = np.where(union_m > 0, inter_m / np.maximum(union_m, 1), 0.0)
    iou[iou <= 0.5] = 0.0
    pt, pp = np.nonzero(iou)
    tp, fp, fn = len(pt), len(pred_ids) - 1 - len(pt), len(true_ids) - 1 - len(pt)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    return dq * iou[pt, pp].sum() / (tp + 1.0e-6)


def _aji_finish(true, pred, inter_m, union_m, pt, pp) -> float:
    overall_inter = inter_m[pt, pp].sum()
    overall_union = union_m[pt, pp].sum()
    areas_t = np.bincount(true.ravel())[1:]
    areas_p = np.bincount(pred.ravel())[1:]
    paired_t, paired_p = set((pt + 1).tolist()), set((pp + 1).tolist())
    for t in range(1, areas_t.size + 1):
        if t not in paired_t:
            overall_union += (true == t).sum()  # HoVer-Net sums the full-image mask
    for p in range(1, areas_p.size + 1):
        if p not in paired_p:
            overall_union += (pred == p).sum()
    return overall_inter / overall_union


def hovernet_aji(true: np.ndarray, pred: np.ndarray) -> float:
    true, pred = remap_label(true), remap_label(pred)
    _, _, inter_m, union_m = _hovernet_pairwise(true, pred)
    iou = inter_m / (union_m + 1.0e-6)
    pp = np.argmax(iou, axis=1)
    pt = np.nonzero(np.max(iou, axis=1) > 0.0)[0]
    return _aji_finish(true, pred, inter_m, union_m, pt, pp[pt])


def hovernet_aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    true, pred = remap_label(true), remap_label(pred)
    _, _, inter_m, union_m = _hovernet_pairwise(true, pred)
    iou = inter_m / (union_m + 1.0e-6)
    pt, pp = linear_sum_assignment(-iou)
    keep = iou[pt, pp] > 0.0
    return _aji_finish(true, pred, inter_m, union_m, pt[keep], pp[keep])


# ----------------------------------------------------------------------------- cellseg
def ours_pq_aji(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    table = pair_table(true, pred)
    counts, _ = panoptic_counts(table)
    return float(counts.quality()["pq"]), ratio(*aji_totals(table))


def ours_pq(true, pred) -> float:
    counts, _ = panoptic_counts(pair_table(true, pred))
    return float(counts.quality()["pq"])


def ours_aji_plus(true, pred) -> float:
    return ratio(*aji_plus_totals(pair_table(true, pred)))


def ours_ap(true, pred, scores) -> tuple[float, float]:
    table = pair_table(true, pred)
    ap = average_precision([image_detections(table, scores[table.pred_ids - 1])])
    return ap["ap50"], ap["map"]


# ----------------------------------------------------------------------------- optional comparators
def monai_pq():
    try:
        import torch
        from monai.metrics.panoptic_quality import compute_panoptic_quality
    except ImportError as e:
        return None, f"MONAI not installed ({e.name}): `pip install --no-deps monai`"
    return (lambda t, p: float(compute_panoptic_quality(torch.from_numpy(p), torch.from_numpy(t), "pq"))), ""


def torchmetrics_pq():
    try:
        import torch
        from torchmetrics.detection import PanopticQuality
    except ImportError as e:
        return None, f"torchmetrics not installed ({e.name}): `pip install --no-deps torchmetrics lightning-utilities`"

    def run(t, p):
        # category 1 = nucleus (thing), 0 = background (stuff); per-class output, the nucleus entry
        metric = PanopticQuality(things={1}, stuffs={0}, return_per_class=True)

        def pan(x):
            return torch.from_numpy(np.stack([(x > 0).astype(np.int64), x.astype(np.int64)], axis=-1))[None]

        return float(metric(pan(p), pan(t)).flatten()[0])

    return run, ""


def pycocotools_ap():
    try:
        import pycocotools.mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        return None, f"pycocotools not installed ({e.name})"

    def run(t, p, scores):
        anns, dts = [], []
        for k in np.unique(t)[1:]:
            rle = mask_utils.encode(np.asfortranarray((t == k).astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "segmentation": rle,
                         "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
        ids = np.unique(p)[1:]
        for k in ids:
            rle = mask_utils.encode(np.asfortranarray((p == k).astype(np.uint8)))
            dts.append({"image_id": 1, "category_id": 1, "segmentation": rle, "score": float(scores[k - 1])})
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": [{"id": 1, "height": t.shape[0], "width": t.shape[1]}], "annotations": anns,
                          "categories": [{"id": 1, "name": "nucleus"}]}
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(dts), "segm")
            ev.params.maxDets = [1, 10, len(ids) + 1]
            ev.evaluate()
            ev.accumulate()
        prec = ev.eval["precision"][:, :, 0, 0, -1]
        return float(prec[0].mean()), float(prec.mean())

    return run, ""


# ----------------------------------------------------------------------------- inputs and timing
def perturb(m: np.ndarray, seed: int = 0) -> np.ndarray:
    p = np.roll(m, (2, -1), axis=(0, 1))
    edge = ndi.grey_dilation(p, size=3) != ndi.grey_erosion(p, size=3)
    p = np.where(edge & (np.random.default_rng(seed).random(p.shape) < 0.5), 0, p)
    ids = np.unique(p)[1:]
    xx = np.broadcast_to(np.arange(p.shape[1]), p.shape)
    out = p.copy()
    next_id = int(p.max()) + 1
    objs = ndi.find_objects(p)
    for k in ids[::3]:  # split every 3rd nucleus at its centroid column
        sl = objs[k - 1]
        sel = p[sl] == k
        cx = xx[sl][sel].mean()
        out[sl][sel & (xx[sl] > cx)] = next_id
        next_id += 1
    return np.where(np.isin(out, ids[::7]), 0, out)  # drop every 7th


def mosaic(m: np.ndarray, n: int = 4) -> np.ndarray:
    step = int(m.max()) + 1
    return np.block([[np.where(m > 0, m + (r * n + c) * step, 0) for c in range(n)] for r in range(n)])


def timed(fn, args, repeats: int):
    out = fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def fmt(v) -> str:
    return " / ".join(f"{x:.6f}" for x in v) if isinstance(v, tuple) else f"{v:.6f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsb", default=os.environ.get("CELLSEG_DSB2018_ROOT"), help="folder with mask2d.tif")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-slow", action="store_true", help="skip the per-instance loops on the mosaic")
    parser.add_argument("--max-gb", type=float, default=4.0, help="memory allowed to MONAI's per-instance masks")
    args = parser.parse_args()
    if not args.dsb:
        print("set CELLSEG_DSB2018_ROOT or pass --dsb (folder with mask2d.tif)", file=sys.stderr)
        return 2
    tile = tifffile.imread(Path(args.dsb) / "mask2d.tif").astype(np.int32)
    cases = {"DSB2018 tile 512x512": tile, "mosaic 2048x2048": mosaic(tile)}
    mon, mon_why = monai_pq()
    tm, tm_why = torchmetrics_pq()
    coco, coco_why = pycocotools_ap()
    print(f"{os.cpu_count()} CPUs; median of {args.repeats} runs (1 for the per-instance loops on the mosaic)\n")
    print("| input | metric | implementation | time (s) | value | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case, gt in cases.items():
        pred = perturb(gt)
        scores = np.random.default_rng(1).random(int(pred.max()))
        big = gt.shape[0] > 1024
        slow_reps = 1 if big else args.repeats
        n_gt, n_pred = len(np.unique(gt)) - 1, len(np.unique(pred)) - 1
        label = f"{case} ({n_gt} GT, {n_pred} pred)"
        t_ours, (pq, aji) = timed(ours_pq_aji, (gt, pred), args.repeats)
        print(f"| {label} | PQ + AJI | cellseg (one pair table) | {t_ours:.4f} | {fmt((pq, aji))} | 1x |")
        if big and args.skip_slow:
            print(f"| {label} | PQ + AJI | HoVer-Net get_fast_pq + get_fast_aji | skipped (--skip-slow) | | |")
        else:
            t_pq, r_pq = timed(hovernet_pq, (gt, pred), slow_reps)
            t_aji, r_aji = timed(hovernet_aji, (gt, pred), slow_reps)
            same = abs(r_pq - pq) < 1e-6 and abs(r_aji - aji) < 1e-6
            print(f"| {label} | PQ + AJI | HoVer-Net get_fast_pq + get_fast_aji | {t_pq + t_aji:.4f} | "
                  f"{fmt((r_pq, r_aji))} ({'equal' if same else 'DIFFERENT'} to 1e-6) | "
                  f"cellseg {(t_pq + t_aji) / t_ours:.0f}x faster |")
        t_ap, ap_plus = timed(ours_aji_plus, (gt, pred), args.repeats)
        print(f"| {label} | AJI+ | cellseg | {t_ap:.4f} | {fmt(ap_plus)} | |")
        if not (big and args.skip_slow):
            t_r, r = timed(hovernet_aji_plus, (gt, pred), slow_reps)
            print(f"| {label} | AJI+ | HoVer-Net get_fast_aji_plus | {t_r:.4f} | {fmt(r)} "
                  f"({'equal' if abs(r - ap_plus) < 1e-6 else 'DIFFERENT'}) | cellseg {t_r / t_ap:.0f}x faster |")
        t_pq_only, pq_only = timed(ours_pq, (gt, pred), args.repeats)
        print(f"| {label} | PQ | cellseg | {t_pq_only:.4f} | {fmt(pq_only)} | |")
        for name, fn, why in (("MONAI compute_panoptic_quality", mon, mon_why),
                              ("torchmetrics PanopticQuality (nucleus class)", tm, tm_why)):
            if fn is None:
                print(f"| {label} | PQ | {name} | – | {why} | |")
                continue
            need_gb = (n_gt + n_pred) * gt.size * 4 / 1e9  # MONAI keeps an int32 mask per instance
            if name.startswith("MONAI") and need_gb > args.max_gb:
                print(f"| {label} | PQ | {name} | not run: keeps one int32 full-image mask per instance, "
                      f"{need_gb:.0f} GB here (> --max-gb {args.max_gb:g}) | | |")
                continue
            t, v = timed(fn, (gt, pred), slow_reps)
            print(f"| {label} | PQ | {name} | {t:.4f} | {fmt(v)} | cellseg {t / t_pq_only:.0f}x faster |")
        t_ours_ap, ours = timed(ours_ap, (gt, pred, scores), args.repeats)
        print(f"| {label} | AP50 / mAP | cellseg | {t_ours_ap:.4f} | {fmt(ours)} | |")
        if coco is None:
            print(f"| {label} | AP50 / mAP | pycocotools COCOeval | – | {coco_why} | |")
        else:
            t, v = timed(coco, (gt, pred, scores), slow_reps)
            same = max(abs(a - b) for a, b in zip(v, ours)) < 1e-6
            print(f"| {label} | AP50 / mAP | pycocotools COCOeval (maxDets raised, precision array) | {t:.4f} | "
                  f"{fmt(v)} ({'equal' if same else 'DIFFERENT'}) | cellseg {t / t_ours_ap:.0f}x faster |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
