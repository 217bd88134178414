"""Where a phase's checkpoint files live and how old ones are moved aside (never overwritten or deleted)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import time
from pathlib import Path

from cellseg.checkpoint.atomic import fsync_dir, is_temp

LATEST, BEST = "latest.pt", "best.pt"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


@functools.lru_cache(maxsize=1)
def default_code_version() -> str:
    """cellseg's package version plus the git commit of its source tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("cellseg")
    except PackageNotFoundError:
        ver = "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)
        ver += f"+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return ver


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


def epoch_files(directory: Path) -> list[Path]:
    """``epoch_XXXX.pt`` files of a directory, newest (highest number) first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _EPOCH_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_files(directory: Path) -> list[Path]:
    """Every checkpoint and sidecar file of a directory (not the ledger, not temporary files)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and not is_temp(p)
                  and (p.suffix == ".pt" or p.name.endswith(".pt.json")))


def move_aside(directory: Path, files: list[Path], label: str) -> Path:
    """Move ``files`` into a new sibling folder ``<directory>.<label>-<timestamp>`` (never overwriting)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = directory.parent / f"{directory.name}.{label}-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = directory.parent / f"{directory.name}.{label}-{stamp}-{n}"
    dest.mkdir(parents=True)
    for f in files:
        os.replace(f, dest / f.name)
    fsync_dir(directory)
    fsync_dir(dest)
    return dest
