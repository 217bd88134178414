"""Phase set-up and the optimizer: what is frozen, what trains, and at which learning rate.

Phase 1 freezes the encoder (no gradients; its norm/dropout layers stay in eval mode, see ``CellSegModel.train``).
Phase 2 adds LoRA to a ViT encoder (peft) or unfreezes a CNN encoder at ``LR_ENCODER_P2``. The optimizer only ever
sees trainable parameters, in named groups with their own learning rates; norms and biases get no weight decay.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from cellseg.model.lora import apply_lora, lora_modules

log = logging.getLogger(__name__)


def param_kind(name: str) -> str:
    """'lora', 'backbone' or 'decoder' for a parameter name of :class:`CellSegModel`."""
    if "lora_" in name:
        return "lora"
    return "backbone" if name.startswith("encoder.") else "decoder"


def configure_phase(model: nn.Module, cfg) -> int:
    """Freeze / unfreeze / wrap for ``cfg.PHASE``. Returns the number of LoRA-wrapped modules (0 without LoRA).

    Raises:
        RuntimeError: a backbone parameter is still trainable in Phase 1, or the decoder is not trainable.
    """
    n_lora = 0
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for p in model.decoder.parameters():
        p.requires_grad_(True)
    if cfg.PHASE == 2:
        if model.encoder.family == "vit":
            n_lora = apply_lora(model, r=cfg.LORA_R, alpha=cfg.LORA_ALPHA, dropout=cfg.LORA_DROPOUT,
                                targets=list(cfg.LORA_TARGETS), blocks=cfg.LORA_BLOCKS)
            for name, p in model.encoder.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            for p in model.encoder.parameters():
                p.requires_grad_(True)
    if cfg.GRAD_CHECKPOINTING:
        model.encoder.set_grad_checkpointing(True)
    check_phase(model, cfg.PHASE, n_lora)
    model.train()
    return n_lora


def check_phase(model: nn.Module, phase: int, n_lora: int) -> None:
    """Frozen means frozen: verify the trainable set before the first step."""
    trainable_backbone = [n for n, p in model.named_parameters() if p.requires_grad and param_kind(n) == "backbone"]
    if phase == 1 and trainable_backbone:
        raise RuntimeError(f"Phase 1 must train the decoder only, but {len(trainable_backbone)} backbone parameters are "
                           f"trainable (e.g. {trainable_backbone[:3]}).")
    if phase == 2 and model.encoder.family == "vit":
        if trainable_backbone:
            raise RuntimeError(f"Phase 2 with LoRA must keep the ViT base weights frozen; trainable: {trainable_backbone[:3]}")
        if n_lora != len(lora_modules(model)) or n_lora == 0:
            raise RuntimeError(f"expected {n_lora} LoRA modules, found {len(lora_modules(model))}")
    frozen_decoder = [n for n, p in model.decoder.named_parameters() if not p.requires_grad]
    if frozen_decoder:
        raise RuntimeError(f"the decoder must train in every phase; frozen: {frozen_decoder[:3]}")


def count_params(model: nn.Module) -> dict:
    """Total / trainable / frozen counts, trainable per group (backbone, lora, decoder) and totals per group."""
    out = {"total": 0, "trainable": 0, "frozen": 0, "backbone": 0, "lora": 0, "decoder": 0,
           "total_per_group": {"backbone": 0, "lora": 0, "decoder": 0}}
    for name, p in model.named_parameters():
        n, kind = p.numel(), param_kind(name)
        out["total"] += n
        out["total_per_group"][kind] += n
        if p.requires_grad:
            out["trainable"] += n
            out[kind] += n
        else:
            out["frozen"] += n
    return out


def write_params_json(model: nn.Module, path: str | Path) -> dict:
    counts = count_params(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def phase_learning_rates(cfg) -> dict[str, float]:
    """The phase's own learning rates per group kind (never derived from the other phase's)."""
    if cfg.PHASE == 1:
        return {"decoder": cfg.LR_DECODER_P1}
    return {"decoder": cfg.LR_DECODER_P2, "lora": cfg.LR_LORA, "backbone": cfg.LR_ENCODER_P2}


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Named groups of trainable parameters: ``<kind>`` (with weight decay) and ``<kind>_no_decay`` (norms, biases)."""
    lrs = phase_learning_rates(cfg)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = param_kind(name)
        if kind not in lrs:
            raise RuntimeError(f"parameter {name} ({kind}) is trainable but Phase {cfg.PHASE} has no learning rate for it")
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        key = f"{kind}_no_decay" if no_decay else kind
        g = groups.setdefault(key, {"name": key, "params": [], "lr": lrs[kind],
                                    "weight_decay": 0.0 if no_decay else cfg.WEIGHT_DECAY})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable groups (fused kernels on CUDA)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise RuntimeError("no trainable parameters: check PHASE and the model set-up")
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], fused=fused or None)
