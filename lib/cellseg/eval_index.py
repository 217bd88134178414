"""Where evaluations live: one folder per (phase, checkpoint, split), an index of them, and a pointer to the newest.

Layout under ``RUN_DIR/eval/``::

    phase2-best-test/        metrics.json, report.md, figures, predictions/, evaluation.json
    phase1-latest-test/      (evaluating Phase 1 after Phase 2 no longer overwrites Phase 2's report)
    index.jsonl              one line per finished evaluation (folder, checkpoint hash, time, headline metrics)
    latest                   a one-line text file naming the newest folder

``latest`` is a small file rather than a symlink: symlinks are refused by some shared mounts (SMB/CIFS, object-store
FUSE mounts) and are dropped or dereferenced by the tools that copy run folders off a cluster (``scp -r``, cloud
sync), while writing a temporary file and renaming it over ``latest`` is atomic on every POSIX filesystem (Lustre,
GPFS, NFS), so a reader never sees a half-written pointer. :func:`latest_eval_dir` resolves it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

INDEX_FILE = "index.jsonl"
LATEST_FILE = "latest"
RECORD_FILE = "evaluation.json"

# Headline numbers copied into index.jsonl (the folder's metrics.json holds everything).
INDEX_METRICS = ("bpq", "mpq", "mpq_plus", "pq", "aji", "det_f1", "ap50", "map", "ap50_agnostic", "map_agnostic")


def checkpoint_label(checkpoint: str) -> str:
    """``best`` / ``latest`` as they are; a path becomes its file stem with characters other than letters, digits,
    ``_`` and ``.`` replaced by ``_`` (so the folder name stays one path component)."""
    if checkpoint in ("best", "latest"):
        return checkpoint
    stem = Path(checkpoint).name
    stem = stem[:-3] if stem.endswith(".pt") else stem
    return re.sub(r"[^A-Za-z0-9_.]", "_", stem) or "checkpoint"


def eval_dir_name(phase: int, checkpoint: str, split: str) -> str:
    """``phase<P>-<checkpoint>-<split>``, e.g. ``phase2-best-test``."""
    return f"phase{int(phase)}-{checkpoint_label(checkpoint)}-{split}"


def eval_dir(cfg) -> Path:
    """``RUN_DIR/eval/phase<EVAL_PHASE>-<EVAL_CHECKPOINT>-<EVAL_SPLIT>`` of a 02_evaluate configuration."""
    return Path(cfg.run_dir) / "eval" / eval_dir_name(cfg.EVAL_PHASE, cfg.EVAL_CHECKPOINT, cfg.EVAL_SPLIT)


def checkpoint_record(path: str | Path) -> dict[str, Any]:
    """What identifies a checkpoint file: path, SHA-256 (from its sidecar when present and matching the file's
    size, else computed), phase, epoch, step, architecture and save time from the sidecar.

    Raises:
        FileNotFoundError: the file does not exist (named in the message).
    """
    from cellseg.checkpoint.atomic import sha256_file
    from cellseg.checkpoint.sidecar import sidecar_path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; cannot record which weights were evaluated")
    side: dict[str, Any] = {}
    side_file = sidecar_path(path)
    if side_file.is_file():
        try:
            side = json.loads(side_file.read_text())
        except (OSError, ValueError):
            side = {}  # an unreadable sidecar only costs the shortcut: the hash is computed below
    size = path.stat().st_size
    sha = side.get("sha256") if side.get("size") == size else None
    arch = side.get("arch") or {}
    return {
        "path": str(path.resolve()),
        "file": path.name,
        "sha256": sha or sha256_file(path),
        "size": size,
        "phase": side.get("phase"),
        "epoch": side.get("epoch"),
        "step": side.get("step"),
        "saved": side.get("time"),
        "arch": arch,
    }


def _atomic_text(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)


def record_evaluation(out_dir: str | Path, metrics: dict, *, checkpoint: dict | None = None,
                      parameters: dict | None = None) -> dict[str, Any]:
    """Register a finished evaluation in ``out_dir``: write ``evaluation.json`` (checkpoint, parameters, time),
    append its line to the parent's ``index.jsonl`` and point ``latest`` at it. Returns the index line.

    ``out_dir`` is ``RUN_DIR/eval/<name>``; call this only after ``metrics.json`` and the report are written, so the
    index never names an unfinished folder.
    """
    out_dir = Path(out_dir)
    root = out_dir.parent
    params = dict(parameters or {})
    entry = {
        "dir": out_dir.name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "split": metrics.get("split"),
        "n_images": metrics.get("n_images"),
        "phase": params.get("EVAL_PHASE", (checkpoint or {}).get("phase")),
        "checkpoint": params.get("EVAL_CHECKPOINT"),
        "checkpoint_sha256": (checkpoint or {}).get("sha256"),
        "checkpoint_file": (checkpoint or {}).get("path"),
        "epoch": (checkpoint or {}).get("epoch"),
        "encoder": params.get("ENCODER"),
        "decoder": params.get("DECODER"),
        "metrics": {k: metrics.get(k) for k in INDEX_METRICS},
    }
    record = {**entry, "checkpoint_record": checkpoint, "parameters": params,
              "postprocess": metrics.get("postprocess"), "postprocess_tuned_on": metrics.get("postprocess_tuned_on")}
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    # One write of one line in append mode: concurrent evaluations of one run cannot interleave within a line.
    with open(root / INDEX_FILE, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
    _atomic_text(root / LATEST_FILE, out_dir.name + "\n")
    return entry


def read_index(eval_root: str | Path) -> list[dict[str, Any]]:
    """The lines of ``eval_root/index.jsonl`` (oldest first); [] when there is none.

    Raises:
        ValueError: a line that is not JSON (file and line number named).
    """
    path = Path(eval_root) / INDEX_FILE
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path} line {n} is not JSON ({e}); remove or fix that line") from e
    return out


def latest_eval_dir(run_dir: str | Path) -> Path:
    """The folder ``RUN_DIR/eval/latest`` names.

    Raises:
        FileNotFoundError: no ``latest`` file, or it names a folder that does not exist.
    """
    root = Path(run_dir) / "eval"
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} does not exist: no evaluation of {run_dir} has finished yet "
                                "(run notebooks/02_evaluate.ipynb)")
    target = root / pointer.read_text().strip()
    if not target.is_dir():
        raise FileNotFoundError(f"{pointer} names {target.name!r}, which is not a folder in {root}")
    return target
