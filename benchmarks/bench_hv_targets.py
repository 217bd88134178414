"""Benchmark: HV training targets of cells cut by the patch border, against HoVer-Net's crop-after-target rule.

Prepares BCCD (all images, or reuses ``--cache``), then takes ``--crops`` random 256 px training patches per train
image exactly as ``CellDataset`` cuts them (augmentation switched to the identity so that the reference is defined)
and compares, on the pixels of cells the patch cuts, three HV targets with the reference (HV of the whole image's
cells, cropped afterwards, HoVer-Net's rule):

- ``fragment HV``: the former rule, HV maps of the visible fragments (computed after the final crop);
- ``CellDataset``: the training targets now (whole cells in the context window, cropped after); dropped slivers
  (< ``MIN_FRAGMENT_FRACTION`` of their cell, HV 0 on purpose) are reported apart.

Prints the mean |dHV| and the wrong-sign fraction of each, and a markdown row for RESULTS.md.

Run: CELLSEG_BCCD_ROOT=../shared/data/BCCD .venv/bin/python benchmarks/bench_hv_targets.py [--cache DIR] [--crops 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cellseg.data import AugmentConfig, CellDataset, prepare_dataset
from cellseg.data.targets import MIN_FRAGMENT_FRACTION, hv_maps
from cellseg.imageops import denormalize_image

IDENTITY = AugmentConfig(flip=0, rot90=0, affine=0, elastic=0, colour=0, hed=0, blur=0, noise=0)


def locate(patch: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """Where ``patch`` was cut from ``image`` (None when the patch leaves the image or is not unique)."""
    p = patch.shape[0]
    h, w = image.shape[:2]
    if h < p or w < p:
        return None
    first = np.all(image[: h - p + 1, : w - p + 1] == patch[0, 0], axis=2)
    last = np.all(image[p - 1 :, p - 1 :] == patch[-1, -1], axis=2)
    hits = [(y, x) for y, x in zip(*np.nonzero(first & last)) if np.array_equal(image[y : y + p, x : x + p], patch)]
    return (int(hits[0][0]), int(hits[0][1])) if len(hits) == 1 else None


def measure(cache: Path, crops: int, patch: int) -> dict[str, float]:
    ds = CellDataset(cache, "train", patch_size=patch, augment=True, seed=0, augment_config=IDENTITY)
    sums = {k: np.zeros(3) for k in ("fragment", "dataset")}  # |d| sum, wrong-sign count, pixel count
    fg_px = cut_px = sliver_px = 0
    for index in range(len(ds)):
        raw = ds.load(index)
        reference_full = hv_maps(raw["inst_map"])
        whole = np.bincount(raw["inst_map"].ravel())
        for epoch in range(crops):
            ds.set_epoch(epoch)
            item = ds[index]
            where = locate(denormalize_image(item["image"]), raw["image"])
            if where is None:
                continue
            y0, x0 = where
            rows, cols = slice(y0, y0 + patch), slice(x0, x0 + patch)
            visible = raw["inst_map"][rows, cols]
            seen = np.bincount(visible.ravel(), minlength=whole.size)
            cut = (seen < whole)[visible] & (visible > 0)
            sliver = (seen < MIN_FRAGMENT_FRACTION * whole)[visible] & cut
            kept = cut & ~sliver
            ref = reference_full[:, rows, cols][:, kept]
            for key, hv in (("fragment", hv_maps(visible)[:, kept]), ("dataset", item["hv"].numpy()[:, kept])):
                sums[key] += (np.abs(hv - ref).sum(), (np.sign(hv) != np.sign(ref)).sum(), ref.size)
            fg_px += int((visible > 0).sum())
            cut_px += int(cut.sum())
            sliver_px += int(sliver.sum())
    out = {"fg_px": fg_px, "cut_share": cut_px / max(fg_px, 1), "sliver_share": sliver_px / max(cut_px, 1)}
    for key, (err, wrong, n) in sums.items():
        out[f"{key}_mean_abs"] = err / max(n, 1)
        out[f"{key}_wrong_sign"] = wrong / max(n, 1)
    return out


def time_items(cache: Path, n: int, patch: int) -> float:
    """Milliseconds per training item with the default augmentation (the context window's cost)."""
    ds = CellDataset(cache, "train", patch_size=patch, augment=True, seed=0)
    ds[0]  # warm-up
    t = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return 1000 * (time.perf_counter() - t) / n


def subset_root(real: Path, target: Path, limit: int) -> Path:
    """A BCCD folder of links to the first ``limit`` training images of each official split list (a quick run)."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (target / d).mkdir(parents=True)
    for split in ("train", "val", "test"):
        names = (real / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[: limit if split == "train" else 1]
        (target / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            for sub, ext in (("Annotations", "xml"), ("JPEGImages", "jpg")):
                (target / sub / f"{name}.{ext}").symlink_to(real / sub / f"{name}.{ext}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("CELLSEG_BCCD_ROOT"), help="BCCD folder")
    parser.add_argument("--cache", type=Path, default=None, help="a prepared BCCD cache to reuse (else a temporary one)")
    parser.add_argument("--crops", type=int, default=2, help="random patches per training image")
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--time-items", type=int, default=100, help="items timed with the default augmentation")
    parser.add_argument("--limit", type=int, default=0, help="only the first N training images (0: all)")
    args = parser.parse_args()
    if not args.root and args.cache is None:
        raise SystemExit("set CELLSEG_BCCD_ROOT or pass --root (the BCCD folder), or --cache")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        if args.root:
            root = subset_root(Path(args.root), Path(tmp) / "BCCD", args.limit) if args.limit else Path(args.root)
            prepare_dataset("bccd", root, cache, progress=False, num_workers=1 if args.limit else 2)
        t = time.perf_counter()
        r = measure(cache, args.crops, args.patch)
        seconds = time.perf_counter() - t
        ms = time_items(cache, args.time_items, args.patch) if args.time_items else float("nan")
    print(
        f"{r['fg_px']} foreground pixels in {args.crops} x train patches of {args.patch} px; {r['cut_share']:.1%} "
        f"belong to cut cells ({r['sliver_share']:.1%} of those to dropped slivers) [{seconds:.0f} s]"
    )
    for key, label in (("fragment", "fragment HV (former rule)"), ("dataset", "CellDataset (whole cells)")):
        print(f"{label}: mean |dHV| {r[f'{key}_mean_abs']:.4f}, wrong sign {r[f'{key}_wrong_sign']:.2%}")
    print(f"training item with the default augmentation: {ms:.1f} ms (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    print(
        f"| BCCD train{f' (first {args.limit})' if args.limit else ''}, {args.crops} x {args.patch} px patches | "
        f"{r['cut_share']:.0%} | "
        f"{r['fragment_mean_abs']:.3f} / {r['fragment_wrong_sign']:.1%} | "
        f"{r['dataset_mean_abs']:.3g} / {r['dataset_wrong_sign']:.2%} | {r['sliver_share']:.1%} |"
    )


if __name__ == "__main__":
    main()
