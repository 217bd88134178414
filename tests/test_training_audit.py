"""The gradient audit after a phase's first optimizer step, and GRAD_CHECKPOINTING that is never a silent no-op:
LoRA under timm's reentrant checkpointing gets no gradient, and the audit stops training naming the adapters."""

from __future__ import annotations

import pytest
import timm
import torch

from cellseg.model import build_model
from cellseg.model.backbones import require_checkpointing_support
from cellseg.training.audit import GradientAuditError, audit_gradients
from test_training import make_trainer, snapshot


@pytest.fixture
def reentrant_timm():
    timm.layers.set_reentrant_ckpt(True)  # what TIMM_REENTRANT_CKPT=1 (or timm < 1.0.16) does
    yield
    timm.layers.set_reentrant_ckpt(False)


def test_lora_under_reentrant_checkpointing_is_stopped_by_the_audit(tmp_path, reentrant_timm):
    t = make_trainer(tmp_path, PHASE=2, GRAD_CHECKPOINTING=True, LORA_BLOCKS="last_half")
    before = snapshot(t.model)
    with pytest.raises(GradientAuditError) as e:
        t.train_one_epoch(0)
    msg = str(e.value)
    assert "Phase 2" in msg and "lora_A" in msg and "lora_B" in msg and "TIMM_REENTRANT_CKPT" in msg
    assert "GRAD_CHECKPOINTING=False" in msg
    assert all(torch.equal(v, snapshot(t.model)[k]) for k, v in before.items())  # stopped before the step


def test_lora_with_checkpointing_trains_the_adapters(tmp_path):
    t = make_trainer(tmp_path, PHASE=2, GRAD_CHECKPOINTING=True, LORA_BLOCKS="last_half", LR_LORA=1e-2)
    before = snapshot(t.model)
    assert t.train_one_epoch(0) is not None
    after = snapshot(t.model)
    lora = [k for k in before if "lora_" in k]
    assert lora and all(not torch.equal(before[k], after[k]) for k in lora)


def test_grad_checkpointing_really_checkpoints_the_vit_blocks(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build_model("test_vit", num_classes=2, width=8)
    model.encoder.set_grad_checkpointing(True)
    for p in model.encoder.parameters():
        p.requires_grad_(True)
    model(torch.randn(1, 3, 32, 32))
    assert len(calls) == len(model.encoder.core.blocks)


def test_a_timm_that_ignores_checkpointing_is_refused():
    class OldViT(torch.nn.Module):  # forward_intermediates as in timm < 1.0.16: never looks at the flag
        def forward_intermediates(self, x):
            return [blk(x) for blk in self.blocks]

    with pytest.raises(RuntimeError, match=r"GRAD_CHECKPOINTING=True.*ignores.*timm>=1.0.16"):
        require_checkpointing_support(OldViT.forward_intermediates, OldViT())


def test_audit_names_frozen_parameters_with_gradients_and_non_finite_ones():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    net[0].weight.requires_grad_(False)
    net(torch.ones(1, 2)).sum().backward()
    assert audit_gradients(net, phase=1, grad_checkpointing=False) == 3
    net[0].weight.grad = torch.zeros(2, 2)
    with pytest.raises(GradientAuditError, match=r"1 frozen parameters received gradients \(0.weight\)"):
        audit_gradients(net, phase=1, grad_checkpointing=False)
    net[0].weight.grad = None
    net[1].bias.grad = torch.tensor([float("nan")])
    with pytest.raises(GradientAuditError, match=r"NaN/Inf gradients \(1.bias\)"):
        audit_gradients(net, phase=1, grad_checkpointing=False)
    assert audit_gradients(net, phase=1, grad_checkpointing=False, allow_non_finite=True) == 3  # fp16 GradScaler
    net[1].bias.grad = None
    with pytest.raises(GradientAuditError, match=r"1 of 3 trainable parameters received no gradient \(1.bias\)"):
        audit_gradients(net, phase=1, grad_checkpointing=False)
