"""``cellseg runs summarize RUN_DIR [RUN_DIR ...] [--out FILE.md|FILE.csv]``: one table across runs, a row per
(run, phase, checkpoint, split) evaluation (:mod:`cellseg.runs_table`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellseg.runs_table import RunsError, format_csv, format_markdown, summarize_runs


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``runs`` on the ``cellseg`` command's subparsers."""
    parser = subparsers.add_parser("runs", help="tables across runs (runs summarize RUN_DIR ...)",
                                   description="Tables across runs.")
    sub = parser.add_subparsers(dest="runs_command", required=True)
    summ = sub.add_parser(
        "summarize", help="one row per (run, phase, checkpoint, split) evaluation",
        description="One row per (run, phase, checkpoint, split) evaluation found in RUN_DIR/eval/index.jsonl: "
        "encoder, decoder, epochs, key metrics, per-class PQ/F1, date, checkpoint hash. Printed as markdown; "
        "--out writes markdown (.md) or CSV (.csv).",
    )
    summ.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    summ.add_argument("--out", type=Path, default=None, help="write the table to FILE.md or FILE.csv as well")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the table (and write --out). Returns 0, or 2 on a user error (message on stderr)."""
    try:
        if args.out is not None and args.out.suffix.lower() not in (".md", ".csv"):
            raise RunsError(f"--out {args.out} must end in .md or .csv")
        columns, rows = summarize_runs(args.run_dirs)
    except (RunsError, ValueError) as e:
        print(f"cellseg runs summarize: {e}", file=sys.stderr)
        return 2
    print(format_markdown(columns, rows), end="")
    if args.out is not None:
        text = format_csv(columns, rows) if args.out.suffix.lower() == ".csv" else format_markdown(columns, rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0
