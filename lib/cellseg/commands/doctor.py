"""``cellseg doctor [--notebook NB] [-- PAPERMILL_ARGS...]``: what a bug report or a set-up fix needs, one verdict
per line.

Lines: Python, cellseg, torch and its CUDA build (with what ``make setup`` reported), torchvision's operators, the
NVIDIA driver and GPUs (and whether the driver runs this torch's CUDA build), Jupyter (kernelspec, JupyterLab,
ipywidgets), the encoder weights file and its SHA-256, the data (raw ``DATA_ROOT`` or the prepared cache), SLURM
commands, free disk in ``RUN_DIR``. Papermill arguments (``-f FILE``, ``-p NAME VALUE``, ...) after ``--`` select
the run being checked; without them the notebook's defaults are used. Exit 1 when a line is FAIL (the SLURM scripts
run it in the job header and stop there), else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"
FREE_DISK_WARN_GB = 10.0
# CUDA major line -> minimum Linux driver (NVIDIA's minor-version compatibility table), to compare with nvidia-smi.
MIN_DRIVER = {"12": (525, 60, 13), "13": (580, 65, 6)}
DATA_LAYOUT = {"bccd": ("Annotations", "JPEGImages", "ImageSets"), "pannuke": (), "consep": ("Train", "Test"),
               "folder": ()}


@dataclass
class Check:
    """One line of the report."""

    name: str
    verdict: str
    detail: str


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.replace("-", ".").split(".") if p.isdigit())


def check_python() -> Check:
    v = sys.version.split()[0]
    ok = sys.version_info >= (3, 11)
    return Check("python", OK if ok else FAIL, f"{v} at {sys.executable}" + ("" if ok else " (cellseg needs >= 3.11)"))


def check_cellseg() -> Check:
    import cellseg

    return Check("cellseg", OK, f"imported from {Path(cellseg.__file__).parent}")


def torch_build() -> tuple[str, str | None]:
    """(torch.__version__, torch.version.cuda), read from torch/version.py when possible: importing torch takes
    seconds, which every job header would pay."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'torch'")
    text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    version = re.search(r"^__version__\s*=\s*'([^']+)'", text, re.M)
    cuda = re.search(r"^cuda(?::[^=]*)?=\s*(None|'([^']*)')", text, re.M)
    if version is None or cuda is None:  # another layout: ask torch itself
        import torch

        return torch.__version__, torch.version.cuda
    return version.group(1), cuda.group(2)


def check_torch(report_path: Path) -> tuple[Check, str | None]:
    try:
        version, cuda = torch_build()
    except (ImportError, OSError) as e:
        return Check("torch", FAIL, f"cannot find torch: {e}; run make setup (or conda env create)"), None
    detail = f"{version}, CUDA build {cuda or 'none (CPU only)'}"
    verdict = OK
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        detail += f"; make setup chose '{report['build']}' ({report['reason']})"
        if report.get("fallback"):
            verdict, detail = WARN, detail + f"; fallback: {report['fallback']}"
        if report.get("expected_cuda") != cuda:
            verdict = FAIL
            detail += f"; but setup planned CUDA {report.get('expected_cuda')}: re-run make setup"
    return Check("torch", verdict, detail), cuda


def check_torchvision() -> Check:
    try:
        import torch
        import torchvision

        boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.1]])
        keep = torchvision.ops.nms(boxes, torch.tensor([1.0, 0.9]), 0.5)
    except Exception as e:  # a mismatched pair fails here with "operator torchvision::nms does not exist"
        return Check("torchvision", FAIL, f"{type(e).__name__}: {e}; torch and torchvision must be a matched pair "
                     "(re-run make setup)")
    return Check("torchvision", OK if keep.tolist() == [0] else FAIL, f"{torchvision.__version__}, nms operator works")


def nvidia_smi() -> tuple[str | None, list[str], str]:
    """(driver, GPU lines, how) from nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, [], "no nvidia-smi on PATH"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, [], f"nvidia-smi failed ({e})"
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or not lines:
        return None, [], f"nvidia-smi failed (exit {out.returncode}: {(out.stderr or out.stdout).strip()[:200]})"
    return lines[0].split(",")[0].strip(), [",".join(ln.split(",")[1:]).strip() for ln in lines], "nvidia-smi"


def check_gpu(cuda_build: str | None, device: str) -> Check:
    driver, gpus, how = nvidia_smi()
    wants_cuda = device.startswith("cuda")
    if driver is None:
        if wants_cuda:
            return Check("gpu", FAIL, f"DEVICE={device!r} but {how}: no usable NVIDIA GPU here (request one with "
                         "--gres=gpu:1, or set DEVICE cpu)")
        return Check("gpu", INFO, f"{how}: runs on CPU (DEVICE={device!r})")
    detail = f"driver {driver}, {len(gpus)} GPU(s): {'; '.join(gpus)}"
    if cuda_build is None:
        return Check("gpu", WARN, detail + "; but torch is a CPU-only build: re-run make setup (TORCH=auto picks "
                     "the CUDA build for this driver)")
    need = MIN_DRIVER.get(cuda_build.split(".")[0])
    if need and _version_tuple(driver) < need:
        return Check("gpu", FAIL, detail + f"; torch's CUDA {cuda_build} build needs driver >= "
                     f"{'.'.join(map(str, need))}: install an older CUDA build (make setup TORCH=cu126, or "
                     "environment-cu126.yml)")
    try:
        import torch

        available = torch.cuda.is_available()
    except Exception as e:  # a broken CUDA runtime raises here rather than returning False
        return Check("gpu", FAIL, detail + f"; torch.cuda.is_available() raised {type(e).__name__}: {e}")
    return Check("gpu", OK if available else FAIL, detail + ("; torch sees them" if available else
                 "; but torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES empty? no GPU allocated?)"))


def check_jupyter(kernel: str) -> list[Check]:
    from cellseg.slurm_helpers import SlurmHelperError, check_kernelspec

    out = []
    try:
        out.append(Check("kernelspec", OK, f"{kernel!r} at {check_kernelspec(kernel)} starts {sys.executable}"))
    except SlurmHelperError as e:
        out.append(Check("kernelspec", FAIL, str(e)))
    for module, what in (("jupyterlab", "JupyterLab (make lab)"), ("ipywidgets", "progress bars in notebooks")):
        try:
            mod = importlib.import_module(module)
            out.append(Check(module, OK, f"{getattr(mod, '__version__', '?')} ({what})"))
        except ImportError:
            out.append(Check(module, WARN, f"not installed ({what}); pip install {module}"))
    return out


def check_weights(cfg: Any, root: Path, hash_weights: bool, required: bool = True) -> Check:
    if not cfg.ENCODER_WEIGHTS:
        return Check("weights", INFO, f"ENCODER={cfg.ENCODER!r} with ENCODER_WEIGHTS empty: random initialisation")
    path = Path(cfg.ENCODER_WEIGHTS)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        # Evaluation may read a self-contained checkpoint instead: there a missing file is only a warning.
        return Check("weights", FAIL if required else WARN, f"ENCODER_WEIGHTS={cfg.ENCODER_WEIGHTS} not found at "
                     f"{path}; download it on a "
                     "login node (HPC_SETUP_GUIDE.md section 2: hf download MahmoodLab/UNI pytorch_model.bin "
                     "--local-dir weights/uni) or set ENCODER_WEIGHTS")
    size = path.stat().st_size
    detail = f"{path} ({size / 1e6:.1f} MB)"
    if hash_weights:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        detail += f", SHA-256 {h.hexdigest()}"
    return Check("weights", OK, detail)


def check_data(cfg: Any, root: Path) -> Check:
    def absolute(p: str | Path) -> Path:
        return Path(p) if Path(p).is_absolute() else root / p

    cache = absolute(cfg.data_cache)
    if (cache / "manifest.json").is_file():
        return Check("data", OK, f"prepared cache {cache} (manifest.json present)")
    if cfg.DATASET == "synthetic":
        return Check("data", OK, f"DATASET='synthetic': generated into {cache} by 00_prepare_data")
    data_root = absolute(cfg.DATA_ROOT) if cfg.DATA_ROOT else None
    fetch = {"bccd": "cellseg data fetch bccd DIR"}.get(cfg.DATASET, "copy the dataset")
    if data_root is None or not data_root.exists():
        return Check("data", FAIL, f"DATASET={cfg.DATASET!r}: DATA_ROOT={cfg.DATA_ROOT!r} does not exist ({data_root}) "
                     f"and no prepared cache at {cache}. On a login node (compute nodes are usually offline): "
                     f"{fetch} and set DATA_ROOT to DIR")
    missing = [d for d in DATA_LAYOUT.get(cfg.DATASET, ()) if not (data_root / d).exists()]
    if missing:
        return Check("data", FAIL, f"DATA_ROOT={data_root} lacks {missing} for DATASET={cfg.DATASET!r}; {fetch}")
    return Check("data", OK, f"DATASET={cfg.DATASET!r} at {data_root} (cache {cache} will be prepared)")


def check_slurm() -> Check:
    names = ("sbatch", "squeue", "scontrol", "sacct", "srun")
    found = {n: shutil.which(n) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if len(missing) == len(names):
        return Check("slurm", INFO, "no SLURM commands on PATH (fine on a workstation; on a cluster: module load slurm?)")
    if missing:
        return Check("slurm", WARN, f"missing {missing} (have {[n for n in names if found[n]]})")
    job = os.environ.get("SLURM_JOB_ID")
    return Check("slurm", OK, f"{', '.join(names)} on PATH" + (f"; in job {job} on {os.environ.get('SLURMD_NODENAME', '?')}"
                                                               if job else ""))


def check_disk(run_dir: Path) -> Check:
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    verdict = OK if free_gb >= FREE_DISK_WARN_GB else WARN
    return Check("disk", verdict, f"{free_gb:.1f} GB free at {probe} (RUN_DIR {run_dir})"
                 + ("" if verdict == OK else f"; under {FREE_DISK_WARN_GB:.0f} GB: checkpoints may not fit"))


CHECK_NAMES = ("python", "cellseg", "torch", "torchvision", "parameters", "gpu", "kernelspec", "jupyterlab",
               "ipywidgets", "data", "weights", "disk", "slurm")


def diagnose(papermill_args: list[str], notebook: str = "01_train", kernel: str = "cellseg",
             root: Path | None = None, hash_weights: bool = True, only: set[str] | None = None) -> list[Check]:
    """Every check (or those named in ``only``), in report order."""
    from cellseg.config import ConfigError, resolve_config
    from cellseg.slurm_helpers import SlurmHelperError, parse_papermill_args

    def wanted(name: str) -> bool:
        return only is None or name in only

    root = (root or Path.cwd()).resolve()
    checks = [c for c in (check_python() if wanted("python") else None,
                          check_cellseg() if wanted("cellseg") else None) if c]
    cuda_build = None
    if wanted("torch") or wanted("gpu"):
        torch_check, cuda_build = check_torch(Path(sys.prefix) / "cellseg-torch.json")
        if wanted("torch"):
            checks.append(torch_check)
    if wanted("torchvision"):
        checks.append(check_torchvision())
    cfg = None
    try:
        params, _ = parse_papermill_args(papermill_args)
        cfg = resolve_config(params, notebook)
        checks.append(Check("parameters", OK, f"notebooks/{notebook}.ipynb accepts {papermill_args or 'the defaults'}"))
    except (ConfigError, SlurmHelperError) as e:
        checks.append(Check("parameters", FAIL, str(e)))
    if not wanted("parameters"):
        checks.pop()
    if wanted("gpu"):
        checks.append(check_gpu(cuda_build, cfg.DEVICE if cfg else "auto"))
    checks += [c for c in check_jupyter(kernel) if wanted(c.name)] if any(map(wanted, CHECK_NAMES[6:9])) else []
    if cfg is not None:
        if notebook != "02_evaluate" and wanted("data"):
            checks.append(check_data(cfg, root))
        if wanted("weights"):
            checks.append(check_weights(cfg, root, hash_weights, required=notebook == "01_train"))
        run_dir = Path(cfg.RUN_DIR)
        if wanted("disk"):
            checks.append(check_disk(run_dir if run_dir.is_absolute() else root / run_dir))
    if wanted("slurm"):
        checks.append(check_slurm())
    return checks


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--notebook", default="01_train", choices=("00_prepare_data", "01_train", "02_evaluate"),
                   help="whose parameters the papermill arguments are (default 01_train)")
    p.add_argument("--kernel", default=os.environ.get("CELLSEG_KERNEL", "cellseg"), help="kernelspec name")
    p.add_argument("--no-hash", dest="hash_weights", action="store_false", help="skip the weights file's SHA-256")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--checks", default=None, metavar="NAME,...",
                   help=f"only these checks (comma-separated, from {', '.join(CHECK_NAMES)})")
    p.add_argument("papermill_args", nargs=argparse.REMAINDER,
                   help="after --: the run's papermill arguments (-f FILE, -p NAME VALUE, -r, -y)")
    return p


def add_parser(subparsers: Any) -> None:
    _configure(subparsers.add_parser("doctor", help="check the installation and a run's inputs, one verdict per line",
                                     description=__doc__.split("\n\n")[0].replace("\n", " ")))


def run(args: argparse.Namespace) -> int:
    pm_args = list(args.papermill_args)
    if pm_args[:1] == ["--"]:
        pm_args = pm_args[1:]
    only = None
    if args.checks:
        only = {c.strip() for c in args.checks.split(",") if c.strip()}
        unknown = sorted(only - set(CHECK_NAMES))
        if unknown:
            print(f"cellseg doctor: --checks: unknown {unknown}; choose from {', '.join(CHECK_NAMES)}", file=sys.stderr)
            return 2
    checks = diagnose(pm_args, args.notebook, args.kernel, hash_weights=args.hash_weights, only=only)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.verdict:<4}  {c.name:<{width}}  {c.detail}")
    failed = [c.name for c in checks if c.verdict == FAIL]
    if failed and not args.json:
        print(f"cellseg doctor: FAIL in {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cellseg.commands.doctor``: the same without loading the other subcommands (and torch) first."""
    parser = _configure(argparse.ArgumentParser(prog="cellseg doctor", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
