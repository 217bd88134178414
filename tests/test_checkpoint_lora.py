"""The four LoRA / plain combinations, checked numerically on the network's outputs, and the notebook re-run case."""

from __future__ import annotations

import copy

import pytest
import torch

from cellseg.checkpoint import (
    CheckpointManager,
    IncompatibleCheckpoint,
    collect_state,
    init_phase2,
    load_weights,
)
from cellseg.checkpoint.lora_keys import merged_weight
from cellseg.model.lora import apply_lora, lora_modules, merge_lora
from cellseg.model.network import build_model

LORA = dict(r=4, alpha=8, dropout=0.1, targets=["qkv"], blocks="all")


def _model(seed: int, lora: bool = False, **lora_overrides):
    torch.manual_seed(seed)
    m = build_model("test_vit", num_classes=3, width=8)
    if lora:
        apply_lora(m, **{**LORA, **lora_overrides})
    return m.eval()


def _train_adapters(model, seed: int = 7) -> None:
    """Stand-in for training: non-zero lora_B (and new lora_A) so that the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _assert_same_outputs(a, b, x, atol=0.0):
    oa, ob = _out(a, x), _out(b, x)
    for k in oa:
        if atol:
            torch.testing.assert_close(oa[k], ob[k], atol=atol, rtol=1e-4)
        else:
            assert torch.equal(oa[k], ob[k]), k


def _payload(model) -> dict:
    return collect_state(model=model, optimizer=None, scheduler=None, scaler=None, progress={}, config={"PHASE": 1})


def test_plain_checkpoint_into_plain_model(image):
    src, dst = _model(0), _model(1)
    report = load_weights(dst, _payload(src))
    assert report.complete and not report.merged and not report.adapters_kept
    _assert_same_outputs(src, dst, image)


def test_plain_checkpoint_into_lora_model_keeps_outputs(image):
    """qkv.weight -> qkv.base_layer.weight; the fresh adapters (B = 0) leave the function unchanged."""
    src, dst = _model(0), _model(1, lora=True)
    report = load_weights(dst, _payload(src))
    assert len(report.adapters_kept) == 2 * len(lora_modules(dst)) > 0
    assert report.complete and not report.adapters_reset
    base = dict(dst.named_parameters())["encoder.core.blocks.0.attn.qkv.base_layer.weight"]
    assert torch.equal(base, src.state_dict()["encoder.core.blocks.0.attn.qkv.weight"])
    _assert_same_outputs(src, dst, image)


def test_lora_checkpoint_into_lora_model(image):
    src = _model(0, lora=True)
    _train_adapters(src)
    dst = _model(1, lora=True)
    payload = _payload(src)
    assert "encoder.core.blocks.0.attn.qkv.lora_A.weight" in payload["model"]
    assert "encoder.core.blocks.0.attn.qkv.weight" in payload["model"]  # canonical: the plain layer's name
    report = load_weights(dst, payload)
    assert report.complete and not report.adapters_kept
    _assert_same_outputs(src, dst, image)


def test_lora_checkpoint_into_plain_model_merges_when_asked(image):
    src = _model(0, lora=True)
    _train_adapters(src)
    plain_before = _model(1)
    dst = _model(1)
    report = load_weights(dst, _payload(src), merge_lora=True)
    assert len(report.merged) == len(lora_modules(src)) and report.complete
    # bit-identical to peft's own merge, and equal to the LoRA model up to float32 rounding
    peft_merged = copy.deepcopy(src)
    merge_lora(peft_merged)
    for k, v in peft_merged.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    _assert_same_outputs(src, dst, image, atol=1e-4)
    # and the merge really changed something: without the adapters the outputs differ
    base_only = _model(2)
    load_weights(base_only, {k: v for k, v in _payload(src)["model"].items() if "lora_" not in k})
    assert not torch.allclose(_out(base_only, image)["np"], _out(src, image)["np"], atol=1e-4)
    assert not torch.equal(_out(plain_before, image)["np"], _out(dst, image)["np"])


def test_lora_checkpoint_into_plain_model_without_merge_names_merge_lora():
    src = _model(0, lora=True)
    with pytest.raises(IncompatibleCheckpoint, match="MERGE_LORA=True") as err:
        load_weights(_model(1), _payload(src))
    assert "LoRA adapters" in str(err.value)
    with pytest.raises(IncompatibleCheckpoint, match="MERGE_LORA"):
        load_weights(_model(1), _payload(src), strict=False)  # non-strict never drops trained adapters silently


def test_merged_weight_formula():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(6, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    expected = w + 0.5 * torch.einsum("or,ri->oi", b, a)
    torch.testing.assert_close(merged_weight(w, a, b, 0.5), expected)


def test_lora_settings_mismatch_is_explained():
    src = _model(0, lora=True)
    with pytest.raises(IncompatibleCheckpoint, match="LORA_R") as err:
        load_weights(_model(1, lora=True, r=8, alpha=16), _payload(src))
    assert "shape-mismatched" in str(err.value) and "lora_A" in str(err.value)


def test_raw_lora_state_dict_cannot_be_merged_without_settings():
    src = _model(0, lora=True)
    with pytest.raises(IncompatibleCheckpoint, match="no LoRA settings"):
        load_weights(_model(1), src.state_dict(), merge_lora=True)


def test_raw_peft_state_dict_loads_into_lora_model(image):
    src = _model(0, lora=True)
    _train_adapters(src)
    dst = _model(1, lora=True)
    assert load_weights(dst, {"module." + k: v for k, v in src.state_dict().items()}).complete
    _assert_same_outputs(src, dst, image)


def test_notebook_rerun_apply_lora_twice_and_load_again(tmp_path, image):
    """Re-running the LoRA cell is a no-op and re-running the load cell works on the already-wrapped model; adapters
    that trained in between are reset (B = 0) so the model again equals the plain checkpoint."""
    phase1 = _model(0)
    mgr = CheckpointManager(tmp_path / "phase1", phase=1)
    mgr.save(collect_state(model=phase1, optimizer=None, scheduler=None, scaler=None,
                           progress={"epoch": 1, "step": 1, "best_metric": 0.5,
                                     "monitor": {"metric": "pq", "mode": "max"}}, config={"PHASE": 1}),
             epoch_end=True, is_best=True)
    model = _model(1, lora=True)
    assert init_phase2(model, tmp_path / "phase1") == tmp_path / "phase1" / "best.pt"
    _assert_same_outputs(phase1, model, image)
    n = len(lora_modules(model))
    assert apply_lora(model, **LORA) == n  # the cell again
    _train_adapters(model)
    assert not torch.equal(_out(model, image)["np"], _out(phase1, image)["np"])
    report = load_weights(model, tmp_path / "phase1" / "best.pt")  # the load cell again
    assert len(report.adapters_reset) == n
    _assert_same_outputs(phase1, model, image)
    assert len(lora_modules(model)) == n
