"""Encoders and decoders: shapes at any input size, UNI's exact configuration and strict local loading, errors."""

from __future__ import annotations

import pytest
import timm
import torch

from cellseg.branches import Branch
from cellseg.model import build_model
from cellseg.model.backbones import UNI_KWARGS, default_indices


@pytest.mark.parametrize("encoder", ["test_vit", "test_resnet", "test_efficientnet"])
@pytest.mark.parametrize("decoder", ["hovernet", "unet_resattn"])
@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_output_shapes_at_any_size(encoder, decoder, size):
    torch.manual_seed(0)
    model = build_model(encoder, num_classes=3, decoder=decoder, width=8).eval()
    out = model(torch.randn(2, 3, *size))
    assert set(out) == set(Branch)
    assert out[Branch.NP].shape == (2, 2, *size)
    assert out[Branch.HV].shape == (2, 2, *size)
    assert out[Branch.NC].shape == (2, 4, *size)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_every_trainable_parameter_gets_a_gradient():
    model = build_model("test_vit", num_classes=2, width=8)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


def test_default_indices():
    assert default_indices(24) == [5, 11, 17, 23]
    assert default_indices(6) == [1, 2, 3, 5]
    assert build_model("test_vit", num_classes=1, width=8).arch["encoder_indices"] == [1, 2, 3, 5]
    assert build_model("test_vit", num_classes=1, width=8, indices=[1, 5]).arch["encoder_indices"] == [1, 5]


def test_cnn_encoders_of_the_issue_build_with_their_channels():
    for name, chans in [("resnet50", [64, 256, 512, 1024, 2048]), ("efficientnet_b4", [24, 32, 56, 160, 448])]:
        with torch.device("meta"):
            m = build_model(name, num_classes=3)
        assert m.arch["encoder_channels"] == chans and m.arch["family"] == "cnn"


def test_uni2_configuration():
    from cellseg.model.backbones import FOUNDATION_MODELS

    arch, kwargs = FOUNDATION_MODELS["uni2"]
    with torch.device("meta"):
        core = timm.create_model(arch, pretrained=False, **kwargs())
    assert core.embed_dim == 1536 and len(core.blocks) == 24 and core.num_reg_tokens == 8
    assert core.patch_embed.patch_size == (14, 14)


@pytest.fixture(scope="module")
def uni_weights(tmp_path_factory):
    """A randomly initialised ViT-L/16 saved in UNI's file layout (plain state dict, pytorch_model.bin)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_large_patch16_224", pretrained=False, **UNI_KWARGS)
    path = tmp_path_factory.mktemp("uni") / "pytorch_model.bin"
    torch.save(vit.state_dict(), path)
    return path, vit.state_dict()["blocks.3.ls1.gamma"].clone()


def test_uni_loads_strictly_from_a_local_file(uni_weights):
    path, gamma = uni_weights
    model = build_model("uni", num_classes=3, weights=str(path), width=8)
    assert model.arch["encoder_indices"] == [5, 11, 17, 23] and model.arch["encoder_channels"] == [1024] * 4
    torch.testing.assert_close(model.encoder.core.blocks[3].ls1.gamma, gamma)
    out = model.eval()(torch.randn(1, 3, 48, 80))  # not a multiple of 16: padded and cropped back
    assert out[Branch.NC].shape == (1, 4, 48, 80)


def test_uni_with_foreign_weights_is_explained(tmp_path, uni_weights):
    bad = tmp_path / "other.bin"
    torch.save(timm.create_model("test_vit").state_dict(), bad)
    with pytest.raises(RuntimeError, match="does not fit ENCODER='uni'"):
        build_model("uni", num_classes=3, weights=str(bad))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read"):
        build_model("uni", num_classes=3, weights=str(junk))


def test_uni_without_weights_says_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="`hf download MahmoodLab/UNI pytorch_model.bin --local-dir weights/uni`"):
        build_model("uni", num_classes=3, weights="")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.bin")):
        build_model("uni", num_classes=3, weights=str(tmp_path / "nope.bin"))
    with pytest.raises(FileNotFoundError, match="ENCODER_WEIGHTS"):
        build_model("test_vit", num_classes=3, weights=str(tmp_path / "nope.bin"))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="ENCODER must be"):
        build_model("resnet5", num_classes=3)
    with pytest.raises(ValueError, match="DECODER must be"):
        build_model("test_vit", num_classes=3, decoder="fpn")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("test_vit", num_classes=0)
    with pytest.raises(ValueError, match="ENCODER_INDICES"):
        build_model("test_vit", num_classes=3, indices=[7])
    with pytest.raises(ValueError, match="ViT encoders only"):
        build_model("test_resnet", num_classes=3, indices=[1])


def test_frozen_encoder_runs_without_graph_and_stays_in_eval():
    model = build_model("test_resnet", num_classes=2, width=8)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    model.train()
    assert not model.encoder.training and model.decoder.training
    feats = model.encoder(torch.randn(1, 3, 64, 64))
    out = model(torch.randn(1, 3, 64, 64))
    assert out[Branch.NP].requires_grad and not feats[0].requires_grad


def test_shape_only_build_needs_no_weights_file(tmp_path):
    """Login-node uses (ckpt check, preflight, memory) build UNI's architecture without its gated weights."""
    with torch.device("meta"):
        m = build_model("uni", num_classes=3, weights=str(tmp_path / "absent.bin"), load_weights=False)
    assert m.arch["encoder"] == "uni" and m.arch["encoder_channels"] == [1024] * 4
    assert m.encoder.core.blocks[0].ls1.gamma.shape == (1024,)  # UNI's LayerScale, as in the real file


def test_ckpt_check_skeleton_for_uni_without_its_weights(tmp_path):
    from cellseg.commands.ckpt import build_network_skeleton
    from cellseg.config import resolve_config

    cfg = resolve_config({"ENCODER": "uni", "ENCODER_WEIGHTS": str(tmp_path / "absent.bin"), "PHASE": 2})
    model = build_network_skeleton(cfg, 3)
    assert model.arch_info()["lora"]["r"] == cfg.LORA_R and model.arch["encoder"] == "uni"
