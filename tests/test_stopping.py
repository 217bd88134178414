"""Cooperative stopping: signals only set a flag (handlers restored afterwards), the STOP file, the STOP_AT deadline,
the run-status marker and the all-ranks agreement."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta

import pytest

from cellseg.stopping import StopRequest, any_rank, parse_deadline, read_run_status, write_run_status


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_signal_sets_flag_and_handlers_are_restored(name):
    sig = getattr(signal, name)
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(sig, previous)
    try:
        stop = StopRequest([name], stop_file=None, deadline=None).install()
        assert stop.reason is None
        os.kill(os.getpid(), sig)
        assert _wait_for(lambda: stop.reason is not None)
        assert stop.reason == f"signal {name}" and stop.requested
        assert seen == []  # not chained by default: the previous handler does not run
        stop.uninstall()
        assert signal.getsignal(sig) is previous
    finally:
        signal.signal(sig, old)


def test_chain_calls_previous_python_handler():
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with StopRequest(["SIGUSR1"], chain=True) as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert _wait_for(lambda: stop.reason is not None)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_second_sigint_breaks_out():
    # a shell starting the tests in the background hands them SIGINT ignored: what must come back is what was there
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(["SIGINT"]) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: stop.reason is not None)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs at the next bytecode boundary
    assert signal.getsignal(signal.SIGINT) is before


def test_install_outside_main_thread_only_logs(caplog):
    stop = StopRequest(["SIGTERM"])
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level("INFO", logger="cellseg.stopping"):
        t = threading.Thread(target=stop.install)
        t.start()
        t.join()
    assert not stop.installed and signal.getsignal(signal.SIGTERM) is before
    assert any("outside the main thread" in r.getMessage() for r in caplog.records)


def test_stop_file_is_seen_and_checks_are_throttled(tmp_path):
    flag = tmp_path / "STOP"
    eager = StopRequest([], stop_file=flag, file_check_interval=0)
    lazy = StopRequest([], stop_file=flag, file_check_interval=3600)
    assert eager.reason is None and lazy.reason is None
    flag.touch()
    assert eager.reason == f"STOP file {flag}"
    assert lazy.reason is None  # not looked at again within the hour
    flag.unlink()
    assert eager.reason == f"STOP file {flag}"  # once seen, the request stands


def test_deadline_forms():
    past = datetime.now() - timedelta(seconds=5)
    future = datetime.now() + timedelta(hours=1)
    assert "deadline STOP_AT reached" in StopRequest([], deadline=past.isoformat()).reason
    assert StopRequest([], deadline=future.isoformat(timespec="seconds")).reason is None
    assert StopRequest([], deadline=str(time.time() - 1)).reason is not None
    assert StopRequest([], deadline=time.time() + 3600).reason is None
    assert StopRequest([], deadline="").deadline is None and StopRequest([], deadline=None).deadline is None
    assert parse_deadline("2025-06-01T17:30:00+02:00") == datetime.fromisoformat("2025-06-01T17:30:00+02:00").timestamp()


@pytest.mark.parametrize("bad", ["tomorrow", "17h30", True, -5, float("inf")])
def test_bad_deadline_names_stop_at(bad):
    with pytest.raises(ValueError, match="STOP_AT"):
        StopRequest([], deadline=bad)


@pytest.mark.parametrize("bad", ["SIGFOO", "TERM", "SIG_DFL", "SIGKILL"])
def test_bad_signal_names_stop_signals(bad):
    with pytest.raises(ValueError, match="STOP_SIGNALS"):
        StopRequest([bad])


def test_request_from_code():
    stop = StopRequest([])
    stop.request("notebook cell")
    assert stop.reason == "signal notebook cell"


def test_run_status_marker(tmp_path):
    path = tmp_path / "phase1" / "status.json"
    assert read_run_status(path) is None
    rec = write_run_status(path, "preempted", "signal SIGTERM", epoch=3, step=41)
    assert rec["resumable"] is True
    on_disk = json.loads(path.read_text())
    assert on_disk["status"] == "preempted" and on_disk["reason"] == "signal SIGTERM" and on_disk["step"] == 41
    write_run_status(path, "finished", "all epochs done", resumable=False)
    assert read_run_status(path)["status"] == "finished" and read_run_status(path)["resumable"] is False
    assert not [p for p in path.parent.iterdir() if p.name != "status.json"]  # atomic: no temp files left
    with pytest.raises(ValueError, match="status must be one of"):
        write_run_status(path, "done", None)


def test_any_rank_without_process_group_is_identity():
    assert any_rank(True) is True and any_rank(False) is False


_RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from cellseg.stopping import any_rank
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(any_rank(rank == 1), any_rank(False), flush=True)
    dist.destroy_process_group()
""")


def test_any_rank_agrees_across_two_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == ["True", "False"]  # rank 1's request reaches rank 0 too


_LOOP_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from cellseg.checkpoint import CheckpointManager, collect_state
    from cellseg.stopping import StopRequest, any_rank, write_run_status

    directory = Path(sys.argv[1])
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(directory / "phase1", phase=1)
    stop = StopRequest(["SIGTERM"], stop_file=directory / "STOP", file_check_interval=0).install()
    progress = mgr.resume("auto", model=model, optimizer=opt, scheduler=None, scaler=None) or {"step": 0}
    print("start", progress["step"], flush=True)
    x = torch.ones(2, 4)
    while True:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        progress["step"] += 1
        print("step", progress["step"], flush=True)
        time.sleep(0.02)
        reason = stop.reason
        if any_rank(reason is not None):
            state = collect_state(model=model, optimizer=opt, scheduler=None, scaler=None, progress=progress,
                                  config={"PHASE": 1})
            mgr.save(state, epoch_end=False, is_best=False, reason=f"stop: {reason}")
            mgr.ledger_event("stop", reason=reason, step=progress["step"])
            write_run_status(directory / "status.json", "preempted", reason, step=progress["step"])
            stop.uninstall()
            sys.exit(0)
""")


def test_sigterm_during_a_training_loop_saves_at_the_next_step_and_exits_0(tmp_path):
    from cellseg.checkpoint import read_ledger, read_sidecar

    script = tmp_path / "loop.py"
    script.write_text(_LOOP_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    steps = []
    for line in proc.stdout:
        if line.startswith("step"):
            steps.append(int(line.split()[1]))
            if len(steps) == 5:
                proc.send_signal(signal.SIGTERM)
                break
    rest, _ = proc.communicate(timeout=60)
    steps += [int(line.split()[1]) for line in rest.splitlines() if line.startswith("step")]
    assert proc.returncode == 0
    saved = read_sidecar(tmp_path / "phase1" / "latest.pt")["step"]
    assert saved == steps[-1] and saved - 5 <= 1  # within one step of the signal
    stop = [r for r in read_ledger(tmp_path / "phase1") if r["event"] == "stop"]
    assert stop and stop[0]["reason"] == "signal SIGTERM"
    assert read_run_status(tmp_path / "status.json")["status"] == "preempted"
    # the next run resumes from that step; a STOP file ends it the same way
    (tmp_path / "STOP").touch()
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines()[0] == f"start {saved}"
    assert read_run_status(tmp_path / "status.json")["reason"] == f"STOP file {tmp_path / 'STOP'}"
