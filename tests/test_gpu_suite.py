"""benchmarks/gpu_suite.sh (issue 17): the CPU dry run goes through every measurement of the GPU suite and writes
its JSON and Markdown; the time budget stops a measurement in flight and skips the ones that no longer fit; an
out-of-memory or a broken measurement is recorded without costing the others; without a GPU the real suite refuses."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"


@pytest.fixture(scope="module")
def suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(*args: str, out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_measures_everything_the_gpu_run_does(tmp_path, suite_module):
    # a budget far above the dry run's cost, so that every measurement runs on a slow or busy CI machine too
    proc = _run("--dry-run", "--budget-s", "900", out=tmp_path, timeout=960)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert results["dry_run"] is True and results["environment"]["device"] == "cpu"
    measured = {m["name"]: m for m in results["measurements"]}
    planned = [name for _, name, _, _ in suite_module.plan(suite_module.Suite(
        suite_module.DRY_PRESET, torch.device("cpu"), tmp_path, suite_module.Budget(1), True))]
    assert list(measured) == planned
    not_ok = {n: (m["status"], m.get("detail")) for n, m in measured.items() if m["status"] != "ok"}
    assert not not_ok, not_ok
    assert measured["bf16 matmul peak"]["tflops"] > 0
    for name in ("train P1 eager", "train P2 eager", "train P2 compile"):
        row = measured[name]
        assert row["images_per_s"] > 0 and row["gflop_per_step"] > 0 and 0 < row["mfu"]
    for row in (m for m in measured.values() if "within_10pct" in m):
        assert row["measured_bytes"] > 0 and row["predicted_bytes"] > 0
    assert measured["capped 12 GB"]["fits"] is True and "x" in measured["capped 12 GB"]["suggested"]
    assert measured["inference TTA on"]["forward_passes_per_tile"] == 8
    assert 0 <= measured["data loading 2 workers"]["gpu_idle_fraction"] <= 1
    assert "compile" in measured["train P2 compile"]["configuration"]
    md = (tmp_path / "gpu_suite.md").read_text()
    for header in ("| configuration | images/s", "| memory configuration |", "| emulated card |", "| inference |",
                   "| data loading |"):
        assert header in md
    assert "summary: 20 ok" in proc.stdout


def test_budget_stops_the_measurement_in_flight_and_skips_the_rest(tmp_path, suite_module):
    suite = suite_module.Suite(suite_module.DRY_PRESET, torch.device("cpu"), tmp_path, suite_module.Budget(60),
                               dry_run=True)
    suite.budget = suite_module.Budget(0.5)  # starts now, after the (slow) environment probe
    t0 = time.monotonic()
    slow = suite.run("slow", 0.1, lambda: time.sleep(30) or {})
    assert time.monotonic() - t0 < 5
    assert slow["status"] == "stopped: budget"
    skipped = suite.run("next", 1.0, lambda: {"x": 1})
    assert skipped["status"] == "not run: budget"
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [m["status"] for m in saved["measurements"]] == ["stopped: budget", "not run: budget"]
    assert "| slow | stopped: budget" in (tmp_path / "gpu_suite.md").read_text()


def test_out_of_memory_and_errors_are_recorded_and_the_suite_goes_on(tmp_path, suite_module):
    suite = suite_module.Suite(suite_module.DRY_PRESET, torch.device("cpu"), tmp_path, suite_module.Budget(60),
                               dry_run=True)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken():
        raise KeyError("boom")

    assert suite.run("oom", 1, oom)["status"] == "out of memory"
    err = suite.run("broken", 1, broken)
    assert err["status"] == "error" and "KeyError" in err["detail"]
    assert suite.run("fine", 1, lambda: {"value": 3})["value"] == 3


def test_without_a_gpu_the_real_suite_refuses_and_says_how(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    proc = _run(out=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "No CUDA device" in proc.stderr and "--dry-run" in proc.stderr


@pytest.mark.parametrize("args, message", [(["--budget-s", "0"], "--budget-s must be > 0"),
                                           (["--only", "train,gpus"], "--only takes groups")])
def test_bad_arguments_are_refused(tmp_path, args, message):
    proc = _run("--dry-run", *args, out=tmp_path, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
