"""SHA-256 of large input files (encoder weights), cached by path + size + modification time.

Hashing UNI's 1.2 GB file takes seconds; every notebook kernel, rank and checkpoint load would pay it again. The cache
lives in memory and in ``$XDG_CACHE_HOME/cellseg/file_sha256.json`` (``~/.cache`` by default; ``CELLSEG_CACHE_DIR``
overrides the folder). An entry is reused only while the file's absolute path, size and ``st_mtime_ns`` are unchanged,
so a file replaced in place (new size or time) is hashed again. The one place the project hashes such files: the
compact checkpoints' base-weights identity and the run identity both use :func:`file_sha256`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from cellseg.checkpoint.atomic import sha256_file

log = logging.getLogger(__name__)

_MEMORY: dict[str, tuple[int, int, str]] = {}


def cache_file() -> Path:
    """Where the on-disk hash cache lives."""
    base = os.environ.get("CELLSEG_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cellseg")
    return Path(base) / "file_sha256.json"


def _read_disk() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, entry: list) -> None:
    """Best effort: a read-only or full home only costs a re-hash next time."""
    path = cache_file()
    data = _read_disk()
    data[key] = entry
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # atomic: ranks hashing at once never leave a half-written cache
    except OSError as e:
        log.debug("could not write the hash cache %s: %s", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of ``path``'s bytes, from the cache when path, size and mtime are unchanged.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    hit = _MEMORY.get(key)
    if hit is None:
        disk = _read_disk().get(key)
        if isinstance(disk, list) and len(disk) == 3:
            hit = (int(disk[0]), int(disk[1]), str(disk[2]))
    if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        _MEMORY[key] = hit
        return hit[2]
    digest = sha256_file(path)
    _MEMORY[key] = (st.st_size, st.st_mtime_ns, digest)
    _write_disk(key, [st.st_size, st.st_mtime_ns, digest])
    return digest


def file_identity(path: str | Path) -> dict:
    """{'file': name, 'path': absolute path, 'size': bytes, 'sha256': hex} of a weights file (plain types)."""
    path = Path(path).resolve()
    return {"file": path.name, "path": str(path), "size": path.stat().st_size, "sha256": file_sha256(path)}
