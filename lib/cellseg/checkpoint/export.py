"""A self-contained inference file from a (compact) training checkpoint: base encoder weights included, LoRA merged.

The file is for sharing, prediction and evaluation on machines without the gated base weights file. It holds the
network (canonical keys), the architecture fingerprint (LoRA removed when merged), the resolved parameters and the
progress counters, no optimizer or RNG state (``contents='weights'``, like ``best.pt``): ``RESUME='auto'`` never
continues from it, but ``INIT_FROM``, ``EVAL_CHECKPOINT`` and :func:`cellseg.checkpoint.load_weights` accept it. It is
written atomically with its sidecar, like every checkpoint. Mind the licence of the base weights (UNI: CC-BY-NC-ND
4.0) before sharing a file that contains them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cellseg.checkpoint.atomic import commit, fsync_dir, open_temp
from cellseg.checkpoint.base import base_tensors, resolve_base_file
from cellseg.checkpoint.contents import WEIGHTS
from cellseg.checkpoint.keys import canonicalize, lora_prefixes_from_keys, manifest
from cellseg.checkpoint.layout import default_code_version
from cellseg.checkpoint.ledger import now_iso
from cellseg.checkpoint.lora_keys import adapter_keys, lora_scale, merged_weight
from cellseg.checkpoint.sidecar import (
    FORMAT_VERSION,
    build_sidecar,
    read_payload,
    read_sidecar,
    sidecar_path,
    verify_file,
)

log = logging.getLogger(__name__)


def merge_adapters(state: dict[str, torch.Tensor], lora: dict | None, source: str) -> tuple[dict, int]:
    """``state`` with every LoRA adapter folded into its base weight (``W + alpha/r * B @ A``). Returns (state, n)."""
    prefixes = sorted(lora_prefixes_from_keys(state))
    if not prefixes:
        return state, 0
    scale = lora_scale(lora)
    if scale is None:
        raise ValueError(f"{source} holds LoRA adapters but no LoRA settings (r, alpha): they cannot be merged. Export "
                         "without --merge, or use a checkpoint written by cellseg.")
    out = dict(state)
    for prefix in prefixes:
        a_key, b_key = adapter_keys(prefix)
        base = f"{prefix}.weight"
        out[base] = merged_weight(out[base], out.pop(a_key), out.pop(b_key), scale)
    return out, len(prefixes)


def export_checkpoint(source: str | Path, out: str | Path, *, merge: bool = True,
                      base_weights: str | Path | None = None) -> dict:
    """Write ``out``: the network of checkpoint ``source`` with its base encoder weights included (read from
    ``base_weights``, default the recorded path, SHA-256 verified) and, with ``merge``, its LoRA adapters merged.

    Returns a summary: {'out', 'size', 'sha256', 'tensors', 'merged_lora_layers', 'base_tensors_added'}.

    Raises:
        CorruptCheckpoint: ``source`` is missing, truncated or does not match its sidecar.
        IncompatibleCheckpoint: the base weights file is missing or differs (names the expected hash).
        ValueError: ``out`` is ``source``, or adapters without LoRA settings are to be merged.
    """
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"export OUT {out} is the checkpoint itself; give another file name.")
    parent_sha = None
    if sidecar_path(source).exists():
        side = read_sidecar(source)
        verify_file(source, side)
        parent_sha = side["sha256"]
    payload = read_payload(source)
    state = canonicalize(payload["model"])
    arch = dict(payload.get("arch") or {})
    base = payload.get("base_weights")
    added = 0
    if base:
        path = resolve_base_file(base, None, base_weights, str(source))
        state = {**base_tensors(arch, path, base["manifest"]), **state}
        added = len(base["manifest"])
    lora = payload.get("lora")
    merged = 0
    if merge:
        state, merged = merge_adapters(state, lora, str(source))
        if merged:
            lora = None
            arch["lora"] = None
    exported = {
        "format_version": FORMAT_VERSION,
        "contents": WEIGHTS,
        "phase": payload.get("phase"),
        "model": state,
        "arch": arch or None,
        "lora": lora,
        "base_weights": None,
        "config": payload.get("config"),
        "progress": payload.get("progress"),
        "exported_from": {"path": str(source), "merged_lora_layers": merged, "base_tensors_added": added},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_temp(out) as (writer, tmp):
        torch.save(exported, writer)
    side = build_sidecar(payload=exported, manifest=manifest(state), sha256=writer.sha256, size=writer.size,
                         file_name=out.name, parent={"path": str(source), "sha256": parent_sha},
                         code_version=default_code_version(), reason="export", time=now_iso())
    with open_temp(sidecar_path(out)) as (w, stmp):
        w.write((json.dumps(side, indent=1) + "\n").encode())
    commit(tmp, out, sync_dir=False)
    commit(stmp, sidecar_path(out), sync_dir=False)
    fsync_dir(out.parent)
    log.info("exported %s -> %s (%d tensors, %d LoRA layers merged, %d base tensors added, %.1f MB)", source, out,
             len(state), merged, added, writer.size / 1e6)
    return {"out": str(out), "size": writer.size, "sha256": writer.sha256, "tensors": len(state),
            "merged_lora_layers": merged, "base_tensors_added": added}
