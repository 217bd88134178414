"""The JSON sidecar next to each checkpoint (``latest.pt.json``) and the validity checks that use it.

The sidecar is the commit marker (as the metadata file of PyTorch distributed checkpointing): it carries the payload's
SHA-256 and size, so a truncated or foreign ``.pt`` is recognised before ``torch.load`` reads it, and the architecture
fingerprint plus the key -> shape manifest, so compatibility is decided without reading a tensor.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from cellseg.checkpoint.atomic import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".json"


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be trusted: missing, truncated or unreadable, or not the file its sidecar
    describes. ``reason`` is one short phrase for logs and the ledger."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path = Path(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"checkpoint {path} rejected: {reason}{' (' + detail + ')' if detail else ''}")


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def build_sidecar(*, payload: dict[str, Any], manifest: dict[str, list[int]], sha256: str, size: int,
                  file_name: str, parent: dict | None, code_version: str | None, reason: str, time: str) -> dict:
    """The sidecar record of one saved file (plain JSON types)."""
    progress = payload.get("progress") or {}
    monitor = dict(progress.get("monitor") or {})
    metric = monitor.get("metric")
    history = progress.get("history") or []
    last = history[-1] if history else {}
    value = None
    if metric is not None and isinstance(last, dict):
        value = (last.get("monitor") or {}).get(metric, last.get(metric))
    monitor.update({"value": value, "best": progress.get("best_metric"), "best_epoch": progress.get("best_epoch")})
    return {
        "format_version": payload.get("format_version", FORMAT_VERSION),
        "file": file_name,
        "contents": payload.get("contents"),  # 'full' (resumable) or 'weights' (no optimizer/scheduler/RNG state)
        "phase": payload.get("phase"),
        "epoch": progress.get("epoch"),
        "step": progress.get("step"),
        "batch_in_epoch": progress.get("batch_in_epoch"),
        "patience_counter": progress.get("patience_counter"),
        "monitor": monitor,
        "arch": payload.get("arch"),
        "lora": payload.get("lora"),
        "manifest": manifest,
        "base_weights": payload.get("base_weights"),
        "optimizer_params": payload.get("optimizer_params"),
        "scheduler": {"kind": payload.get("scheduler_kind"), "interval": payload.get("scheduler_interval")},
        "identity": payload.get("identity"),  # the run's identity (cellseg.checkpoint.identity), readable without torch
        "sha256": sha256,
        "size": size,
        "parent": parent,
        "code_version": code_version,
        "torch_version": torch.__version__,
        "reason": reason,
        "time": time,
    }


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of checkpoint ``path``.

    Raises:
        CorruptCheckpoint: the sidecar is missing, unreadable, or of a newer format.
    """
    side = sidecar_path(path)
    if not side.exists():
        raise CorruptCheckpoint(path, "sidecar missing",
                                f"{side.name} absent: the save was interrupted before its commit marker was written")
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(path, "sidecar unreadable", f"{side}: {e}") from e
    if not isinstance(data, dict) or "sha256" not in data:
        raise CorruptCheckpoint(path, "sidecar unreadable", f"{side} has no sha256 field")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise CorruptCheckpoint(path, "newer format", f"format {data['format_version']} > {FORMAT_VERSION} this "
                                "cellseg reads; update cellseg")
    return data


def verify_file(path: str | Path, side: dict) -> None:
    """Check existence, size and SHA-256 of ``path`` against its sidecar.

    Raises:
        CorruptCheckpoint: 'missing', 'truncated' (size differs) or 'hash mismatch'.
    """
    path = Path(path)
    if not path.exists():
        raise CorruptCheckpoint(path, "missing")
    size = os.path.getsize(path)
    if side.get("size") is not None and size != side["size"]:
        raise CorruptCheckpoint(path, "truncated" if size < side["size"] else "size mismatch",
                                f"{size} bytes on disk, sidecar says {side['size']}")
    digest = sha256_file(path)
    if digest != side["sha256"]:
        raise CorruptCheckpoint(path, "hash mismatch", f"sha256 {digest[:12]}... on disk, sidecar says "
                                f"{side['sha256'][:12]}...")


def read_payload(path: str | Path) -> dict:
    """``torch.load`` a checkpoint to the CPU with ``weights_only=True``.

    Raises:
        CorruptCheckpoint: 'missing', or 'truncated or unreadable' with torch's error.
    """
    path = Path(path)
    if not path.exists():
        raise CorruptCheckpoint(path, "missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler errors all mean "cannot trust this file"
        raise CorruptCheckpoint(path, "truncated or unreadable", f"{type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or "model" not in payload:
        raise CorruptCheckpoint(path, "not a cellseg checkpoint", "no 'model' entry in the payload")
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise CorruptCheckpoint(path, "newer format", f"format {payload['format_version']} > {FORMAT_VERSION}")
    return payload
