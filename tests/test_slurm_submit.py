"""slurm/submit.sh: parameters checked on the login node before sbatch (a fake sbatch records what it was given);
no SLURM needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def _submit(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "sbatch.args"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\necho 'Submitted batch job 4242'\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CONDA_"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CELLSEG_ENV=sys.prefix,
               PYTHONPATH=os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(["bash", str(ROOT / "slurm" / "submit.sh"), *args], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    return out, (record.read_text().splitlines() if record.exists() else None)


def test_valid_parameters_are_submitted_with_a_per_phase_name(tmp_path):
    out, sbatch = _submit(tmp_path, "train", "--time=01:00:00", "--", "-f", str(TINY), "-p", "PHASE", "2", "-p",
                          "RUN_DIR", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert "Submitted batch job 4242" in out.stdout
    assert sbatch == ["--job-name=cellseg-train-p2", "--time=01:00:00", "slurm/slurm_train.sh", "-f", str(TINY),
                      "-p", "PHASE", "2", "-p", "RUN_DIR", str(tmp_path / "run")]
    assert "OK    parameters" in out.stdout  # the doctor's report is shown


@pytest.mark.parametrize("args, message", [
    (["train", "--", "-f", str(TINY), "-p", "PHSE", "2"], r"unknown parameter(s) ['PHSE']"),
    (["train", "--", "-f", str(TINY), "-p", "DATASET", "bccd", "-r", "DATA_ROOT", "/nonexistent/BCCD"],
     "cellseg data fetch bccd DIR"),
    (["predict", "--", "-f", str(TINY)], "first argument must be train, ddp or eval, got 'predict'"),
    (["train", "-f", str(TINY)], "put the papermill arguments after --"),
])
def test_bad_submissions_never_reach_sbatch(tmp_path, args, message):
    out, sbatch = _submit(tmp_path, *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert sbatch is None


def test_dry_run_and_own_job_name(tmp_path):
    out, sbatch = _submit(tmp_path, "--dry-run", "eval", "-J", "mine", "--", "-f", str(TINY))
    assert out.returncode == 0 and sbatch is None
    assert f"submit.sh: sbatch -J mine slurm/slurm_eval.sh -f {TINY}" in out.stdout


def test_no_sbatch_options(tmp_path):
    out, _ = _submit(tmp_path, "--dry-run", "train", "--", "-f", str(TINY))
    assert out.returncode == 0, out.stderr
    assert f"submit.sh: sbatch --job-name=cellseg-train-p1 slurm/slurm_train.sh -f {TINY}" in out.stdout
