"""One table across runs: a row per (run, phase, checkpoint, split) evaluation, read from each run's
``RUN_DIR/eval/index.jsonl`` and the evaluation folders it names (see :mod:`cellseg.eval_index`).

Re-evaluating the same (phase, checkpoint, split) adds a line to the index; the table keeps the newest. Columns:
run, phase, checkpoint, split, encoder, decoder, epochs (of the checkpoint), the headline metrics, PQ and F1 of every
class (``pq:<class>``, ``f1:<class>``), the evaluation date and the checkpoint's SHA-256.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellseg.eval_index import INDEX_FILE, read_index

KEY_METRICS = ("bpq", "mpq", "mpq_plus", "pq", "aji", "det_f1", "ap50", "map", "ap50_agnostic")
BASE_COLUMNS = ("run", "phase", "checkpoint", "split", "encoder", "decoder", "epochs")
TAIL_COLUMNS = ("date", "checkpoint_sha256")


class RunsError(ValueError):
    """A run folder that cannot be summarised (named in the message with the fix)."""


def _run_rows(run_dir: Path) -> list[dict[str, Any]]:
    eval_root = run_dir / "eval"
    if not run_dir.is_dir():
        raise RunsError(f"{run_dir} is not a folder; give RUN_DIRs of runs (the folders holding eval/)")
    entries = read_index(eval_root)
    if not entries:
        old = " (it holds an eval/metrics.json of the layout before per-checkpoint folders: run 02_evaluate again)" \
            if (eval_root / "metrics.json").is_file() else ""
        raise RunsError(f"{eval_root / INDEX_FILE} does not exist or is empty: {run_dir} has no finished "
                        f"evaluation{old}. Run notebooks/02_evaluate.ipynb with RUN_DIR={run_dir}.")
    newest: dict[str, dict] = {}
    for entry in entries:  # later lines win: a re-evaluation replaces the row
        newest[entry["dir"]] = entry
    rows = []
    for name, entry in newest.items():
        metrics_file = eval_root / name / "metrics.json"
        if not metrics_file.is_file():
            raise RunsError(f"{eval_root / INDEX_FILE} lists {name!r} but {metrics_file} is missing; re-run that "
                            "evaluation or remove its line from the index")
        try:
            metrics = json.loads(metrics_file.read_text())
        except ValueError as e:
            raise RunsError(f"{metrics_file} is not valid JSON ({e}); re-run that evaluation") from e
        row: dict[str, Any] = {
            "run": run_dir.name, "phase": entry.get("phase"), "checkpoint": entry.get("checkpoint"),
            "split": entry.get("split"), "encoder": entry.get("encoder"), "decoder": entry.get("decoder"),
            "epochs": entry.get("epoch"),
        }
        row.update({k: metrics.get(k) for k in KEY_METRICS})
        for cls, values in (metrics.get("per_class") or {}).items():
            row[f"pq:{cls}"] = values.get("pq")
            row[f"f1:{cls}"] = values.get("f1")
        row["date"] = entry.get("time")
        row["checkpoint_sha256"] = entry.get("checkpoint_sha256")
        rows.append(row)
    return rows


def summarize_runs(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows (one per run and evaluation folder, runs in the given order, folders by phase, checkpoint,
    split).

    Raises:
        RunsError: a folder that is not a run with finished evaluations, or an index naming a missing folder.
    """
    if not run_dirs:
        raise RunsError("give at least one RUN_DIR")
    rows: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        run_rows = _run_rows(Path(run_dir))
        run_rows.sort(key=lambda r: (str(r["phase"]), str(r["checkpoint"]), str(r["split"])))
        rows += run_rows
    class_cols = list(dict.fromkeys(k for r in rows for k in r if k.startswith(("pq:", "f1:"))))
    columns = [*BASE_COLUMNS, *KEY_METRICS, *class_cols, *TAIL_COLUMNS]
    return columns, rows


def _cell(value: Any, column: str, short_hash: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if column == "checkpoint_sha256" and short_hash:
        return str(value)[:12]
    return str(value)


def format_markdown(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """A markdown table (hashes shortened to 12 characters)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c), c, True) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_csv(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """CSV with full hashes and full-precision numbers (empty cells for missing values)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    return buf.getvalue()
