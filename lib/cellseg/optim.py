"""Phase set-up and the optimizer: what is frozen, what trains, and at which learning rate.

Phase 1 freezes the encoder (no gradients; its norm/dropout layers stay in eval mode, see ``CellSegModel.train``),
unless ``TRAIN_ENCODER_P1`` trains the whole network from the start (an encoder without pretrained weights: freezing
random features would leave the decoder nothing to learn from, so that combination is refused, see
:func:`check_encoder_source`).
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


NO_WEIGHTS = ("", "none", "None")


def encoder_is_pretrained(cfg) -> bool:
    """True when ``ENCODER_WEIGHTS`` names a weights file (the encoder is loaded, not randomly initialised)."""
    return cfg.ENCODER_WEIGHTS not in NO_WEIGHTS


def training_mode(cfg) -> str:
    """What a phase trains, in words (``params.json``, the training summary and the evaluation report)."""
    source = f"weights {cfg.ENCODER_WEIGHTS}" if encoder_is_pretrained(cfg) else "random init"
    if cfg.PHASE == 1:
        if cfg.TRAIN_ENCODER_P1:
            return f"full network (encoder {cfg.ENCODER} from {source}, trained at LR_ENCODER_P1={cfg.LR_ENCODER_P1:g})"
        return f"frozen encoder (encoder {cfg.ENCODER} from {source}, decoder only)"
    return f"Phase 2 fine-tuning (encoder {cfg.ENCODER} from {source}, then Phase 1)"


def check_encoder_source(cfg) -> None:
    """Refuse to freeze an encoder that was never loaded from weights.

    Raises:
        ConfigError: ``PHASE`` 1 with ``ENCODER_WEIGHTS`` empty and ``TRAIN_ENCODER_P1`` False.
    """
    from cellseg.config import ConfigError

    if cfg.PHASE == 1 and not cfg.TRAIN_ENCODER_P1 and not encoder_is_pretrained(cfg):
        raise ConfigError(
            f"Phase 1 would freeze ENCODER='{cfg.ENCODER}' with random weights (ENCODER_WEIGHTS={cfg.ENCODER_WEIGHTS!r}): "
            "the decoder would learn from random features and nothing would improve them. Choose one: "
            "(a) set ENCODER_WEIGHTS to a local state-dict file of the encoder (pretrained features; the intended "
            "Phase 1, e.g. UNI), or (b) set TRAIN_ENCODER_P1=True to train the whole network from the start, the "
            "encoder at LR_ENCODER_P1 (from scratch: needs more epochs; see configs/bench_bccd_cpu.yaml). "
            "Set it in the parameters cell, in the -f YAML file, or with `-p TRAIN_ENCODER_P1 True`."
        )


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
    full = cfg.PHASE == 1 and getattr(cfg, "TRAIN_ENCODER_P1", False)
    if full:
        for p in model.encoder.parameters():
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
    check_phase(model, cfg.PHASE, n_lora, full_network=full)
    model.train()
    return n_lora


def check_phase(model: nn.Module, phase: int, n_lora: int, *, full_network: bool = False) -> None:
    """Frozen means frozen (and full means full): verify the trainable set before the first step."""
    trainable_backbone = [n for n, p in model.named_parameters() if p.requires_grad and param_kind(n) == "backbone"]
    if phase == 1 and full_network:
        frozen = [n for n, p in model.encoder.named_parameters() if not p.requires_grad]
        if frozen:
            raise RuntimeError(f"TRAIN_ENCODER_P1 trains the whole network, but {len(frozen)} encoder parameters are "
                               f"frozen (e.g. {frozen[:3]}).")
    elif phase == 1 and trainable_backbone:
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


def write_params_json(model: nn.Module, path: str | Path, extra: dict | None = None) -> dict:
    """Write the parameter counts (and ``extra`` entries, e.g. the training mode) to ``path``."""
    counts = {**count_params(model), **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def phase_learning_rates(cfg) -> dict[str, float]:
    """The phase's own learning rates per group kind (never derived from the other phase's)."""
    if cfg.PHASE == 1:
        if getattr(cfg, "TRAIN_ENCODER_P1", False):
            return {"decoder": cfg.LR_DECODER_P1, "backbone": cfg.LR_ENCODER_P1}
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
