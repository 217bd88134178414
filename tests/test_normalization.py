"""Per-encoder input normalisation (issue 15): from NORM_MEAN/NORM_STD, the weights' config.json, UNI's model card or
timm's pretrained_cfg; stored in the architecture fingerprint (so in checkpoints) and used by the training data,
prediction and evaluation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from torch import nn

from cellseg.checkpoint import CheckpointManager, IncompatibleCheckpoint, collect_state
from cellseg.config import ConfigError, resolve_config
from cellseg.data import CellDataset, prepare_dataset
from cellseg.imageops import denormalize_image, normalize_image
from cellseg.inference import predict_image
from cellseg.loading import load_checkpoint_model
from cellseg.model.network import build_model
from cellseg.model.normalization import IMAGENET, resolve_normalization

CUSTOM = {"mean": [0.7, 0.6, 0.5], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLSEG_CACHE_DIR", str(tmp_path / "hash-cache"))


def test_sources_in_order(tmp_path):
    assert resolve_normalization("uni", "")[0] == IMAGENET
    assert resolve_normalization("resnet50", "")[0] == IMAGENET
    assert resolve_normalization("test_vit", "")[0] == {"mean": [0.5] * 3, "std": [0.5] * 3}  # timm pretrained_cfg
    weights = tmp_path / "model.safetensors"
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_vit", "pretrained_cfg": CUSTOM}))
    norm, source = resolve_normalization("test_vit", str(weights))
    assert norm == CUSTOM and source.endswith("config.json")
    norm, source = resolve_normalization("test_vit", str(weights), [0.1, 0.2, 0.3], [1, 1, 1])
    assert norm == {"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]} and source == "NORM_MEAN / NORM_STD"


@pytest.mark.parametrize("mean, std, match", [
    ([0.5, 0.5, 0.5], [], "NORM_MEAN and NORM_STD go together"),
    ([0.5, 0.5], [0.2, 0.2], "3 finite numbers each"),
    ([0.5, 0.5, 0.5], [0.2, 0.0, 0.2], "std > 0"),
    (["a", 0.5, 0.5], [0.2, 0.2, 0.2], "lists of 3 numbers"),
])
def test_bad_overrides_are_refused(mean, std, match):
    with pytest.raises(ValueError, match=match):
        resolve_normalization("test_vit", "", mean, std)


def test_unreadable_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json.*not readable JSON"):
        resolve_normalization("test_vit", str(tmp_path / "w.bin"))


@pytest.mark.parametrize("values, match", [
    ({"NORM_MEAN": [0.5, 0.5]}, "NORM_MEAN must be empty"),
    ({"NORM_MEAN": [0.5] * 3, "NORM_STD": [0.2, 0.0, 0.2]}, "NORM_STD must be empty"),
    ({"NORM_MEAN": [0.5] * 3}, "NORM_MEAN and NORM_STD go together"),
])
def test_config_validation_names_the_parameter(values, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(values)


def test_dataset_and_prediction_use_the_models_normalisation(tmp_path):
    prepare_dataset("synthetic", None, tmp_path / "cache", synth_num_images=3, synth_image_size=64, test_fraction=0.0,
                    progress=False)
    ds = CellDataset(tmp_path / "cache", "val", patch_size=None, augment=False, seed=0, normalization=CUSTOM)
    raw = ds.load(0)["image"]
    torch.testing.assert_close(ds[0]["image"], normalize_image(raw, CUSTOM))
    np.testing.assert_array_equal(denormalize_image(ds[0]["image"], CUSTOM), raw)

    class Capture(nn.Module):
        def __init__(self):
            super().__init__()
            self.arch = {"normalization": CUSTOM}
            self.w = nn.Parameter(torch.zeros(1))
            self.seen = None

        def forward(self, x):
            self.seen = x.clone()
            b, _, h, w = x.shape
            return {"np": torch.zeros(b, 2, h, w), "hv": torch.zeros(b, 2, h, w), "nc": torch.zeros(b, 3, h, w)}

    model = Capture()
    predict_image(model, raw)
    torch.testing.assert_close(model.seen[0], normalize_image(raw, CUSTOM))


def _save(model, directory):
    state = collect_state(model=model, optimizer=None, scheduler=None, scaler=None,
                          progress={"epoch": 1, "step": 1, "batch_in_epoch": 0, "history": []}, config={"PHASE": 1})
    CheckpointManager(directory, phase=1).save(state, epoch_end=False, is_best=False)
    return directory / "latest.pt"


def test_checkpoint_carries_the_normalisation_to_evaluation(tmp_path):
    model = build_model("test_vit", num_classes=2, width=8, norm_mean=CUSTOM["mean"], norm_std=CUSTOM["std"])
    path = _save(model, tmp_path / "phase1")
    cfg = resolve_config({"ENCODER": "test_vit", "ENCODER_WEIGHTS": "", "DECODER_WIDTH": 8}, "02_evaluate")
    loaded = load_checkpoint_model(path, cfg, num_classes=2, device="cpu")
    assert loaded.arch["normalization"] == CUSTOM
    other = resolve_config({"ENCODER": "test_vit", "ENCODER_WEIGHTS": "", "DECODER_WIDTH": 8,
                            "NORM_MEAN": [0.5] * 3, "NORM_STD": [0.5] * 3}, "02_evaluate")
    with pytest.raises(ValueError, match="differ from the normalisation"):
        load_checkpoint_model(path, other, num_classes=2, device="cpu")
    # resuming training with other statistics is an architecture difference, explained
    fresh = build_model("test_vit", num_classes=2, width=8)
    with pytest.raises(IncompatibleCheckpoint, match="input normalisation"):
        CheckpointManager(tmp_path / "phase1", phase=1).resume("auto", model=fresh, optimizer=None, scheduler=None,
                                                               scaler=None)


def test_old_checkpoints_without_normalisation_evaluate_with_imagenet(tmp_path):
    model = build_model("test_vit", num_classes=2, width=8)
    del model.arch["normalization"]  # as written before the normalisation was stored
    path = _save(model, tmp_path / "phase1")
    cfg = resolve_config({"ENCODER": "test_vit", "ENCODER_WEIGHTS": "", "DECODER_WIDTH": 8}, "02_evaluate")
    assert load_checkpoint_model(path, cfg, num_classes=2, device="cpu").arch["normalization"] == IMAGENET


def test_trainer_refuses_data_normalised_differently_from_the_model(tmp_path):
    from cellseg.distributed import DistEnv
    from cellseg.runtime import RunContext
    from cellseg.training.session import TrainData, build_trainer

    cfg = resolve_config({"ENCODER": "test_vit", "ENCODER_WEIGHTS": "", "DECODER_WIDTH": 8,
                          "RUN_DIR": str(tmp_path / "run"), "CHECKPOINT_DIR": str(tmp_path / "ck"), "DEVICE": "cpu"})
    model = build_model("test_vit", num_classes=2, width=8)
    ds = SimpleNamespace(split="train", normalization=IMAGENET)
    data = TrainData({}, ["a", "b"], ds, ds)
    ctx = RunContext(cfg, DistEnv(), torch.device("cpu"), tmp_path / "run")
    with pytest.raises(ValueError, match="normalised with .* but the model expects"):
        build_trainer(cfg, ctx, model, data)


def test_uni_config_json_next_to_the_weights_is_read(tmp_path):
    """The hub layout (weights + config.json with pretrained_cfg) sets the statistics; the file's tensors load."""
    vit = timm.create_model("test_vit", num_classes=0, dynamic_img_size=True)
    torch.save(vit.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": CUSTOM}))
    model = build_model("test_vit", num_classes=2, width=8, weights=str(tmp_path / "pytorch_model.bin"))
    assert model.arch["normalization"] == CUSTOM
