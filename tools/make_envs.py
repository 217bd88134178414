"""Write the conda environment files, one per torch build, from pyproject.toml and tools/torch_setup.py.

    python tools/make_envs.py              # (re)write environment*.yml
    python tools/make_envs.py --resolve    # also dry-run pip's resolver against the registries for each file

| file | torch build | NVIDIA driver (Linux) |
| --- | --- | --- |
| environment.yml | PyPI's CUDA 13.0 wheels | >= 580.65.06 |
| environment-cu128.yml | CUDA 12.8 (PyTorch index) | >= 525.60.13 (570+ for Blackwell GPUs) |
| environment-cu126.yml | CUDA 12.6 (PyTorch index) | >= 525.60.13 |
| environment-cpu.yml | CPU only (PyTorch index) | none |

The PyTorch index is an *extra* index (``--extra-index-url``) and the torch pair is pinned with its local label, so
everything else still comes from PyPI and PyPI's CUDA 13.0 build cannot win the resolution.
tests/test_packaging.py checks that the files equal what this script writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("torch_setup", ROOT / "tools" / "torch_setup.py")
torch_setup = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("torch_setup", torch_setup)
_spec.loader.exec_module(torch_setup)

ENV_FILES = {"environment.yml": "cu130", "environment-cu128.yml": "cu128", "environment-cu126.yml": "cu126",
             "environment-cpu.yml": "cpu"}


def requirements() -> list[str]:
    """pyproject's dependencies (torch pair excluded), the dev tools and tensorboard, in pyproject's order."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    reqs += project["optional-dependencies"].get("tensorboard", [])
    return [r for r in reqs if not r.startswith(("torch>", "torch=", "torchvision"))]


def torch_lines(build: str) -> list[str]:
    b = torch_setup.BUILDS[build]
    if b.local is None:
        return [f"torch=={torch_setup.TORCH_VERSION}", f"torchvision=={torch_setup.TORCHVISION_VERSION}"]
    return [f"--extra-index-url {torch_setup.INDEX_BASE}/{b.local}",
            f"torch=={torch_setup.TORCH_VERSION}+{b.local}", f"torchvision=={torch_setup.TORCHVISION_VERSION}+{b.local}"]


def render(file_name: str) -> str:
    build = ENV_FILES[file_name]
    b = torch_setup.BUILDS[build]
    env_name = "cellseg" if build == "cu130" else f"cellseg-{build}"
    need = f"NVIDIA driver >= {b.min_driver}" if b.min_driver else "no GPU driver (CPU only)"
    what = "PyPI's torch (CUDA 13.0 build)" if b.local is None else f"torch's {build} build from the PyTorch index"
    lines = [
        f"# Conda environment: {what}; needs {need}. Written by tools/make_envs.py; edit pyproject.toml or",
        "# tools/torch_setup.py and re-run it (tests/test_packaging.py checks the files are up to date).",
        "# Other builds: environment.yml (CUDA 13.0, driver >= 580.65.06), environment-cu128.yml / environment-cu126.yml",
        "# (driver >= 525.60.13), environment-cpu.yml. `nvidia-smi` prints the driver. The PyTorch index is an EXTRA",
        "# index for the torch pair only; everything else comes from PyPI.",
        f"#   conda env create -f {file_name} && conda activate {env_name}",
        "#   pip install -e . --no-deps && python -m ipykernel install --sys-prefix --name cellseg --display-name \"Python (cellseg)\"",
        f"name: {env_name}",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        "  - python=3.11",
        "  - pip",
        "  - pip:",
    ]
    lines += [f"      - {r}" for r in torch_lines(build) + requirements()]
    return "\n".join(lines) + "\n"


def resolve(file_name: str, *, with_torch: bool = True) -> dict:
    """Dry-run pip's resolver for one file's pip list with this interpreter (run it with a CPython 3.11 on Linux
    x86-64, the environments' target); without the torch
    pair and its extra index when ``with_torch`` is False (the part PyPI alone must solve)."""
    import yaml

    env = yaml.safe_load((ROOT / file_name).read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    if not with_torch:
        pip_list = [r for r in pip_list if not r.startswith(("--extra-index-url", "torch=", "torchvision="))]
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(pip_list) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report",
               str(report), "--retries", "1", "--timeout", "15", "-r", str(reqs)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            return {"file": file_name, "with_torch": with_torch, "ok": False,
                    "error": out.stderr.strip().splitlines()[-3:]}
        installs = json.loads(report.read_text())["install"]
        versions = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
        return {"file": file_name, "with_torch": with_torch, "ok": True, "packages": len(versions),
                "torch": versions.get("torch"), "torchvision": versions.get("torchvision")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolve", action="store_true", help="dry-run pip's resolver for each file")
    args = ap.parse_args(argv)
    for name in ENV_FILES:
        (ROOT / name).write_text(render(name))
    if args.resolve:
        results = [resolve(name, with_torch=t) for name in ENV_FILES for t in (False, True)]
        print(json.dumps(results, indent=1))
        return 0 if all(r["ok"] for r in results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
