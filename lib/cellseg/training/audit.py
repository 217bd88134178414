"""The gradient audit after the first optimizer step of a phase: every trainable parameter received a finite gradient
and every frozen one none.

``requires_grad`` says what *should* train, not what does. timm's reentrant activation checkpointing
(``TIMM_REENTRANT_CKPT=1``, and timm's default before 1.0.16) returns a block's outputs without a graph when the
block's input needs no gradient, which is the case for a frozen ViT's blocks: every LoRA adapter inside then gets no
gradient and Phase 2 silently trains the decoder alone. The audit catches that, and anything else that disconnects a
parameter from the loss, whatever the cause (timm's "every trainable parameter gets a gradient, no NaNs" test, run on
the real configuration).
"""

from __future__ import annotations

import os

import torch
from torch import nn


class GradientAuditError(RuntimeError):
    """Trainable parameters without a (finite) gradient, or frozen ones with one, after the first optimizer step."""


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def audit_gradients(model: nn.Module, *, phase: int, grad_checkpointing: bool, allow_non_finite: bool = False) -> int:
    """Check the gradients the first backward pass of a phase left on ``model`` (call before the optimizer step).

    Args:
        model: the plain model (not the DDP wrapper).
        phase: named in the message.
        grad_checkpointing: ``GRAD_CHECKPOINTING``; the message explains the reentrant-checkpoint trap when it is on.
        allow_non_finite: True under fp16's GradScaler, which skips steps with Inf gradients by design.

    Returns:
        The number of trainable parameters checked.

    Raises:
        GradientAuditError: naming the parameters without a gradient, with a non-finite one, or frozen with one.
    """
    missing, non_finite, frozen = [], [], []
    checked = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            checked += 1
            if p.grad is None:
                missing.append(name)
            elif not allow_non_finite and not bool(torch.isfinite(p.grad).all()):
                non_finite.append(name)
        elif p.grad is not None:
            frozen.append(name)
    problems = []
    if missing:
        why = "they are not connected to the loss"
        if grad_checkpointing:
            reentrant = os.environ.get("TIMM_REENTRANT_CKPT", "")
            why = ("with GRAD_CHECKPOINTING=True, timm's reentrant activation checkpointing (TIMM_REENTRANT_CKPT="
                   f"{reentrant or 'unset'}; the default of timm < 1.0.16) returns a frozen block's outputs without a "
                   "graph, so adapters inside it never train. Unset TIMM_REENTRANT_CKPT (timm >= 1.0.16 checkpoints "
                   "non-reentrantly), or set GRAD_CHECKPOINTING=False")
        problems.append(f"{len(missing)} of {checked} trainable parameters received no gradient ({_names(missing)}): "
                        f"{why}.")
    if non_finite:
        problems.append(f"{len(non_finite)} trainable parameters received NaN/Inf gradients ({_names(non_finite)}): "
                        "lower the learning rate, check the inputs, or use PRECISION='fp32'.")
    if frozen:
        problems.append(f"{len(frozen)} frozen parameters received gradients ({_names(frozen)}): something set "
                        ".grad on parameters the phase keeps frozen.")
    if problems:
        raise GradientAuditError(f"gradient audit after the first optimizer step of Phase {phase} failed: "
                                 + " ".join(problems) + " Training stops here rather than train something else than "
                                 "the phase says.")
    return checked


__all__ = ["GradientAuditError", "audit_gradients"]
