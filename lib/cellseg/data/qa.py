"""Quality report of a prepared dataset: per-class statistics, box-to-mask statistics (BCCD) and overlay PNGs.

``qa.json`` is the machine-readable record, ``qa_report.md`` the same for people, with overlays next to it
(instance contours coloured by class, boxes where the source had boxes, ignored pixels hatched).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

log = logging.getLogger(__name__)

# one colour per class id 1..; cycled for longer class lists
CLASS_COLOURS: list[tuple[int, int, int]] = [
    (0, 200, 0),
    (0, 90, 255),
    (255, 140, 0),
    (230, 0, 230),
    (0, 210, 210),
    (255, 230, 0),
    (140, 70, 20),
]
HATCH_COLOUR = (255, 0, 0)


def class_colour(type_id: int) -> tuple[int, int, int]:
    return CLASS_COLOURS[(type_id - 1) % len(CLASS_COLOURS)]


def draw_overlay(
    image: np.ndarray,
    inst_map: np.ndarray,
    type_map: np.ndarray,
    class_names: list[str],
    *,
    ignore_mask: np.ndarray | None = None,
    boxes: list[list[int]] | None = None,
) -> np.ndarray:
    """Contours coloured by class, boxes (``[x0, y0, x1, y1, class_id]``, half-open) and hatched ignore pixels.

    Images narrower than 384 px are enlarged (nearest) up to 4x.

    Shape: (H, W, 3) uint8 -> (zoom * H + legend, zoom * W, 3) uint8.
    """
    h, w = inst_map.shape
    zoom = min(4, max(1, -(-384 // w)))  # small images are enlarged so contours and the legend stay readable
    if zoom > 1:
        up = lambda a: np.repeat(np.repeat(a, zoom, axis=0), zoom, axis=1)  # noqa: E731
        image, inst_map, type_map = up(image), up(inst_map), up(type_map)
        ignore_mask = up(ignore_mask) if ignore_mask is not None else None
        boxes = [[v * zoom for v in b[:4]] + [b[4]] for b in boxes] if boxes else boxes
        h, w = inst_map.shape
    out = image.copy()
    if ignore_mask is not None and ignore_mask.any():
        yy, xx = np.mgrid[0:h, 0:w]
        hatch = ignore_mask & ((xx + yy) % 6 < 2)
        out[hatch] = HATCH_COLOUR
    edges = find_boundaries(inst_map, mode="inner")
    for type_id in range(1, len(class_names) + 1):
        out[edges & (type_map == type_id)] = class_colour(type_id)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1, cls in boxes or []:
        colour = class_colour(int(cls))
        # dashed box so that it does not hide the contour drawn on its edge
        for x in range(x0, x1, 6):
            draw.line([(x, y0), (min(x + 2, x1 - 1), y0)], fill=colour)
            draw.line([(x, y1 - 1), (min(x + 2, x1 - 1), y1 - 1)], fill=colour)
        for y in range(y0, y1, 6):
            draw.line([(x0, y), (x0, min(y + 2, y1 - 1))], fill=colour)
            draw.line([(x1 - 1, y), (x1 - 1, min(y + 2, y1 - 1))], fill=colour)
    entries = [(name, class_colour(i)) for i, name in enumerate(class_names, start=1)] + [
        ("ignore", HATCH_COLOUR)
    ]
    positions, x, y = [], 2, 0
    for name, _ in entries:
        width = 16 + 7 * len(name)
        if x + width > w and x > 2:  # wrap the legend on narrow images
            x, y = 2, y + 16
        positions.append((x, y))
        x += width
    legend = Image.new("RGB", (w, y + 16), (255, 255, 255))
    ldraw = ImageDraw.Draw(legend)
    for (name, colour), (x, y) in zip(entries, positions):
        ldraw.rectangle([x, y + 4, x + 8, y + 12], fill=colour)
        ldraw.text((x + 11, y + 2), name, fill=(0, 0, 0))
    full = Image.new("RGB", (w, h + legend.height))
    full.paste(canvas, (0, 0))
    full.paste(legend, (0, h))
    return np.asarray(full)


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    return {k: round(float(v), 4) for k, v in zip(("min", "p05", "p25", "median", "p75", "p95", "max"), q)}


def collect_qa(cache_dir: str | Path) -> dict[str, Any]:
    """Statistics of a prepared cache, read from the cache itself (labels and their ``meta``)."""
    from cellseg.data.cache import load_manifest
    from cellseg.data.safe_pickle import load_label_dict
    from cellseg.data.sample import SPLITS, instance_types

    cache_dir = Path(cache_dir)
    manifest = load_manifest(cache_dir)
    names = manifest["class_names"]
    areas: dict[str, list[float]] = {c: [] for c in names}
    boxes = {c: 0 for c in names}
    fallbacks = {c: 0 for c in names}
    fills: dict[str, list[float]] = {c: [] for c in names}
    degenerate: list[dict] = []
    duplicates: list[dict] = []
    ignore_px = total_px = 0
    has_boxes = False
    for split in SPLITS:
        for name in manifest["splits"].get(split, []):
            labels = load_label_dict(cache_dir / split / f"{name}.npy")
            inst = np.asarray(labels["inst_map"]).astype(np.int64)
            types = instance_types(inst, np.asarray(labels["type_map"]))
            sizes = np.bincount(inst.ravel(), minlength=types.size)
            for i in range(1, types.size):
                areas[names[types[i] - 1]].append(float(sizes[i]))
            total_px += inst.size
            if labels.get("ignore_mask") is not None:
                ignore_px += int(np.count_nonzero(labels["ignore_mask"]))
            meta = labels.get("meta") or {}
            if "boxes" in meta:
                has_boxes = True
                for (_, _, _, _, cls), fill, fb in zip(meta["boxes"], meta["fill"], meta["fallback"]):
                    c = names[int(cls) - 1]
                    boxes[c] += 1
                    fallbacks[c] += int(bool(fb))
                    fills[c].append(float(fill))
                degenerate.extend(meta.get("degenerate_boxes", []))
                duplicates.extend({"split": split, "image": name, **d} for d in meta.get("duplicate_boxes", []))
    per_class: dict[str, dict[str, Any]] = {}
    for c in names:
        entry: dict[str, Any] = {
            "instances": sum(manifest["counts"][s][c] for s in SPLITS),
            "instance_area_px": _quantiles(areas[c]),
        }
        if has_boxes:
            entry.update(
                boxes=boxes[c],
                masks=len(areas[c]),
                ellipse_fallbacks=fallbacks[c],
                fill_ratio=_quantiles(fills[c]),
            )
        per_class[c] = entry
    return {
        "dataset": manifest["dataset"],
        "cache": str(cache_dir),
        "images": {s: len(manifest["splits"].get(s, [])) for s in SPLITS},
        "classes": per_class,
        "ignore_pixel_fraction": round(ignore_px / total_px, 6) if total_px else 0.0,
        "degenerate_boxes": degenerate,
        "duplicate_boxes": duplicates,
        "near_duplicate_images": manifest.get("near_duplicates", []),
        "dropped_duplicate_images": manifest.get("dropped_duplicates", []),
        "has_boxes": has_boxes,
    }


def qa_is_current(qa_dir: str | Path, fingerprint: str, n_overlays: int) -> bool:
    """Whether ``qa_dir`` already holds the complete report of the cache with this fingerprint."""
    path = Path(qa_dir) / "qa.json"
    try:
        qa = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    files = ["qa_report.md", *qa.get("overlays", [])]
    return (
        qa.get("fingerprint") == fingerprint
        and qa.get("n_overlays") == n_overlays
        and all((Path(qa_dir) / f).exists() for f in files)
    )


def write_qa_report(
    cache_dir: str | Path,
    qa_dir: str | Path,
    *,
    n_overlays: int = 6,
    seed: int = 0,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Write ``qa.json``, ``qa_report.md`` and ``overlay_*.png`` for a prepared cache; returns the QA dict."""
    from cellseg.data.cache import load_manifest, load_sample
    from cellseg.data.sample import SPLITS

    qa_dir = Path(qa_dir)
    qa_dir.mkdir(parents=True, exist_ok=True)
    for old in qa_dir.glob("overlay_*.png"):
        old.unlink()
    qa = collect_qa(cache_dir)
    manifest = load_manifest(cache_dir)
    keys = [(s, n) for s in SPLITS for n in manifest["splits"].get(s, [])]
    rng = np.random.default_rng(seed)
    chosen = [keys[i] for i in sorted(rng.choice(len(keys), size=min(n_overlays, len(keys)), replace=False))]
    overlays = []
    for split, name in chosen:
        sample = load_sample(cache_dir, split, name)
        png = f"overlay_{split}_{name}.png"
        image = draw_overlay(
            sample["image"],
            sample["inst_map"],
            sample["type_map"],
            manifest["class_names"],
            ignore_mask=sample.get("ignore_mask"),
            boxes=sample["meta"].get("boxes"),
        )
        Image.fromarray(image).save(qa_dir / png)
        overlays.append(png)
    qa["overlays"] = overlays
    qa["n_overlays"] = n_overlays
    qa["fingerprint"] = fingerprint
    (qa_dir / "qa.json").write_text(json.dumps(qa, indent=1))
    (qa_dir / "qa_report.md").write_text(_markdown(qa))
    log.info("QA report written to %s", qa_dir / "qa_report.md")
    return qa


def _markdown(qa: dict[str, Any]) -> str:
    lines = [
        f"# Data QA: {qa['dataset']}",
        "",
        f"Cache: `{qa['cache']}`",
        "",
        "Images per split: " + ", ".join(f"{s} {n}" for s, n in qa["images"].items()),
        "",
        f"Ignored pixel fraction (foreground without a label): {qa['ignore_pixel_fraction']:.4f}",
        "",
    ]
    head = "| class | instances | area median (px) | area p05-p95 (px) |"
    if qa["has_boxes"]:
        head += " boxes | masks | ellipse fallbacks | fill median | fill p05-p95 |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for c, e in qa["classes"].items():
        a = e["instance_area_px"] or {}
        row = f"| {c} | {e['instances']} | {a.get('median', '-')} | {a.get('p05', '-')}-{a.get('p95', '-')} |"
        if qa["has_boxes"]:
            f = e["fill_ratio"] or {}
            row += (
                f" {e['boxes']} | {e['masks']} | {e['ellipse_fallbacks']} | {f.get('median', '-')} |"
                f" {f.get('p05', '-')}-{f.get('p95', '-')} |"
            )
        lines.append(row)
    if qa["has_boxes"]:
        lines += ["", f"## Degenerate boxes (left out): {len(qa['degenerate_boxes'])}", ""]
        for d in qa["degenerate_boxes"]:
            lines.append(
                f"- `{d['file']}` object {d['object']} {d['class']}: xmin={d['xmin']} ymin={d['ymin']} "
                f"xmax={d['xmax']} ymax={d['ymax']} ({d['reason']})"
            )
    if qa["has_boxes"]:
        from cellseg.data.bccd import DUPLICATE_BOX_IOU

        lines += [
            "",
            f"## Cells annotated twice (same class, box IoU > {DUPLICATE_BOX_IOU}), merged into one: "
            f"{len(qa['duplicate_boxes'])}",
            "",
        ]
        for d in qa["duplicate_boxes"]:
            boxes = "; ".join("xmin={} ymin={} xmax={} ymax={}".format(*b) for b in d["voc_boxes"])
            lines.append(f"- `{d['file']}` ({d['split']}) {d['class']}: {boxes} (IoU {d['iou']}) -> one cell")
    lines += _duplicate_image_lines(qa)
    lines += [
        "",
        "## Overlays",
        "",
        "Contours coloured by class, dashed boxes where the source had boxes, ignored pixels hatched red.",
        "",
    ]
    lines += [f"![{png}]({png})" for png in qa.get("overlays", [])]
    return "\n".join(lines) + "\n"


def _duplicate_image_lines(qa: dict[str, Any]) -> list[str]:
    near = qa.get("near_duplicate_images", [])
    dropped = qa.get("dropped_duplicate_images", [])
    lines = ["", f"## Identical or near-duplicate images in different splits: {len(near)}", ""]
    if near:
        lines.append("| image | other image | kind | hash distance |")
        lines.append("|---|---|---|---|")
        lines += [f"| {d['image']} | {d['other']} | {d['kind']} | {d['distance']} |" for d in near]
    if dropped:
        lines += ["", f"Dropped from val/test (DUPLICATES='drop'): {', '.join(dropped)}"]
    elif near:
        lines += ["", "Kept in their splits (DUPLICATES='keep'): scores on val/test include these images."]
    return lines
