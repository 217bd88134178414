"""slurm/common.sh's choice of environment: an activated env wins over ROOT/.venv (no SLURM needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _choose(env_vars: dict[str, str], root: Path) -> subprocess.CompletedProcess:
    script = (f"source {ROOT / 'slurm' / 'common.sh'}; CELLSEG_ROOT={root}; cs_setup_env")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
                                                            "CELLSEG_ENV") and not k.startswith("SLURM_")}
    env.update(env_vars)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)


def _fake_env(path: Path) -> Path:
    """A prefix whose python cannot import cellseg: the error names the environment that was chosen."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").write_text("#!/bin/sh\necho 'No module named cellseg' >&2\nexit 1\n")
    (path / "bin" / "python").chmod(0o755)
    return path


def test_activated_env_wins_over_root_venv_with_a_warning(tmp_path):
    root = tmp_path / "checkout"
    _fake_env(root / ".venv")
    active = _fake_env(tmp_path / "active")
    out = _choose({"VIRTUAL_ENV": str(active)}, root)
    assert out.returncode == 2
    assert f"WARNING: using the activated virtualenv (VIRTUAL_ENV) {active}, not {root}/.venv" in out.stdout
    assert f"environment {active} cannot import cellseg" in out.stderr
    conda = _fake_env(tmp_path / "conda-env")
    out = _choose({"CONDA_PREFIX": str(conda), "CONDA_DEFAULT_ENV": "cellseg"}, root)
    assert f"environment {conda} cannot import cellseg" in out.stderr
    # conda's base env does not beat ROOT/.venv; nothing activated: ROOT/.venv without a warning
    out = _choose({"CONDA_PREFIX": str(conda), "CONDA_DEFAULT_ENV": "base"}, root)
    assert f"environment {root}/.venv cannot import cellseg" in out.stderr and "WARNING" not in out.stdout
    out = _choose({"CELLSEG_ENV": str(conda), "VIRTUAL_ENV": str(active)}, root)
    assert f"environment {conda} cannot import cellseg" in out.stderr  # CELLSEG_ENV first
