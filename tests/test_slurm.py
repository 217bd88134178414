"""The batch scripts in slurm/ on a real single-node SLURM (tests/slurm_cluster.py) with the tiny CPU config.

- Phase 1 via ``sbatch slurm/slurm_train.sh``, stopped mid-training with SLURM's warning signal
  (``scancel --signal=USR1 --batch``): it checkpoints, requeues itself, resumes at the same step and finishes; Phase 2
  and ``slurm_eval.sh`` follow through ``--dependency=afterok``.
- ``slurm_train_ddp.sh`` with 2 tasks (gloo on CPU): both ranks train, only rank 0 writes, the weights agree.
- Set-up errors stop a script with exit code 2 and a message, before any notebook runs.

Needs the ``slurm-wlm`` and ``munge`` packages (the fixture fails with the install command otherwise).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

from conftest_slurm import slurm_cluster  # noqa: F401  (module-scoped fixture)
from slurm_cluster import (
    SlurmCluster,
    SlurmUnavailable,
    parse_scontrol_record,
    require_binaries,
    start_cluster,
)

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
TINY = ROOT / "configs" / "tiny_cpu.yaml"
PYTHON = ROOT / ".venv" / "bin" / "python"
# The node has 2 CPUs and fake GPUs: the scripts' headers ask for 8 CPUs per task.
SMALL = ["--cpus-per-task=1"]
JOB_TIMEOUT = 240


# ----- helpers -----
def notebook_text(path: Path) -> str:
    """All stream / text outputs of an executed notebook, concatenated."""
    nb = nbformat.read(path, as_version=4)
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
            elif out.get("output_type") == "error":
                parts.append("\n".join(out.get("traceback", [])))
    return "".join(parts)


def assert_executed_cleanly(path: Path) -> str:
    """The notebook ran every cell without an exception; returns its output text."""
    nb = nbformat.read(path, as_version=4)
    pm = nb.metadata.get("papermill", {})
    assert pm.get("exception") in (None, False), f"{path} raised: {notebook_text(path)[-2000:]}"
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path} has error outputs: {errors}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path}: not every code cell ran"
    return notebook_text(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition, timeout: float, what: str, cluster: SlurmCluster | None = None, job: int | None = None):
    """Poll ``condition()`` until it returns something truthy; fail with ``what`` (and the job log) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if cluster is not None and job is not None and cluster.job(job).get("JobState") in ("FAILED", "COMPLETED"):
            value = condition()
            if value:
                return value
            break
        time.sleep(0.3)
    log = ""
    if cluster is not None and job is not None:
        out = cluster.job(job).get("StdOut", "")
        log = Path(out).read_text()[-4000:] if out and Path(out).is_file() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n--- job log ---\n{log}")


def job_log(record: dict) -> str:
    return Path(record["StdOut"]).read_text()


def steps_per_epoch(text: str) -> int:
    match = re.search(r"(\d+) optimizer steps per epoch", text)
    assert match, "01_train's optimizer cell did not print its steps per epoch"
    return int(match.group(1))


def checksum_in(text: str) -> float | None:
    """The parameter checksum a rank reports at the end of training (``... parameter checksum 1.2345e+04``)."""
    match = re.search(r"parameter checksum\D{0,40}?([-+]?\d+\.\d+e[-+]\d+)", text)
    return float(match.group(1)) if match else None


# ----- set-up errors: no notebook runs, no cluster needed -----
def _run_script(script: str, args: list[str], env: dict[str, str | None] | None = None,
                cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.pop("CELLSEG_ROOT", None)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run(["bash", str(SLURM_DIR / script), *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("script, args, env, message", [
    ("slurm_train.sh", ["-f", str(TINY), "-p", "PHSE", "2"], {}, r"unknown parameter\(s\) \['PHSE'\]"),
    ("slurm_train_ddp.sh", ["-f", str(TINY), "-p", "PHASE", "3"], {}, r"PHASE must be one of \[1, 2\], got 3"),
    ("slurm_eval.sh", ["-f", str(TINY), "-p", "TTA", "false"], {}, "TTA must be of type bool, got 'false'"),
    ("slurm_train.sh", ["-f", str(TINY), "-k", "python3"], {}, "-k cannot be passed.*CELLSEG_KERNEL"),
    ("slurm_train.sh", ["notebooks/01_train.ipynb"], {}, "unexpected argument 'notebooks/01_train.ipynb'"),
    ("slurm_train.sh", ["-f", str(TINY)], {"CELLSEG_KERNEL": "cellseg-missing"},
     "kernelspec 'cellseg-missing' not found.*ipykernel install --sys-prefix"),
    ("slurm_eval.sh", ["-f", str(TINY)], {"CELLSEG_ENV": "/nonexistent/env"}, "CELLSEG_ENV=/nonexistent/env has no bin/python"),
    ("slurm_train.sh", ["-f", str(TINY)], {"CELLSEG_ROOT": "/nonexistent"}, "no slurm/common.sh at or above /nonexistent"),
    ("slurm_train_ddp.sh", ["-f", str(TINY)], {"CELLSEG_LAUNCHER": "mpirun"},
     "CELLSEG_LAUNCHER must be srun or torchrun, got 'mpirun'"),
    ("slurm_train_ddp.sh", ["-f", str(TINY)], {"CELLSEG_RANK_NOTEBOOKS": "some"},
     "CELLSEG_RANK_NOTEBOOKS must be keep or discard, got 'some'"),
    ("slurm_train.sh", ["-f", str(TINY)], {"MAX_REQUEUES": "-1"}, "MAX_REQUEUES must be a whole number >= 0, got '-1'"),
    ("slurm_train.sh", ["-f", str(TINY)], {"CELLSEG_STOP_MARGIN": "5min"},
     "CELLSEG_STOP_MARGIN must be a number of seconds >= 0, got '5min'"),
    ("slurm_train.sh", ["-f", str(TINY)], {"CELLSEG_PREPARE": "sometimes"},
     "CELLSEG_PREPARE must be auto, always or never, got 'sometimes'"),
])
def test_setup_errors_exit_2_with_a_message(tmp_path, script, args, env, message):
    proc = _run_script(script, [*args, "-p", "RUN_DIR", str(tmp_path / "run")], env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stdout + proc.stderr), proc.stdout + proc.stderr
    assert not list(tmp_path.glob("run/jobs/*/*.ipynb")), "a notebook ran despite the set-up error"
    assert "Traceback" not in proc.stderr


def test_stale_kernelspec_is_refused(tmp_path):
    spec = tmp_path / "kernels" / "cellseg"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f",
                                                           "{connection_file}"], "display_name": "stale",
                                                  "language": "python"}))
    proc = _run_script("slurm_train.sh", ["-f", str(TINY), "-p", "RUN_DIR", str(tmp_path / "run")],
                       {"JUPYTER_PATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "starts '/usr/bin/python3'" in proc.stderr and "not this environment's Python" in proc.stderr


# ----- the test cluster's own helpers -----
def test_missing_binaries_fail_with_the_install_command(monkeypatch, tmp_path):
    with pytest.raises(SlurmUnavailable, match=r"needs \['no-such-slurmd'\].*apt-get install -y slurm-wlm munge"):
        require_binaries(["no-such-slurmd"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM anywhere (require_binaries also looks in /usr/sbin)
    monkeypatch.setattr("slurm_cluster.BINARIES", ("munged", "no-such-slurmctld"))
    with pytest.raises(SlurmUnavailable, match="no-such-slurmctld"):
        start_cluster(tmp_path / "cluster")
    assert not (tmp_path / "cluster").exists(), "start_cluster wrote files before checking the binaries"


def test_parse_scontrol_record_keeps_values_with_spaces():
    rec = parse_scontrol_record("JobId=12 JobName=cellseg train JobState=PENDING Reason=BeginTime "
                                "Command=/a b/slurm_train.sh StdOut=/x/slurm-cellseg-12.out Restarts=1")
    assert rec == {"JobId": "12", "JobName": "cellseg train", "JobState": "PENDING", "Reason": "BeginTime",
                   "Command": "/a b/slurm_train.sh", "StdOut": "/x/slurm-cellseg-12.out", "Restarts": "1"}


# ----- common.sh functions, sourced in bash -----
def _bash(snippet: str, run_dir: Path, job_id: str = "77") -> subprocess.CompletedProcess:
    script = (f'source {SLURM_DIR / "common.sh"}\nCS_RUN_DIR={run_dir}\nCS_JOB_ID={job_id}\nCS_RESTART=0\n'
              + snippet)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)


def test_signal_during_payload_writes_a_tagged_stop_file_and_keeps_the_exit_code(tmp_path):
    proc = _bash('cs_install_traps\n'
                 '( sleep 0.5; kill -USR1 $$ ) &\n'
                 'cs_run_payload bash -c "sleep 2; exit 7"\n'
                 'echo "rc=$CS_RC signal=$CS_SIGNAL"\n'
                 'head -n1 "$CS_RUN_DIR/STOP"\n', tmp_path)
    assert "rc=7 signal=USR1" in proc.stdout, proc.stdout + proc.stderr
    assert "caught SIGUSR1" in proc.stdout
    assert re.search(r"^cellseg-slurm job=77 restart=0 signal=USR1 time=\d+$", proc.stdout, re.M), proc.stdout


def test_sigterm_writes_stop_but_is_not_a_requeue_request(tmp_path):
    proc = _bash('cs_install_traps\n( sleep 0.5; kill -TERM $$ ) &\ncs_run_payload sleep 2\n'
                 'echo "rc=$CS_RC signal=[$CS_SIGNAL]"\n', tmp_path)
    assert "rc=0 signal=[]" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "STOP").is_file()


@pytest.mark.parametrize("first_line, kept", [
    ("cellseg-slurm job=77 restart=0 signal=USR1 time=1", False),  # this job's, from an earlier attempt
    ("cellseg-slurm job=local-20250101T000000-999999999 restart=0 signal=USR1 time=1", False),  # writer gone
    (f"cellseg-slurm job=local-20250101T000000-{os.getpid()} restart=0 signal=USR1 time=1", True),  # writer alive
    ("please stop", True),  # the user's own STOP file is honoured
])
def test_stale_stop_files_are_removed_and_others_kept(tmp_path, first_line, kept):
    (tmp_path / "STOP").write_text(first_line + "\n")
    proc = _bash("cs_clear_stale_stop\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "STOP").exists() == kept, proc.stdout


# ----- on the cluster -----
@pytest.mark.slow
def test_phase1_preempted_requeued_resumed_then_phase2_and_eval(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    run, ckpt, submit = tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "submit"
    submit.mkdir()
    common = ["-f", str(TINY), "-p", "RUN_DIR", str(run), "-p", "CHECKPOINT_DIR", str(ckpt)]
    epochs = 3
    # submitted from outside the checkout: CELLSEG_ROOT finds it; the log lands in the submit directory
    env = {"CELLSEG_ROOT": str(ROOT), "MAX_REQUEUES": "2"}
    # no accumulation: 2 optimizer steps per epoch, so the stop lands mid-epoch with steps left to run
    p1 = cluster.sbatch(SLURM_DIR / "slurm_train.sh", [*common, "-p", "EPOCHS", str(epochs), "-p", "GRAD_ACCUM_TARGET",
                                                       "0"], options=SMALL, env=env, cwd=submit)
    p2 = cluster.sbatch(SLURM_DIR / "slurm_train.sh", [*common, "-p", "PHASE", "2"],
                        options=[*SMALL, f"--dependency=afterok:{p1}"], env=env, cwd=submit)
    # evaluation submitted from a subdirectory of the checkout without CELLSEG_ROOT: found from SLURM_SUBMIT_DIR
    ev = cluster.sbatch(SLURM_DIR / "slurm_eval.sh", common,
                        options=[*SMALL, f"--dependency=afterok:{p2}", f"--output={submit}/eval-%j.out"],
                        env={"CELLSEG_ROOT": None}, cwd=SLURM_DIR)

    # stop mid-training: as soon as the training notebook starts (its traps are set by then), send the job's warning
    # signal to its batch shell. The STOP file is there before the first step ends, so the loop stops at step 1 of
    # 2 x epochs, whatever the speed of the machine: mid-epoch, with a mid-epoch resume to follow.
    log_file = submit / f"slurm-cellseg-train-{p1}.out"
    wait_for(lambda: log_file.is_file() and "papermill notebooks/01_train.ipynb" in log_file.read_text(), JOB_TIMEOUT,
             "Phase 1's training notebook to start", cluster, p1)
    cluster.run(["scancel", "--batch", "--signal=USR1", str(p1)])
    rec1 = cluster.wait_job(p1, timeout=JOB_TIMEOUT)
    assert (rec1["JobState"], rec1["ExitCode"], rec1["Restarts"]) == ("COMPLETED", "0:0", "1"), job_log(rec1)

    # the job's own directory: a link to the log, both attempts' notebooks and their verdicts
    job_dir = run / "jobs" / str(p1)
    assert (job_dir / "slurm.out").resolve() == log_file.resolve()
    attempts = read_jsonl(job_dir / "attempts.jsonl")
    assert [(a["restart"], a["outcome"], a["action"], a["exit_code"]) for a in attempts] == [
        (0, "preempted", "requeue", 0), (1, "finished", "exit", 0)]
    assert attempts[0]["signal"] == "USR1" and "STOP file" in attempts[0]["reason"]
    stop_step, stop_epoch = attempts[0]["step"], attempts[0]["epoch"]
    log = log_file.read_text()
    assert "caught SIGUSR1" in log and "REQUEUED (restart 1 of at most 2)" in log and "FINISHED" in log
    first = assert_executed_cleanly(job_dir / "01_train_phase1.attempt0.ipynb")
    second = assert_executed_cleanly(job_dir / "01_train_phase1.attempt1.ipynb")
    per_epoch = steps_per_epoch(first)
    total = epochs * per_epoch
    assert 1 <= stop_step < total, f"the stop came after the last step ({stop_step} of {total})"
    assert f"resumed Phase 1 at epoch {stop_epoch}, step {stop_step}" in second

    # the checkpoints and the ledger tell the same story: stop at S, load at S, finish at the full count
    ledger = read_jsonl(ckpt / "phase1" / "ledger.jsonl")
    events = [e["event"] for e in ledger]
    i_stop = events.index("stop")
    assert ledger[i_stop]["step"] == stop_step and "STOP file" in ledger[i_stop]["reason"]
    saves_at_stop = [e for e in ledger[:i_stop] if e["event"] == "save" and e["step"] == stop_step]
    assert saves_at_stop and "stop" in saves_at_stop[-1]["reason"]
    loads = [e for e in ledger[i_stop:] if e["event"] == "load"]
    assert loads and loads[0]["step"] == stop_step and loads[0]["file"].endswith("latest.pt")
    assert events[-1] == "finished" and ledger[-1]["step"] == total
    status1 = json.loads((run / "phase1" / "status.json").read_text())
    assert status1["status"] == "finished" and status1["steps"] == total
    history = read_jsonl(run / "phase1" / "history.jsonl")
    assert [h["epoch"] for h in history] == list(range(epochs)), "an epoch was lost or repeated by the resume"
    assert not (run / "STOP").exists() and len(list(run.glob("STOP.handled-*"))) == 1
    for name in ("latest.pt", "best.pt"):
        assert (ckpt / "phase1" / name).is_file()

    # Phase 2 started after Phase 1 really completed (afterok through the requeue), from Phase 1's checkpoint
    rec2 = cluster.wait_job(p2, timeout=JOB_TIMEOUT)
    assert (rec2["JobState"], rec2["ExitCode"], rec2["Restarts"]) == ("COMPLETED", "0:0", "0"), job_log(rec2)
    p2_text = assert_executed_cleanly(run / "jobs" / str(p2) / "01_train_phase2.attempt0.ipynb")
    assert "Phase 2 starts from" in p2_text and "phase1" in p2_text
    status2 = json.loads((run / "phase2" / "status.json").read_text())
    assert status2["status"] == "finished" and status2["slurm_job_id"] == str(p2)
    assert (ckpt / "phase2" / "best.pt").is_file()
    assert not (run / "jobs" / str(p2) / "00_prepare_data.attempt0.ipynb").exists(), "data prepared twice"
    assert (run / "jobs" / str(p1) / "00_prepare_data.attempt0.ipynb").is_file()

    rec3 = cluster.wait_job(ev, timeout=JOB_TIMEOUT)
    assert (rec3["JobState"], rec3["ExitCode"]) == ("COMPLETED", "0:0"), job_log(rec3)
    assert_executed_cleanly(run / "jobs" / str(ev) / "02_evaluate.attempt0.ipynb")
    metrics = json.loads((run / "eval" / "phase2-best-test" / "metrics.json").read_text())  # default EVAL_* values
    assert (run / "eval" / "latest").read_text().strip() == "phase2-best-test"
    for key in ("pq", "dice", "det_f1"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0
    assert "FINISHED" in (submit / f"eval-{ev}.out").read_text()


@pytest.mark.slow
def test_ddp_two_ranks_only_rank0_writes(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    epochs = 2
    args = ["-f", str(TINY), "-p", "RUN_DIR", str(run), "-p", "CHECKPOINT_DIR", str(ckpt), "-p", "EPOCHS", str(epochs)]
    job = cluster.sbatch(SLURM_DIR / "slurm_train_ddp.sh", args,
                         options=[*SMALL, "--ntasks-per-node=2", "--gres=gpu:2"],
                         env={"CELLSEG_ROOT": str(ROOT)}, cwd=tmp_path)
    rec = cluster.wait_job(job, timeout=JOB_TIMEOUT)
    log = job_log(rec)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log
    job_dir = run / "jobs" / str(job)
    rank0 = assert_executed_cleanly(job_dir / "01_train_phase1.attempt0.ipynb")
    rank1 = assert_executed_cleanly(job_dir / "01_train_phase1.attempt0.rank1.ipynb")
    # both ranks joined one gloo group of two and trained every step
    assert "rank 0/2" in rank0
    total = epochs * steps_per_epoch(rank0)
    assert steps_per_epoch(rank1) == steps_per_epoch(rank0)
    # only rank 0 wrote: one writer process in the ledger, one history line per epoch, no rank-suffixed files
    ledger = read_jsonl(ckpt / "phase1" / "ledger.jsonl")
    assert len({(e["host"], e["pid"]) for e in ledger}) == 1, "more than one process wrote the ledger"
    assert [h["epoch"] for h in read_jsonl(run / "phase1" / "history.jsonl")] == list(range(epochs))
    status = json.loads((run / "phase1" / "status.json").read_text())
    assert status["status"] == "finished" and status["steps"] == total
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert [p for p in written if "rank1" in p.name] == [Path("run/jobs", str(job),
                                                              "01_train_phase1.attempt0.rank1.ipynb")]
    # the weights agree: each rank reports a checksum of its trainable parameters at the end, in its own notebook
    sums = [checksum_in(rank0), checksum_in(rank1)]
    assert None not in sums, (f"a rank's notebook lacks its parameter checksum {sums}; the training loop must report it "
                              "on every rank (non-main ranks only log warnings)")
    assert sums[0] == pytest.approx(sums[1], rel=1e-9)
    assert read_jsonl(job_dir / "attempts.jsonl")[-1]["outcome"] == "finished"


@pytest.mark.slow
def test_failed_and_manually_stopped_jobs_exit_1_and_3(slurm_cluster: SlurmCluster, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    env = {"CELLSEG_ROOT": str(ROOT)}
    # evaluation of a run that has neither data nor checkpoints: the notebook fails, the job says FAILED, exit 1
    empty = tmp_path / "empty"
    failing = cluster.sbatch(SLURM_DIR / "slurm_eval.sh", ["-f", str(TINY), "-p", "RUN_DIR", str(empty)],
                             options=SMALL, env=env, cwd=tmp_path)
    # a STOP file the user wrote (no job tag): honoured once at the first step, and the job is not requeued: exit 3
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "STOP").write_text("stop please\n")
    stopped = cluster.sbatch(SLURM_DIR / "slurm_train.sh", ["-f", str(TINY), "-p", "RUN_DIR", str(run), "-p",
                                                            "CHECKPOINT_DIR", str(run / "checkpoints")],
                             options=SMALL, env=env, cwd=tmp_path)
    rec = cluster.wait_job(failing, timeout=JOB_TIMEOUT)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "1:0"), job_log(rec)
    assert "FAILED: exit code 1" in job_log(rec)
    assert read_jsonl(empty / "jobs" / str(failing) / "attempts.jsonl")[-1]["outcome"] == "failed"

    rec = cluster.wait_job(stopped, timeout=JOB_TIMEOUT)
    log = job_log(rec)
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("FAILED", "3:0", "0"), log
    assert "stopped on request" in log and "not requeued" in log and "REQUEUED" not in log
    attempt = read_jsonl(run / "jobs" / str(stopped) / "attempts.jsonl")[-1]
    assert (attempt["outcome"], attempt["action"], attempt["exit_code"], attempt["signal"]) == (
        "preempted", "exit", 3, None)
    status = json.loads((run / "phase1" / "status.json").read_text())
    assert status["status"] == "preempted" and status["resumable"] is True and status["step"] == attempt["step"]
    assert (run / "checkpoints" / "phase1" / "latest.pt").is_file()
    assert not (run / "STOP").exists() and len(list(run.glob("STOP.handled-*"))) == 1
