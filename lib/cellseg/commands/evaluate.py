"""``cellseg evaluate --gt DIR --pred DIR [--out FILE] [--classes NAME ...] [--tissues FILE]``: score saved predictions.

Each folder holds one ``.npy`` per image, with the same file names; each file is a dict with ``inst_map`` and
``type_map`` (integer arrays) and, for predictions, optionally ``scores`` (``scores[k - 1]`` = confidence of
instance id k, default 1.0) — the format :func:`cellseg.evaluation.evaluate_model` writes to ``predictions/``.
Ground-truth files may carry an ``ignore_mask`` and a tissue label (``tissue``, or ``meta["tissue"]`` as in the
prepared cache); with tissues for every image (from the files or ``--tissues FILE``), ``bpq``/``mpq`` are averaged
per tissue and then over tissues, as PanNuke's official evaluation. The files are read with the project's restricted unpickler (only
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

SUMMARY_KEYS = ("pq", "sq", "rq", "bpq", "bpq_incl_empty_gt", "aji", "aji_plus", "dice", "det_precision",
                "det_recall", "det_f1", "ap50_agnostic", "map_agnostic",  # class-agnostic
                "mpq", "mpq_gt_or_pred", "mpq_plus", "ap50", "ap75", "map")  # class-aware
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
        "(inst_map, type_map; predictions may add scores = class-aware confidence and objectness) with the same file "
        "names. Each number is printed with its convention.",
    )
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth .npy dicts")
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted .npy dicts (same file names)")
    parser.add_argument("--out", type=Path, default=None, help="metrics JSON to write (default: PRED/metrics.json)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                        help="class names of type ids 1..C (default: class1..classC up to the largest id found)")
    parser.add_argument("--tissues", type=Path, default=None, metavar="FILE",
                        help="tissue label per image: JSON {file name: tissue} or lines 'file name,tissue' "
                        "(default: the ground-truth files' own 'tissue' / meta['tissue'] when every file has one)")
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


def _file_tissue(rec: dict) -> str | None:
    value = rec.get("tissue")
    if value is None and isinstance(rec.get("meta"), dict):
        value = rec["meta"].get("tissue")
    if value is None:
        return None
    return str(np.asarray(value).item()) if np.ndim(value) == 0 else str(value)


def read_tissues_file(path: Path) -> dict[str, str]:
    """``{file name: tissue}`` from JSON or from lines ``name,tissue`` (comma or tab; ``#`` comments; names with or
    without ``.npy``).

    Raises:
        EvaluateError: unreadable, not a JSON object of strings, or a line without two fields (line named).
    """
    try:
        text = path.read_text()
    except OSError as e:
        raise EvaluateError(f"--tissues {path}: cannot read it ({e})") from e
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise EvaluateError(f"--tissues {path} is not valid JSON ({e}); give {{\"file.npy\": \"tissue\", ...}}") from e
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise EvaluateError(f"--tissues {path} must hold a JSON object mapping file names to tissue names")
        return {str(k): v for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",")]
        if len(parts) != 2 or not all(parts):
            raise EvaluateError(f"--tissues {path} line {n}: expected 'file name,tissue', got {line!r}")
        out[parts[0]] = parts[1]
    return out


def image_tissues(gts: list[dict], names: list[str], gt_dir: Path, tissues_file: Path | None) -> list[str] | None:
    """One tissue per image from ``--tissues`` or the ground-truth files; None when no file carries one.

    Raises:
        EvaluateError: ``--tissues`` misses images, or only some ground-truth files carry a tissue (names listed).
    """
    if tissues_file is not None:
        table = read_tissues_file(tissues_file)
        out, missing = [], []
        for name in names:
            stem = name[:-4] if name.endswith(".npy") else name
            tissue = table.get(name, table.get(stem))
            missing += [name] if tissue is None else []
            out.append(tissue)
        if missing:
            raise EvaluateError(f"--tissues {tissues_file} has no tissue for {len(missing)} of {len(names)} files: "
                                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; add a line for each")
        return out
    found = [_file_tissue(g) for g in gts]
    if all(t is None for t in found):
        return None
    lacking = [n for n, t in zip(names, found) if t is None]
    if lacking:
        raise EvaluateError(
            f"{len(lacking)} of {len(names)} files in {gt_dir} carry no tissue label while the others do "
            f"({', '.join(lacking[:10])}{' ...' if len(lacking) > 10 else ''}): bPQ/mPQ would silently lose the "
            "tissue average. Add 'tissue' to those files or give every image's tissue with --tissues FILE.")
    return found  # type: ignore[return-value]


def default_class_names(gts: list[dict], preds: list[dict]) -> list[str]:
    """``class1..classC`` for the largest type id found in either folder (at least one class)."""
    top = max(int(np.max(r["type_map"], initial=0)) for r in [*gts, *preds])
    return [f"class{i}" for i in range(1, max(top, 1) + 1)]


def format_table(metrics: dict) -> str:
    """Plain-text summary and per-class tables for the terminal."""

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"images: {metrics['n_images']}, tissues: {metrics.get('n_tissues') or 'none (means over images)'}"]
    width = max(len(k) for k in SUMMARY_KEYS)
    conv = metrics.get("conventions") or {}
    lines += [f"{k:<{width}}  {fmt(metrics.get(k)):>7}  {conv.get(k, '')}" for k in SUMMARY_KEYS]
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
        tissues = image_tissues(gts, names, args.gt, getattr(args, "tissues", None))
        metrics = evaluate_instances(gts, preds, class_names, tissues, names=names, match_radius=args.radius)
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
