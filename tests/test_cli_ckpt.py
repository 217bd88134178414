"""``cellseg ckpt inspect PATH [--json]`` and ``cellseg ckpt check PATH -f PARAMS.yaml [-p NAME VALUE ...]``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cellseg.checkpoint import CheckpointManager, collect_state
from cellseg.checkpoint.sidecar import sidecar_path
from cellseg.commands import ckpt
from cellseg.model.lora import apply_lora
from cellseg.model.network import build_model


def _save(directory, model, *, epoch: int = 2, phase: int = 1, best: float = 0.5, **save_kw):
    progress = {"epoch": epoch, "step": 10 * epoch, "batch_in_epoch": 0, "best_metric": best, "best_epoch": epoch,
                "patience_counter": 0, "history": [{"monitor": {"pq": best}}],
                "monitor": {"metric": "pq", "mode": "max"}}
    state = collect_state(model=model, optimizer=None, scheduler=None, scaler=None, progress=progress,
                          config={"PHASE": phase})
    CheckpointManager(directory, phase=phase).save(state, **{"epoch_end": True, "is_best": True, **save_kw})
    return directory / "latest.pt"


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("vit") / "phase1", build_model("test_vit", num_classes=3, width=8))


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("rn") / "phase1", build_model("resnet50", num_classes=3, width=8),
                 epoch_end=False, is_best=False)


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("ENCODER: test_vit\nENCODER_WEIGHTS: ''\nDECODER_WIDTH: 8\nCHECKPOINT_DIR: ckpts\n")
    return path


def test_inspect_json(vit_ckpt, capsys):
    assert ckpt.main(["ckpt", "inspect", str(vit_ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sidecar"] == "ok" and info["valid"] is True
    assert (info["phase"], info["epoch"], info["step"], info["batch_in_epoch"]) == (1, 2, 20, 0)
    assert info["monitor"]["metric"] == "pq" and info["monitor"]["best"] == 0.5
    assert info["arch"]["encoder"] == "test_vit" and info["lora"] is None
    assert info["tensors"] > 100 and info["parameters"] > 0 and len(info["sha256"]) == 64
    assert info["contents"] == ("weights" if vit_ckpt.name == "best.pt" else "full")


def test_inspect_text_and_directory(vit_ckpt, capsys):
    assert ckpt.main(["ckpt", "inspect", str(vit_ckpt.parent)]) == 0
    out = capsys.readouterr().out
    assert out.count("sidecar:      ok") == 3  # latest, epoch_0002, best
    assert out.count("contents:     full (weights + optimizer") == 2  # latest, epoch_0002
    assert out.count("contents:     weights only") == 1  # best
    assert "encoder 'test_vit'" in out and "LoRA:         none" in out


def test_inspect_reports_corruption_and_exits_1(tmp_path, capsys):
    path = _save(tmp_path / "phase1", build_model("test_vit", num_classes=3, width=8))
    data = path.read_bytes()
    path.write_bytes(data[:1000])
    assert ckpt.main(["ckpt", "inspect", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["sidecar"].startswith("truncated")
    sidecar_path(path).unlink()
    assert ckpt.main(["ckpt", "inspect", str(path), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["sidecar"] == "sidecar missing" and info["payload"].startswith("truncated or unreadable")
    assert ckpt.main(["ckpt", "inspect", str(tmp_path / "none.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_inspect_without_sidecar_reads_payload(tmp_path, capsys):
    path = _save(tmp_path / "phase1", build_model("test_vit", num_classes=3, width=8))
    sidecar_path(path).unlink()
    assert ckpt.main(["ckpt", "inspect", str(path), "--json"]) == 1  # cannot be verified
    info = json.loads(capsys.readouterr().out)
    assert info["payload"].startswith("readable") and info["epoch"] == 2 and info["arch"]["encoder"] == "test_vit"
    assert info["contents"] == "full"


def test_check_resnet50_against_efficientnet_b4_fails_with_both_ways_out(resnet_ckpt, params, capsys):
    rc = ckpt.main(["ckpt", "check", str(resnet_ckpt), "-f", str(params), "-p", "ENCODER", "efficientnet_b4"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "'resnet50' with skip channels [64, 256, 512, 1024, 2048]" in out
    assert "'efficientnet_b4' with [24, 32, 56, 160, 448]" in out
    assert "FORCE_RECREATE=True" in out and "STRICT_LOAD=False" in out


def test_check_compatible_and_non_strict(vit_ckpt, resnet_ckpt, params, capsys):
    assert ckpt.main(["ckpt", "check", str(vit_ckpt), "-f", str(params)]) == 0
    assert "compatible for RESUME" in capsys.readouterr().out
    rc = ckpt.main(["ckpt", "check", str(resnet_ckpt), "-f", str(params), "-p", "ENCODER", "efficientnet_b4",
                    "-p", "STRICT_LOAD", "False"])
    out = capsys.readouterr().out
    assert rc == 0 and "STRICT_LOAD=False: the rest is left as it is" in out and "missing from the checkpoint" in out


def test_check_phase1_checkpoint_for_phase2_lora_parameters(vit_ckpt, params, capsys):
    assert ckpt.main(["ckpt", "check", str(vit_ckpt), "-f", str(params), "-p", "PHASE", "2"]) == 0
    out = capsys.readouterr().out
    assert "INIT_FROM (a Phase 1 checkpoint starting Phase 2)" in out and "LoRA adapter tensors start fresh" in out


def test_check_lora_checkpoint_against_plain_parameters_names_merge_lora(tmp_path, params, capsys):
    model = build_model("test_vit", num_classes=3, width=8)
    apply_lora(model, r=8, alpha=16, dropout=0.1, targets=["qkv"])
    path = _save(tmp_path / "phase2", model, phase=2)
    assert ckpt.main(["ckpt", "check", str(path), "-f", str(params)]) == 1
    assert "MERGE_LORA=True" in capsys.readouterr().out
    assert ckpt.main(["ckpt", "check", str(path), "-f", str(params), "-p", "MERGE_LORA", "True"]) == 0
    assert ckpt.main(["ckpt", "check", str(path), "-f", str(params), "-p", "PHASE", "2"]) == 0  # LORA_R 8 default


@pytest.mark.parametrize("argv, err", [
    ([], "give the parameters"),
    (["-p", "ENCODR", "resnet50"], "unknown parameter"),
    (["-p", "ENCODER", "resnet5"], "ENCODER must be"),
])
def test_check_usage_errors_exit_2(vit_ckpt, argv, err, capsys):
    assert ckpt.main(["ckpt", "check", str(vit_ckpt), *argv]) == 2
    assert err in capsys.readouterr().err


def test_check_missing_file_exits_2(tmp_path, params, capsys):
    assert ckpt.main(["ckpt", "check", str(tmp_path / "x.pt"), "-f", str(params)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_through_the_cellseg_command(vit_ckpt, params):
    """The lead's ``cellseg`` entry point dispatches to this module (``python -m cellseg ckpt ...``)."""
    out = subprocess.run([sys.executable, "-m", "cellseg", "ckpt", "inspect", str(vit_ckpt), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["epoch"] == 2
    from cellseg.cli import main

    assert main(["ckpt", "check", str(vit_ckpt), "-f", str(params)]) == 0


def test_skeleton_is_on_meta_device(params):
    from cellseg.config import config_from_cli

    model = ckpt.build_network_skeleton(config_from_cli([str(params)], [["PHASE", "2"]]), 3)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lora_config is not None and torch.nn.Module in type(model).__mro__


def test_check_unreadable_checkpoint_exits_2(tmp_path, params, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    assert ckpt.main(["ckpt", "check", str(junk), "-f", str(params)]) == 2
    err = capsys.readouterr().err
    assert "cannot check" in err and "truncated or unreadable" in err
