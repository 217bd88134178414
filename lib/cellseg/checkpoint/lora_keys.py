"""Which checkpoint tensor goes where, for the four LoRA / plain combinations (LoRA: Hu et al., 2021).

Both sides are described by key -> shape manifests in the canonical key space (see :mod:`cellseg.checkpoint.keys`),
so the same plan serves the compatibility check (sidecar manifest, no tensor read) and the actual load:

- plain checkpoint -> plain model, LoRA -> LoRA: keys match one to one.
- plain checkpoint -> LoRA model: the base weights load by name (the canonical ``qkv.weight`` is the model's
  ``qkv.base_layer.weight``); the adapters keep their initialisation (``lora_B`` = 0, so outputs are unchanged).
- LoRA checkpoint -> plain model: with ``MERGE_LORA=True`` each adapter is folded into its base weight,
  ``W + (alpha / r) * B @ A`` (peft's ``merge``); otherwise it is an error, because dropping trained adapters silently
  would load a different network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cellseg.checkpoint.keys import LORA_ADAPTERS, lora_prefixes_from_keys


@dataclass
class LoadPlan:
    """Key-level plan of a load. Keys are canonical; ``merges`` maps a model weight to its checkpoint
    (base, lora_A, lora_B) keys."""

    direct: list[str] = field(default_factory=list)
    merges: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    scale: float | None = None
    adapters_kept: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    needs_merge: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when every model tensor gets a value and every checkpoint tensor is used."""
        return not (self.missing or self.unexpected or self.mismatched or self.needs_merge)


def lora_scale(lora: dict | None) -> float | None:
    """peft's scaling ``alpha / r`` of a LoRA configuration dict ({r, alpha, ...}), or None."""
    if not lora:
        return None
    return float(lora["alpha"]) / float(lora["r"])


def adapter_keys(prefix: str) -> tuple[str, str]:
    return f"{prefix}.{LORA_ADAPTERS[0]}.weight", f"{prefix}.{LORA_ADAPTERS[1]}.weight"


def plan_load(ckpt: dict[str, list[int]], model: dict[str, list[int]], *, model_lora: set[str],
              ckpt_lora: dict | None, merge_lora: bool) -> LoadPlan:
    """Plan loading a checkpoint manifest into a model manifest (both canonical key -> shape).

    Args:
        ckpt: the checkpoint's key -> shape manifest.
        model: the model's key -> shape manifest.
        model_lora: canonical names of the model's LoRA layers (found by type).
        ckpt_lora: the checkpoint's LoRA settings ({r, alpha, ...}); needed for the merge scale.
        merge_lora: fold checkpoint adapters into plain model layers (``MERGE_LORA``).
    """
    plan = LoadPlan()
    consumed: set[str] = set()
    ckpt_layers = lora_prefixes_from_keys(ckpt)
    targets_done: set[str] = set()
    for prefix in sorted(ckpt_layers - model_lora):  # LoRA checkpoint layer -> plain model layer
        a_key, b_key = adapter_keys(prefix)
        base = f"{prefix}.weight"
        if not merge_lora:
            plan.needs_merge.append(prefix)
            consumed.update({a_key, b_key})
            continue
        if base not in model or base not in ckpt or a_key not in ckpt or b_key not in ckpt:
            continue  # reported below as missing / unexpected
        a, b = ckpt[a_key], ckpt[b_key]
        merged_shape = [b[0], a[1]] if len(a) == 2 and len(b) == 2 and a[0] == b[1] else None
        if ckpt[base] != model[base] or merged_shape != model[base]:
            plan.mismatched.append((base, ckpt[base], model[base]))
        else:
            plan.merges[base] = (base, a_key, b_key)
        consumed.update({base, a_key, b_key})
        targets_done.add(base)
    if plan.merges:
        plan.scale = lora_scale(ckpt_lora)
    for prefix in sorted(model_lora - ckpt_layers):  # plain checkpoint layer -> LoRA model layer
        for key in adapter_keys(prefix):
            if key in model:
                plan.adapters_kept.append(key)
                targets_done.add(key)
    for key, shape in model.items():
        if key in targets_done:
            continue
        if key not in ckpt:
            plan.missing.append(key)
        elif ckpt[key] != shape:
            plan.mismatched.append((key, ckpt[key], shape))
            consumed.add(key)
        else:
            plan.direct.append(key)
            consumed.add(key)
    plan.unexpected = sorted(k for k in ckpt if k not in consumed)
    return plan


@torch.no_grad()
def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B @ A`` computed in float32 on the CPU, returned in the base weight's dtype.

    Shape: base (out, in), lora_a (r, in), lora_b (out, r) -> (out, in).
    """
    delta = lora_b.float() @ lora_a.float()  # (out, in)
    return (base.float() + scale * delta).to(base.dtype)
