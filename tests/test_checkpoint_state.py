"""The payload: plain types only (``torch.load(weights_only=True)``), RNG states restored exactly, optimizer /
scheduler / GradScaler round trips in the order that keeps the loaded learning rates."""

from __future__ import annotations

import io
import random
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cellseg.checkpoint import collect_rng, collect_state, restore_rng
from cellseg.checkpoint.state import restore_training_state, to_plain
from cellseg.config import Config
from cellseg.model.network import build_model


def _draws(gen: torch.Generator | None = None) -> tuple:
    return (random.random(), random.getrandbits(64), np.random.rand(3).tolist(), np.random.randn(2).tolist(),
            torch.rand(4).tolist(), torch.randn(2).tolist(),
            torch.rand(2, generator=gen).tolist() if gen is not None else None)


def test_rng_states_restored_exactly():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn(1)  # leaves a cached Gaussian in NumPy's legacy state
    gen = torch.Generator().manual_seed(4)
    state = collect_rng({"data": gen})
    first = _draws(gen)
    _draws(gen)  # move everything on
    restore_rng(state, {"data": gen})
    assert _draws(gen) == first


def test_rng_state_survives_weights_only_roundtrip(tmp_path):
    np.random.seed(5)
    torch.manual_seed(6)
    state = to_plain(collect_rng())
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    first = _draws()
    restore_rng(loaded)
    assert _draws() == first


def test_restore_rng_warns_about_unknown_generator(caplog):
    state = collect_rng()
    with caplog.at_level("WARNING", logger="cellseg.checkpoint.state"):
        restore_rng(state, {"other": torch.Generator()})
    assert any("no state for generator 'other'" in r.getMessage() for r in caplog.records)


def test_to_plain_converts_numpy_and_keeps_containers():
    obj = {"a": np.float64(0.5), "b": [np.int64(3), (np.float32(1.5), "x")], "c": np.arange(3),
           "d": OrderedDict(z=np.bool_(True)), "t": torch.ones(2), "n": None}
    out = to_plain(obj)
    assert out["a"] == 0.5 and type(out["a"]) is float
    assert out["b"] == [3, (1.5, "x")] and type(out["b"][0]) is int and isinstance(out["b"][1], tuple)
    assert torch.equal(out["c"], torch.arange(3)) and isinstance(out["d"], OrderedDict) and out["d"]["z"] is True


@dataclass
class _Opaque:
    x: int = 1


@pytest.mark.parametrize("bad", [_Opaque(), object(), {1, 2}])
def test_to_plain_rejects_objects_and_says_where(bad):
    with pytest.raises(TypeError, match=r"checkpoint\['progress'\]\['history'\]\[0\]"):
        to_plain({"progress": {"history": [bad]}}, "checkpoint")


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("test_vit", num_classes=3, width=8)
    opt = torch.optim.AdamW([{"params": list(model.decoder.parameters()), "lr": 1e-3},
                             {"params": list(model.encoder.parameters()), "lr": 1e-4}], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    sched.kind, sched.interval = "warmup", "step"  # what the loop's scheduler wrapper declares
    return model, opt, sched


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.9 ** step


def _train_steps(model, opt, sched, n: int) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        opt.zero_grad()
        out = model(x)
        sum(v.float().pow(2).mean() for v in out.values()).backward()
        opt.step()
        sched.step()


def test_collect_state_is_weights_only_loadable_and_complete(tmp_path):
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    progress = {"epoch": 0, "step": 2, "batch_in_epoch": 4, "best_metric": np.float64(0.25), "best_epoch": 0,
                "patience_counter": 1, "history": [{"val": {"pq": np.float32(0.25)}}],
                "monitor": {"metric": "pq", "mode": "max"}}
    state = collect_state(model=model, optimizer=opt, scheduler=sched, scaler=scaler, progress=progress,
                          config=Config(PHASE=1))
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert loaded["format_version"] == 1 and loaded["phase"] == 1
    assert loaded["scheduler_interval"] == "step" and loaded["scheduler_kind"] == "warmup"
    assert loaded["progress"]["best_metric"] == 0.25 and type(loaded["progress"]["best_metric"]) is float
    assert loaded["config"]["PHASE"] == 1 and loaded["arch"]["encoder"] == "test_vit" and loaded["lora"] is None
    assert loaded["scaler"]["scale"] == 1024.0
    assert [len(g) for g in loaded["optimizer_params"]] == [len(g["params"]) for g in opt.param_groups]
    assert loaded["optimizer_params"][0][0].startswith("decoder.")
    assert set(loaded["model"]) == set(model.state_dict())


def test_optimizer_then_scheduler_restore_keeps_learning_rates_and_continues_identically():
    model, opt, sched = _setup()
    _train_steps(model, opt, sched, 3)
    state = collect_state(model=model, optimizer=opt, scheduler=sched, scaler=None, progress={}, config={})
    lrs = [g["lr"] for g in opt.param_groups]
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, opt, sched, 2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _setup(seed=9)  # built first, as the loop does
    model2.load_state_dict(weights_before)
    restore_training_state(state, optimizer=opt2, scheduler=sched2, scaler=None)
    assert [g["lr"] for g in opt2.param_groups] == lrs
    _train_steps(model2, opt2, sched2, 2)
    for k, v in reference.items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_restore_notes_scaler_and_missing_states():
    state = {"optimizer": None, "scheduler": None, "scaler": {"scale": 2.0}, "rng": collect_rng()}
    notes = restore_training_state(state, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1),
                                   scheduler=None, scaler=None)
    assert any("no optimizer state" in n for n in notes)
    assert any("GradScaler state but this run uses none" in n for n in notes)
    scaler = torch.amp.GradScaler("cpu")
    notes = restore_training_state({**state, "scaler": None}, optimizer=None, scheduler=None, scaler=scaler)
    assert any("no GradScaler state" in n for n in notes)


def _roundtrip(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_each_rank_restores_its_own_rng_state(monkeypatch):
    import cellseg.checkpoint.state as state_mod

    torch.manual_seed(10)
    rank0 = collect_rng()
    torch.manual_seed(11)
    rank1 = collect_rng()
    expected = torch.rand(2)
    payload = collect_state(model=torch.nn.Linear(1, 1), optimizer=None, scheduler=None, scaler=None, progress={},
                            config={}, rng_ranks=[rank0, rank1])
    payload = torch.load(_roundtrip(payload), weights_only=True)
    monkeypatch.setattr(state_mod, "rank_and_world", lambda: (1, 2))
    torch.manual_seed(99)
    assert restore_training_state(payload, optimizer=None, scheduler=None, scaler=None) == []
    assert torch.equal(torch.rand(2), expected)
    # without per-rank states a non-zero rank keeps its own seeded stream (never rank 0's)
    torch.manual_seed(12)
    own = torch.rand(2)
    torch.manual_seed(12)
    notes = restore_training_state({**payload, "rng_ranks": None}, optimizer=None, scheduler=None, scaler=None)
    assert any("keeps its seeded state" in n for n in notes) and torch.equal(torch.rand(2), own)


@pytest.mark.parametrize("kind", ["cosine_warmup", "cosine_restarts", "exponential", "step", "cosine", "constant",
                                  "onecycle", "plateau"])
def test_every_project_scheduler_survives_save_and_resume(tmp_path, kind):
    from cellseg.checkpoint import CheckpointManager
    from cellseg.schedulers import build_scheduler

    def build():
        model = torch.nn.Linear(3, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, build_scheduler(opt, Config(SCHEDULER=kind, WARMUP_STEPS=2, EPOCHS=3), steps_per_epoch=4)

    model, opt, sched = build()
    for _ in range(3):
        opt.step()
        sched.step_on_optimizer_step()
    sched.step_on_epoch_end(0.5)
    lrs = [g["lr"] for g in opt.param_groups]
    mgr = CheckpointManager(tmp_path, phase=1)
    mgr.save(collect_state(model=model, optimizer=opt, scheduler=sched, scaler=None, progress={"epoch": 1},
                           config={"PHASE": 1}), epoch_end=False, is_best=False)
    model2, opt2, sched2 = build()
    CheckpointManager(tmp_path, phase=1).resume("auto", model=model2, optimizer=opt2, scheduler=sched2, scaler=None)
    assert [g["lr"] for g in opt2.param_groups] == lrs
    assert sched2.state_dict() == sched.state_dict()
