"""The evaluation report: markdown tables and PNG figures next to ``metrics.json``.

Figures are drawn on ``matplotlib.figure.Figure`` objects directly (no pyplot state, no backend switching), so
writing a report never interferes with a notebook's own plots.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries

from cellseg.metrics import (
    CLASS_AGNOSTIC_KEYS,
    CLASS_AWARE_KEYS,
    drop_ignored,
    match_iou,
    pair_table,
    relabel_sequential,
)
from cellseg.metrics.boxes import box_markdown

log = logging.getLogger(__name__)

GT_COLOUR = (0.0, 1.0, 0.0)  # green
PRED_COLOUR = (1.0, 0.0, 1.0)  # magenta


@dataclass
class ErrorCrop:
    """A crop around a false positive or false negative, with both outlines, for the galleries."""

    image: np.ndarray  # (h, w, 3) uint8
    gt_inst: np.ndarray  # (h, w)
    pred_inst: np.ndarray  # (h, w)
    focus: np.ndarray  # (h, w) bool: the missed / spurious instance
    source: str


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def overlay(image: np.ndarray, gt_inst: np.ndarray | None, pred_inst: np.ndarray | None) -> np.ndarray:
    """The image with ground-truth outlines in green (just outside each instance) and predicted outlines in magenta
    (just inside), so that both stay visible where they coincide. Shape: (H, W, 3) uint8."""
    out = image.astype(np.float32) / 255.0
    for inst, colour, mode in ((gt_inst, GT_COLOUR, "outer"), (pred_inst, PRED_COLOUR, "inner")):
        if inst is not None and inst.any():
            edge = find_boundaries(inst, mode=mode) & (inst == 0 if mode == "outer" else inst > 0)
            out[edge] = colour
    return (out * 255).round().astype(np.uint8)


def error_crops(
    image: np.ndarray,
    gt_inst: np.ndarray,
    pred_inst: np.ndarray,
    source: str,
    limit: int = 8,
    *,
    ignore_mask: np.ndarray | None = None,
) -> tuple[list[ErrorCrop], list[ErrorCrop]]:
    """Crops around false positives and false negatives (IoU > 0.5 matching) of one image, at most ``limit`` each,
    largest first. Each crop spans the instance's bounding box plus its own size on every side (at least 16 px).

    With ``ignore_mask``, the errors are the metrics' own: predictions lying mostly in ignored pixels (unlabelled
    cells) are no false positives, and ignored pixels count nowhere (:func:`cellseg.metrics.drop_ignored`)."""
    if ignore_mask is not None:
        ignore = np.asarray(ignore_mask).astype(bool)
        pred_inst = drop_ignored(pred_inst, ignore)
        gt_inst = np.where(ignore, 0, gt_inst)
    table = pair_table(gt_inst, pred_inst)
    gi, pi, _ = match_iou(table)
    out: list[list[ErrorCrop]] = []
    for inst, ids, matched, areas in (
        (pred_inst, table.pred_ids, pi, table.pred_areas),
        (gt_inst, table.gt_ids, gi, table.gt_areas),
    ):
        unmatched = np.setdiff1d(np.arange(ids.size), matched)
        unmatched = unmatched[np.argsort(-areas[unmatched], kind="stable")][:limit]
        crops = []
        if unmatched.size:
            objects = _bounding_boxes(inst, ids[unmatched])
            for k, box in zip(ids[unmatched], objects):
                y0, y1, x0, x1 = box
                m = max(16, y1 - y0, x1 - x0)
                ys = slice(max(0, y0 - m), min(inst.shape[0], y1 + m))
                xs = slice(max(0, x0 - m), min(inst.shape[1], x1 + m))
                crops.append(ErrorCrop(image[ys, xs], gt_inst[ys, xs], pred_inst[ys, xs], inst[ys, xs] == k, source))
        out.append(crops)
    return out[0], out[1]


def _bounding_boxes(inst: np.ndarray, ids: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of each id, from one pass over the labelled pixels."""
    ys, xs = np.nonzero(np.isin(inst, ids))
    labels = inst[ys, xs]
    boxes = []
    for k in ids:
        sel = labels == k
        boxes.append((int(ys[sel].min()), int(ys[sel].max()) + 1, int(xs[sel].min()), int(xs[sel].max()) + 1))
    return boxes


def plot_overlays(examples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path) -> Path:
    """One row per image: ground truth, prediction, both. ``examples``: (name, image, gt_inst, pred_inst)."""
    n = max(1, len(examples))
    fig = Figure(figsize=(12, 4 * n))
    for row, (name, image, gt, pred, *_) in enumerate(examples):
        for col, (title, g, p) in enumerate(
            (("ground truth", gt, None), ("prediction", None, pred), ("both (GT green, prediction magenta)", gt, pred))
        ):
            ax = fig.add_subplot(n, 3, row * 3 + col + 1)
            ax.imshow(overlay(image, g, p))
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


MISCLASSIFIED_COLOUR = (255, 0, 0)  # fill of a matched prediction whose class differs from the ground truth's


def class_overlay(
    image: np.ndarray,
    gt_inst: np.ndarray,
    gt_types: np.ndarray,
    pred_inst: np.ndarray,
    pred_types: np.ndarray,
) -> np.ndarray:
    """Every instance outlined in its class's colour (ground truth just outside, prediction just inside, colours of
    :func:`cellseg.data.qa.class_colour`), and matched predictions (IoU > 0.5) of the wrong class filled red.

    Classes are voted by :func:`cellseg.data.sample.vote_classes`. Shape: (H, W, 3) uint8 -> (H, W, 3) uint8.
    """
    from cellseg.data.qa import class_colour

    out = image.astype(np.float32)
    table = pair_table(gt_inst, pred_inst, gt_types, pred_types)  # classes by the shared vote
    gi, pi, _ = match_iou(table)
    g, _ = relabel_sequential(gt_inst)
    p, _ = relabel_sequential(pred_inst)
    g_cls = np.concatenate([[0], table.gt_classes])
    p_cls = np.concatenate([[0], table.pred_classes])
    wrong = np.zeros(p_cls.size, bool)
    wrong[pi + 1] = g_cls[gi + 1] != p_cls[pi + 1]
    fill = wrong[p]
    out[fill] = 0.55 * out[fill] + 0.45 * np.array(MISCLASSIFIED_COLOUR, np.float32)
    for inst, cls, mode in ((g, g_cls, "outer"), (p, p_cls, "inner")):
        edge = find_boundaries(inst, mode=mode) & (inst == 0 if mode == "outer" else inst > 0)
        owner = inst if mode == "inner" else _outer_owner(inst)
        for c in np.unique(cls[owner[edge]]):
            out[edge & (cls[owner] == c)] = class_colour(int(c)) if c > 0 else (255, 255, 255)
    return out.round().astype(np.uint8)


def _outer_owner(inst: np.ndarray) -> np.ndarray:
    """Each background pixel takes the largest id of its 3x3 neighbourhood (who owns an outer outline)."""
    from scipy import ndimage as ndi

    return np.where(inst > 0, inst, ndi.grey_dilation(inst, size=(3, 3)))


def plot_class_overlays(
    examples: Sequence[tuple], class_names: Sequence[str], path: Path
) -> Path:
    """One panel per image: :func:`class_overlay` with a legend of the class colours and the misclassified fill.

    ``examples``: (name, image, gt_inst, pred_inst, gt_types, pred_types).
    """
    from matplotlib.patches import Patch

    from cellseg.data.qa import class_colour

    n = max(1, len(examples))
    fig = Figure(figsize=(6, 5 * n))
    for row, (name, image, gt, pred, gt_types, pred_types) in enumerate(examples):
        ax = fig.add_subplot(n, 1, row + 1)
        ax.imshow(class_overlay(image, gt, gt_types, pred, pred_types))
        ax.set_title(f"{name}: outline colour = class (outside: ground truth, inside: prediction)", fontsize=8)
        ax.axis("off")
    handles = [Patch(color=np.array(class_colour(i)) / 255, label=c) for i, c in enumerate(class_names, start=1)]
    handles.append(Patch(color=np.array(MISCLASSIFIED_COLOUR) / 255, alpha=0.45, label="matched, wrong class"))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    return path


def plot_gallery(crops: Sequence[ErrorCrop], title: str, path: Path, columns: int = 6) -> Path:
    """A grid of error crops, the instance in question filled in translucent colour."""
    n = max(1, len(crops))
    rows = (n + columns - 1) // columns
    fig = Figure(figsize=(2.2 * columns, 2.4 * rows + 0.4))
    fig.suptitle(title, fontsize=10)
    for i, crop in enumerate(crops):
        ax = fig.add_subplot(rows, columns, i + 1)
        img = overlay(crop.image, crop.gt_inst, crop.pred_inst).astype(np.float32)
        img[crop.focus] = 0.6 * img[crop.focus] + 0.4 * np.array([255.0, 200.0, 0.0])
        ax.imshow(img.astype(np.uint8))
        ax.set_title(crop.source, fontsize=6)
        ax.axis("off")
    if not crops:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "none", ha="center", va="center")
        ax.axis("off")
    fig.savefig(path, dpi=100)
    return path


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix of matched instances' classes, with the counts written in."""
    m = np.asarray(matrix, dtype=np.float64).reshape(len(labels), len(labels))
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.7 * len(labels)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, label="fraction of the row")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title("classes of matched instances (IoU > 0.5)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def collapse_alarm(metrics: dict) -> str:
    """A loud markdown block naming classes present in the ground truth but never predicted ('' when none)."""
    collapsed = metrics.get("collapsed_classes") or []
    if not collapsed:
        return ""
    details = ", ".join(f"**{c}** ({metrics['per_class'][c]['n_gt']} GT instances)" for c in collapsed)
    return (
        "> [!CAUTION]\n"
        f"> **CLASS COLLAPSE: {len(collapsed)} class(es) present in the ground truth are never predicted:** "
        f"{details}.\n"
        "> The model has collapsed these classes into others (see the confusion matrix). Check class balance "
        "(OVERSAMPLE_RARE), the NC loss weights and the per-class pixel fractions below.\n"
    )


def report_markdown(
    metrics: dict,
    *,
    title: str = "Evaluation report",
    context: dict | None = None,
    figures: dict[str, str] | None = None,
    tuning: dict | None = None,
) -> str:
    """The report's markdown: alarm, class-agnostic and class-aware tables (each number beside its convention),
    per tissue, per class, confusion, post-processing, figures."""
    figures = figures or {}
    parts = [f"# {title}", ""]
    alarm = collapse_alarm(metrics)
    if alarm:
        parts += [alarm, ""]
    if context:
        parts += [_table(["setting", "value"], [[k, v] for k, v in context.items()]), ""]
    conv = metrics.get("conventions") or {}
    vs = f", {metrics['mask_ground_truth']}" if metrics.get("mask_ground_truth") else ""
    if metrics.get("mask_ground_truth"):  # BCCD: the masks are derived from boxes, the boxes are the ground truth
        parts += [f"> Every mask score below is **{metrics['mask_ground_truth']}**; box scores are vs the "
                  "annotated boxes (last section).", ""]

    def convention_rows(keys: Sequence[str]) -> list[list]:
        return [[f"`{k}`", metrics.get(k), conv.get(k, "")] for k in keys if k in metrics]

    parts += [
        f"{metrics.get('n_images')} images. Each number's convention is stated beside it (also in `metrics.json` "
        "under `conventions`).",
        "",
        f"## Class-agnostic{vs}",
        "",
        _table(["metric", "value", "convention"], convention_rows(CLASS_AGNOSTIC_KEYS)),
        "",
        f"TP {metrics.get('det_tp')}, FP {metrics.get('det_fp')}, FN {metrics.get('det_fn')} (IoU > 0.5); centroid "
        f"radius {_fmt(metrics.get('match_radius'), 1)} px; class-agnostic AP ranked by "
        f"{', '.join(metrics.get('ap_agnostic_ranked_by') or ['-'])}.",
        "",
        f"## Class-aware{vs}",
        "",
        _table(["metric", "value", "convention"], convention_rows(CLASS_AWARE_KEYS)),
        "",
        f"AP categories with ground truth: {', '.join(metrics.get('ap_categories') or []) or 'none'}.",
        "",
    ]
    if metrics.get("per_tissue"):
        parts += [
            f"### Per tissue ({conv.get('per_tissue', '')})",
            "",
            _table(["tissue", "images", "bPQ", "mPQ"],
                   [[t, v["n_images"], v["bpq"], v["mpq"]] for t, v in metrics["per_tissue"].items()]),
            "",
        ]
    parts += [
        "## Per class",
        "",
        "Pixel IoU/Dice from pixel counts over the dataset; PQ/SQ/RQ from TP/FP/FN/IoU sums over the dataset (as "
        "mPQ+); F1 from centroid matching (a misclassified match counts as FP and FN); AP50/mAP: COCO mask AP of the "
        "category, ranked by class-aware confidence; pixel fraction = share of predicted foreground pixels given "
        "the class.",
        "",
    ]
    rows = []
    for name, v in metrics.get("per_class", {}).items():
        rows.append([name, v["n_gt"], v["n_pred"], v["pred_pixel_fraction"], v["iou"], v["dice"], v["pq"], v["sq"],
                     v["rq"], v["f1"], v.get("ap50"), v.get("map")])
    parts += [
        _table(["class", "GT", "pred", "pixel fraction", "IoU", "Dice", "PQ", "SQ", "RQ", "F1", "AP50", "mAP"], rows),
        f"\nMean pixel IoU {_fmt(metrics.get('miou'))}, mean pixel Dice {_fmt(metrics.get('mdice'))}.",
        "",
    ]
    conf = metrics.get("confusion")
    if conf:
        labels = conf["labels"]
        parts += [
            "## Confusion matrix of matched instances (rows: ground truth, columns: prediction)",
            "",
            _table(["GT \\ pred", *labels], [[lab, *row] for lab, row in zip(labels, conf["matrix"])]),
            "",
            f"Matched pairs with an unclassified instance: {conf.get('unclassified_matches', 0)}.",
            "",
        ]
    if tuning:
        parts += ["## Post-processing", "", _table(["parameter", "value"], list(tuning["params"].items())), ""]
        if tuning.get("table"):
            best = sorted(tuning["table"], key=lambda r: -(r["pq"] if r["pq"] is not None else -1))[:5]
            keys = list(tuning.get("grid", {}))
            parts += [
                f"Tuned on split `{tuning.get('tune_split')}` ({tuning.get('n_images')} images); best of "
                f"{len(tuning['table'])} settings:",
                "",
                _table([*keys, "PQ", "SQ", "RQ"], [[r[k] for k in keys] + [r["pq"], r["sq"], r["rq"]] for r in best]),
                "",
            ]
    parts += box_markdown(metrics)
    for caption, rel in figures.items():
        parts += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    return "\n".join(parts)


def write_report(
    out_dir: Path,
    metrics: dict,
    *,
    examples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = (),
    false_positives: Sequence[ErrorCrop] = (),
    false_negatives: Sequence[ErrorCrop] = (),
    context: dict | None = None,
    tuning: dict | None = None,
    title: str = "Evaluation report",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write ``report.md`` with ``overlays.png``, ``false_positives.png``, ``false_negatives.png`` and
    ``confusion.png`` into ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    if examples:
        plot_overlays(examples, out_dir / "overlays.png")
        figures["Ground truth vs prediction"] = "overlays.png"
        if class_names and all(len(e) == 6 for e in examples):  # examples with type maps: classes and mistakes
            plot_class_overlays(examples, class_names, out_dir / "classes.png")
            figures["Classes (colour = class, red fill = matched with the wrong class)"] = "classes.png"
    plot_gallery(false_positives, "false positives (spurious predictions, filled)", out_dir / "false_positives.png")
    figures["False positives"] = "false_positives.png"
    plot_gallery(false_negatives, "false negatives (missed ground truth, filled)", out_dir / "false_negatives.png")
    figures["False negatives"] = "false_negatives.png"
    conf = metrics.get("confusion")
    if conf and conf["labels"]:
        plot_confusion(conf["matrix"], conf["labels"], out_dir / "confusion.png")
        figures["Confusion matrix"] = "confusion.png"
    path = out_dir / "report.md"
    path.write_text(report_markdown(metrics, title=title, context=context, figures=figures, tuning=tuning))
    log.info("wrote %s", path)
    return path
