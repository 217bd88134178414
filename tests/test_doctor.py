"""`cellseg doctor`: one verdict per line, FAIL (exit 1) for what would break the run, with the fix in the line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cellseg.cli import main as cli_main
from cellseg.commands import doctor

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def _fake_nvidia_smi(tmp_path: Path, driver: str, monkeypatch) -> None:
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f"#!/bin/sh\necho '{driver}, NVIDIA A100-SXM4-40GB, 40960 MiB'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")


def _checks(capsys, *argv: str) -> tuple[int, dict[str, dict]]:
    code = cli_main(["doctor", "--json", *argv])
    return code, {c["name"]: c for c in json.loads(capsys.readouterr().out)}


def test_doctor_on_the_tiny_config(capsys, tmp_path):
    code, checks = _checks(capsys, "--", "-f", str(TINY), "-p", "RUN_DIR", str(tmp_path / "run"))
    assert code == 0, checks
    for name in ("python", "cellseg", "torch", "torchvision", "parameters", "gpu", "kernelspec", "jupyterlab",
                 "ipywidgets", "data", "weights", "disk", "slurm"):
        assert checks[name]["verdict"] in ("OK", "WARN", "INFO"), checks[name]
    assert checks["torchvision"]["detail"].endswith("nms operator works")
    assert f"at {tmp_path}" in checks["disk"]["detail"]  # nearest existing parent of RUN_DIR
    # the plain report: one line per check, verdict first
    assert cli_main(["doctor", "--no-hash", "--", "-f", str(TINY)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(checks) and all(ln.split()[0] in ("OK", "WARN", "INFO") for ln in lines)


def test_missing_data_and_weights_fail_with_the_fix(capsys, tmp_path):
    code, checks = _checks(capsys, "--", "-f", str(TINY), "-p", "DATASET", "bccd", "-r", "DATA_ROOT",
                           str(tmp_path / "nowhere"), "-p", "RUN_DIR", str(tmp_path / "run"), "-r", "ENCODER_WEIGHTS",
                           str(tmp_path / "uni.bin"))
    assert code == 1
    assert checks["data"]["verdict"] == "FAIL" and "cellseg data fetch bccd DIR" in checks["data"]["detail"]
    assert checks["weights"]["verdict"] == "FAIL" and "hf download MahmoodLab/UNI" in checks["weights"]["detail"]
    # evaluation may use a self-contained checkpoint: the missing weights file only warns there
    code, checks = _checks(capsys, "--notebook", "02_evaluate", "--", "-f", str(TINY), "-r", "ENCODER_WEIGHTS",
                           str(tmp_path / "uni.bin"))
    assert checks["weights"]["verdict"] == "WARN" and "data" not in checks


def test_weights_hash_and_bccd_layout(capsys, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"weights")
    bccd = tmp_path / "BCCD"
    (bccd / "Annotations").mkdir(parents=True)
    code, checks = _checks(capsys, "--", "-f", str(TINY), "-r", "ENCODER_WEIGHTS", str(tmp_path / "w.pt"),
                           "-p", "DATASET", "bccd", "-r", "DATA_ROOT", str(bccd), "-p", "RUN_DIR", str(tmp_path / "r"))
    assert checks["weights"]["detail"].endswith(f"SHA-256 {hashlib.sha256(b'weights').hexdigest()}")
    assert checks["data"]["verdict"] == "FAIL" and "lacks ['JPEGImages', 'ImageSets']" in checks["data"]["detail"]
    (tmp_path / "r" / "data").mkdir(parents=True)
    (tmp_path / "r" / "data" / "manifest.json").write_text("{}")  # a prepared cache needs no raw data
    code, checks = _checks(capsys, "--", "-f", str(TINY), "-p", "DATASET", "bccd", "-r", "DATA_ROOT",
                           str(tmp_path / "gone"), "-p", "RUN_DIR", str(tmp_path / "r"))
    assert checks["data"]["verdict"] == "OK" and code == 0


def test_bad_parameter_fails_naming_it(capsys):
    code, checks = _checks(capsys, "--", "-f", str(TINY), "-p", "PHSE", "2")
    assert code == 1 and checks["parameters"]["verdict"] == "FAIL" and "PHSE" in checks["parameters"]["detail"]


@pytest.mark.parametrize("driver, build, verdict, text", [
    ("535.104.05", "13.0", "FAIL", "needs driver >= 580.65.6"),
    ("535.104.05", "12.6", None, "driver 535.104.05, 1 GPU(s): NVIDIA A100-SXM4-40GB, 40960 MiB"),
    ("580.82.07", None, "WARN", "torch is a CPU-only build"),
])
def test_gpu_line_compares_the_driver_with_the_cuda_build(tmp_path, monkeypatch, driver, build, verdict, text):
    _fake_nvidia_smi(tmp_path, driver, monkeypatch)
    check = doctor.check_gpu(build, "auto")
    assert text in check.detail
    if verdict:
        assert check.verdict == verdict
    else:  # the driver is new enough; torch (a CUDA 13 build on this machine) then says whether it sees the GPU
        assert check.verdict in ("OK", "FAIL") and "torch" in check.detail


def test_cuda_device_without_gpu_and_setup_report_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    check = doctor.check_gpu(None, "cuda")
    assert check.verdict == "FAIL" and "DEVICE='cuda' but no nvidia-smi on PATH" in check.detail
    import torch

    report = tmp_path / "cellseg-torch.json"
    report.write_text(json.dumps({"build": "cpu", "reason": "TORCH=cpu given", "expected_cuda": "99.9",
                                  "fallback": None}))
    check, cuda = doctor.check_torch(report)
    assert cuda == torch.version.cuda and check.verdict == "FAIL" and "setup planned CUDA 99.9" in check.detail


def test_low_disk_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "FREE_DISK_WARN_GB", 1e12)
    check = doctor.check_disk(tmp_path / "a" / "b")
    assert check.verdict == "WARN" and f"at {tmp_path}" in check.detail and "may not fit" in check.detail


def test_only_the_named_checks(capsys):
    code, checks = _checks(capsys, "--checks", "parameters,data", "--", "-f", str(TINY))
    assert code == 0 and sorted(checks) == ["data", "parameters"]
    assert cli_main(["doctor", "--checks", "parameters,gpuu"]) == 2
    assert "--checks: unknown ['gpuu']" in capsys.readouterr().err


def test_torch_build_is_read_without_importing_torch(tmp_path, monkeypatch):
    import importlib.machinery

    import torch

    assert doctor.torch_build() == (torch.__version__, torch.version.cuda)
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "version.py").write_text("__version__ = '2.14.1+cpu'\ndebug = False\ncuda: Optional[str] = None\n")
    spec = importlib.machinery.ModuleSpec("torch", None, is_package=True)
    spec.submodule_search_locations = [str(fake)]
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name: spec)
    assert doctor.torch_build() == ("2.14.1+cpu", None)
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name: None)
    check, cuda = doctor.check_torch(tmp_path / "no-report.json")
    assert check.verdict == "FAIL" and "cannot find torch" in check.detail and cuda is None
