"""CheckpointManager: files of a phase directory, fall-back on corrupt files, compatibility errors and the ways out,
best-metric protection, exact state round trips, Phase 2 initialisation."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cellseg.checkpoint import (
    CheckpointManager,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    WeightsOnlyCheckpoint,
    collect_state,
    init_phase2,
    read_ledger,
    read_sidecar,
)
from cellseg.checkpoint.sidecar import sidecar_path
from cellseg.model.lora import apply_lora
from cellseg.model.network import build_model


def _model(seed: int = 0, *, width: int = 8, num_classes: int = 3, encoder: str = "test_vit"):
    torch.manual_seed(seed)
    model = build_model(encoder, num_classes=num_classes, width=width)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    return model


def _opt(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def _progress(epoch: int, *, step: int | None = None, best: float | None = None, best_epoch: int | None = None,
              patience: int = 0, mode: str = "max", history: list | None = None, batch: int = 0) -> dict:
    return {"epoch": epoch, "step": epoch * 10 if step is None else step, "batch_in_epoch": batch,
            "best_metric": best, "best_epoch": best_epoch, "patience_counter": patience,
            "history": history or [], "monitor": {"metric": "pq", "mode": mode}}


def _state(model, progress, optimizer=None, phase: int = 1) -> dict:
    return collect_state(model=model, optimizer=optimizer, scheduler=None, scaler=None, progress=progress,
                         config={"PHASE": phase})


def _mark(model, value: float) -> None:
    """Make the weights identify a save: the NC head's bias holds ``value``."""
    with torch.no_grad():
        dict(model.named_parameters())[_MARK].fill_(value)


_MARK = "decoder.heads.nc.bias"


def _marked(model) -> float:
    return float(dict(model.named_parameters())[_MARK].detach()[0])


@pytest.fixture(autouse=True)
def _check_mark_name():
    names = dict(_model().named_parameters())
    if _MARK not in names:  # keep the helper honest if the decoder's names change
        pytest.fail(f"{_MARK} is not a parameter name any more; pick another, e.g. {list(names)[-1]}")


def _run_epochs(directory, n: int, *, keep_last: int = 3, metrics=None):
    """Save ``n`` epochs (weights marked with the epoch number); returns the manager."""
    model = _model()
    mgr = CheckpointManager(directory, phase=1, keep_last=keep_last)
    best, best_epoch, history = None, None, []
    for epoch in range(1, n + 1):
        value = metrics[epoch - 1] if metrics else 0.1 * epoch
        is_best = best is None or value > best
        if is_best:
            best, best_epoch = value, epoch
        history.append({"epoch": epoch, "monitor": {"pq": value}})
        _mark(model, float(epoch))
        mgr.save(_state(model, _progress(epoch, best=best, best_epoch=best_epoch, history=list(history))),
                 epoch_end=True, is_best=is_best)
    return mgr


def _resume(directory, mode="auto", model=None, optimizer=None, **kw):
    model = model if model is not None else _model(seed=5)
    mgr = CheckpointManager(directory, phase=1)
    progress = mgr.resume(mode, model=model, optimizer=optimizer, scheduler=None, scaler=None, **kw)
    return progress, model, mgr


# ----- files -----
def test_files_sidecars_and_pruning(tmp_path):
    d = tmp_path / "phase1"
    _run_epochs(d, 5, keep_last=2)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["best.pt", "best.pt.json", "epoch_0004.pt", "epoch_0004.pt.json", "epoch_0005.pt",
                     "epoch_0005.pt.json", "latest.pt", "latest.pt.json", "ledger.jsonl"]
    side = read_sidecar(d / "latest.pt")
    for key in ("format_version", "phase", "epoch", "step", "batch_in_epoch", "monitor", "arch", "manifest",
                "sha256", "parent", "code_version", "time"):
        assert key in side, key
    assert side["epoch"] == 5 and side["monitor"] == {"metric": "pq", "mode": "max", "value": 0.5, "best": 0.5,
                                                      "best_epoch": 5}
    assert side["manifest"][_MARK] == [4] and side["arch"]["encoder"] == "test_vit"
    assert side["parent"]["path"].endswith("latest.pt")
    saves = [r for r in read_ledger(d) if r["event"] == "save"]
    assert len(saves) == 5 and saves[-1]["files"] == ["latest.pt", "epoch_0005.pt", "best.pt"]
    assert saves[2]["pruned"] == ["epoch_0001.pt"]


def test_non_main_rank_writes_nothing_and_waits(tmp_path):
    calls = []
    mgr = CheckpointManager(tmp_path / "phase1", phase=1, is_main=False, barrier=lambda: calls.append("b"))
    mgr.save(None, epoch_end=True, is_best=True)
    assert calls == ["b"] and not (tmp_path / "phase1").exists()
    main = CheckpointManager(tmp_path / "phase1", phase=1, barrier=lambda: calls.append("m"))
    main.save(_state(_model(), _progress(1)), epoch_end=False, is_best=False)
    assert calls == ["b", "m"] and (tmp_path / "phase1" / "latest.pt").exists()


@pytest.mark.parametrize("kwargs, match", [({"keep_last": 0}, "KEEP_LAST"), ({"phase": 3}, "phase must be 1 or 2")])
def test_bad_manager_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointManager(tmp_path, **{"phase": 1, **kwargs})


def test_save_rejects_missing_state_and_wrong_phase(tmp_path):
    mgr = CheckpointManager(tmp_path / "phase1", phase=1)
    with pytest.raises(ValueError, match="needs the dict of collect_state"):
        mgr.save(None, epoch_end=False, is_best=False)
    with pytest.raises(ValueError, match="state is of Phase 2"):
        mgr.save(_state(_model(), _progress(1), phase=2), epoch_end=False, is_best=False)


def test_saved_payload_loads_with_weights_only(tmp_path):
    import numpy as np

    model = _model()
    progress = _progress(1, best=np.float64(0.3), history=[{"monitor": {"pq": np.float32(0.3)}}])
    CheckpointManager(tmp_path, phase=1).save(_state(model, progress, _opt(model)), epoch_end=False, is_best=False)
    payload = torch.load(tmp_path / "latest.pt", map_location="cpu", weights_only=True)
    assert payload["progress"]["best_metric"] == pytest.approx(0.3)
    assert set(payload["model"]) == set(model.state_dict())


# ----- resuming: exact state -----
def test_resume_restores_weights_optimizer_progress_and_rng(tmp_path):
    model = _model()
    opt = _opt(model)
    model(torch.randn(1, 3, 32, 32))["np"].mean().backward()
    opt.step()
    progress = _progress(3, step=31, best=0.7, best_epoch=2, patience=1, batch=5,
                         history=[{"epoch": e, "monitor": {"pq": v}} for e, v in [(1, 0.5), (2, 0.7), (3, 0.6)]])
    torch.manual_seed(123)
    state = _state(model, progress, opt)
    expected_draw = torch.rand(3)
    CheckpointManager(tmp_path, phase=1).save(state, epoch_end=False, is_best=False)

    model2 = _model(seed=9)
    opt2 = _opt(model2)
    mgr = CheckpointManager(tmp_path, phase=1)
    torch.manual_seed(999)
    got = mgr.resume("auto", model=model2, optimizer=opt2, scheduler=None, scaler=None)
    assert torch.equal(torch.rand(3), expected_draw)
    assert got == progress  # patience counter, best metric, history, position in the epoch
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    assert mgr.resumed_from == tmp_path / "latest.pt"
    assert [r["event"] for r in read_ledger(tmp_path)] == ["save", "load"]


def test_patience_and_best_survive_resume_and_best_is_protected(tmp_path, logs):
    """detectron2 keeps the best metric only in memory: after a resume its first evaluation overwrites model_best."""
    d = tmp_path / "phase1"
    _run_epochs(d, 3, metrics=[0.2, 0.9, 0.5])
    progress, _, mgr = _resume(d)
    assert progress["best_metric"] == 0.9 and progress["best_epoch"] == 2
    # a buggy loop that forgot the best metric would flag the next (worse) epoch as best
    worse = _model()
    _mark(worse, 4.0)
    mgr.save(_state(worse, _progress(4, best=0.6, best_epoch=4)), epoch_end=True, is_best=True)
    best = read_sidecar(d / "best.pt")
    assert best["monitor"]["best"] == 0.9 and best["epoch"] == 2
    assert "NOT replacing best.pt" in logs()
    assert any(r["event"] == "refused_best" for r in read_ledger(d))
    better = _model()
    mgr.save(_state(better, _progress(5, best=0.95, best_epoch=5)), epoch_end=True, is_best=True)
    assert read_sidecar(d / "best.pt")["monitor"]["best"] == 0.95


@pytest.mark.parametrize("mode, old, new, replaced", [("min", 0.3, 0.4, False), ("min", 0.3, 0.2, True),
                                                      ("max", 0.3, float("nan"), False), ("max", 0.3, 0.3, True)])
def test_best_guard_follows_monitor_mode(tmp_path, mode, old, new, replaced):
    mgr = CheckpointManager(tmp_path, phase=1)
    model = _model()
    mgr.save(_state(model, _progress(1, best=old, mode=mode)), epoch_end=False, is_best=True)
    mgr.save(_state(model, _progress(2, best=new, mode=mode)), epoch_end=False, is_best=True)
    assert (read_sidecar(tmp_path / "best.pt")["epoch"] == 2) is replaced


# ----- resuming: fall-back and rejections -----
def test_truncated_latest_is_rejected_and_previous_epoch_file_used(tmp_path, logs):
    d = tmp_path / "phase1"
    _run_epochs(d, 3)
    data = (d / "latest.pt").read_bytes()
    (d / "latest.pt").write_bytes(data[: len(data) // 2])
    progress, model, _ = _resume(d)
    assert progress["epoch"] == 3 and _marked(model) == 3.0  # epoch_0003.pt holds the same state
    assert re.search(r"latest\.pt rejected: truncated", logs())
    rejects = [r for r in read_ledger(d) if r["event"] == "reject"]
    assert rejects and rejects[0]["reason"].startswith("truncated")
    aside = list(tmp_path.glob("phase1.rejected-*"))
    assert len(aside) == 1 and (aside[0] / "latest.pt").stat().st_size == len(data) // 2  # kept, not deleted


def test_hash_mismatch_is_rejected_and_falls_back(tmp_path, logs):
    d = tmp_path / "phase1"
    _run_epochs(d, 3)
    # latest.pt is newer than epoch 3 here: a mid-epoch save
    model = _model()
    _mark(model, 3.5)
    mgr = CheckpointManager(d, phase=1)
    mgr.save(_state(model, _progress(3, step=35, batch=4)), epoch_end=False, is_best=False)
    side = json.loads(sidecar_path(d / "latest.pt").read_text())
    side["sha256"] = "0" * 64
    sidecar_path(d / "latest.pt").write_text(json.dumps(side))
    progress, model, _ = _resume(d)
    assert progress["step"] == 30 and _marked(model) == 3.0
    assert "latest.pt rejected: hash mismatch" in logs()


def test_flipped_byte_same_size_is_a_hash_mismatch(tmp_path):
    d = tmp_path / "phase1"
    _run_epochs(d, 2)
    data = bytearray((d / "epoch_0002.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "latest.pt").write_bytes(bytes(data))
    (d / "epoch_0002.pt").write_bytes(bytes(data))
    progress, model, _ = _resume(d)
    assert progress["epoch"] == 1 and _marked(model) == 1.0
    rejects = [r["reason"] for r in read_ledger(d) if r["event"] == "reject"]
    assert [r.split(" ")[0] for r in rejects] == ["hash", "hash"]


def test_missing_sidecar_rejected_in_auto(tmp_path):
    d = tmp_path / "phase1"
    _run_epochs(d, 2)
    sidecar_path(d / "latest.pt").unlink()
    progress, _, _ = _resume(d)
    assert progress["epoch"] == 2  # from epoch_0002.pt
    assert any(r["reason"].startswith("sidecar missing") for r in read_ledger(d) if r["event"] == "reject")


def test_nothing_valid_starts_fresh_and_moves_files_aside(tmp_path, logs):
    d = tmp_path / "phase1"
    _run_epochs(d, 1)
    for name in ("latest.pt", "epoch_0001.pt", "best.pt"):
        (d / name).write_bytes(b"garbage")
    progress, _, _ = _resume(d)
    assert progress is None
    assert "starting fresh" in logs()
    assert not list(d.glob("*.pt"))
    aside = list(tmp_path.glob("phase1.aside-*"))
    assert len(aside) == 1 and (aside[0] / "best.pt").read_bytes() == b"garbage"
    events = [r["event"] for r in read_ledger(d)]
    assert events[-2:] == ["moved_aside", "fresh_start"] and events.count("reject") == 3  # best.pt counted once


def test_empty_directory_starts_fresh(tmp_path, logs):
    progress, _, _ = _resume(tmp_path / "phase1")
    assert progress is None and "starting fresh" in logs()
    records = read_ledger(tmp_path / "phase1")
    assert [(r["event"], r.get("reason")) for r in records[:2]] == [("reject", "missing"), ("reject", "missing")]
    assert [r["event"] for r in records[2:]] == ["fresh_start"]


def test_resume_never_moves_old_checkpoints_aside(tmp_path):
    d = tmp_path / "phase1"
    _run_epochs(d, 1)
    progress, _, _ = _resume(d, "never")
    assert progress is None and not list(d.glob("*.pt")) and len(list(tmp_path.glob("phase1.aside-*"))) == 1


def test_explicit_path_errors(tmp_path):
    d = tmp_path / "phase1"
    _run_epochs(d, 1)
    with pytest.raises(FileNotFoundError, match="RESUME='.*nope.pt': no such file"):
        _resume(d, str(tmp_path / "nope.pt"))
    (d / "epoch_0001.pt").write_bytes(b"junk")
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        _resume(d, str(d / "epoch_0001.pt"))
    with pytest.raises(ValueError, match="RESUME must be 'auto', 'never' or a path"):
        _resume(d, "latest")


def test_explicit_path_without_sidecar_loads_unverified(tmp_path, logs):
    d = tmp_path / "phase1"
    _run_epochs(d, 2)
    sidecar_path(d / "epoch_0001.pt").unlink()
    progress, model, _ = _resume(d, str(d / "epoch_0001.pt"))
    assert progress["epoch"] == 1 and _marked(model) == 1.0
    assert "loading it unverified" in logs()


def test_explicit_path_of_other_phase_points_to_init_from(tmp_path):
    model = _model()
    CheckpointManager(tmp_path / "phase2", phase=2).save(_state(model, _progress(1), phase=2), epoch_end=False,
                                                         is_best=False)
    with pytest.raises(ValueError, match="Phase 2 checkpoint but this run is Phase 1.*INIT_FROM"):
        _resume(tmp_path / "phase1", str(tmp_path / "phase2" / "latest.pt"))


# ----- compatibility -----
@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resnet") / "phase1"
    model = _model(encoder="resnet50")
    CheckpointManager(d, phase=1).save(_state(model, _progress(1)), epoch_end=True, is_best=False)
    return d


def _effnet_on_meta():
    with torch.device("meta"):
        return build_model("efficientnet_b4", num_classes=3, width=8)


def test_resnet_checkpoint_vs_efficientnet_parameters_is_explained(resnet_dir):
    before = (resnet_dir / "latest.pt").read_bytes()
    with pytest.raises(IncompatibleCheckpoint) as err:
        _resume(resnet_dir, model=_effnet_on_meta())  # meta: proves no tensor is needed for the check
    msg = str(err.value)
    assert "checkpoint encoder is 'resnet50' with skip channels [64, 256, 512, 1024, 2048]" in msg
    assert "the parameters ask for 'efficientnet_b4' with [24, 32, 56, 160, 448]" in msg
    assert "FORCE_RECREATE=True" in msg and "STRICT_LOAD=False" in msg
    assert re.search(r"unexpected in the checkpoint \(\d+\):\n\s+encoder\.core\.conv1\.\* \(1\)", msg)
    assert re.search(r"encoder\.core\.layer1\.\* \(\d+\): .*\+\d+ more", msg)  # examples, then counts
    assert isinstance(err.value, ValueError)
    assert (resnet_dir / "latest.pt").read_bytes() == before
    assert read_ledger(resnet_dir)[-1]["reason"] == "incompatible"


def test_incompatible_latest_never_falls_back_to_older_compatible_file(tmp_path):
    d = tmp_path / "phase1"
    mgr = CheckpointManager(d, phase=1)
    mgr.save(_state(_model(width=8), _progress(1)), epoch_end=True, is_best=False)
    mgr.save(_state(_model(width=16), _progress(2)), epoch_end=False, is_best=False)  # latest: another network
    with pytest.raises(IncompatibleCheckpoint, match="decoder width is 16; the parameters give 8"):
        _resume(d, model=_model(width=8))


def test_force_recreate_moves_old_files_aside_and_starts_fresh(tmp_path):
    d = tmp_path / "phase1"
    CheckpointManager(d, phase=1).save(_state(_model(width=16), _progress(1)), epoch_end=True, is_best=False)
    old = {p.name: p.read_bytes() for p in d.glob("*.pt")}
    progress, _, _ = _resume(d, model=_model(width=8), force_recreate=True)
    assert progress is None and not list(d.glob("*.pt"))
    aside = list(tmp_path.glob("phase1.recreated-*"))
    assert len(aside) == 1 and re.fullmatch(r"phase1\.recreated-\d{8}-\d{6}", aside[0].name)
    assert {p.name: p.read_bytes() for p in aside[0].glob("*.pt")} == old
    events = [r["event"] for r in read_ledger(d)]
    assert events[-3:] == ["reject", "moved_aside", "fresh_start"]
    # the new run saves into the clean directory and resumes from its own files
    CheckpointManager(d, phase=1).save(_state(_model(width=8), _progress(1, step=3)), epoch_end=False, is_best=False)
    assert _resume(d, model=_model(width=8), force_recreate=True)[0]["step"] == 3  # compatible: resumed, kept


def test_strict_load_false_loads_matching_tensors_and_reports(tmp_path, logs):
    d = tmp_path / "phase1"
    src = _model(seed=1, num_classes=3)
    opt = _opt(src)
    CheckpointManager(d, phase=1).save(_state(src, _progress(2), opt), epoch_end=False, is_best=False)
    dst = _model(seed=2, num_classes=5)
    with pytest.raises(IncompatibleCheckpoint, match="number of cell classes is 3; the parameters give 5"):
        CheckpointManager(d, phase=1).resume("auto", model=dst, optimizer=_opt(dst), scheduler=None, scaler=None)
    head_before = dst.state_dict()["decoder.heads.nc.weight"].clone()
    opt_dst = _opt(dst)
    mgr = CheckpointManager(d, phase=1)
    progress = mgr.resume("auto", model=dst, optimizer=opt_dst, scheduler=None, scaler=None, strict=False)
    assert progress["epoch"] == 2
    report = mgr.last_report
    mism = {k for k, _, _ in report.mismatched}
    assert mism and all(".nc" in k for k in mism) and not report.missing and not report.unexpected
    assert torch.equal(dst.state_dict()["decoder.heads.nc.weight"], head_before)
    for k in report.loaded:
        assert torch.equal(dst.state_dict()[k], src.state_dict()[k]), k
    assert opt_dst.state_dict()["state"] == {}  # the optimizer starts fresh after a partial load
    assert "shape-mismatched, left as they were" in logs() and "optimizer starts fresh" in logs()


def test_optimizer_parameters_changed_is_incompatible(tmp_path):
    d = tmp_path / "phase1"
    model = _model()
    CheckpointManager(d, phase=1).save(_state(model, _progress(1), _opt(model)), epoch_end=False, is_best=False)
    model2 = _model()
    for p in model2.encoder.parameters():
        p.requires_grad_(True)  # now the encoder trains too
    with pytest.raises(IncompatibleCheckpoint, match="optimizer parameters differ") as err:
        _resume(d, model=model2, optimizer=_opt(model2))
    assert "trained now, not in the checkpoint" in str(err.value)
    opt2 = _opt(model2)
    progress, _, mgr = _resume(d, model=model2, optimizer=opt2, strict=False)
    assert progress["epoch"] == 1 and opt2.state_dict()["state"] == {}


def test_scheduler_kind_change_is_incompatible(tmp_path):
    d = tmp_path / "phase1"
    model = _model()
    opt = _opt(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sched.kind, sched.interval = "cosine_warmup", "step"
    CheckpointManager(d, phase=1).save(collect_state(model=model, optimizer=opt, scheduler=sched, scaler=None,
                                                     progress=_progress(1), config={"PHASE": 1}),
                                       epoch_end=False, is_best=False)
    opt2 = _opt(model)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1)
    sched2.kind, sched2.interval = "step", "epoch"
    with pytest.raises(IncompatibleCheckpoint, match="'cosine_warmup' stepping per 'step'.*'step' stepping per 'epoch'"):
        CheckpointManager(d, phase=1).resume("auto", model=model, optimizer=opt2, scheduler=sched2, scaler=None)


def test_ignore_network_restores_counters_not_weights(tmp_path):
    d = tmp_path / "phase1"
    CheckpointManager(d, phase=1).save(_state(_model(width=16), _progress(4, best=0.8, patience=2)),
                                       epoch_end=False, is_best=False)
    model = _model(seed=3, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    progress, _, mgr = _resume(d, model=model, ignore_network=True)
    assert progress["epoch"] == 4 and progress["patience_counter"] == 2 and progress["best_metric"] == 0.8
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert read_ledger(d)[-1]["ignore_network"] is True


# ----- Phase 2 initialisation -----
def _phase1(tmp_path, *, best: bool = True, latest: bool = True):
    d = tmp_path / "phase1"
    model = _model(seed=1)
    mgr = CheckpointManager(d, phase=1)
    if best:
        _mark(model, 1.0)
        mgr.save(_state(model, _progress(1, best=0.5)), epoch_end=False, is_best=True)
    if latest:
        _mark(model, 2.0)
        mgr.save(_state(model, _progress(2, best=0.5)), epoch_end=False, is_best=False)
    if not latest:
        (d / "latest.pt").unlink()
        sidecar_path(d / "latest.pt").unlink()
    return d


def _lora_model():
    model = _model(seed=7)
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["qkv"])
    return model


def test_init_phase2_prefers_best_then_latest(tmp_path, logs):
    d = _phase1(tmp_path)
    model = _lora_model()
    assert init_phase2(model, d, ledger_dir=tmp_path / "phase2") == d / "best.pt"
    assert _marked(model) == 1.0 and "Phase 2 starts from" in logs() and "(best)" in logs()
    init = read_ledger(tmp_path / "phase2")[-1]
    assert init["event"] == "init" and init["which"] == "best"
    (d / "best.pt").write_bytes(b"broken")
    model = _lora_model()
    assert init_phase2(model, d) == d / "latest.pt"
    assert _marked(model) == 2.0 and "latest, as Phase 1 has no valid best.pt" in logs()


def test_init_phase2_without_phase1_is_an_error_unless_fresh(tmp_path, logs):
    with pytest.raises(FileNotFoundError, match=r"Run Phase 1 first.*INIT_FROM='fresh'"):
        init_phase2(_lora_model(), tmp_path / "phase1")
    assert init_phase2(_lora_model(), tmp_path / "phase1", "fresh", ledger_dir=tmp_path / "p2") is None
    assert "INIT_FROM='fresh'" in logs() and read_ledger(tmp_path / "p2")[-1]["source"] == "fresh"


def test_init_phase2_explicit_path_and_bad_values(tmp_path):
    d = _phase1(tmp_path)
    model = _lora_model()
    assert init_phase2(model, tmp_path / "elsewhere", str(d / "latest.pt")) == d / "latest.pt"
    assert _marked(model) == 2.0
    with pytest.raises(FileNotFoundError, match="INIT_FROM='.*missing.pt': no such file"):
        init_phase2(model, d, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="INIT_FROM must be 'auto', 'fresh' or a path"):
        init_phase2(model, d, "best")
    (d / "latest.pt").write_bytes(b"junk")
    with pytest.raises(CorruptCheckpoint):
        init_phase2(model, d, str(d / "latest.pt"))


def test_init_phase2_incompatible_phase1_is_explained(tmp_path):
    d = tmp_path / "phase1"
    CheckpointManager(d, phase=1).save(_state(_model(width=16), _progress(1, best=0.5)), epoch_end=False,
                                       is_best=True)
    with pytest.raises(IncompatibleCheckpoint, match="decoder width is 16"):
        init_phase2(_lora_model(), d)


# ----- the validity checks, one by one -----
def _one_save(tmp_path):
    d = tmp_path / "phase1"
    CheckpointManager(d, phase=1).save(_state(_model(), _progress(1)), epoch_end=False, is_best=False)
    return d / "latest.pt"


@pytest.mark.parametrize("sidecar_text, reason", [
    ("{not json", "sidecar unreadable"),
    ('{"format_version": 1}', "sidecar unreadable"),
    ('{"format_version": 99, "sha256": "x"}', "newer format"),
])
def test_bad_sidecars_are_rejected_with_their_reason(tmp_path, sidecar_text, reason):
    path = _one_save(tmp_path)
    sidecar_path(path).write_text(sidecar_text)
    with pytest.raises(CorruptCheckpoint, match=reason):
        read_sidecar(path)
    assert _resume(path.parent)[0] is None
    assert any(r["event"] == "reject" and r["reason"].startswith(reason) for r in read_ledger(path.parent))


def test_verify_and_read_payload_reasons(tmp_path):
    from cellseg.checkpoint.sidecar import read_payload, verify_file

    path = _one_save(tmp_path)
    side = read_sidecar(path)
    with pytest.raises(CorruptCheckpoint, match="missing"):
        verify_file(tmp_path / "gone.pt", side)
    with pytest.raises(CorruptCheckpoint, match="missing"):
        read_payload(tmp_path / "gone.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CorruptCheckpoint, match="not a cellseg checkpoint"):
        read_payload(tmp_path / "foreign.pt")
    torch.save({"model": {}, "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CorruptCheckpoint, match="newer format"):
        read_payload(tmp_path / "future.pt")


def test_payload_without_progress_is_rejected(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": _model().state_dict(), "format_version": 1, "phase": 1, "rng": None}, path)
    model = _model(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptCheckpoint, match="incomplete payload"):
        _resume(tmp_path / "phase1", str(path), model=model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


def test_load_weights_rejects_unknown_source():
    from cellseg.checkpoint import load_weights

    with pytest.raises(TypeError, match="load_weights source must be"):
        load_weights(_model(), {"model_weights": [1, 2]})


# ----- best.pt is weights-only -----
def _break_full_files(d):
    """latest.pt and every epoch file unusable (a torn disk): only best.pt is left."""
    for p in [d / "latest.pt", *d.glob("epoch_*.pt")]:
        p.write_bytes(p.read_bytes()[:100])


def _stepped():
    """A model and its AdamW after one step (the optimizer holds moments)."""
    model = _model()
    opt = _opt(model)
    model(torch.randn(1, 3, 32, 32))["np"].mean().backward()
    opt.step()
    return model, opt


def test_best_is_weights_only_latest_and_epoch_files_are_full(tmp_path):
    from cellseg.checkpoint.sidecar import read_payload

    d = tmp_path / "phase1"
    model, opt = _stepped()
    CheckpointManager(d, phase=1).save(_state(model, _progress(1, best=0.5, best_epoch=1), opt), epoch_end=True,
                                       is_best=True)
    best, latest = read_payload(d / "best.pt"), read_payload(d / "latest.pt")
    assert best["contents"] == "weights" and latest["contents"] == "full"
    assert read_payload(d / "epoch_0001.pt")["contents"] == "full"
    for key in ("optimizer", "optimizer_params", "scheduler", "scaler", "rng", "rng_ranks"):
        assert best[key] is None, key
    assert latest["optimizer"]["state"] and isinstance(latest["rng"], dict)
    assert best["progress"] == latest["progress"] and best["arch"] == latest["arch"]
    assert all(torch.equal(best["model"][k], v) for k, v in latest["model"].items())
    side_b, side_l = read_sidecar(d / "best.pt"), read_sidecar(d / "latest.pt")
    assert (side_b["contents"], side_l["contents"]) == ("weights", "full")
    assert side_b["size"] == (d / "best.pt").stat().st_size < side_l["size"] and side_b["sha256"] != side_l["sha256"]
    assert side_b["manifest"] == side_l["manifest"]
    save = [r for r in read_ledger(d) if r["event"] == "save"][-1]
    assert save["best_sha256"] == side_b["sha256"] and save["best_size"] == side_b["size"]


def test_auto_resume_refuses_to_continue_from_weights_only_best(tmp_path, logs):
    d = tmp_path / "phase1"
    _run_epochs(d, 2)
    _break_full_files(d)
    names = sorted(p.name for p in d.iterdir())
    model = _model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsOnlyCheckpoint) as e:
        _resume(d, model=model, optimizer=_opt(model))
    text = str(e.value)
    for part in ("best.pt (epoch 2, step 20), which holds weights only", "latest.pt: truncated",
                 "epoch_0002.pt: truncated", "epoch_0001.pt: truncated", f"RESUME={str(d / 'best.pt')!r}",
                 "fresh optimizer", "RESUME='never'"):
        assert part in text, part
    assert e.value.path == d / "best.pt" and len(e.value.rejected) == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing loaded
    assert sorted(p.name for p in d.iterdir()) == names  # nothing moved aside
    refuse = [r for r in read_ledger(d) if r["event"] == "refuse"]
    assert refuse and refuse[-1]["reason"] == "weights only" and refuse[-1]["file"].endswith("best.pt")
    assert not any(r["event"] in ("fresh_start", "load") for r in read_ledger(d))


def test_explicit_resume_from_weights_only_best_continues_loudly(tmp_path, logs):
    d = tmp_path / "phase1"
    _run_epochs(d, 2)
    _break_full_files(d)
    model = _model(seed=5)
    opt = _opt(model)
    torch.manual_seed(7)
    progress, model, mgr = _resume(d, str(d / "best.pt"), model=model, optimizer=opt)
    assert progress["epoch"] == 2 and _marked(model) == 2.0 and mgr.resumed_from == d / "best.pt"
    assert not opt.state_dict()["state"]  # fresh AdamW
    text = logs()
    assert "weights-only checkpoint" in text and "FRESH optimizer" in text and "RESTARTED" in text
    assert "no RNG states (weights only)" in text
    event = [r for r in read_ledger(d) if r["event"] == "weights_only_resume"]
    assert event and event[0]["epoch"] == 2


def test_best_written_as_a_full_copy_by_earlier_versions_still_resumes(tmp_path):
    """Before best.pt was weights-only it was a byte copy of latest.pt with a sidecar without 'contents'."""
    import shutil

    d = tmp_path / "phase1"
    model, opt = _stepped()
    _mark(model, 3.0)
    CheckpointManager(d, phase=1).save(_state(model, _progress(3, best=0.5, best_epoch=3), opt), epoch_end=False,
                                       is_best=True)
    shutil.copyfile(d / "latest.pt", d / "best.pt")
    side = json.loads(sidecar_path(d / "latest.pt").read_text())
    del side["contents"]
    side["file"] = "best.pt"
    sidecar_path(d / "best.pt").write_text(json.dumps(side))
    (d / "latest.pt").write_bytes(b"torn")
    again = _model(seed=5)
    opt2 = _opt(again)
    progress, again, mgr = _resume(d, model=again, optimizer=opt2)  # 'auto': latest.pt torn -> the full best.pt
    assert progress["epoch"] == 3 and _marked(again) == 3.0 and mgr.resumed_from == d / "best.pt"
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    assert not any(r["event"] in ("refuse", "weights_only_resume") for r in read_ledger(d))
