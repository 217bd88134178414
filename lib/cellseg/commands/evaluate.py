"""``cellseg evaluate --gt DIR --pred DIR [--out FILE] [--classes NAME ...]``: score saved predictions.

Each folder holds one ``.npy`` per image, with the same file names; each file is a dict with ``inst_map`` and
``type_map`` (integer arrays) and, for predictions, optionally ``scores`` (``scores[k - 1]`` = confidence of
instance id k, default 1.0) — the format :func:`cellseg.evaluation.evaluate_model` writes to ``predictions/``.
Ground-truth files may carry an ``ignore_mask``. The files are read with the project's restricted unpickler (only
NumPy arrays and plain containers), never with ``np.load(allow_pickle=True)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from cellseg.metrics import evaluate_instances
from cellseg.metrics.detection import centroid_radius

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("pq", "sq", "rq", "bpq", "mpq", "mpq_plus", "aji", "aji_plus", "dice", "det_precision",
                "det_recall", "det_f1", "ap50", "map")
CLASS_KEYS = ("n_gt", "n_pred", "pred_pixel_fraction", "iou", "dice", "pq", "sq", "rq", "f1", "ap50")


class EvaluateError(ValueError):
    """A user error of ``cellseg evaluate`` (bad folders or files), reported without a traceback."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``cellseg`` command's subparsers."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted instance/type maps (.npy dicts) against ground truth",
        description="Score predicted instance/type maps against ground truth: PQ/SQ/RQ, bPQ, mPQ, mPQ+, AJI, AJI+, "
        "Dice, detection P/R/F1, COCO AP and per-class metrics. Each folder holds one .npy dict per image "
        "(inst_map, type_map; predictions may add scores) with the same file names.",
    )
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth .npy dicts")
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted .npy dicts (same file names)")
    parser.add_argument("--out", type=Path, default=None, help="metrics JSON to write (default: PRED/metrics.json)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                        help="class names of type ids 1..C (default: class1..classC up to the largest id found)")
    parser.add_argument("--object-diameter", type=float, default=20.0,
                        help="typical object diameter in pixels (OBJECT_DIAMETER; default 20, nuclei at 40x)")
    parser.add_argument("--radius", type=float, default=None,
                        help="centroid matching radius in pixels (default 0.6 x --object-diameter, the radius of "
                        "validation and the evaluation notebook: 12 px for nuclei at 40x)")
    return parser


def load_record(path: Path) -> dict:
    """Read one ``.npy`` dict safely.

    Raises:
        EvaluateError: unreadable, not a dict, no ``inst_map``, or refused by the restricted unpickler (the message
            names the file).
    """
    from cellseg.data.safe_pickle import load_label_dict

    try:
        return load_label_dict(path)
    except (ValueError, OSError) as e:  # refused globals, not a dict, no inst_map, unreadable: all name the file
        raise EvaluateError(f"cannot read {path}: {e}") from e


def load_pairs(gt_dir: Path, pred_dir: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Ground-truth and prediction dicts paired by file name, checked for matching names, keys and shapes.

    Raises:
        EvaluateError: a missing or empty folder, file names present in only one folder, missing keys, shapes that
            differ (every message names the files).
    """
    for role, d in (("--gt", gt_dir), ("--pred", pred_dir)):
        if not d.is_dir():
            raise EvaluateError(f"{role} {d} is not a folder")
    gt_names = sorted(p.name for p in gt_dir.glob("*.npy"))
    pred_names = sorted(p.name for p in pred_dir.glob("*.npy"))
    if not gt_names:
        raise EvaluateError(f"--gt {gt_dir} holds no .npy files")
    only_gt = sorted(set(gt_names) - set(pred_names))
    only_pred = sorted(set(pred_names) - set(gt_names))
    if only_gt or only_pred:
        lines = [f"the folders must hold the same file names; {len(only_gt)} only in --gt, {len(only_pred)} only in --pred"]
        if only_gt:
            lines.append(f"  only in {gt_dir}: {', '.join(only_gt[:10])}{' ...' if len(only_gt) > 10 else ''}")
        if only_pred:
            lines.append(f"  only in {pred_dir}: {', '.join(only_pred[:10])}{' ...' if len(only_pred) > 10 else ''}")
        raise EvaluateError("\n".join(lines))
    gts, preds = [], []
    for name in gt_names:
        gt, pred = load_record(gt_dir / name), load_record(pred_dir / name)
        for path, rec in ((gt_dir / name, gt), (pred_dir / name, pred)):
            missing = [k for k in ("inst_map", "type_map") if k not in rec]
            if missing:
                raise EvaluateError(f"{path} lacks {missing}; each file needs 'inst_map' and 'type_map'")
        shapes = {f"{gt_dir / name}:{k}": np.shape(gt[k]) for k in ("inst_map", "type_map")}
        shapes.update({f"{pred_dir / name}:{k}": np.shape(pred[k]) for k in ("inst_map", "type_map")})
        if len(set(shapes.values())) != 1:
            raise EvaluateError("shapes differ: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
        gts.append(gt)
        preds.append(pred)
    return gts, preds, gt_names


def default_class_names(gts: list[dict], preds: list[dict]) -> list[str]:
    """``class1..classC`` for the largest type id found in either folder (at least one class)."""
    top = max(int(np.max(r["type_map"], initial=0)) for r in [*gts, *preds])
    return [f"class{i}" for i in range(1, max(top, 1) + 1)]


def format_table(metrics: dict) -> str:
    """Plain-text summary and per-class tables for the terminal."""

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"images: {metrics['n_images']}"]
    width = max(len(k) for k in SUMMARY_KEYS)
    lines += [f"{k:<{width}}  {fmt(metrics.get(k))}" for k in SUMMARY_KEYS]
    names = list(metrics["per_class"])
    cw = max([5, *(len(n) for n in names)])
    header = f"{'class':<{cw}}  " + "  ".join(f"{k:>10}" for k in CLASS_KEYS)
    lines += ["", header, "-" * len(header)]
    for name in names:
        row = metrics["per_class"][name]
        lines.append(f"{name:<{cw}}  " + "  ".join(f"{fmt(row.get(k)):>10}" for k in CLASS_KEYS))
    if metrics.get("collapsed_classes"):
        lines.append(f"\n!!! CLASS COLLAPSE: {metrics['collapsed_classes']} present in the ground truth, never predicted")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the tables, write the JSON. Returns 0, or 2 on a user error (message on stderr)."""
    try:
        if not args.object_diameter > 0:
            raise EvaluateError(f"--object-diameter must be > 0 pixels, got {args.object_diameter}")
        if args.radius is None:
            args.radius = centroid_radius(args.object_diameter)
        if not args.radius > 0:
            raise EvaluateError(f"--radius must be > 0 pixels, got {args.radius}")
        gts, preds, names = load_pairs(args.gt, args.pred)
        class_names = list(args.classes) if args.classes else default_class_names(gts, preds)
        metrics = evaluate_instances(gts, preds, class_names, names=names, match_radius=args.radius)
    except ValueError as e:  # EvaluateError and evaluate_instances' checks, both naming the file
        print(f"cellseg evaluate: {e}", file=sys.stderr)
        return 2
    metrics["files"] = names
    out = args.out if args.out is not None else args.pred / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, allow_nan=False))
    print(format_table(metrics))
    print(f"\nwrote {out}")
    return 0
