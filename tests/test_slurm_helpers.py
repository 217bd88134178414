"""Unit tests of cellseg.slurm_helpers: papermill argument parsing, kernelspec check, deadline, verdict and requeue
decision. The batch scripts themselves run on a real SLURM in tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellseg import slurm_helpers as sh
from cellseg.slurm_helpers import Outcome, SlurmHelperError

ROOT = Path(__file__).resolve().parents[1]


# ----- parameters -----
@pytest.mark.parametrize("raw, expected", [
    ("True", True), ("False", False), ("None", None), ("2", 2), ("001", 1), ("1e-3", 1e-3), ("0.5", 0.5),
    ("true", "true"), ("auto", "auto"), ("['qkv']", "['qkv']"), ("", ""),
])
def test_papermill_value_matches_papermill(raw, expected):
    from papermill.cli import _resolve_type

    assert sh.papermill_value(raw) == expected
    assert sh.papermill_value(raw) == _resolve_type(raw)
    assert type(sh.papermill_value(raw)) is type(_resolve_type(raw))


def test_parse_papermill_args_precedence_and_passthrough(tmp_path):
    f1 = tmp_path / "a.yaml"
    f1.write_text("RUN_DIR: runs/a\nPHASE: 1\nEPOCHS: 3\n")
    f2 = tmp_path / "b.yaml"
    f2.write_text("EPOCHS: 4\n")
    # papermill applies files, then -y, then -p, then -r, whatever the order on the command line
    params, rest = sh.parse_papermill_args(
        ["-p", "PHASE", "2", "-f", str(f1), "--log-output", "-r", "STOP_AT", "123", "-y", "EPOCHS: 7",
         f"--parameters_file={f2}", "-p", "SEED", "001", "--request-save-on-cell-execute"])
    assert params == {"RUN_DIR": "runs/a", "PHASE": 2, "EPOCHS": 7, "STOP_AT": "123", "SEED": 1}
    assert rest == ["--log-output", "--request-save-on-cell-execute"]


@pytest.mark.parametrize("argv, match", [
    (["-k", "python3"], "-k cannot be passed.*CELLSEG_KERNEL"),
    (["--cwd", "/tmp"], "--cwd cannot be passed.*CELLSEG_ROOT"),
    (["-b", "e30="], "-b cannot be passed"),
    (["notebooks/01_train.ipynb", "out.ipynb"], "unexpected argument 'notebooks/01_train.ipynb'"),
    (["-p", "PHASE"], "-p needs NAME VALUE"),
    (["-f"], "-f needs FILE"),
    (["-f", "-p", "PHASE", "1"], "-f needs FILE"),
    (["-f", "/nonexistent/params.yaml"], "/nonexistent/params.yaml does not exist"),
    (["-y", "[1, 2]"], "must be a YAML mapping"),
    (["-y", "a: [1"], "is not valid YAML"),
])
def test_parse_papermill_args_rejects(argv, match):
    with pytest.raises(SlurmHelperError, match=match):
        sh.parse_papermill_args(argv)


def test_run_info_locations(tmp_path):
    info = sh.run_info(["-f", str(ROOT / "configs" / "tiny_cpu.yaml"), "-p", "RUN_DIR", "runs/x", "-p", "PHASE", "2",
                        "-r", "CHECKPOINT_DIR", str(tmp_path / "ck")], "01_train", root=tmp_path)
    assert info.run_dir == str(tmp_path / "runs" / "x")
    assert info.checkpoint_dir == str(tmp_path / "ck")
    assert info.data_cache == str(tmp_path / "runs" / "x" / "data")
    assert info.phase == 2
    assert info.status_file == str(tmp_path / "runs" / "x" / "phase2" / "status.json")
    assert info.resume == "auto" and info.stop_at == ""
    ev = sh.run_info(["-p", "RUN_DIR", "/abs/r", "-p", "EVAL_PHASE", "1", "-p", "DATA_CACHE", "cache"], "02_evaluate",
                     root=tmp_path)
    # one evaluation folder per (phase, checkpoint, split): the job waits for that folder's metrics.json
    assert (ev.phase, ev.metrics_file, ev.data_cache) == (1, "/abs/r/eval/phase1-best-test/metrics.json",
                                                          str(tmp_path / "cache"))
    # the shell form round-trips through bash quoting
    values = dict(line.split("=", 1) for line in info.shell().splitlines())
    assert shlex.split(values["CS_RUN_DIR"]) == [info.run_dir]
    assert values["CS_PHASE"] == "2"


@pytest.mark.parametrize("argv, notebook, match", [
    (["-p", "PHSE", "2"], "01_train", r"unknown parameter\(s\) \['PHSE'\]"),
    (["-p", "PHASE", "3"], "01_train", r"PHASE must be one of \[1, 2\], got 3"),
    (["-p", "TTA", "false"], "02_evaluate", "TTA must be of type bool, got 'false'"),
    (["-p", "RUN_DIR", "x"], "03_nope", "notebook must be one of"),
])
def test_run_info_rejects_what_the_notebook_would(argv, notebook, match):
    with pytest.raises(SlurmHelperError, match=match):
        sh.run_info(argv, notebook)


# ----- kernelspec -----
def _write_spec(directory: Path, name: str, python: str) -> None:
    spec = directory / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": name,
        "language": "python"}))


def test_check_kernelspec_accepts_this_environment():
    assert Path(sh.check_kernelspec("cellseg")).name == "cellseg"


def test_check_kernelspec_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    with pytest.raises(SlurmHelperError, match="kernelspec 'no-such-kernel' not found.*ipykernel install --sys-prefix"):
        sh.check_kernelspec("no-such-kernel")


@pytest.mark.parametrize("python", ["/usr/bin/python3", "/nonexistent/bin/python"])
def test_check_kernelspec_stale_spec_of_another_environment(monkeypatch, tmp_path, python):
    # JUPYTER_PATH comes before sys.prefix, as ~/.local does: a stale spec there shadows the environment's own
    _write_spec(tmp_path, "cellseg-stale", python)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    with pytest.raises(SlurmHelperError, match=f"starts '{python}'.*not this environment's Python"):
        sh.check_kernelspec("cellseg-stale")


# ----- deadline -----
def test_stop_at_from_end_time():
    now = time.mktime((2030, 1, 1, 10, 0, 0, 0, 0, -1))
    assert sh.stop_at_from_end_time("2030-01-01T12:00:00", 300, now=now) == now + 2 * 3600 - 300
    for unlimited in ("Unknown", "N/A", "", "UNLIMITED"):
        assert sh.stop_at_from_end_time(unlimited, 300, now=now) is None


@pytest.mark.parametrize("end, margin, match", [
    ("2030-01-01T10:04:00", 300, "within CELLSEG_STOP_MARGIN=300 s.*longer --time"),
    ("2030-01-01T12:00:00", -1, "CELLSEG_STOP_MARGIN must be >= 0"),
    ("tomorrow", 300, "is not an ISO time"),
])
def test_stop_at_rejects(end, margin, match):
    now = time.mktime((2030, 1, 1, 10, 0, 0, 0, 0, -1))
    with pytest.raises(SlurmHelperError, match=match):
        sh.stop_at_from_end_time(end, margin, now=now)


# ----- verdict -----
def _marker(path: Path, status: str, *, t: float | None = None, job: str | None = None, restart: str | None = None,
            step: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "status": status, "reason": "signal SIGUSR1" if status == "preempted" else "all epochs done",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() if t is None else t)),
        "slurm_job_id": job, "slurm_restart_count": restart, "epoch": 1, "step": step}))
    return path


def test_read_outcome_trusts_a_fresh_marker_over_the_exit_code(tmp_path):
    since = time.time() - 5
    f = _marker(tmp_path / "phase1" / "status.json", "finished", job="7", restart=None)
    # torchrun exits 1 after forwarding TERM to a worker that finished cleanly: the marker decides
    assert sh.read_outcome(f, since, 1, job_id="7", restart_count="0").status == "finished"
    f = _marker(f, "preempted", job="7", restart="2")
    out = sh.read_outcome(f, since, 0, job_id="7", restart_count="2")
    assert (out.status, out.step, out.reason) == ("preempted", 5, "signal SIGUSR1")


@pytest.mark.parametrize("case", ["missing", "stale_time", "other_job", "other_restart", "failed_status", "garbage"])
def test_read_outcome_failed(tmp_path, case):
    f = tmp_path / "status.json"
    since = time.time()
    if case == "stale_time":
        _marker(f, "finished", t=since - 3600)
    elif case == "other_job":
        _marker(f, "finished", job="6")
    elif case == "other_restart":
        _marker(f, "preempted", job="7", restart="1")
    elif case == "failed_status":
        _marker(f, "failed", job="7")
    elif case == "garbage":
        f.write_text("{not json")
    out = sh.read_outcome(f, since, 0, job_id="7", restart_count="2")
    assert out.status == "failed"
    assert "exit code 0" in out.reason


def test_read_outcome_without_marker_uses_expected_output(tmp_path):
    metrics = tmp_path / "metrics.json"
    since = time.time() - 1
    assert sh.read_outcome("", since, 0, expect_file=metrics).status == "failed"
    metrics.write_text("{}")
    assert sh.read_outcome("", since, 0, expect_file=metrics).status == "finished"
    assert sh.read_outcome("", since, 1, expect_file=metrics).status == "failed"
    assert sh.read_outcome("", since + 3600, 0, expect_file=metrics).status == "failed"  # written before the job


PRE = Outcome("preempted", "signal SIGUSR1", epoch=1, step=12)


@pytest.mark.parametrize("outcome, kw, action, code, words", [
    (Outcome("finished", "all epochs done", 2, 20), {}, "exit", 0, "FINISHED"),
    (Outcome("failed", "exit code 1; no status marker"), {}, "exit", 1, "FAILED"),
    (PRE, {}, "requeue", 0, "REQUEUED (restart 1 of at most 10)"),
    (PRE, {"scheduler_stop": False}, "exit", 3, "stopped on request"),
    (PRE, {"in_slurm": False}, "exit", 3, "not a SLURM job"),
    (PRE, {"restart_count": 10}, "exit", 3, "requeue cap reached"),
    (PRE, {"restart_count": 2, "max_requeues": 3}, "requeue", 0, "REQUEUED (restart 3 of at most 3)"),
    (PRE, {"previous_step": 12}, "exit", 3, "no progress since the previous attempt"),
    (PRE, {"previous_step": 11}, "requeue", 0, "REQUEUED"),
])
def test_decide(outcome, kw, action, code, words):
    args = {"scheduler_stop": True, "in_slurm": True, "restart_count": 0, "max_requeues": 10} | kw
    d = sh.decide(outcome, **args)
    assert (d.action, d.exit_code) == (action, code)
    assert words in d.message


def test_decide_rejects_negative_counts():
    with pytest.raises(SlurmHelperError, match="MAX_REQUEUES and SLURM_RESTART_COUNT must be >= 0"):
        sh.decide(PRE, scheduler_stop=True, in_slurm=True, restart_count=0, max_requeues=-1)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellseg.slurm_helpers", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_conclude_records_attempts_and_detects_no_progress(tmp_path):
    status = tmp_path / "run" / "phase1" / "status.json"
    attempts = tmp_path / "run" / "jobs" / "7" / "attempts.jsonl"
    since = time.time() - 2
    common = ["conclude", "--status-file", str(status), "--since", str(since), "--exit-code", "0", "--job-id", "7",
              "--attempts-file", str(attempts), "--max-requeues", "5"]
    _marker(status, "preempted", job="7", restart=None, step=4)
    first = _cli(*common, "--signal", "USR1", "--restart-count", "0")
    assert first.returncode == 0, first.stderr
    assert "CS_ACTION=requeue" in first.stdout and "CS_EXIT_CODE=0" in first.stdout
    _marker(status, "preempted", job="7", restart="1", step=4)  # the restarted attempt did not get further
    second = _cli(*common, "--signal", "USR1", "--restart-count", "1")
    assert "CS_ACTION=exit" in second.stdout and "CS_EXIT_CODE=3" in second.stdout
    records = [json.loads(line) for line in attempts.read_text().splitlines()]
    assert [(r["restart"], r["outcome"], r["action"], r["step"]) for r in records] == [
        (0, "preempted", "requeue", 4), (1, "preempted", "exit", 4)]
    # a deadline that has passed counts as the scheduler's stop, one in the future does not
    _marker(status, "preempted", job="8", restart=None, step=9)
    late = _cli("conclude", "--status-file", str(status), "--since", str(since), "--exit-code", "0", "--job-id", "8",
                "--deadline", str(time.time() - 1))
    early = _cli("conclude", "--status-file", str(status), "--since", str(since), "--exit-code", "0", "--job-id", "8",
                 "--deadline", str(time.time() + 3600))
    assert "CS_ACTION=requeue" in late.stdout and "CS_ACTION=exit" in early.stdout


def test_cli_errors_exit_2_with_the_message():
    proc = _cli("run-info", "--notebook", "01_train", "--", "-p", "PHASE", "7")
    assert proc.returncode == sh.EXIT_SETUP
    assert "PHASE must be one of [1, 2], got 7" in proc.stderr
    proc = _cli("stop-at", "--end-time", "2001-01-01T00:00:00", "--margin", "300")
    assert proc.returncode == sh.EXIT_SETUP and "within CELLSEG_STOP_MARGIN" in proc.stderr
    proc = _cli("stop-at", "--end-time", "Unknown", "--margin", "300")
    assert proc.returncode == 0 and proc.stdout.strip() == ""
