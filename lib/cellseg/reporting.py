"""Plain-text tables the notebooks print at the end of each section (readable in Jupyter and in SLURM logs)."""

from __future__ import annotations


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    return "\n".join(lines + [fmt.format(*r) for r in cells[1:]])


def counts_table(manifest: dict) -> str:
    """Instances per class and split, and images per split, from a prepared-data manifest."""
    classes = list(manifest["class_names"])
    rows = []
    for split, names in manifest["splits"].items():
        counts = manifest.get("counts", {}).get(split, {})
        rows.append([split, len(names)] + [counts.get(c, 0) for c in classes])
    return _table(rows, ["split", "images"] + classes)


def params_table(counts: dict) -> str:
    """Total / trainable / frozen parameters and the trainable ones per group."""
    rows = [[k, f"{counts[k]:,}"] for k in ("total", "trainable", "frozen", "backbone", "lora", "decoder")]
    rows.append(["lora modules", counts.get("lora_modules", 0)])
    return _table(rows, ["parameters (backbone/lora/decoder: trainable)", "count"])


def training_summary(summary: dict, cfg) -> str:
    status = ("preempted, resumable" if summary.get("stopped") else
              "finished (early stopping)" if summary.get("early_stopped") else "finished")
    rows = [["status", status], ["epochs done", summary["epochs_done"]], ["optimizer steps", summary["steps"]],
            [f"best {cfg.MONITOR_METRIC}", summary["best_metric"]], ["best epoch", summary["best_epoch"]],
            ["checkpoints", str(cfg.checkpoint_dir())], ["history", str(cfg.phase_dir() / "history.jsonl")],
            ["curves", str(cfg.phase_dir() / "*.png")]]
    params = _read_params(cfg)
    if params.get("mode"):
        rows.insert(1, ["mode", params["mode"]])
    if params.get("class_weights"):
        rows.insert(2, ["NC class weights", f"{params['class_weights']} ({params.get('class_weights_source', '')})"])
    return _table(rows, [f"Phase {cfg.PHASE}", ""])


def _read_params(cfg) -> dict:
    import json

    path = cfg.phase_dir() / "params.json"
    return json.loads(path.read_text()) if path.exists() else {}


def metrics_table(metrics: dict) -> str:
    """Class-agnostic and class-aware headline metrics with their conventions, then per-class rows."""
    from cellseg.metrics import CLASS_AGNOSTIC_KEYS, CLASS_AWARE_KEYS

    conv = metrics.get("conventions") or {}

    def value(v):
        return "-" if v is None else float(v)

    head = "\n\n".join(
        _table([[k, value(metrics[k]), conv.get(k, "")] for k in keys if k in metrics], [title, "value", "convention"])
        for title, keys in (("class-agnostic", CLASS_AGNOSTIC_KEYS), ("class-aware", CLASS_AWARE_KEYS))
    )
    per = metrics.get("per_class", {})
    cols = ["iou", "dice", "pq", "sq", "rq", "f1", "ap50"]
    rows = [[c] + [value(v.get(k)) for k in cols] for c, v in per.items()]
    return head + "\n\n" + _table(rows, ["class"] + cols) if rows else head
