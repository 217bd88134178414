"""BCCD pinned by content: the SHA-256 and size of every file of its ``BCCD/`` folder, checked after unpacking.

A GitHub archive is generated on request and GitHub has changed its compression before, so the archive's own hash is
a weak pin: the same commit can come back as other bytes. What a result depends on is the files, so those are
pinned: ``bccd_manifest.tsv`` (next to this module) lists ``relative_path<TAB>sha256<TAB>size`` for every file under
``Annotations/``, ``JPEGImages/`` and ``ImageSets/`` of commit ``BCCD_COMMIT``, computed once from a copy of the
dataset (MIT licence) with :func:`write_manifest`; ``BCCD_MANIFEST_SHA256`` pins the manifest file itself, so an
edited manifest is noticed. ``cellseg data fetch bccd DIR`` unpacks the archive into a staging folder, compares it
file by file and moves nothing into ``DIR`` unless everything matches; ``cellseg data verify bccd DIR`` checks a
folder already on disk. ``--no-verify`` exists for an upstream that really changed: the data is moved into place
with a loud warning and ``UNVERIFIED.txt`` next to it listing the differences.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from cellseg.data.download import download_verified, fetch_url, sha256_file

log = logging.getLogger(__name__)

BCCD_MANIFEST = Path(__file__).with_name("bccd_manifest.tsv")
BCCD_MANIFEST_SHA256 = "b5bdcf72f4ab7f32ee267c0c9ae162689932db18e25db154935f2bebf83634a6"
PINNED_FOLDERS = ("Annotations", "JPEGImages", "ImageSets")  # what the loader reads; other top-level files are not
UNVERIFIED_MARKER = "UNVERIFIED.txt"
_HEADER = "# relative_path\tsha256\tsize"


class ContentMismatch(ValueError):
    """A BCCD folder differs from the pinned manifest; the message names the files and what to do."""

    def __init__(self, message: str, report: Comparison):
        super().__init__(message)
        self.report = report


@dataclass
class Comparison:
    """Files of a folder against the manifest: missing, extra, or with other bytes (relative paths, sorted)."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def describe(self, first: int = 5) -> str:
        parts = []
        for words, names in (("missing", self.missing), ("not in the pinned dataset", self.extra),
                             ("with other content", self.different)):
            if names:
                more = f" and {len(names) - first} more" if len(names) > first else ""
                parts.append(f"{len(names)} {words}: {', '.join(names[:first])}{more}")
        return "; ".join(parts) if parts else f"all {self.checked} files match"


def manifest_of(root: str | Path) -> dict[str, tuple[str, int]]:
    """relative path -> (SHA-256, size) of every file under ``PINNED_FOLDERS`` of ``root``."""
    root = Path(root)
    out = {}
    for folder in PINNED_FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for dirpath, _, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                out[path.relative_to(root).as_posix()] = (sha256_file(path), path.stat().st_size)
    return dict(sorted(out.items()))


def write_manifest(root: str | Path, out: str | Path) -> str:
    """Write the manifest of ``root`` to ``out``; returns the file's SHA-256 (the value for ``BCCD_MANIFEST_SHA256``).
    Run once by a maintainer from a checked copy of the pinned commit's ``BCCD/`` folder."""
    lines = [_HEADER] + [f"{rel}\t{sha}\t{size}" for rel, (sha, size) in manifest_of(root).items()]
    Path(out).write_text("\n".join(lines) + "\n")
    return sha256_file(out)


def load_manifest(path: str | Path | None = None, sha256: str | None = None) -> dict[str, tuple[str, int]]:
    """The pinned manifest (default ``BCCD_MANIFEST``), after checking the file's SHA-256.

    Raises:
        ValueError: the manifest file is missing, was edited (other SHA-256) or has a malformed line.
    """
    path = Path(path) if path is not None else BCCD_MANIFEST
    expected = sha256 if sha256 is not None else BCCD_MANIFEST_SHA256
    if not path.is_file():
        raise ValueError(f"the BCCD manifest {path} is missing: the cellseg installation is incomplete; reinstall it.")
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"the BCCD manifest {path} has SHA-256 {got}, expected {expected} "
                         "(cellseg.data.bccd_pin.BCCD_MANIFEST_SHA256): it was edited. Restore it from the cellseg "
                         "repository (git checkout -- lib/cellseg/data/bccd_manifest.tsv).")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        cells = line.split("\t")
        if len(cells) != 3 or not cells[2].isdigit():
            raise ValueError(f"{path}:{n}: expected 'relative_path<TAB>sha256<TAB>size', got {line!r}")
        out[cells[0]] = (cells[1], int(cells[2]))
    return out


def compare(root: str | Path, manifest: dict[str, tuple[str, int]] | None = None) -> Comparison:
    """Compare the files of ``root`` (under ``PINNED_FOLDERS``) with ``manifest`` (default: the pinned one)."""
    manifest = manifest if manifest is not None else load_manifest()
    found = manifest_of(root)
    report = Comparison(checked=len(found))
    report.missing = sorted(set(manifest) - set(found))
    report.extra = sorted(set(found) - set(manifest))
    report.different = sorted(k for k in set(found) & set(manifest) if found[k] != manifest[k])
    return report


def verify_bccd(root: str | Path, manifest: dict[str, tuple[str, int]] | None = None) -> Comparison:
    """Check an existing BCCD folder against the pinned manifest.

    Raises:
        ContentMismatch: missing, extra or different files (named, first few and counts).
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the BCCD folder (DATA_ROOT, with Annotations/, "
                                "JPEGImages/, ImageSets/).")
    report = compare(root, manifest)
    if not report.ok:
        raise ContentMismatch(f"{root} is not the pinned BCCD dataset ({report.describe()}). Fetch a fresh copy with "
                              f"`cellseg data fetch bccd NEW_DIR`, or restore the files named.", report)
    return report


def _unpack_bccd(archive: Path, staging: Path) -> None:
    """The archive's ``BCCD/`` folder (the repository holds more) into ``staging``, refusing unsafe paths."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if "/BCCD/" in f"/{m}"]
        if not members:
            raise ValueError("the archive has no BCCD/ folder")
        for member in members:
            rel = Path(f"/{member}".split("/BCCD/", 1)[1])
            if ".." in rel.parts or rel.is_absolute():
                raise ValueError(f"unsafe path in archive: {member}")
            target = staging / rel
            if member.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def fetch_pinned_bccd(data_root: str | Path, url: str, *, timeout: float, archive_sha256: str | None = None,
                      verify: bool = True, manifest: dict[str, tuple[str, int]] | None = None) -> Comparison:
    """Download ``url``, unpack its ``BCCD/`` folder in a staging folder next to ``data_root``, compare every file
    with the manifest, and only then move it to ``data_root``.

    ``archive_sha256`` additionally checks the archive's bytes (a mirror you trust). ``verify=False`` moves a
    folder that differs into place anyway, with a WARNING and ``UNVERIFIED.txt`` listing the differences.

    Raises:
        ContentMismatch: the unpacked files differ from the manifest (nothing moved into place).
        OSError, ValueError, zipfile.BadZipFile: download, archive hash or unpacking failed.
    """
    data_root = Path(data_root)
    manifest = manifest if manifest is not None else load_manifest()
    data_root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_root.parent, prefix=f".{data_root.name}.fetch-") as tmp:
        archive = Path(tmp) / "bccd.zip"
        if archive_sha256:
            download_verified(url, archive, archive_sha256, what="the BCCD archive", pin_name="--sha256",
                              timeout=timeout)
        else:
            fetch_url(url, archive, what="the BCCD archive", timeout=timeout)
        staging = Path(tmp) / "BCCD"
        _unpack_bccd(archive, staging)
        report = compare(staging, manifest)
        if not report.ok and verify:
            raise ContentMismatch(
                f"the BCCD archive from {url} unpacks to files that differ from the pinned dataset ({len(manifest)} "
                f"files in cellseg/data/bccd_manifest.tsv): {report.describe()}. Nothing was moved to {data_root}. Retry "
                "(a damaged download); if upstream really changed, check the files named, then either pin the new "
                "content (cellseg.data.bccd_pin.write_manifest) or fetch with --no-verify, which keeps the data "
                f"marked unverified ({UNVERIFIED_MARKER}).", report)
        if not report.ok:
            (staging / UNVERIFIED_MARKER).write_text(
                f"UNVERIFIED: fetched from {url} with --no-verify; it differs from the pinned BCCD dataset: "
                f"{report.describe(first=50)}.\nResults on this data are not comparable with results on the pinned "
                "dataset.\n")
            log.warning("BCCD from %s does NOT match the pinned dataset (%s); moved to %s anyway because of "
                        "--no-verify, marked in %s", url, report.describe(), data_root,
                        data_root / UNVERIFIED_MARKER)
        shutil.move(str(staging), str(data_root))
    if report.ok:
        log.info("BCCD verified (%d files match the pinned manifest) and unpacked to %s", report.checked, data_root)
    return report

