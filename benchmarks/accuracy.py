"""Accuracy on real data: the real workflow (notebooks through papermill, as a user runs them) on BCCD, on the DSB2018
tile split into quadrants, or on any ``DATASET='folder'`` dataset, next to a classical baseline run on the same test
split. Results go to ``benchmarks/RESULTS.md`` (section "Accuracy on real data").

    python benchmarks/accuracy.py bccd --config configs/bench_bccd_cpu.yaml --budget-minutes 45
    python benchmarks/accuracy.py dsb --config configs/bench_dsb_cpu.yaml
    python benchmarks/accuracy.py folder --data-root path/to/folder_dataset --config my.yaml --name mydata

``--bccd-root`` / ``CELLSEG_BCCD_ROOT`` and ``--dsb-root`` / ``CELLSEG_DSB2018_ROOT`` locate the data. The budget
(``--budget-minutes``) covers the whole run: Phase 1 gets ``STOP_AT`` = start + budget - ``--eval-reserve-minutes``
(a clean checkpoint-and-exit), and evaluation uses the best checkpoint. Peak memory is the largest peak resident set
of the kernel processes (``getrusage(RUSAGE_CHILDREN)``), wall times are per notebook.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_tools import (  # noqa: E402
    BoxImage,
    box_scores,
    classical_bccd,
    classical_nuclei,
    fit_bccd_rule,
    fit_box_margins,
    grow_boxes,
    prediction_boxes,
    write_dsb_quadrants,
)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Accuracy on real data (`benchmarks/accuracy.py`)"
TARGETS_F1 = {"WBC": 0.90, "Platelets": 0.60, "RBC": 0.75}  # issue 16, box-level F1 at IoU 0.5 on the BCCD test split


def _load_yaml(path: str) -> dict:
    from cellseg.config import load_params_file

    return load_params_file(path)


def _steps(params: dict) -> tuple:
    from cellseg.workflow import STEPS

    # Phase 2 runs only when the evaluation asks for it (a CPU budget spends everything on Phase 1)
    return tuple(s for s in STEPS if not (s[1].get("PHASE") == 2 and params.get("EVAL_PHASE", 2) == 1))


def run_model(run_dir: Path, params: dict, budget_min: float, reserve_min: float, kernel: str) -> dict:
    """Run the notebooks; returns wall time per notebook and the peak RSS of the largest kernel."""
    from cellseg.workflow import run_workflow

    t0 = time.time()
    if budget_min:
        params = {**params, "STOP_AT": f"{t0 + 60 * (budget_min - reserve_min):.0f}"}
    times = run_workflow(run_dir, params, kernel=kernel, steps=_steps(params))
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": times, "total_s": time.time() - t0, "peak_rss_gib": peak_kib / 2**20,
            "stop_at": params.get("STOP_AT", "")}


def mask_metrics(cache: Path, split: str, preds: dict[str, dict], class_names: list[str], diameter: float) -> dict:
    """The evaluation's own metrics (PQ, mPQ, AJI, confusion, ...) for predictions made outside the notebooks."""
    from cellseg.data import load_sample
    from cellseg.metrics import image_stats, reduce_stats
    from cellseg.metrics.detection import centroid_radius

    radius = centroid_radius(diameter)
    stats = []
    for name, pred in preds.items():
        s = load_sample(cache, split, name)
        gt = {k: s.get(k) for k in ("inst_map", "type_map", "ignore_mask")}
        stats.append(image_stats(gt, pred, len(class_names), match_radius=radius, where=f"{split}/{name}"))
    return reduce_stats(stats, class_names, None, match_radius=radius)


def model_predictions(run_dir: Path, names: list[str]) -> dict[str, dict]:
    from cellseg.data.safe_pickle import load_label_dict
    from cellseg.eval_index import latest_eval_dir

    folder = latest_eval_dir(run_dir) / "predictions"  # one folder per evaluated checkpoint and split
    return {n: load_label_dict(folder / f"{n}.npy") for n in names}


def bccd_boxes(root: Path):
    """name -> (boxes (x0, y0, x1, y1), classes) from the VOC files (the ground truth itself, not the derived masks)."""
    from cellseg.data.bccd import parse_annotation
    from cellseg.data.files import read_image

    cache: dict[str, tuple] = {}

    def boxes_of(name: str):
        if name not in cache:
            h, w = read_image(root / "JPEGImages" / f"{name}.jpg").shape[:2]
            boxes, _, _ = parse_annotation(root / "Annotations" / f"{name}.xml", (h, w))
            cache[name] = (np.array([[b.x0, b.y0, b.x1, b.y1] for b in boxes], np.float64).reshape(-1, 4),
                           np.array([b.cls for b in boxes], np.int64))
        return cache[name]

    return boxes_of


def box_eval(preds: dict[str, dict], boxes_of, class_names: list[str], margins: dict[int, float] | None = None) -> dict:
    """Box-level scores of ``preds``; ``margins`` (per class, see ``fit_box_margins``) grow each instance's box."""
    images = []
    for name, p in preds.items():
        gb, gc = boxes_of(name)
        inst = np.asarray(p["inst_map"])
        pb, pc, ps = prediction_boxes(inst, np.asarray(p["type_map"]), p.get("scores"))
        if margins:
            pb = grow_boxes(pb, pc, margins, inst.shape)
        images.append(BoxImage(gb, gc, pb, pc, ps))
    out = box_scores(images, class_names)
    out["margins"] = {class_names[c - 1]: v for c, v in (margins or {}).items()}
    return out


def training_box_margins(cache: Path, manifest: dict, boxes_of) -> dict[int, float]:
    """The annotators' per-class box margin around the derived masks, fitted on the training split only."""
    from cellseg.data import load_sample

    names = manifest["splits"]["train"]
    pairs = ((np.asarray(load_sample(cache, "train", n)["inst_map"]), *boxes_of(n)) for n in names)
    return fit_box_margins(pairs, len(manifest["class_names"]))


def run_baseline(dataset: str, cache: Path, manifest: dict, diameter: float, boxes_of=None) -> tuple[dict, dict]:
    """The classical baseline over the test split; returns (predictions, info)."""
    from cellseg.data import load_sample

    t0 = time.time()
    info: dict = {}
    if dataset == "bccd":
        train = manifest["splits"]["train"]
        rule = fit_bccd_rule(((n, load_sample(cache, "train", n)["image"]) for n in train), boxes_of)
        info["rule"] = rule.__dict__
        fn = lambda img: classical_bccd(img, rule)  # noqa: E731
    else:
        fn = lambda img: classical_nuclei(img, diameter)  # noqa: E731
    preds = {n: fn(load_sample(cache, "test", n)["image"]) for n in manifest["splits"]["test"]}
    info["seconds"] = time.time() - t0
    return preds, info


def _f(v, d: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "phase1" / "history.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def report(name: str, args, params: dict, run: dict, model_m: dict, base_m: dict, model_box: dict | None,
           base_box: dict | None, base_info: dict, class_names: list[str], run_dir: Path, load: tuple) -> str:
    hist = _history(run_dir)
    status = json.loads((run_dir / "phase1" / "status.json").read_text()) if (run_dir / "phase1" / "status.json").exists() else {}
    p1 = json.loads((run_dir / "phase1" / "params.json").read_text()) if (run_dir / "phase1" / "params.json").exists() else {}
    lines = [f"### {name}", "",
             f"Run {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, command: `{args.command_line}`.",
             f"Machine: {os.cpu_count()} CPU cores, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; load "
             f"average {load[0]:.1f} at the start and {load[1]:.1f} at the end ("
             + ("other jobs shared the machine: wall times are upper bounds of what the same budget gives on an idle "
                "machine)." if load[0] >= 1.0 else "no other job was running at the start; the run's own kernel "
                "raises the load during it)."),
             f"Training: {p1.get('mode', '?')}; input scale {params.get('INPUT_SCALE', 1.0)}; "
             f"{len(hist)} epochs, {hist[-1]['step'] if hist else 0} optimizer steps; Phase 1 status: "
             f"{status.get('status', '?')} ({status.get('reason', '')}); NC class weights {p1.get('class_weights')} "
             f"({p1.get('class_weights_source', '')}).",
             "Wall time: " + ", ".join(f"{k.replace('.ipynb', '')} {v / 60:.1f} min" for k, v in run["seconds"].items())
             + f"; total {run['total_s'] / 60:.1f} min (budget {args.budget_minutes or 'none'} min). Peak memory: "
             f"{run['peak_rss_gib']:.2f} GiB (largest kernel's peak RSS). Classical baseline: {base_info['seconds']:.0f} s.",
             ""]
    if model_box is not None:
        grown = ", ".join(f"{c} {v:g} px" for c, v in (model_box.get("margins") or {}).items())
        lines += ["Box-level detection on the test split (each instance's bounding box vs the VOC boxes, IoU >= 0.5, "
                  "VOC all-point AP; F1 over every kept instance). The model's boxes are its instances' bounding "
                  "boxes grown by the annotators' median margin per class, fitted on the training split (VOC box vs "
                  f"the bounding box of the mask derived from it: {grown}); the baseline's rule fits its own margins "
                  "the same way:", "",
                  "| class | GT | model AP50 | model P | model R | **model F1** | baseline AP50 | baseline F1 | target F1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in class_names:
            m, b = model_box["per_class"][c], base_box["per_class"][c]
            t = TARGETS_F1.get(c)
            verdict = "" if t is None else (f"{t:.2f} ✓" if m["f1"] >= t else f"{t:.2f} ✗ ({m['f1'] - t:+.3f})")
            lines.append(f"| {c} | {m['n_gt']} | {_f(m['ap50'])} | {_f(m['precision'])} | {_f(m['recall'])} | "
                         f"**{_f(m['f1'])}** | {_f(b['ap50'])} | {_f(b['f1'])} | {verdict} |")
        lines += [f"| mean | | {_f(model_box['map50'])} | | | {_f(model_box['mean_f1'])} | {_f(base_box['map50'])} | "
                  f"{_f(base_box['mean_f1'])} | |", ""]
        beaten = [c for c in class_names if model_box["per_class"][c]["f1"] > base_box["per_class"][c]["f1"]]
        lines += [f"Model beats the baseline's box F1 on {len(beaten)}/{len(class_names)} classes ({', '.join(beaten)}).",
                  ""]
        labels = class_names + ["(none)"]
        for who, box in (("model", model_box), ("baseline", base_box)):
            lines += [f"Box-level confusion, {who} (rows GT, columns prediction; '(none)' = missed / spurious):", "",
                      "| GT \\ pred | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
            lines += [f"| {lab} | " + " | ".join(str(v) for v in row) + " |" for lab, row in zip(labels, box["confusion"])]
            lines.append("")
    vs = " vs box-derived masks" if name.startswith("BCCD") else ""
    lines += [f"Mask metrics on the test split{vs} (cellseg.metrics; PQ/AJI mean over images, mPQ over classes):", "",
              "| | PQ | mPQ | AJI | Dice | F1 (IoU > 0.5) | " + " | ".join(f"PQ {c}" for c in class_names) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(class_names)]
    for who, m in (("model", model_m), ("classical baseline", base_m)):
        lines.append(f"| {who} | {_f(m.get('pq'))} | {_f(m.get('mpq'))} | {_f(m.get('aji'))} | {_f(m.get('dice'))} | "
                     f"{_f(m.get('det_f1'))} | " + " | ".join(_f(m['per_class'][c]['pq']) for c in class_names) + " |")
    conf = model_m.get("confusion")
    if conf and len(class_names) > 1:
        lines += ["", "Mask-level confusion of the model (IoU > 0.5 matches; rows GT, columns prediction):", "",
                  "| GT \\ pred | " + " | ".join(conf["labels"]) + " |", "|" + "---|" * (len(conf["labels"]) + 1)]
        lines += [f"| {lab} | " + " | ".join(str(v) for v in row) + " |" for lab, row in zip(conf["labels"], conf["matrix"])]
    from cellseg.eval_index import latest_eval_dir

    eval_rel = latest_eval_dir(run_dir).relative_to(run_dir).as_posix()
    figs = [f for f in ("phase1/loss_curves.png", "phase1/val_curves.png", "phase1/class_f1_curves.png",
                        f"{eval_rel}/overlays.png", "baseline_overlays.png") if (run_dir / f).exists()]
    lines += ["", "Figures (in the run folder `" + str(run_dir) + "`): " + ", ".join(f"`{f}`" for f in figs) + ".", ""]
    return "\n".join(lines)


def write_results(key: str, text: str, path: Path = RESULTS) -> None:
    """Replace this dataset's block (between markers) inside the accuracy section, or append it."""
    start, end = f"<!-- accuracy:{key}:start -->", f"<!-- accuracy:{key}:end -->"
    content = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{text}\n{end}"
    if start in content and end in content:
        head, rest = content.split(start, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        if SECTION not in content:
            content = content.rstrip("\n") + f"\n\n{SECTION}\n\nWritten by `benchmarks/accuracy.py` (issue 16).\n"
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(content)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["bccd", "dsb", "folder"])
    ap.add_argument("--config", help="papermill -f parameter file (default: configs/bench_<dataset>_cpu.yaml)")
    ap.add_argument("--data-root", help="folder dataset (DATASET='folder')")
    ap.add_argument("--name", help="name of a folder dataset in RESULTS.md")
    ap.add_argument("--bccd-root", default=os.environ.get("CELLSEG_BCCD_ROOT"))
    ap.add_argument("--dsb-root", default=os.environ.get("CELLSEG_DSB2018_ROOT"))
    ap.add_argument("--run-dir", help="default runs/bench/<dataset>")
    ap.add_argument("--budget-minutes", type=float, default=0.0, help="whole-run budget; 0 for none")
    ap.add_argument("--eval-reserve-minutes", type=float, default=8.0)
    ap.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[], help="parameter override")
    ap.add_argument("--kernel", default="cellseg")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true", help="print the results instead of writing RESULTS.md")
    ap.add_argument("--reuse", action="store_true",
                    help="score an already finished run in --run-dir again (no training; timings from its run.json)")
    args = ap.parse_args(argv)
    args.command_line = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from cellseg.config import parse_cli_value
    from cellseg.data import load_manifest
    from cellseg.eval_index import latest_eval_dir

    config = args.config or str(ROOT / "configs" / f"bench_{args.dataset}_cpu.yaml")
    params = _load_yaml(config)
    for k, v in args.p:
        params[k] = parse_cli_value(v)
    run_dir = Path(args.run_dir or ROOT / "runs" / "bench" / (args.name or args.dataset)).resolve()
    if not args.reuse and run_dir.exists() and any(run_dir.iterdir()):
        ap.error(f"--run-dir {run_dir} is not empty: a benchmark starts from scratch (the notebooks would resume its "
                 "checkpoints). Remove it, choose another --run-dir, or pass --reuse to score that run again.")
    if args.dataset == "bccd":
        if not args.bccd_root:
            ap.error("BCCD: give --bccd-root or set CELLSEG_BCCD_ROOT (the BCCD/ folder with Annotations/, JPEGImages/)")
        params.update(DATASET="bccd", DATA_ROOT=str(Path(args.bccd_root).resolve()))
        name = "BCCD (official splits: 205 train / 87 val / 72 test)"
    elif args.dataset == "dsb":
        if not args.dsb_root:
            ap.error("DSB2018: give --dsb-root or set CELLSEG_DSB2018_ROOT (the folder with img2d.tif, mask2d.tif)")
        from cellseg.data.files import read_image, read_mask

        root = Path(args.dsb_root)
        folder = run_dir / "dsb_quadrants"
        if not args.reuse:
            write_dsb_quadrants(read_image(root / "img2d.tif"), read_mask(root / "mask2d.tif"), folder)
        params.update(DATASET="folder", DATA_ROOT=str(folder))
        name = "DSB2018 tile (quadrant 3 held out; quadrants 0-2 as 12 sub-tiles: 10 train, 2 val)"
    else:
        if not args.data_root:
            ap.error("folder: give --data-root (a DATASET='folder' dataset, see cellseg.data.folder)")
        params.update(DATASET="folder", DATA_ROOT=str(Path(args.data_root).resolve()))
        name = f"folder dataset {args.name or Path(args.data_root).name}"
    load0 = os.getloadavg()[0]
    if args.reuse:
        if not (run_dir / "run.json").exists():
            ap.error(f"--reuse: {run_dir / 'run.json'} does not exist; run the benchmark without --reuse first")
        run = json.loads((run_dir / "run.json").read_text())
    else:
        run = run_model(run_dir, params, args.budget_minutes, args.eval_reserve_minutes, args.kernel)
        (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    cache = Path(params["DATA_CACHE"]) if params.get("DATA_CACHE") else run_dir / "data"
    manifest = load_manifest(cache)
    class_names = list(manifest["class_names"])
    names = list(manifest["splits"]["test"])
    diameter = float(params.get("OBJECT_DIAMETER", 100.0))
    boxes_of = bccd_boxes(Path(params["DATA_ROOT"])) if args.dataset == "bccd" else None
    model_pred = model_predictions(run_dir, names)
    base_pred, base_info = run_baseline(args.dataset, cache, manifest, diameter, boxes_of)
    model_m = json.loads((latest_eval_dir(run_dir) / "metrics.json").read_text())
    base_m = mask_metrics(cache, "test", base_pred, class_names, diameter)
    margins = training_box_margins(cache, manifest, boxes_of) if boxes_of else None
    model_box = box_eval(model_pred, boxes_of, class_names, margins) if boxes_of else None
    base_box = box_eval(base_pred, boxes_of, class_names) if boxes_of else None
    from cellseg.data import load_sample
    from cellseg.report import plot_overlays

    examples = [(n, load_sample(cache, "test", n)["image"], np.asarray(load_sample(cache, "test", n)["inst_map"]),
                 base_pred[n]["inst_map"]) for n in names[:4]]
    plot_overlays(examples, run_dir / "baseline_overlays.png")
    summary = {"run": run, "model": {"mask": model_m, "box": model_box}, "baseline": {"mask": base_m, "box": base_box,
                                                                                      "info": base_info}}
    (run_dir / "accuracy.json").write_text(json.dumps(summary, indent=2, default=float))
    text = report(name, args, params, run, model_m, base_m, model_box, base_box, base_info, class_names, run_dir,
                  (load0, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_results(args.dataset if args.dataset != "folder" else f"folder-{args.name or 'data'}", text,
                      Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
