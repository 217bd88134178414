"""ENCODER_WEIGHTS accepts any standard weights file (issue 15): timm / torchvision state dicts with or without their
classifier head, ``.safetensors`` as well as ``.pt``/``.bin``, training-checkpoint wrappers; the head is dropped with
a report, anything else that does not fit is still an error."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from cellseg.checkpoint import collect_state
from cellseg.config import resolve_config
from cellseg.distributed import DistEnv
from cellseg.losses import loss_from_config
from cellseg.model import build_model_from_config
from cellseg.model.network import build_model
from cellseg.optim import configure_phase
from cellseg.runtime import RunContext
from cellseg.training.trainer import Trainer
from toydata import FakeCheckpoints, ToyDataset


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLSEG_CACHE_DIR", str(tmp_path / "hash-cache"))


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory):
    """A randomly initialised timm resnet50 classifier (1000-class ``fc`` head included), as .pth and .safetensors."""
    torch.manual_seed(0)
    state = timm.create_model("resnet50", pretrained=False).state_dict()
    folder = tmp_path_factory.mktemp("rn50")
    torch.save(state, folder / "resnet50.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "resnet50.safetensors"))
    return folder, state


@pytest.mark.parametrize("name", ["resnet50.pth", "resnet50.safetensors"])
def test_timm_resnet50_with_its_fc_head_trains_as_encoder_weights(tmp_path, resnet50_files, name, logs):
    folder, state = resnet50_files
    cfg = resolve_config({"ENCODER": "resnet50", "ENCODER_WEIGHTS": str(folder / name), "DECODER_WIDTH": 8,
                          "PATCH_SIZE": 64, "DEVICE": "cpu", "NUM_WORKERS": 0, "BATCH_SIZE": 2, "GRAD_ACCUM_TARGET": 0,
                          "EPOCHS": 1, "MAX_STEPS_PER_EPOCH": 1, "PRECISION": "fp32", "LOG_EVERY": 1000,
                          "SCHEDULER": "constant", "PATIENCE_P1": 0, "RUN_DIR": str(tmp_path / "run"),
                          "CHECKPOINT_DIR": str(tmp_path / "ck")})
    model = build_model_from_config(cfg, num_classes=2)
    assert "dropped 2 classifier-head tensor(s): fc.bias (1000,), fc.weight (1000, 2048)" in logs()
    assert torch.equal(model.encoder.core.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.encoder.core.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    configure_phase(model, cfg)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    ctx = RunContext(cfg, DistEnv(), torch.device("cpu"), tmp_path / "run")
    trainer = Trainer(ctx, model, loss_from_config(cfg, 2), ToyDataset(n=2, size=64),
                      validate_fn=lambda m, e: {"pq": 0.0, "val_loss": 1.0}, ckpt=FakeCheckpoints(), stop=None)
    trainer.collect = lambda: {}
    trainer.fit()
    assert trainer.progress["step"] == 1
    assert any(not torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())
    assert torch.equal(model.encoder.core.conv1.weight, state["conv1.weight"])  # Phase 1: frozen
    # the checkpoint leaves the frozen file weights (BatchNorm statistics included) out
    saved = collect_state(model=model, optimizer=None, scheduler=None, scaler=None, progress={}, config={"PHASE": 1})
    assert not any(k.startswith("encoder.") for k in saved["model"])
    assert saved["base_weights"]["file"] == name


def test_torchvision_state_dict_and_training_checkpoint_wrappers(tmp_path, logs):
    torchvision = pytest.importorskip("torchvision")  # a dependency of timm: always installed with cellseg
    tv = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.items()}, "epoch": 90}, path)
    model = build_model("resnet18", num_classes=2, width=8, weights=str(path))
    assert torch.equal(model.encoder.core.layer1[0].conv1.weight, tv["layer1.0.conv1.weight"])
    assert "fc.weight (1000, 512)" in logs()


def test_vit_head_and_cnn_layers_after_the_last_stage_are_dropped(tmp_path, logs):
    vit = timm.create_model("test_vit", num_classes=7).state_dict()
    torch.save(vit, tmp_path / "vit.bin")
    model = build_model("test_vit", num_classes=2, width=8, weights=str(tmp_path / "vit.bin"))
    assert torch.equal(model.encoder.core.patch_embed.proj.weight, vit["patch_embed.proj.weight"])
    assert "head.weight" in logs()
    eff = timm.create_model("test_efficientnet").state_dict()
    save_file({k: v.contiguous() for k, v in eff.items()}, str(tmp_path / "eff.safetensors"))
    build_model("test_efficientnet", num_classes=2, width=8, weights=str(tmp_path / "eff.safetensors"))
    assert "conv_head.weight" in logs() and "unused by the features-only encoder" in logs()


def test_unexpected_or_missing_keys_are_still_errors(tmp_path):
    state = timm.create_model("test_resnet").state_dict()
    torch.save({**state, "extra.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match=r"1 unexpected keys \(e.g. \['extra.weight'\]\)"):
        build_model("test_resnet", num_classes=2, width=8, weights=str(tmp_path / "extra.pth"))
    first = next(iter(state))
    torch.save({k: v for k, v in state.items() if k != first}, tmp_path / "short.pth")
    with pytest.raises(RuntimeError, match=rf"1 missing keys \(e.g. \['{first}'\]\)"):
        build_model("test_resnet", num_classes=2, width=8, weights=str(tmp_path / "short.pth"))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError, match="could not be read as a safetensors"):
        build_model("test_resnet", num_classes=2, width=8, weights=str(tmp_path / "bad.safetensors"))
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(RuntimeError, match="holds no state dict of tensors"):
        build_model("test_resnet", num_classes=2, width=8, weights=str(tmp_path / "empty.pth"))
