"""Run the whole workflow headless through the real notebooks: 00 -> 01 (PHASE 1) -> 01 (PHASE 2) -> 02 -> 03.

``make demo`` calls ``python -m cellseg.workflow --run-dir runs/demo --config configs/tiny_cpu.yaml``; the notebook
tests call :func:`run_workflow`. Each notebook starts in a fresh kernel; phases hand off through files.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

STEPS = (
    ("00_prepare_data", {}, "00_prepare_data.ipynb"),
    ("01_train", {"PHASE": 1}, "01_train_phase1.ipynb"),
    ("01_train", {"PHASE": 2}, "01_train_phase2.ipynb"),
    ("02_evaluate", {}, "02_evaluate.ipynb"),
    ("03_predict", {}, "03_predict.ipynb"),
)


def project_root() -> Path:
    """The checkout holding ``notebooks/`` (this package is installed editable from ``lib/``)."""
    return Path(__file__).resolve().parents[2]


def run_notebook(name: str, out: Path, parameters: dict, *, kernel: str = "cellseg", cwd: Path | None = None,
                 log_output: bool = False) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``out``."""
    import papermill as pm

    from cellseg.config import NOTEBOOK_PARAMS, Config
    from cellseg.kernels import engine_kwargs

    # Drop the other notebooks' parameters (papermill would warn about each); unknown names stay, so the
    # notebook's validation cell rejects a typo.
    known = {f.name for f in dataclasses.fields(Config)}
    parameters = {k: v for k, v in parameters.items() if k in NOTEBOOK_PARAMS[name] or k not in known}
    root = project_root()
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(root / "notebooks" / f"{name}.ipynb"), str(out), parameters=parameters,
                        kernel_name=kernel, cwd=str(cwd or root), log_output=log_output, progress_bar=False,
                        **engine_kwargs())
    return out


def run_workflow(run_dir: str | Path, params: dict, *, kernel: str = "cellseg", steps=STEPS,
                 log_output: bool = False) -> dict[str, float]:
    """Run the notebooks in order; executed copies go to ``RUN_DIR/notebooks``. Returns seconds per step."""
    run_dir = Path(run_dir)
    base = {**params, "RUN_DIR": str(run_dir)}  # checkpoints: CHECKPOINT_DIR, default RUN_DIR/checkpoints
    times = {}
    for name, extra, out_name in steps:
        t0 = time.perf_counter()
        print(f"[cellseg] running notebooks/{name}.ipynb {extra or ''} -> {run_dir / 'notebooks' / out_name}", flush=True)
        run_notebook(name, run_dir / "notebooks" / out_name, {**base, **extra}, kernel=kernel, log_output=log_output)
        times[out_name] = time.perf_counter() - t0
    return times


class _CellMarkers(logging.Filter):
    """Drop papermill's "Executing Cell 7----" / "Ending Cell 7----" lines; the cells' own output stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(("Executing Cell ", "Ending Cell ")) and msg.endswith("-"))


def stream_notebook_output() -> logging.Handler:
    """Print what the notebooks print (papermill's ``log_output``) to stdout as it comes: the progress lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  | %(message)s"))
    handler.addFilter(_CellMarkers())
    logger = logging.getLogger("papermill")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def main(argv: list[str] | None = None) -> int:
    from cellseg.config import load_params_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--config", default="configs/tiny_cpu.yaml", help="papermill -f parameter file")
    ap.add_argument("--kernel", default="cellseg")
    args = ap.parse_args(argv)
    params = load_params_file(args.config)
    t0 = time.perf_counter()
    stream_notebook_output()
    times = run_workflow(args.run_dir, params, kernel=args.kernel, log_output=True)
    run_dir = Path(args.run_dir)
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
    print(f"\n[cellseg] done in {time.perf_counter() - t0:.0f} s ({steps})")
    print(f"[cellseg] executed notebooks: {run_dir / 'notebooks'}")
    print(f"[cellseg] checkpoints:        {run_dir / 'checkpoints'}")
    # 02_evaluate writes RUN_DIR/eval/phase<P>-<checkpoint>-<split>/; eval/latest names the newest folder.
    from cellseg.eval_index import latest_eval_dir

    latest = latest_eval_dir(run_dir)
    print(f"[cellseg] metrics:            {latest / 'metrics.json'}")
    print(f"[cellseg] report:             {latest / 'report.md'}")
    print(f"[cellseg] all evaluations:    {run_dir / 'eval' / 'index.jsonl'} (cellseg runs summarize {run_dir})")
    print(f"[cellseg] predictions:        {run_dir / 'predict' / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
