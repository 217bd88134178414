"""One canonical key space: DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes in any order and repetition on
either side, unwrapping by type (never by attribute name), and LoRA keys written as the plain layer's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cellseg.checkpoint import canonical_state_dict, canonicalize, load_weights, strip_wrappers, unwrap_model
from cellseg.checkpoint.keys import canonical_key, canonical_names, lora_prefixes_from_keys, model_key_map
from cellseg.model.network import build_model

PREFIXES = ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "module.module.",
            "_orig_mod._orig_mod.module.", "module._orig_mod.module._orig_mod."]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_strip_wrappers_any_order_and_repetition(prefix):
    assert strip_wrappers(prefix + "decoder.np.head.weight") == "decoder.np.head.weight"


def test_inner_compiled_submodule_segment_is_dropped():
    assert strip_wrappers("encoder._orig_mod.core.blocks.0.attn.qkv.weight") == "encoder.core.blocks.0.attn.qkv.weight"
    assert strip_wrappers("module.encoder._orig_mod.core.x") == "encoder.core.x"


def test_lora_keys_become_plain_layer_keys_and_canonical_is_idempotent():
    keys = ["module.encoder.core.blocks.0.attn.qkv.base_layer.weight",
            "module.encoder.core.blocks.0.attn.qkv.base_layer.bias",
            "module.encoder.core.blocks.0.attn.qkv.lora_A.default.weight",
            "module.encoder.core.blocks.0.attn.qkv.lora_B.default.weight",
            "module.encoder.core.blocks.0.attn.proj.weight"]
    names = canonical_names(keys)
    assert list(names.values()) == ["encoder.core.blocks.0.attn.qkv.weight", "encoder.core.blocks.0.attn.qkv.bias",
                                    "encoder.core.blocks.0.attn.qkv.lora_A.weight",
                                    "encoder.core.blocks.0.attn.qkv.lora_B.weight",
                                    "encoder.core.blocks.0.attn.proj.weight"]
    canon = list(names.values())
    assert list(canonical_names(canon).values()) == canon
    assert lora_prefixes_from_keys(canon) == {"encoder.core.blocks.0.attn.qkv"}
    # 'base_layer' outside a LoRA layer is an ordinary name and stays
    assert canonical_key("x.base_layer.weight") == "x.base_layer.weight"


@pytest.mark.parametrize("keys", [
    ["a.qkv.lora_A.default.weight", "a.qkv.lora_A.other.weight", "a.qkv.base_layer.weight"],
    ["module.w", "w"],
])
def test_colliding_keys_raise(keys):
    with pytest.raises(ValueError, match="both map to"):
        canonical_names(keys)


class _HasChildNamedModule(nn.Module):
    """A model whose child is *called* 'module': attribute-based unwrapping (timm's) would wrongly descend."""

    def __init__(self):
        super().__init__()
        self.module = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)


def test_unwrap_by_type_not_by_attribute_name():
    m = _HasChildNamedModule()
    assert unwrap_model(m) is m
    assert unwrap_model(nn.DataParallel(m)) is m


def test_unwrap_real_dataparallel_and_compiled_module():
    m = nn.Sequential(nn.Linear(4, 4))
    compiled = torch.compile(m)
    assert type(compiled).__name__ == "OptimizedModule"
    assert unwrap_model(compiled) is m
    assert unwrap_model(torch.compile(nn.DataParallel(m))) is m
    assert unwrap_model(nn.DataParallel(torch.compile(m))) is m
    assert list(canonical_state_dict(torch.compile(nn.DataParallel(m)))) == ["0.weight", "0.bias"]


@pytest.fixture(scope="module")
def src_dst():
    torch.manual_seed(0)
    return build_model("test_vit", num_classes=3, width=8), build_model("test_vit", num_classes=3, width=8)


@pytest.mark.parametrize("save_prefix", PREFIXES[:6])
@pytest.mark.parametrize("wrap", ["plain", "dataparallel", "compile", "compile+dataparallel"])
def test_prefixed_state_dicts_load_into_wrapped_models(save_prefix, wrap, src_dst):
    src, dst = src_dst
    with torch.no_grad():
        for t in dst.state_dict().values():
            t.zero_()  # whatever a previous case loaded is gone
    state = {save_prefix + k: v for k, v in src.state_dict().items()}
    wrapped = {"plain": dst, "dataparallel": nn.DataParallel(dst), "compile": torch.compile(dst),
               "compile+dataparallel": torch.compile(nn.DataParallel(dst))}[wrap]
    report = load_weights(wrapped, state)
    assert report.complete and len(report.loaded) == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_checkpoint_of_wrapped_model_is_canonical():
    m = build_model("test_vit", num_classes=3, width=8)
    assert list(canonical_state_dict(nn.DataParallel(torch.compile(m)))) == list(m.state_dict())
    assert model_key_map(torch.compile(m)) == {k: k for k in m.state_dict()}
    assert list(canonicalize({"module._orig_mod." + k: v for k, v in m.state_dict().items()})) == list(m.state_dict())


def test_wrapper_cycle_is_an_error_not_a_hang():
    dp = nn.DataParallel(nn.Linear(1, 1))
    dp.module = dp
    with pytest.raises(RuntimeError, match="wrapping itself"):
        unwrap_model(dp)
