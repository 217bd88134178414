"""LoRA injection: block selection, idempotent re-application (notebook cell re-run), merge, clear errors."""

from __future__ import annotations

import pytest
import torch

from cellseg.model import build_model
from cellseg.model.lora import apply_lora, lora_modules, merge_lora, select_blocks

KW = dict(r=2, alpha=4, dropout=0.0, targets=["qkv"])


@pytest.mark.parametrize("spec, expected", [("all", [0, 1, 2, 3, 4, 5]), ("last_half", [3, 4, 5]), ("1-3", [1, 2, 3]),
                                            ("0,5", [0, 5])])
def test_select_blocks(spec, expected):
    assert select_blocks(spec, 6) == expected


@pytest.mark.parametrize("spec", ["4-9", "7"])
def test_select_blocks_outside_the_encoder(spec):
    with pytest.raises(ValueError, match="LORA_BLOCKS"):
        select_blocks(spec, 6)


def test_only_encoder_attention_is_wrapped_and_reapplying_is_a_no_op():
    model = build_model("test_vit", num_classes=2, width=8)
    model.decoder.add_module("qkv", torch.nn.Linear(4, 4))  # a decoder layer with the same name is never hit
    assert apply_lora(model, blocks="0,2", **KW) == 2
    assert lora_modules(model) == ["encoder.core.blocks.0.attn.qkv", "encoder.core.blocks.2.attn.qkv"]
    assert apply_lora(model, blocks="0,2", **KW) == 2  # cell re-run
    assert model.arch_info()["lora"] == {**KW, "blocks": "0,2"}
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(model, blocks="all", **KW)


def test_merge_gives_the_same_outputs_as_the_adapted_model():
    torch.manual_seed(0)
    model = build_model("test_vit", num_classes=2, width=8).eval()
    apply_lora(model, blocks="all", **KW)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)["nc"]
    assert merge_lora(model) == 6 and not lora_modules(model) and model.lora_config is None
    torch.testing.assert_close(model(x)["nc"], before, rtol=1e-4, atol=1e-5)


def test_lora_errors():
    cnn = build_model("test_resnet", num_classes=2, width=8)
    with pytest.raises(ValueError, match="needs a ViT encoder"):
        apply_lora(cnn, blocks="all", **KW)
    vit = build_model("test_vit", num_classes=2, width=8)
    with pytest.raises(ValueError, match="matched no Linear layer"):
        apply_lora(vit, r=2, alpha=4, dropout=0.0, targets=["query"], blocks="all")
