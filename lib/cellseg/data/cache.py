"""The prepared cache: the only thing training and evaluation read.

Layout::

    DATA_CACHE/
      manifest.json          written last, atomically (temp file + fsync + rename): its presence marks a complete cache
      .cellseg_cache         marker: this folder is a cellseg cache and may be rebuilt in place
      train/ val/ test/
        <name>.png           the image, RGB
        <name>.npy           np.save of {"inst_map", "type_map"[, "ignore_mask"], "meta"}

Labels are stored compactly (``inst_map`` uint16 when ids fit, else int32; ``type_map`` uint8; ``ignore_mask`` bool)
and come back as int32 / bool from :func:`load_sample`. The cache is itself a valid ``folder`` dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.data.files import read_image, sha256_file, write_png
from cellseg.data.safe_pickle import load_label_dict
from cellseg.data.sample import SPLITS, Sample
from cellseg.data.validate import Problem

MANIFEST = "manifest.json"
MARKER = ".cellseg_cache"
FORMAT_VERSION = 2  # part of every fingerprint: bump it when a conversion changes, so old caches are rebuilt
PREPARE_HINT = "run notebooks/00_prepare_data.ipynb first (or cellseg.data.prepare_dataset)"


def sample_paths(cache_dir: str | Path, split: str, name: str) -> tuple[Path, Path]:
    """The ``.png`` and ``.npy`` of one cached sample."""
    folder = Path(cache_dir) / split
    return folder / f"{name}.png", folder / f"{name}.npy"


def write_sample(cache_dir: str | Path, split: str, name: str, sample: Sample) -> dict[str, str]:
    """Write one sample into the cache; returns the SHA-256 of both files (``{"png": ..., "npy": ...}``)."""
    png, npy = sample_paths(cache_dir, split, name)
    png.parent.mkdir(parents=True, exist_ok=True)
    write_png(png, sample["image"])
    inst = sample["inst_map"]
    labels: dict[str, Any] = {
        "inst_map": inst.astype(np.uint16 if inst.max(initial=0) < 2**16 else np.int32),
        "type_map": sample["type_map"].astype(
            np.uint8 if sample["type_map"].max(initial=0) < 2**8 else np.int32
        ),
        "meta": _plain(sample.get("meta") or {}),
    }
    if sample.get("ignore_mask") is not None:
        labels["ignore_mask"] = np.asarray(sample["ignore_mask"], dtype=bool)
    np.save(npy, labels, allow_pickle=True)
    return {"png": sha256_file(png), "npy": sha256_file(npy)}


def _plain(value: Any) -> Any:
    """Meta values as plain Python types (the restricted unpickler reads NumPy and builtins only; keep it simple)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def load_sample(cache_dir: str | Path, split: str, name: str) -> Sample:
    """Read one sample of the cache in the internal format (int32 maps, bool ignore mask).

    Raises:
        FileNotFoundError: naming the missing file and how to rebuild the cache.
    """
    png, npy = sample_paths(cache_dir, split, name)
    for path in (png, npy):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the cache {cache_dir}; {PREPARE_HINT}")
    labels = load_label_dict(npy)
    sample: Sample = {
        "image": read_image(png),
        "inst_map": np.asarray(labels["inst_map"]).astype(np.int32),
        "type_map": np.asarray(labels["type_map"]).astype(np.int32),
        "meta": dict(labels.get("meta") or {}),
    }
    if labels.get("ignore_mask") is not None:
        sample["ignore_mask"] = np.asarray(labels["ignore_mask"]).astype(bool)
    return sample


def load_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Read ``DATA_CACHE/manifest.json``.

    Raises:
        FileNotFoundError: no manifest (the cache was never prepared or is incomplete).
        ValueError: the manifest is not valid JSON.
    """
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no prepared data at DATA_CACHE={cache_dir} ({path} is missing): {PREPARE_HINT}"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and {PREPARE_HINT}") from e


def write_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically: a reader sees the old one, the new one, or none, never half a file."""
    cache_dir = Path(cache_dir)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cache_dir / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_is_complete(cache_dir: str | Path, manifest: dict[str, Any]) -> bool:
    """Every sample listed in the manifest has both files (cheap: no hashing)."""
    for split, names in manifest.get("splits", {}).items():
        for name in names:
            png, npy = sample_paths(cache_dir, split, name)
            if not (png.is_file() and npy.is_file()):
                return False
    return True


def verify_cache(cache_dir: str | Path) -> list[Problem]:
    """Check every cached file against the manifest's SHA-256 checksums; returns the problems (empty when intact)."""
    manifest = load_manifest(cache_dir)
    problems: list[Problem] = []
    for split in SPLITS:
        for name in manifest["splits"].get(split, []):
            expected = manifest["checksums"].get(f"{split}/{name}", {})
            png, npy = sample_paths(cache_dir, split, name)
            for kind, path in (("png", png), ("npy", npy)):
                if not path.exists():
                    problems.append(Problem(str(path), "missing from the cache"))
                elif sha256_file(path) != expected.get(kind):
                    problems.append(
                        Problem(str(path), "checksum differs from manifest.json (modified or corrupt)")
                    )
    return problems


def source_listing_digest(data_root: Path, exclude: Path | None = None) -> str:
    """A small fingerprint of a source folder: SHA-256 over (relative path, size, mtime) of every file."""
    h = hashlib.sha256()
    exclude = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(data_root):
        here = Path(dirpath)
        if exclude is not None and (here.resolve() == exclude or exclude in here.resolve().parents):
            dirnames[:] = []
            continue
        dirnames.sort()
        for fn in sorted(filenames):
            path = here / fn
            if fn.startswith("."):
                continue
            st = path.stat()
            h.update(f"{path.relative_to(data_root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint(parameters: dict[str, Any], data_root: Path | None, cache_dir: Path) -> str:
    """Fingerprint of a preparation's inputs: parameters, format version and the source listing."""
    payload = {"format_version": FORMAT_VERSION, "parameters": parameters}
    if data_root is not None:
        payload["source_listing"] = source_listing_digest(data_root, exclude=cache_dir)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
