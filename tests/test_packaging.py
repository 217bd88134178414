"""Repository promises: environment.yml installs what `make setup` installs, the code passes ruff, weights and
checkpoints are never committed."""

from __future__ import annotations

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


def test_torch_pair_is_the_same_in_makefile_and_environment_yml():
    make = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"TORCH_SPEC \?= (\S+)", make).group(1)
    vision_spec = re.search(r"TORCHVISION_SPEC \?= (\S+)", make).group(1)
    env = (ROOT / "environment.yml").read_text()
    assert torch_spec in env and vision_spec in env


def test_ruff_passes_on_code_and_notebooks():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "lib", "tests", "benchmarks", "notebooks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_weights_and_checkpoints_are_ignored():
    for path in ("checkpoints/phase1/latest.pt", "weights/uni/pytorch_model.bin", "runs/demo/eval/metrics.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
