"""Atomic, durable file writes with a running SHA-256.

``torch.save`` is not atomic (PyTorch declined to make it so), and a job killed mid-write leaves a truncated file
under the final name. Here every file is written to a uniquely named temporary file *in the target directory* (a
rename across filesystems is a copy), flushed and fsync'ed, moved into place with ``os.replace`` and the directory is
fsync'ed, following the commit-marker pattern of PyTorch distributed checkpointing. Until the ``os.replace`` the
previous file under the final name is untouched and valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
_CHUNK = 8 << 20


class HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes going through it (one pass, no re-read)."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def temp_path(target: Path) -> Path:
    """A unique temporary name next to ``target`` (same directory, hence same filesystem)."""
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


def fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable. A no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_temp(target: Path) -> Iterator[tuple[HashingWriter, Path]]:
    """Open a temporary file next to ``target`` for writing; yields (hashing writer, temp path).

    On leaving the block the data is flushed and fsync'ed (not yet renamed: see :func:`commit`). On an exception the
    temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    tmp = temp_path(target)
    try:
        with open(tmp, "xb") as f:
            writer = HashingWriter(f)
            yield writer, tmp
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def commit(tmp: Path, target: Path, *, sync_dir: bool = True) -> None:
    """``os.replace`` a finished temporary file onto ``target``; removes the temporary file if that fails."""
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(Path(target).parent)


def atomic_write_bytes(target: Path, data: bytes) -> str:
    """Write ``data`` to ``target`` atomically and durably. Returns its SHA-256 hex digest."""
    target = Path(target)
    with open_temp(target) as (writer, tmp):
        writer.write(data)
    commit(tmp, target)
    return writer.sha256


def atomic_write_json(target: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    atomic_write_bytes(target, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def copy_to_temp(source: Path, target: Path) -> Path:
    """Copy ``source`` to a fsync'ed temporary file next to ``target`` (kernel-side copy); returns the temp path."""
    tmp = temp_path(Path(target))
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temps(directory: Path) -> int:
    """Delete temporary files left by writers that died mid-write (never a committed file). Returns the count."""
    n = 0
    if not Path(directory).is_dir():
        return 0
    for p in Path(directory).iterdir():
        if p.is_file() and is_temp(p):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    if n:
        log.info("removed %d temporary file(s) left by an interrupted write in %s", n, directory)
    return n
