"""LoRA (Hu et al., 2021) on the encoder's attention through peft, injected into the timm encoder only.

Injecting into ``model.encoder.core`` (not the whole network) means peft's suffix matching of ``target_modules`` can
never hit a decoder module of the same name, and peft's freezing never touches the decoder. Applying twice with the
same settings is a no-op, so re-running a notebook cell is safe.
"""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

log = logging.getLogger(__name__)


def select_blocks(spec: str, depth: int) -> list[int]:
    """``LORA_BLOCKS`` -> block indices: 'all', 'last_half', 'A-B' (inclusive) or 'i,j,k'."""
    if spec == "all":
        return list(range(depth))
    if spec == "last_half":
        return list(range(depth // 2, depth))
    if "-" in spec:
        a, b = (int(v) for v in spec.split("-"))
        blocks = list(range(a, b + 1))
    else:
        blocks = [int(v) for v in spec.split(",")]
    bad = [i for i in blocks if not 0 <= i < depth]
    if bad or not blocks:
        raise ValueError(f"LORA_BLOCKS='{spec}' names blocks {bad or blocks} outside the encoder's 0..{depth - 1}.")
    return blocks


def lora_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _target_names(core: nn.Module, targets: list[str], blocks: list[int]) -> list[str]:
    chosen = {str(b) for b in blocks}
    names = []
    for name, module in core.named_modules():
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1] in chosen and parts[-1] in targets \
                and isinstance(module, nn.Linear):
            names.append(name)
    return names


def apply_lora(model: nn.Module, *, r: int, alpha: int, dropout: float, targets: list[str], blocks: str = "all") -> int:
    """Inject LoRA adapters into the ViT encoder's ``targets`` layers of the chosen blocks.

    Returns the number of wrapped modules (checked against the number expected).

    Raises:
        ValueError: the encoder is not a ViT, no module matches, or the model already carries different LoRA settings.
    """
    settings = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets), "blocks": blocks}
    if model.encoder.family != "vit":
        raise ValueError(f"LoRA needs a ViT encoder; ENCODER='{model.arch['encoder']}' is a CNN (Phase 2 fine-tunes it at "
                         "LR_ENCODER_P2 instead).")
    core = model.encoder.core
    if model.lora_config is not None:
        if model.lora_config != settings:
            raise ValueError(f"the model already carries LoRA {model.lora_config}; asked for {settings}. Rebuild the "
                             "model (re-run the model cell) to change LoRA settings.")
        log.info("LoRA already applied with the same settings (cell re-run): nothing to do")
        return len(lora_modules(core))
    names = _target_names(core, targets, select_blocks(blocks, len(core.blocks)))
    if not names:
        raise ValueError(f"LORA_TARGETS={targets} matched no Linear layer in blocks '{blocks}' of the encoder; "
                         f"attention layers here are named e.g. {[n for n, _ in core.named_modules()][:0] or 'attn.qkv'}.")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, core)
    wrapped = lora_modules(core)
    if len(wrapped) != len(names):
        raise RuntimeError(f"peft wrapped {len(wrapped)} modules, expected {len(names)} ({names[:3]}...)")
    model.lora_config = settings
    model.arch["lora"] = settings
    return len(wrapped)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain layer back. Returns the number merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
            # the merged weight no longer holds the base file's values: compact checkpoints must store it
            getattr(model, "base_keys", set()).discard(f"{name}.weight")
    if hasattr(model, "lora_config"):
        model.lora_config = None
        model.arch["lora"] = None
    return merged
