"""Phase set-up errors, scheduler errors and the small run-time guards that keep failures loud."""

from __future__ import annotations

import pytest
import torch

from cellseg.config import resolve_config
from cellseg.model import build_model_from_config
from cellseg.optim import build_optimizer, check_phase, configure_phase, param_groups, write_params_json
from cellseg.schedulers import build_scheduler

BASE = dict(ENCODER="test_vit", ENCODER_WEIGHTS="", DECODER_WIDTH=8, LORA_R=2, LORA_ALPHA=4)


def _model(**kw):
    cfg = resolve_config({**BASE, **kw})
    model = build_model_from_config(cfg, num_classes=2)
    return cfg, model, configure_phase(model, cfg)


def test_phase2_guards():
    cfg, model, n = _model(PHASE=2)
    assert n == 6
    next(p for name, p in model.encoder.named_parameters() if "lora_" not in name).requires_grad_(True)
    with pytest.raises(RuntimeError, match="keep the ViT base weights frozen"):
        check_phase(model, 2, n)
    cfg, model, n = _model(PHASE=2)
    with pytest.raises(RuntimeError, match="expected 3 LoRA modules"):
        check_phase(model, 2, 3)
    next(model.decoder.parameters()).requires_grad_(False)
    with pytest.raises(RuntimeError, match="the decoder must train"):
        check_phase(model, 1, 0)


def test_param_groups_refuse_parameters_without_a_rate(tmp_path):
    cfg, model, _ = _model(PHASE=1)
    next(model.encoder.parameters()).requires_grad_(True)
    with pytest.raises(RuntimeError, match="has no learning rate"):
        param_groups(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        build_optimizer(model, cfg)
    cfg, model, _ = _model(PHASE=1)
    counts = write_params_json(model, tmp_path / "p" / "params.json")
    assert (tmp_path / "p" / "params.json").exists() and counts["backbone"] == 0


def test_scheduler_errors():
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="SCHEDULER must be one of"):
        build_scheduler(opt, type("C", (), {"SCHEDULER": "linear"})(), steps_per_epoch=2)
    sched = build_scheduler(opt, resolve_config({"SCHEDULER": "plateau"}), steps_per_epoch=2)
    with pytest.raises(ValueError, match="needs the monitored validation metric"):
        sched.step_on_epoch_end(None)
    other = build_scheduler(opt, resolve_config({"SCHEDULER": "cosine"}), steps_per_epoch=2)
    with pytest.raises(ValueError, match="checkpoint scheduler is 'plateau'"):
        other.load_state_dict(sched.state_dict())
    from cellseg.schedulers import epoch_factor

    with pytest.raises(ValueError, match="not a per-epoch schedule"):
        epoch_factor("onecycle", 1, gamma=0.5, step_size=1, epochs=2, min_ratio=0.0)


def test_runtime_guards(tmp_path):
    import numpy as np

    from cellseg.distributed import DistEnv, detect_env, pick_device
    from cellseg.imageops import denormalize_image, normalize_image
    from cellseg.loading import checkpoint_path
    from cellseg.plots import read_history
    from cellseg.training.trainer import resolve_precision

    with pytest.raises(ValueError, match="PRECISION='fp16' needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            pick_device("cuda", DistEnv())
    with pytest.raises(FileNotFoundError, match="Train that phase first"):
        checkpoint_path(resolve_config({"CHECKPOINT_DIR": str(tmp_path), "EVAL_PHASE": 1}))
    with pytest.raises(FileNotFoundError, match="train the phase first"):
        read_history(tmp_path / "history.jsonl")
    with pytest.raises(ValueError, match="RGB"):
        normalize_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        normalize_image(np.zeros((4, 4, 3), np.float32))
    img = (np.arange(48) * 5).astype(np.uint8).reshape(4, 4, 3)
    assert np.array_equal(denormalize_image(normalize_image(img)), img)
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "node[01-02]"}
    d = detect_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (1, 2, 1, "slurm")
    assert env["MASTER_PORT"] == "20077" and env["MASTER_ADDR"]
    assert detect_env({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}).world_size == 4
    assert detect_env({}).world_size == 1


def test_tensorboard_missing_is_explained(tmp_path, monkeypatch):
    import builtins

    from cellseg.distributed import DistEnv
    from cellseg.losses import loss_from_config
    from cellseg.runtime import RunContext
    from cellseg.training.trainer import Trainer
    from toydata import FakeCheckpoints, ToyDataset

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "torch.utils.tensorboard":
            raise ImportError("no tensorboard")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    cfg, model, _ = _model(TENSORBOARD=True, RUN_DIR=str(tmp_path), DEVICE="cpu", NUM_WORKERS=0)
    ctx = RunContext(cfg, DistEnv(), torch.device("cpu"), tmp_path)
    with pytest.raises(ImportError, match=r"pip install -e '.\[tensorboard\]'"):
        Trainer(ctx, model, loss_from_config(cfg, 2), ToyDataset(n=2), validate_fn=None, ckpt=FakeCheckpoints(),
                stop=None)


# ----------------------------------------------------------------------------- issue 16: guard and full network
def test_freezing_a_random_encoder_is_refused_with_both_ways_out(tmp_path):
    from cellseg.config import ConfigError
    from cellseg.optim import check_encoder_source
    from cellseg.training.session import build_phase_model

    cfg = resolve_config({**BASE, "PHASE": 1, "RUN_DIR": str(tmp_path)})
    for call in (lambda: check_encoder_source(cfg), lambda: build_phase_model(cfg, _Ctx(), ["a", "b"])):
        with pytest.raises(ConfigError, match="ENCODER_WEIGHTS") as e:
            call()
        assert "TRAIN_ENCODER_P1=True" in str(e.value) and "random weights" in str(e.value)
    assert not (tmp_path / "phase1" / "params.json").exists()
    for ok in ({"TRAIN_ENCODER_P1": True}, {"PHASE": 2}, {"ENCODER_WEIGHTS": "w.pt"}):
        check_encoder_source(resolve_config({**BASE, "PHASE": 1, **ok}))


class _Ctx:
    is_main = True


def test_full_network_mode_trains_the_encoder_at_its_own_rate(tmp_path):
    from cellseg.training.session import build_phase_model

    cfg = resolve_config({**BASE, "PHASE": 1, "TRAIN_ENCODER_P1": True, "LR_ENCODER_P1": 3e-4,
                          "LR_DECODER_P1": 1e-3, "RUN_DIR": str(tmp_path)})
    model, counts = build_phase_model(cfg, _Ctx(), ["a", "b"])
    assert not model.encoder_frozen and counts["backbone"] == counts["total_per_group"]["backbone"] > 0
    assert counts["mode"].startswith("full network") and "random init" in counts["mode"]
    import json

    assert json.loads((tmp_path / "phase1" / "params.json").read_text())["mode"] == counts["mode"]
    opt = build_optimizer(model, cfg)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone"] == 3e-4 and lrs["decoder"] == 1e-3
    model.train()
    assert model.encoder.training  # not held in eval mode: it trains
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    out = model(torch.randn(2, 3, 32, 32))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.encoder.named_parameters() if p.grad is None]
    assert not no_grad, f"encoder parameters without a gradient: {no_grad[:3]}"
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.encoder.named_parameters())
    # the frozen mode is still checked: a full-network check with a frozen encoder parameter fails
    next(model.encoder.parameters()).requires_grad_(False)
    with pytest.raises(RuntimeError, match="TRAIN_ENCODER_P1 trains the whole network"):
        check_phase(model, 1, 0, full_network=True)


def test_training_summary_says_mode_and_class_weights(tmp_path):
    from cellseg.reporting import training_summary
    from cellseg.training.session import record_params, training_description

    cfg = resolve_config({**BASE, "PHASE": 1, "TRAIN_ENCODER_P1": True, "RUN_DIR": str(tmp_path), "EVAL_PHASE": 1})
    record_params(cfg, mode="full network (x)", class_weights=[1.0, 1.0, 3.3], class_weights_source="pixel frequencies")
    summary = {"epochs_done": 2, "steps": 4, "best_metric": 0.5, "best_epoch": 1}
    text = training_summary(summary, cfg)
    assert "full network (x)" in text and "[1.0, 1.0, 3.3] (pixel frequencies)" in text
    assert training_description(cfg) == "Phase 1: full network (x)"
    assert "not recorded" in training_description(resolve_config({**BASE, "RUN_DIR": str(tmp_path / "none")}))
