"""Post-processing benchmark: cellseg.postprocess.hv_to_instances vs HoVer-Net's process_np_hv (re-written here from
the published algorithm) vs MONAI's HoVerNetInstanceMapPostProcessing, on the same maps of the real DSB2018 tile.

Usage:
    CELLSEG_DSB2018_ROOT=/path/to/dsb2018_nuclei python benchmarks/bench_postprocess.py [--repeats 20]

Inputs: "perfect" maps (foreground = ground truth, HV = HV targets of the ground truth) and "degraded" maps (both
blurred with a Gaussian and noised), as a trained network's output is smooth, not exact. Prints a markdown table:
median wall time per call over ``--repeats`` runs after one warm-up, the methods taking turns, and PQ against the ground truth. MONAI is an
optional comparator: its row says so when it is not installed (``pip install --no-deps monai``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from cellseg.metrics import pair_table, panoptic_counts
from cellseg.postprocess import hv_to_instances


def hv_targets(inst: np.ndarray) -> tuple[np.ndarray, str]:
    """HV targets: the project's ``cellseg.data.targets.hv_maps`` when present, else an equivalent local one."""
    try:
        from cellseg.data.targets import hv_maps

        return np.asarray(hv_maps(inst), np.float32), "cellseg.data.targets.hv_maps"
    except ImportError:
        pass
    inst = inst.astype(np.int64)
    h, w = inst.shape
    n = int(inst.max()) + 1
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    area = np.maximum(np.bincount(inst.ravel(), minlength=n), 1)
    out = np.zeros((2, h, w), np.float32)
    for c, coord in enumerate((xx, yy)):
        d = coord - (np.bincount(inst.ravel(), coord.ravel(), n) / area)[inst]
        lo = np.asarray(ndi.minimum(d, inst, np.arange(n)))
        hi = np.asarray(ndi.maximum(d, inst, np.arange(n)))
        neg = np.where(d < 0, d / np.where(lo[inst] < 0, -lo[inst], 1), 0)
        pos = np.where(d > 0, d / np.where(hi[inst] > 0, hi[inst], 1), 0)
        out[c] = np.where(inst > 0, neg + pos, 0)
    return out, "local (cellseg.data.targets not importable)"


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    area = np.bincount(labels.ravel())
    small = area < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def hovernet_process_np_hv(fg_prob: np.ndarray, hv: np.ndarray) -> np.ndarray:
    """HoVer-Net's ``process_np_hv``: threshold 0.5, remove < 10 px, min-max HV per tile, Sobel 21, energy, marker
    threshold 0.4, fill holes, 5x5 elliptical opening, remove < 10 px markers, watershed."""
    blb = (fg_prob >= 0.5).astype(np.int32)
    blb = ndi.label(blb)[0]
    blb = _remove_small(blb, 10)
    blb[blb > 0] = 1
    h_dir = cv2.normalize(hv[0], None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    v_dir = cv2.normalize(hv[1], None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelh = cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=21)
    sobelv = cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=21)
    sobelh = 1 - cv2.normalize(sobelh, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelv = 1 - cv2.normalize(sobelv, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    overall = np.maximum(sobelh, sobelv)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0
    dist = (1.0 - overall) * blb
    dist = -cv2.GaussianBlur(dist, (3, 3), 0)
    overall = (overall >= 0.4).astype(np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = ndi.binary_fill_holes(marker).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = ndi.label(marker)[0]
    marker = _remove_small(marker, 10)
    return watershed(dist, markers=marker, mask=blb)


def monai_postprocess(sobel_kernel_size: int):
    try:
        import torch
        from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing
    except ImportError as e:
        return None, f"MONAI not installed ({e.name}); `pip install --no-deps monai` to compare"
    post = HoVerNetInstanceMapPostProcessing(sobel_kernel_size=sobel_kernel_size)

    def run(fg_prob: np.ndarray, hv: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(np.stack([1.0 - fg_prob, fg_prob]).astype(np.float32))
        _, inst = post(logits, torch.from_numpy(hv))
        return np.asarray(inst)[0]

    return run, ""


def pq(gt: np.ndarray, pred: np.ndarray) -> float:
    counts, _ = panoptic_counts(pair_table(gt, pred))
    return float(counts.quality()["pq"])


def timed_round_robin(jobs: dict[str, tuple], repeats: int) -> dict[str, tuple[float, np.ndarray]]:
    """Median seconds per call and the output of each job; the jobs take turns, so that load from other processes
    on a shared machine hits them all alike."""
    outputs = {name: fn(*args) for name, (fn, args) in jobs.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, (fn, args) in jobs.items():
            t0 = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), outputs[name]) for name in jobs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsb", default=os.environ.get("CELLSEG_DSB2018_ROOT"), help="folder with mask2d.tif")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not args.dsb:
        print("set CELLSEG_DSB2018_ROOT or pass --dsb (folder with mask2d.tif)", file=sys.stderr)
        return 2
    gt = tifffile.imread(Path(args.dsb) / "mask2d.tif").astype(np.int32)
    hv, hv_source = hv_targets(gt)
    fg = (gt > 0).astype(np.float32)
    rng = np.random.default_rng(0)
    fg_deg = np.clip(ndi.gaussian_filter(fg, 1.5) + rng.normal(0, 0.1, fg.shape), 0, 1).astype(np.float32)
    hv_deg = np.clip(np.stack([ndi.gaussian_filter(c, 1.5) for c in hv]) + rng.normal(0, 0.1, hv.shape), -1, 1)
    hv_deg = hv_deg.astype(np.float32)
    methods = [("cellseg hv_to_instances (defaults)", hv_to_instances, ""),
               ("HoVer-Net process_np_hv (re-written)", hovernet_process_np_hv, "")]
    for k in (5, 21):
        fn, why = monai_postprocess(k)
        methods.append((f"MONAI HoVerNetInstanceMapPostProcessing (sobel {k})", fn, why))
    print(f"DSB2018 tile {gt.shape}, {len(np.unique(gt)) - 1} nuclei; HV targets from {hv_source}; "
          f"median of {args.repeats} runs; {os.cpu_count()} CPUs\n")
    jobs, missing = {}, []
    for name, fn, why in methods:
        for label, (f, h) in (("perfect maps", (fg, hv)), ("blur 1.5 px + noise 0.1", (fg_deg, hv_deg))):
            if fn is None:
                missing.append(f"| {name} | {label} | – | {why} |")
            else:
                jobs[f"| {name} | {label} |"] = (fn, (f, h))
    results = timed_round_robin(jobs, args.repeats)
    print("| method | input | time (ms) | PQ |")
    print("| --- | --- | --- | --- |")
    for row, (seconds, inst) in results.items():
        print(f"{row} {seconds * 1000:.1f} | {pq(gt, inst):.4f} |")
    for row in missing:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
