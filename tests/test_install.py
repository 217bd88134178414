"""`make setup TORCH=...` (tools/torch_setup.py): the build chosen for each machine, the PyTorch index as an extra
index only, the loud fallback when that index is unreachable, and the installed torch against setup's report."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "torch_setup.py"
_spec = importlib.util.spec_from_file_location("torch_setup", SCRIPT)
ts = importlib.util.module_from_spec(_spec)
sys.modules["torch_setup"] = ts  # dataclasses look the module up by name
_spec.loader.exec_module(ts)


def _fake_nvidia_smi(bin_dir: Path, driver: str | None, rc: int = 0) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{'echo ' + driver if driver else 'echo NVIDIA-SMI has failed >&2'}\nexit {rc}\n")
    exe.chmod(0o755)


def _plan_cli(torch: str, path: str, index_base: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "TORCH_INDEX_BASE": index_base}
    return subprocess.run([sys.executable, str(SCRIPT), "plan", "--torch", torch], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.fixture(scope="module")
def index_server(tmp_path_factory):
    """A local stand-in for the PyTorch index (only its /<build>/torch/ pages are probed)."""
    root = tmp_path_factory.mktemp("index")
    for build in ("cpu", "cu126", "cu128"):
        (root / build / "torch").mkdir(parents=True)
        (root / build / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("driver, build", [
    (None, "cpu"),                 # no nvidia-smi: the CPU-only wheels
    ("535.104.05", "cu126"),
    ("565.57.01", "cu126"),
    ("570.124.06", "cu128"),
    ("580.65.06", "cu130"),
    ("590.10", "cu130"),
])
def test_auto_picks_the_build_from_nvidia_smi(tmp_path, index_server, driver, build):
    bin_dir = tmp_path / "bin"
    if driver:
        _fake_nvidia_smi(bin_dir, driver)
    out = _plan_cli("auto", f"{bin_dir}:/usr/bin:/bin", index_server)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert plan["build"] == build and plan["fallback"] is None
    pip_line = out.stdout.strip().splitlines()[-1]
    assert "--index-url" not in pip_line.replace("--extra-index-url", "")  # never replaces PyPI
    if build == "cu130":  # PyPI's own build: no extra index at all
        assert plan["index"] is None and f"torch=={ts.TORCH_VERSION} " in pip_line + " "
    else:
        assert f"--extra-index-url {index_server}/{build}" in pip_line
        assert f"torch=={ts.TORCH_VERSION}+{build}" in pip_line
        assert f"torchvision=={ts.TORCHVISION_VERSION}+{build}" in pip_line
    assert plan["expected_cuda"] == ts.BUILDS[build].cuda
    assert out.stderr == ""


def test_failing_nvidia_smi_means_cpu(tmp_path, index_server):
    _fake_nvidia_smi(tmp_path / "bin", None, rc=9)
    out = _plan_cli("auto", f"{tmp_path / 'bin'}:/usr/bin:/bin", index_server)
    plan = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert plan["build"] == "cpu" and "nvidia-smi failed (exit 9" in plan["reason"]


@pytest.mark.parametrize("torch, build, cuda", [("cpu", "cpu", None), ("cu126", "cu126", "12.6"),
                                                ("cu128", "cu128", "12.8"), ("cu130", "cu130", "13.0"),
                                                ("pypi", "pypi", "13.0")])
def test_explicit_torch_ignores_the_gpu(tmp_path, index_server, torch, build, cuda):
    _fake_nvidia_smi(tmp_path / "bin", "580.65.06")
    out = _plan_cli(torch, f"{tmp_path / 'bin'}:/usr/bin:/bin", index_server)
    plan = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert (plan["build"], plan["expected_cuda"]) == (build, cuda)
    assert plan["reason"] == f"TORCH={torch} given"


def test_unreachable_index_falls_back_to_pypi_with_one_warning_line(tmp_path):
    out = _plan_cli("cpu", "/usr/bin:/bin", "http://127.0.0.1:9")  # port 9 (discard): connection refused
    assert out.returncode == 0
    plan = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert plan["build"] == "pypi" and plan["index"] is None and plan["expected_cuda"] == "13.0"
    warning = out.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("WARNING: TORCH=cpu: the PyTorch index http://127.0.0.1:9/cpu "
                                                        "is unreachable")
    assert "instead of the cpu build" in warning[0]


def test_old_driver_and_bad_torch_value_are_refused(tmp_path, index_server):
    _fake_nvidia_smi(tmp_path / "bin", "470.82.01")
    out = _plan_cli("auto", f"{tmp_path / 'bin'}:/usr/bin:/bin", index_server)
    assert out.returncode != 0 and "nvidia-smi reports driver 470.82.01, older than any CUDA build" in out.stderr
    assert "make setup TORCH=cpu" in out.stderr
    out = _plan_cli("cu999", "/usr/bin:/bin", index_server)
    assert out.returncode != 0 and "TORCH must be one of" in out.stderr and "'cu999'" in out.stderr


def test_check_names_a_build_that_differs_from_the_report():
    report = {"requested": "cpu", "build": "cpu", "expected_cuda": None,
              "installed": {"torch": f"{ts.TORCH_VERSION}+cpu", "torchvision": f"{ts.TORCHVISION_VERSION}+cpu",
                            "cuda": None}}
    assert ts.check(report, report["installed"]) == []
    problems = ts.check(report, {"torch": f"{ts.TORCH_VERSION}+cu130", "torchvision": ts.TORCHVISION_VERSION,
                                 "cuda": "13.0"})
    assert any("has CUDA build 13.0, but setup planned build 'cpu' (CUDA None)" in p for p in problems)


def test_installed_torch_is_the_build_setup_reported():
    """The environment running the tests was made by `make setup`: its torch is the build the report names
    (on a machine without a GPU and with the PyTorch index reachable: CPU-only, torch.version.cuda is None)."""
    import torch
    import torchvision

    path = Path(sys.prefix) / "cellseg-torch.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: this environment was not made by `make setup` (which writes it); run "
                    "`make setup` or `python tools/torch_setup.py install --torch auto --python "
                    f"{sys.executable} --report {path}`.", pytrace=False)
    report = json.loads(path.read_text())
    assert torch.version.cuda == report["expected_cuda"], report
    assert torch.__version__ == report["installed"]["torch"]
    assert torchvision.__version__ == report["installed"]["torchvision"]
    if report["requested"] == "cpu" or (report["requested"] == "auto" and report["reason"].endswith("CPU-only build")):
        # A CPU machine gets CPU wheels unless the CPU index was unreachable, which setup must have said.
        assert torch.version.cuda is None or report["fallback"], report
