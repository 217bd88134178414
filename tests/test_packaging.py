"""Repository promises: environment.yml installs what `make setup` installs, the code passes ruff, weights and
checkpoints are never committed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_every_dependency_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip if not r.startswith("--")}
    assert wanted <= listed, f"missing from environment.yml: {sorted(wanted - listed)}"


def test_environment_files_are_what_make_envs_writes():
    """One file per torch build, generated from pyproject.toml and tools/torch_setup.py (the pair `make setup`
    installs); the PyTorch index only ever as an extra index."""
    spec = importlib.util.spec_from_file_location("make_envs", ROOT / "tools" / "make_envs.py")
    make_envs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_envs)
    for name in make_envs.ENV_FILES:
        assert (ROOT / name).read_text() == make_envs.render(name), (
            f"{name} is out of date: run `python tools/make_envs.py`")
        text = (ROOT / name).read_text()
        assert "--index-url" not in text.replace("--extra-index-url", "")
        pip = next(d["pip"] for d in yaml.safe_load(text)["dependencies"] if isinstance(d, dict))
        torch_line = next(r for r in pip if r.startswith("torch=="))
        assert torch_line.startswith(f"torch=={make_envs.torch_setup.TORCH_VERSION}")


def test_ruff_passes_on_code_and_notebooks():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "lib", "tests", "benchmarks", "notebooks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_weights_and_checkpoints_are_ignored():
    for path in ("checkpoints/phase1/latest.pt", "weights/uni/pytorch_model.bin", "runs/demo/eval/metrics.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
