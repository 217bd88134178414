"""Run identity and lineage: a second experiment never resumes the first's checkpoints, a changed setting stops the
resume before training with a table and the ways out, ALLOW_CHANGES accepts named changes, Phase 2 refuses to
continue after Phase 1 changed, and the evaluation report names the checkpoint it scored."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from cellseg.checkpoint import CheckpointManager
from cellseg.checkpoint.identity import (
    FACTS,
    MAY_CHANGE,
    NOT_TRAINING,
    IdentityMismatch,
    identity_parameter_names,
    sha256_cached,
)
from cellseg.config import Config, ConfigError, resolve_config
from cellseg.distributed import DistEnv
from cellseg.losses import loss_from_config
from cellseg.model import build_model_from_config
from cellseg.optim import configure_phase
from cellseg.runtime import RunContext
from cellseg.training.session import identity_facts, start_phase
from cellseg.training.trainer import Trainer
from toydata import ToyDataset

BASE = dict(ENCODER="test_vit", ENCODER_WEIGHTS="", DECODER_WIDTH=8, PATCH_SIZE=32, DEVICE="cpu", NUM_WORKERS=0,
            BATCH_SIZE=2, GRAD_ACCUM_TARGET=0, EPOCHS=1, PRECISION="fp32", LOG_EVERY=1000, SCHEDULER="constant",
            LORA_R=2, LORA_ALPHA=4, PATIENCE_P1=0, PATIENCE_P2=0, SEED=3)
STUB_MANIFEST = {"content_fingerprint": "toy-cache"}


def make_trainer(values: dict, *, facts: dict | None = None) -> Trainer:
    cfg = resolve_config({**BASE, **values})
    torch.manual_seed(0)
    model = build_model_from_config(cfg, num_classes=2)
    configure_phase(model, cfg)
    ckpt = CheckpointManager(cfg.checkpoint_dir(), phase=cfg.PHASE, code_version="t")
    ctx = RunContext(cfg, DistEnv(), torch.device("cpu"), cfg.run_dir)
    return Trainer(ctx, model, loss_from_config(cfg, 2), ToyDataset(n=4, size=32),
                   validate_fn=lambda m, e: {"pq": 0.5}, ckpt=ckpt, stop=None,
                   **({"identity_facts": facts} if facts is not None else {}))


def test_a_new_run_dir_never_resumes_another_runs_checkpoints(tmp_path, monkeypatch):
    """Why (a): with the default CHECKPOINT_DIR the second experiment (new RUN_DIR, new LR) used to resume the first
    one's finished checkpoints and train 0 epochs; now it trains its own epoch at its own learning rate."""
    monkeypatch.chdir(tmp_path)
    first = make_trainer({"RUN_DIR": "runs/a", "LR_DECODER_P1": 3e-3})
    first.resume()
    first.fit()
    second = make_trainer({"RUN_DIR": "runs/b", "LR_DECODER_P1": 5e-4})
    assert second.resume() is False
    second.fit()
    assert [r["lr"]["decoder"] for r in second.progress["history"]] == [5e-4]
    assert (tmp_path / "runs" / "b" / "checkpoints" / "phase1" / "latest.pt").is_file()


def test_shared_checkpoint_dir_with_another_setting_stops_before_training(tmp_path):
    shared = {"CHECKPOINT_DIR": str(tmp_path / "ck")}
    first = make_trainer({**shared, "RUN_DIR": str(tmp_path / "a"), "LR_DECODER_P1": 3e-3, "EPOCHS": 2})
    first.fit()
    second = make_trainer({**shared, "RUN_DIR": str(tmp_path / "b"), "LR_DECODER_P1": 5e-4, "EPOCHS": 2})
    with pytest.raises(IdentityMismatch) as e:
        second.resume()
    text = str(e.value)
    for part in ("LR_DECODER_P1", "0.003", "0.0005", "checkpoint value", "current value", "new RUN_DIR",
                 "RESUME='never'", "ALLOW_CHANGES=['LR_DECODER_P1']"):
        assert part in text, part
    assert second.progress["step"] == 0  # nothing was loaded or trained
    # the documented ways out
    accepted = make_trainer({**shared, "RUN_DIR": str(tmp_path / "b"), "LR_DECODER_P1": 5e-4, "EPOCHS": 2,
                             "ALLOW_CHANGES": ["LR_DECODER_P1"]})
    assert accepted.resume() is True and accepted.progress["epoch"] == 2
    fresh = make_trainer({**shared, "RUN_DIR": str(tmp_path / "b"), "LR_DECODER_P1": 5e-4, "RESUME": "never"})
    assert fresh.resume() is False and fresh.progress["step"] == 0


@pytest.mark.parametrize("change", [{"BATCH_SIZE": 1, "GRAD_ACCUM_TARGET": 2}, {"NUM_WORKERS": 1},
                                    {"EPOCHS": 3}, {"LOG_EVERY": 5}, {"PATIENCE_P1": 4}, {"RUN_DIR": "b"}])
def test_settings_that_may_change_resume_quietly(tmp_path, change):
    values = {"RUN_DIR": str(tmp_path / "a"), "CHECKPOINT_DIR": str(tmp_path / "ck")}
    make_trainer(values).fit()
    again = make_trainer({**values, **change, **({"RUN_DIR": str(tmp_path / "b")} if "RUN_DIR" in change else {})})
    assert again.resume() is True and again.progress["epoch"] == 1


def test_every_parameter_is_classified_and_the_identity_is_stored(tmp_path):
    names = {f.name for f in fields(Config)}
    assert set(MAY_CHANGE) <= names and set(NOT_TRAINING) <= names and not set(MAY_CHANGE) & set(NOT_TRAINING)
    assert set(identity_parameter_names()) == names - set(MAY_CHANGE) - set(NOT_TRAINING)
    t = make_trainer({"RUN_DIR": str(tmp_path / "a")}, facts={"dataset_fingerprint": "abc"})
    t.fit()
    payload = torch.load(tmp_path / "a" / "checkpoints" / "phase1" / "latest.pt", weights_only=True)
    ident = payload["identity"]
    assert ident["parameters"]["LR_DECODER_P1"] == 1e-3 and "BATCH_SIZE" not in ident["parameters"]
    assert ident["facts"] == {"encoder_weights_sha256": "", "effective_batch": 2, "train_images": 4,
                              "precision": "fp32", "dataset_fingerprint": "abc"}
    assert set(ident["facts"]) <= set(FACTS)


def test_a_changed_cache_or_encoder_file_is_named(tmp_path):
    values = {"RUN_DIR": str(tmp_path / "a")}
    make_trainer(values, facts={"dataset_fingerprint": "abc"}).fit()
    with pytest.raises(IdentityMismatch, match=r"dataset_fingerprint +'abc' +'def'(.|\n)*content fingerprint"):
        make_trainer(values, facts={"dataset_fingerprint": "def"}).resume()


def test_encoder_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    first = sha256_cached(f)
    import hashlib

    monkeypatch.setattr(hashlib, "sha256", lambda: pytest.fail("re-hashed an unchanged file"))
    assert sha256_cached(f) == first
    monkeypatch.undo()
    f.write_bytes(b"other weights")
    assert sha256_cached(f) != first


def test_allow_changes_names_are_checked():
    assert resolve_config({"ALLOW_CHANGES": ["LR_DECODER_P1", "phase1_sha256"]}).ALLOW_CHANGES
    with pytest.raises(ConfigError, match=r"ALLOW_CHANGES .*\['BATCH_SIZ'\]"):
        resolve_config({"ALLOW_CHANGES": ["BATCH_SIZ"]})


def test_checkpoint_dir_defaults_inside_the_run_dir(tmp_path):
    from cellseg.slurm_helpers import run_info

    cfg = resolve_config({"RUN_DIR": "runs/x"})
    assert cfg.checkpoint_dir(2).as_posix() == "runs/x/checkpoints/phase2"
    assert resolve_config({"CHECKPOINT_DIR": "/shared/ck"}).checkpoint_dir(1).as_posix() == "/shared/ck/phase1"
    info = run_info(["-p", "RUN_DIR", "runs/x"], "01_train", root=tmp_path)  # what the sbatch scripts print
    assert info.checkpoint_dir == str(tmp_path / "runs" / "x" / "checkpoints")


def test_phase2_refuses_to_continue_after_phase1_changed(tmp_path):
    """Why (c): re-running Phase 1 then Phase 2 with RESUME='auto' used to resume the old Phase 2 run."""
    run = {"RUN_DIR": str(tmp_path / "run")}
    make_trainer({**run, "PHASE": 1}).fit()
    p2 = {**run, "PHASE": 2}
    cfg2 = resolve_config({**BASE, **p2})
    t2 = make_trainer(p2, facts=identity_facts(cfg2, STUB_MANIFEST))
    assert "Phase 2 starts from" in start_phase(cfg2, t2)
    t2.stop = type("Stop", (), {"reason": "test stop"})()
    t2.fit()  # stopped after its first step: latest.pt of Phase 2, resumable
    assert t2.progress["step"] == 1
    again = make_trainer(p2, facts=identity_facts(cfg2, STUB_MANIFEST))
    assert "resumed Phase 2" in start_phase(cfg2, again)  # Phase 1 unchanged: continues
    make_trainer({**run, "PHASE": 1, "RESUME": "never", "LR_DECODER_P1": 2e-3}).fit()  # Phase 1 re-run
    stale = make_trainer(p2, facts=identity_facts(cfg2, STUB_MANIFEST))
    with pytest.raises(IdentityMismatch, match=r"phase1_sha256(.|\n)*Phase 1's checkpoint changed"):
        start_phase(cfg2, stale)


def test_evaluation_report_names_the_checkpoint(tmp_path):
    from cellseg.eval_index import checkpoint_record
    from cellseg.evaluation import evaluate_model
    from test_evaluation import CLASSES, StandIn, write_cache

    make_trainer({"RUN_DIR": str(tmp_path / "run")}).fit()
    path = tmp_path / "run" / "checkpoints" / "phase1" / "best.pt"
    info = checkpoint_record(path)
    side = json.loads(Path(f"{path}.json").read_text())
    assert {k: info[k] for k in ("path", "sha256", "phase", "epoch", "step")} == {
        "path": str(path.resolve()), "sha256": side["sha256"], "phase": 1, "epoch": 1, "step": 2}
    cache = write_cache(tmp_path / "cache", {"test": 1})
    metrics = evaluate_model(StandIn(), cache, "test", tmp_path / "eval", class_names=CLASSES, device="cpu",
                             tta=False, amp="none", pp_params={"object_diameter": 10}, tune_split=None, progress=False,
                             checkpoint=info)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoint"] == metrics["checkpoint"] == info
    assert f"{info['sha256']}" in (tmp_path / "eval" / "report.md").read_text()
