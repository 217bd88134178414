"""Loading network weights from a checkpoint: compatibility first (from manifests), then tensors, to the CPU.

Every tensor arrives on the CPU (``map_location="cpu"``) and is copied into the model's existing parameters by
``load_state_dict``, so no second full copy of the network ever sits on the GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg.checkpoint.base import fill_base, full_manifest
from cellseg.checkpoint.compat import IncompatibleCheckpoint, describe_keys, explain, fingerprint_differences
from cellseg.checkpoint.keys import (
    canonicalize,
    lora_prefixes_from_keys,
    lora_prefixes_from_model,
    manifest,
    model_key_map,
    unwrap_model,
)
from cellseg.checkpoint.lora_keys import LoadPlan, merged_weight, plan_load
from cellseg.checkpoint.sidecar import read_payload, read_sidecar, sidecar_path, verify_file

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a load did, key by key (canonical names)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    adapters_kept: list[str] = field(default_factory=list)
    adapters_reset: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    base: str = ""  # compact checkpoints: where the left-out base encoder tensors came from

    @property
    def complete(self) -> bool:
        """Every model tensor came from the checkpoint (or is a fresh adapter) and nothing was left over."""
        return not (self.mismatched or self.missing or self.unexpected)

    def summary(self) -> str:
        head = (f"loaded {len(self.loaded)} tensors from {self.source}"
                + (f", merged LoRA into {len(self.merged)}" if self.merged else "")
                + (f", {len(self.adapters_kept)} LoRA adapter tensors kept at their initialisation"
                   if self.adapters_kept else "")
                + (f" ({len(self.adapters_reset)} lora_B reset to 0 so outputs equal the checkpoint's)"
                   if self.adapters_reset else ""))
        mism = [f"{k} {c}->{m}" for k, c, m in self.mismatched]
        parts = [head] + ([f"  - {self.base}"] if self.base else []) + [f"  - {d}" for d in self.differences] + [
            describe_keys("shape-mismatched, left as they were", mism),
            describe_keys("missing from the checkpoint, left as they were", self.missing),
            describe_keys("unexpected in the checkpoint, ignored", self.unexpected),
        ]
        return "\n".join(p for p in parts if p)

    def __str__(self) -> str:
        return self.summary()


def model_manifest(model: nn.Module) -> dict[str, list[int]]:
    """canonical key -> shape of the model's state dict (no tensor copied)."""
    inner = unwrap_model(model)
    kmap = model_key_map(inner)
    sd = inner.state_dict()
    return {c: list(sd[k].shape) for c, k in kmap.items()}


def model_arch(model: nn.Module) -> dict | None:
    inner = unwrap_model(model)
    return inner.arch_info() if hasattr(inner, "arch_info") else None


def check_compatibility(meta: dict[str, Any], model: nn.Module, *, strict: bool = True, merge_lora: bool = False,
                        path: str | Path = "<state dict>", checkpoint_dir: str | Path | None = None) \
        -> tuple[LoadPlan, list[str]]:
    """Decide from ``meta`` ({'arch', 'manifest', 'lora'}: a sidecar or a payload's header) whether the checkpoint
    fits ``model``, without touching a tensor. Returns (plan, fingerprint differences).

    Raises:
        IncompatibleCheckpoint: LoRA adapters would be dropped (always), or, when ``strict``, any architecture
            difference or key mismatch. The message explains it and names the ways out.
    """
    arch = model_arch(model)
    differences = fingerprint_differences(meta.get("arch"), arch) if arch is not None and "arch" in meta else []
    plan = plan_load(meta["manifest"], model_manifest(model), model_lora=lora_prefixes_from_model(model),
                     ckpt_lora=meta.get("lora"), merge_lora=merge_lora)
    if plan.merges and plan.scale is None:
        raise IncompatibleCheckpoint(
            f"{path} holds LoRA adapters for {len(plan.merges)} layer(s) but no LoRA settings (r, alpha), so they "
            "cannot be merged (MERGE_LORA=True). Load a checkpoint written by cellseg (it stores the settings).",
            path=path, plan=plan)
    if plan.needs_merge or (strict and (differences or not plan.clean)):
        raise IncompatibleCheckpoint(explain(path, differences, plan, checkpoint_dir=checkpoint_dir), path=path,
                                     differences=differences, plan=plan)
    return plan, differences


def _resolve_source(source: Path | str | dict) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(canonical state dict, meta, description) of a checkpoint path, a payload dict or a raw state dict."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if sidecar_path(path).exists():
            verify_file(path, read_sidecar(path))
        payload = read_payload(path)
        desc = str(path)
    elif isinstance(source, dict) and isinstance(source.get("model"), dict):
        payload, desc = source, "(in-memory payload)"
    elif isinstance(source, dict) and all(isinstance(v, torch.Tensor) for v in source.values()):
        state = canonicalize(source)
        return state, {"manifest": manifest(state), "lora": None}, "(in-memory state dict)"
    else:
        raise TypeError(f"load_weights source must be a checkpoint path, a checkpoint payload (dict with 'model') or a "
                        f"state dict of tensors, got {type(source).__name__}.")
    state = canonicalize(payload["model"])
    meta = {"manifest": full_manifest({**payload, "model": state}), "lora": payload.get("lora"),
            "base_weights": payload.get("base_weights")}
    if payload.get("arch") is not None:  # without a fingerprint only the keys and shapes can be compared
        meta["arch"] = payload["arch"]
    return state, meta, desc


def load_weights(model: nn.Module, source: Path | str | dict, *, strict: bool = True, merge_lora: bool = False,
                 checkpoint_dir: str | Path | None = None, source_name: str | None = None,
                 base_weights: str | Path | None = None) -> LoadReport:
    """Load network weights into ``model`` (any wrappers, LoRA-wrapped or plain) from a checkpoint.

    Args:
        model: the network, possibly wrapped by DDP / DataParallel / torch.compile, possibly carrying LoRA.
        source: a ``.pt`` path (verified against its sidecar when there is one), a payload dict from
            :func:`cellseg.checkpoint.collect_state`, or a plain state dict (any prefixes, raw peft keys).
        strict: ``STRICT_LOAD``; False loads every tensor whose name and shape match and reports the rest.
        merge_lora: ``MERGE_LORA``; fold checkpoint adapters into a plain model's base weights.
        checkpoint_dir: named in the ways out of an incompatibility error.
        source_name: how messages name an in-memory ``source`` (e.g. the file it was read from).
        base_weights: the base encoder weights file of a compact checkpoint (see :mod:`cellseg.checkpoint.base`);
            default: the file the model was built from (``ENCODER_WEIGHTS``), else the checkpoint's recorded path.

    Raises:
        IncompatibleCheckpoint: see :func:`check_compatibility`; or a compact checkpoint whose base weights file is
            missing or has another SHA-256.
        CorruptCheckpoint: the file is missing, truncated or does not match its sidecar.
        TypeError: ``source`` is none of the accepted kinds.
    """
    state, meta, desc = _resolve_source(source)
    desc = source_name or desc
    plan, differences = check_compatibility(meta, model, strict=strict, merge_lora=merge_lora, path=desc,
                                            checkpoint_dir=checkpoint_dir)
    inner = unwrap_model(model)
    kmap = model_key_map(inner)
    held: set[str] = set()
    from_file: set[str] = set()
    if meta.get("base_weights"):
        before = set(state)
        state, held = fill_base(state, meta["base_weights"], arch=meta.get("arch"), model=inner,
                                explicit=base_weights, source=desc)
        from_file = set(state) - before
    current = inner.state_dict()
    target: dict[str, torch.Tensor] = {kmap[k]: state[k] for k in plan.direct if k not in held}
    for key, (base, a_key, b_key) in plan.merges.items():
        base_value = current[kmap[key]] if base in held else state[base]
        target[kmap[key]] = merged_weight(base_value, state[a_key], state[b_key], plan.scale or 0.0)
    _track_base_keys(inner, target, kmap, current, from_file, meta.get("base_weights"))
    result = inner.load_state_dict(target, strict=False)
    expected_missing = {kmap[k] for k in plan.missing + plan.adapters_kept} | {kmap[k] for k in held}
    expected_missing |= {kmap[k] for k, _, _ in plan.mismatched if k in kmap}
    assert not result.unexpected_keys and set(result.missing_keys) <= expected_missing, (
        result.unexpected_keys, sorted(set(result.missing_keys) - expected_missing)[:5])
    report = LoadReport(desc, loaded=list(plan.direct), merged=list(plan.merges), adapters_kept=plan.adapters_kept,
                        mismatched=plan.mismatched, missing=plan.missing, unexpected=plan.unexpected,
                        differences=differences)
    report.adapters_reset = _zero_fresh_lora_b(inner, plan, kmap)
    base = meta.get("base_weights")
    if base:
        report.base = (f"{len(base['manifest'])} frozen base encoder tensors from {base['file']} (SHA-256 "
                       f"{base['sha256'][:12]}... verified), " + ("already in the model, built from that file"
                                                                   if held else "read from the file"))
    if plan.merges:
        log.info("merged the LoRA adapters of %d layer(s) into their base weights (MERGE_LORA=True, scale %.4g)",
                 len(plan.merges), plan.scale)
    if plan.adapters_kept:
        log.info("plain checkpoint into a LoRA model: base weights loaded into %d LoRA layer(s); adapters start "
                 "from their initialisation", len(lora_prefixes_from_keys(plan.adapters_kept)))
    (log.info if report.complete else log.warning)("%s", report.summary())
    return report


@torch.no_grad()
def _track_base_keys(inner: nn.Module, target: dict[str, torch.Tensor], kmap: dict[str, str],
                     current: dict[str, torch.Tensor], from_file: set[str], base: dict | None) -> None:
    """Keep ``inner.base_keys`` (keys holding the base file's values, left out of compact checkpoints) true: a key
    loaded with other values leaves it, one read from the model's own base file (same SHA-256) joins it."""
    keys = getattr(inner, "base_keys", None)
    if keys is None:
        return
    own = getattr(inner, "base_weights", None)
    same_file = bool(own and base and own.get("sha256") == base.get("sha256"))
    canon = {v: k for k, v in kmap.items()}
    for model_key, value in target.items():
        key = canon[model_key]
        if key in from_file and same_file:
            keys.add(key)
        elif key in keys and not torch.equal(current[model_key].cpu(), value.to("cpu", current[model_key].dtype)):
            keys.discard(key)


@torch.no_grad()
def _zero_fresh_lora_b(inner: nn.Module, plan: LoadPlan, kmap: dict[str, str]) -> list[str]:
    """Adapters the checkpoint knows nothing about start with ``lora_B = 0`` (LoRA's initialisation), so the loaded
    network computes exactly the checkpoint's function; only matters when a notebook cell re-runs on a model whose
    adapters already trained."""
    reset = []
    params = dict(inner.named_parameters())
    for key in plan.adapters_kept:
        if key.endswith("lora_B.weight"):
            p = params.get(kmap[key])
            if p is not None and bool(p.ne(0).any()):
                p.zero_()
                reset.append(key)
    if reset:
        log.warning("reset lora_B of %d layer(s) to 0: the checkpoint has no adapters there, and non-zero adapters "
                    "(a re-run cell?) would change its outputs", len(reset))
    return reset
