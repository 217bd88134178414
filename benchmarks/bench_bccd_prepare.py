"""Benchmark: prepare all 364 BCCD images (boxes -> instance masks) and check every image's invariants.

Times ``prepare_dataset("bccd", ...)`` from scratch with 2 worker processes into a temporary cache, then checks on
every image: instances per class == valid boxes per class, every instance inside its box and in one 4-connected piece,
no ignored pixel on an instance. The goal is < 2 minutes on 2 CPU cores. Prints a markdown row for RESULTS.md.

Run: CELLSEG_BCCD_ROOT=../shared/data/BCCD .venv/bin/python benchmarks/bench_bccd_prepare.py [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from cellseg.data import load_manifest, load_sample, prepare_dataset


def check_image(root: Path, cache: Path, split: str, name: str, classes: list[str]) -> None:
    sample = load_sample(cache, split, name)
    inst, types = sample["inst_map"], sample["type_map"]
    boxes = []
    for obj in ET.parse(root / "Annotations" / f"{name}.xml").getroot().iter("object"):
        b = obj.find("bndbox")
        x0, y0, x1, y1 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 > x0 and y1 > y0:
            boxes.append(
                (
                    max(int(x0) - 1, 0),
                    max(int(y0) - 1, 0),
                    int(x1),
                    int(y1),
                    classes.index(obj.findtext("name").strip()) + 1,
                )
            )
    assert int(inst.max()) == len(boxes), f"{name}: {int(inst.max())} instances for {len(boxes)} boxes"
    for i, (x0, y0, x1, y1, cls) in enumerate(boxes, start=1):
        ys, xs = np.nonzero(inst == i)
        assert ys.size, f"{name}: box {i} is empty"
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, (
            f"{name}: instance {i} leaves its box"
        )
        assert (types[ys, xs] == cls).all(), f"{name}: instance {i} has the wrong class"
        assert ndi.label(inst == i)[1] == 1, f"{name}: instance {i} is in pieces"
    assert not (sample["ignore_mask"] & (inst > 0)).any()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("CELLSEG_BCCD_ROOT"), help="BCCD folder")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not args.root:
        raise SystemExit(
            "set CELLSEG_BCCD_ROOT or pass --root (the BCCD folder with Annotations/, JPEGImages/)"
        )
    root = Path(args.root)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        t = time.perf_counter()
        manifest = prepare_dataset("bccd", root, cache, num_workers=args.workers, progress=False)
        elapsed = time.perf_counter() - t
        t = time.perf_counter()
        prepare_dataset("bccd", root, cache, num_workers=args.workers, progress=False)
        reuse = time.perf_counter() - t
        n = 0
        for split, names in load_manifest(cache)["splits"].items():
            for name in names:
                check_image(root, cache, split, name, manifest["class_names"])
                n += 1
    totals = {c: sum(manifest["counts"][s][c] for s in manifest["counts"]) for c in manifest["class_names"]}
    print(
        f"{n} images prepared in {elapsed:.1f} s with {args.workers} workers ({os.cpu_count()} CPUs); "
        f"re-run reusing the cache {reuse:.2f} s; invariants hold on every image; instances {totals}"
    )
    print(
        f"| prepare_dataset('bccd'), all {n} images | {args.workers} workers, {os.cpu_count()} CPUs | "
        f"{elapsed:.1f} s | reuse {reuse:.2f} s | {platform.machine()} |"
    )
    assert elapsed < 120, f"BCCD preparation took {elapsed:.0f} s; the goal is < 120 s on 2 cores"


if __name__ == "__main__":
    main()
