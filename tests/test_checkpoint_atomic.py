"""Atomic writes: the previous file stays valid whatever happens to the writer (exception, os.replace failure,
SIGKILL mid-write), and the ledger survives a torn last line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cellseg.checkpoint import CheckpointManager, collect_state, read_ledger
from cellseg.checkpoint.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    is_temp,
    open_temp,
    remove_stale_temps,
    sha256_file,
)
from cellseg.checkpoint.ledger import Ledger
from cellseg.checkpoint.sidecar import read_sidecar


def _temps(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if is_temp(p)]


def test_atomic_write_returns_sha_and_replaces(tmp_path):
    target = tmp_path / "f.bin"
    sha = atomic_write_bytes(target, b"old")
    assert sha == hashlib.sha256(b"old").hexdigest() == sha256_file(target)
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert not _temps(tmp_path)


def test_torch_save_through_hashing_writer_matches_file_hash(tmp_path):
    target = tmp_path / "t.pt"
    with open_temp(target) as (writer, tmp):
        torch.save({"w": torch.arange(1000.0)}, writer)
    os.replace(tmp, target)
    assert writer.sha256 == sha256_file(target)
    assert writer.size == target.stat().st_size
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(1000.0))


def test_failing_os_replace_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"v": 1})

    def boom(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert not _temps(tmp_path)


def test_exception_while_writing_keeps_old_file(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        with open_temp(target) as (writer, _):
            writer.write(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert not _temps(tmp_path)


def test_sigkill_during_write_keeps_old_file(tmp_path):
    """A writer killed mid-write (SIGKILL: no cleanup at all) leaves the old file intact and only a stale temp file,
    which remove_stale_temps clears."""
    target = tmp_path / "big.bin"
    atomic_write_bytes(target, b"old and valid")
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from cellseg.checkpoint.atomic import open_temp
        with open_temp(Path({str(target)!r})) as (w, tmp):
            w.write(b"x" * 4096); w.flush()
            print("writing", flush=True)
            while True:
                w.write(b"y" * 4096); w.flush(); time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old and valid"
    assert len(_temps(tmp_path)) == 1
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


class _Tiny(torch.nn.Module):
    def __init__(self, value: float = 0.0, size: int = 64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((size, size), value))


def _state(step: int) -> dict:
    return collect_state(model=_Tiny(float(step)), optimizer=None, scheduler=None, scaler=None,
                         progress={"epoch": 0, "step": step, "batch_in_epoch": step, "history": []},
                         config={"PHASE": 1})


def test_manager_save_with_failing_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "phase1", phase=1)
    mgr.save(_state(1), epoch_end=False, is_best=False)
    real_replace = os.replace

    def fail_on_payload(src, dst):
        if str(dst).endswith("latest.pt"):
            raise OSError("quota exceeded")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_payload)
    with pytest.raises(OSError, match="quota exceeded"):
        mgr.save(_state(2), epoch_end=False, is_best=False)
    monkeypatch.undo()
    assert not _temps(tmp_path / "phase1")
    model = _Tiny()
    progress = CheckpointManager(tmp_path / "phase1", phase=1).resume("auto", model=model, optimizer=None,
                                                                       scheduler=None, scaler=None)
    assert progress["step"] == 1 and float(model.w.detach()[0, 0]) == 1.0


_SAVER = """
import sys
from pathlib import Path
import torch
from cellseg.checkpoint import CheckpointManager, collect_state

class Tiny(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((256, 256), float(value)))

mgr = CheckpointManager(Path(sys.argv[1]), phase=1, keep_last=2)
step = int(sys.argv[2])
while True:
    step += 1
    state = collect_state(model=Tiny(step), optimizer=None, scheduler=None, scaler=None,
                          progress={"epoch": step // 3, "step": step, "batch_in_epoch": 0, "history": []},
                          config={"PHASE": 1})
    mgr.save(state, epoch_end=step % 3 == 0, is_best=False, reason="step")
    if step == int(sys.argv[2]) + 1:
        print("ready", flush=True)  # one save done: from here on the kill lands anywhere in the loop
"""


def test_sigkill_at_random_moments_during_saves_always_leaves_a_valid_checkpoint(tmp_path):
    """A process saving in a tight loop is killed at several moments; each time resume finds a checkpoint whose
    weights are exactly those of the step its sidecar and payload name, and no step goes backwards by more than the
    last save."""
    directory = tmp_path / "phase1"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    last_step = 0
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, str(script), str(directory), str(last_step)], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        model = _Tiny(size=256)
        mgr = CheckpointManager(directory, phase=1, keep_last=2)
        progress = mgr.resume("auto", model=model, optimizer=None, scheduler=None, scaler=None)
        assert progress is not None, "a killed saver must leave a resumable checkpoint"
        assert progress["step"] >= last_step
        assert torch.equal(model.w.detach(), torch.full((256, 256), float(progress["step"])))
        assert read_sidecar(mgr.resumed_from)["step"] == progress["step"]
        last_step = progress["step"]
    assert last_step > 0


def test_ledger_skips_torn_last_line(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append("save", step=1)
    ledger.append("save", step=2)
    with open(ledger.path, "a") as f:
        f.write('{"event": "save", "st')  # a writer killed mid-line
    records = read_ledger(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert read_ledger(tmp_path / "nowhere") == []


def test_disabled_ledger_writes_nothing(tmp_path):
    assert Ledger(tmp_path, enabled=False).append("save") is None
    assert not (tmp_path / "ledger.jsonl").exists()


def test_failing_copy_for_epoch_file_keeps_everything_valid(tmp_path, monkeypatch):
    import shutil

    mgr = CheckpointManager(tmp_path / "phase1", phase=1)
    mgr.save(_state(1), epoch_end=True, is_best=False)

    def no_space(src, dst, **kw):
        raise OSError("no space left on device")

    monkeypatch.setattr(shutil, "copyfile", no_space)
    with pytest.raises(OSError, match="no space left"):
        mgr.save(_state(2), epoch_end=True, is_best=False)
    monkeypatch.undo()
    assert not _temps(tmp_path / "phase1")
    assert read_sidecar(tmp_path / "phase1" / "latest.pt")["step"] == 1
    assert sorted(p.name for p in (tmp_path / "phase1").glob("*.pt")) == ["epoch_0000.pt", "latest.pt"]
