"""The batch scripts parse squeue output whatever SLURM formatting variables the user's shell exports: a
SLURM_TIME_FORMAT=relative (or any strftime format) used to make every training job exit 2 at start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# squeue as SLURM formats %e: SLURM_TIME_FORMAT decides (standard = ISO), SQUEUE_STATES filters the jobs shown
FAKE_SQUEUE = """#!/bin/bash
if [[ -n ${SQUEUE_STATES:-} ]]; then exit 0; fi
case "${SLURM_TIME_FORMAT:-standard}" in
  standard) date -d "@$FAKE_END" +%Y-%m-%dT%H:%M:%S ;;
  relative) echo "Tomorr 20:00" ;;
  *) date -d "@$FAKE_END" +"$SLURM_TIME_FORMAT" ;;
esac
"""


@pytest.mark.parametrize("extra", [{"SLURM_TIME_FORMAT": "relative"}, {"SLURM_TIME_FORMAT": "%a %d %b %H:%M"},
                                   {"SQUEUE_FORMAT": "%.18i %.9P", "SQUEUE_STATES": "PD"}, {}])
def test_deadline_ignores_the_users_slurm_formatting(tmp_path, extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE)
    (bin_dir / "squeue").chmod(0o755)
    end = int(time.time()) + 3600
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_END": str(end),
           "SLURM_JOB_ID": "4242", "CELLSEG_STOP_MARGIN": "300", "CS_PY": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]), **extra}
    script = 'source slurm/common.sh && cs_deadline_args && echo "ARGS ${CS_EXTRA_ARGS[*]}"'
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == f"ARGS -r STOP_AT {end - 300}"


def test_stale_stop_check_sees_running_jobs_whatever_squeue_states_says(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE.replace('date -d "@$FAKE_END" +%Y-%m-%dT%H:%M:%S', "echo RUNNING"))
    (bin_dir / "squeue").chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").write_text("cellseg-slurm job=77 restart=0 signal=USR1 time=1\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SQUEUE_STATES": "PD",
           "CS_RUN_DIR": str(run_dir), "CS_JOB_ID": "78"}
    proc = subprocess.run(["bash", "-c", "source slurm/common.sh && cs_clear_stale_stop"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "STOP").exists()  # job 77 still runs: its STOP file stays
