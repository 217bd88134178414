"""The append-only ``ledger.jsonl`` of a phase's checkpoint directory: one JSON line per save, load, rejection
(with its reason), stop, fresh start and force-recreate move, so that what happened to a run can be read back after
the job is gone (torchtune's ``DiskLogger`` habit: machine-readable history as JSON lines)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"


def now_iso() -> str:
    """Local time with UTC offset, to the second (what a person compares against SLURM logs)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Ledger:
    """Appends events to ``directory/ledger.jsonl``. Each line is one ``write`` on an ``O_APPEND`` descriptor and is
    fsync'ed, so lines are never interleaved or half-written by a killed process except possibly the very last one,
    which :func:`read_ledger` skips."""

    def __init__(self, directory: Path, *, enabled: bool = True):
        self.path = Path(directory) / LEDGER_NAME
        self.enabled = enabled

    def append(self, event: str, **fields: Any) -> dict | None:
        """Record ``event`` with ``fields`` (made JSON-safe with ``str`` where needed). Returns the record."""
        if not self.enabled:
            return None
        record = {"time": now_iso(), "event": event, "host": socket.gethostname(), "pid": os.getpid(), **fields}
        line = (json.dumps(record, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return record


def read_ledger(path: Path) -> list[dict]:
    """All complete records of a ledger file (a torn last line from a killed writer is skipped with a log line)."""
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_NAME
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not valid JSON (a write cut short?): skipped", path, i + 1)
    return records
