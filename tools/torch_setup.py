"""Pick, install and verify the torch build for this machine (``make setup TORCH=...``).

Standard library only: it runs before the virtual environment holds anything but pip.

    python tools/torch_setup.py plan --torch auto            # what `make setup` would install, and why
    python tools/torch_setup.py install --torch auto --python .venv/bin/python --report .venv/cellseg-torch.json
    python tools/torch_setup.py check --python .venv/bin/python --report .venv/cellseg-torch.json

``--torch`` is ``auto`` (``nvidia-smi`` present: the newest CUDA line its driver runs; absent: CPU), ``cpu``,
``cu126``, ``cu128``, ``cu130`` or ``pypi``. PyPI's torch Linux wheels are the CUDA 13.0 build; every other build
comes from the PyTorch index, added as an *extra* index for the torch pair only (the rest of the project is not
there). The builds are pinned with their local label (``torch==2.14.1+cpu``), so an installed build of the same
version is replaced and a newer PyPI release cannot win the resolution. When that index cannot be reached the
install falls back to PyPI's build and says so in one WARNING line; the report records the fallback, and
``check`` (and tests/test_install.py) compares the installed torch with the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

TORCH_VERSION = "2.14.1"
TORCHVISION_VERSION = "0.29.1"
INDEX_BASE = os.environ.get("TORCH_INDEX_BASE", "https://download.pytorch.org/whl")
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Build:
    """One torch build: where it comes from and what it needs."""

    name: str
    local: str | None  # local version label on the PyTorch index; None: PyPI's plain wheel
    cuda: str | None  # torch.version.cuda of the build (None: CPU only)
    min_driver: str | None  # NVIDIA Linux driver it needs (CUDA minor-version compatibility minimum)


# Driver minimums: NVIDIA's CUDA compatibility tables (CUDA 12.x runs on >= 525.60.13 through minor-version
# compatibility, CUDA 13.x needs the 580 series). Blackwell GPUs need cu128 or newer and a 570+ driver anyway.
BUILDS = {
    "cpu": Build("cpu", "cpu", None, None),
    "cu126": Build("cu126", "cu126", "12.6", "525.60.13"),
    "cu128": Build("cu128", "cu128", "12.8", "525.60.13"),
    "cu130": Build("cu130", None, "13.0", "580.65.06"),
    "pypi": Build("pypi", None, "13.0", "580.65.06"),
}
CHOICES = ("auto", *BUILDS)


@dataclass
class Plan:
    """What to install: the requested and chosen build, the pip arguments, and why."""

    requested: str
    build: str
    reason: str
    index: str | None
    packages: list[str]
    expected_cuda: str | None
    fallback: str | None = None

    def pip_args(self) -> list[str]:
        extra = ["--extra-index-url", self.index] if self.index else []
        return ["install", "-q", *self.packages, *extra]


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def detect_driver() -> tuple[str | None, str]:
    """The NVIDIA driver version from ``nvidia-smi`` (None when absent or failing) and how it was found."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "no nvidia-smi on PATH"
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvidia-smi failed ({e})"
    first = out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else ""
    if out.returncode != 0 or not first:
        return None, f"nvidia-smi failed (exit {out.returncode}: {(out.stderr or out.stdout).strip()[:200]})"
    return first, f"nvidia-smi reports driver {first}"


def choose_build(requested: str, driver: str | None, how: str) -> tuple[str, str]:
    """The build for ``requested`` on a machine with ``driver`` (None: no usable GPU); returns (build, reason)."""
    if requested not in CHOICES:
        raise SystemExit(f"torch_setup: TORCH must be one of {list(CHOICES)}, got '{requested}' "
                         "(e.g. make setup TORCH=cpu).")
    if requested != "auto":
        return requested, f"TORCH={requested} given"
    if driver is None:
        return "cpu", f"TORCH=auto and {how}: CPU-only build"
    d = _version_tuple(driver)
    for name in ("cu130", "cu128", "cu126"):
        if d >= _version_tuple(BUILDS[name].min_driver):
            if name == "cu128" and d < (570,):
                continue  # cu128 is for 570+ (Blackwell); older 5xx drivers get cu126
            return name, f"TORCH=auto and {how}: {name} (needs driver >= {BUILDS[name].min_driver})"
    raise SystemExit(f"torch_setup: {how}, older than any CUDA build of torch {TORCH_VERSION} supports "
                     f"(cu126 needs >= {BUILDS['cu126'].min_driver}). Ask the administrators for a newer driver, "
                     "or install the CPU build with make setup TORCH=cpu.")


def probe_index(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``url/torch/`` answers, else why not (pip would otherwise retry for minutes)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/torch/", timeout=timeout) as r:
            r.read(1)
        return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        return str(getattr(e, "reason", e))


def make_plan(requested: str, *, driver: str | None = None, how: str = "", probe=probe_index,
              detect=detect_driver) -> Plan:
    """The install plan; ``detect``/``probe`` are replaceable so tests can fake the machine."""
    if requested == "auto":
        driver, how = detect()
    build_name, reason = choose_build(requested, driver, how)
    build = BUILDS[build_name]
    if build.local is None:
        packages = [f"torch=={TORCH_VERSION}", f"torchvision=={TORCHVISION_VERSION}"]
        return Plan(requested, build_name, reason, None, packages, build.cuda)
    index = f"{INDEX_BASE.rstrip('/')}/{build.local}"
    packages = [f"torch=={TORCH_VERSION}+{build.local}", f"torchvision=={TORCHVISION_VERSION}+{build.local}"]
    problem = probe(index)
    if problem is None:
        return Plan(requested, build_name, reason, index, packages, build.cuda)
    pypi = BUILDS["pypi"]
    fallback = (f"the PyTorch index {index} is unreachable ({problem}), so PyPI's torch {TORCH_VERSION} "
                f"(CUDA {pypi.cuda} build, needs driver >= {pypi.min_driver}, several GB) is installed instead of "
                f"the {build_name} build")
    return Plan(requested, "pypi", reason, None, [f"torch=={TORCH_VERSION}", f"torchvision=={TORCHVISION_VERSION}"],
                pypi.cuda, fallback)


def installed_build(python: str) -> dict:
    """torch/torchvision versions and CUDA build of ``python``'s environment."""
    code = ("import json, torch, torchvision; print(json.dumps({'torch': torch.__version__, "
            "'torchvision': torchvision.__version__, 'cuda': torch.version.cuda}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"torch_setup: {python} cannot import torch/torchvision: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(report: dict, installed: dict) -> list[str]:
    """Problems between what setup reported and what is installed (empty: they agree)."""
    problems = []
    if installed["cuda"] != report["expected_cuda"]:
        problems.append(f"installed torch {installed['torch']} has CUDA build {installed['cuda']}, but setup "
                        f"planned build '{report['build']}' (CUDA {report['expected_cuda']})")
    if installed["torch"] != report["installed"]["torch"]:
        problems.append(f"installed torch is {installed['torch']}, setup installed {report['installed']['torch']}")
    if not installed["torch"].startswith(TORCH_VERSION) or not installed["torchvision"].startswith(TORCHVISION_VERSION):
        problems.append(f"installed torch {installed['torch']} / torchvision {installed['torchvision']}, "
                        f"expected the pair {TORCH_VERSION} / {TORCHVISION_VERSION}")
    return problems


def _warn_fallback(plan: Plan) -> None:
    if plan.fallback:
        print(f"WARNING: TORCH={plan.requested}: {plan.fallback}. Re-run make setup where the index is "
              "reachable (or set TORCH_INDEX_BASE to a mirror) to get that build.", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("plan", "install", "check"))
    ap.add_argument("--torch", default="auto", help=f"one of {list(CHOICES)}")
    ap.add_argument("--python", default=sys.executable, help="the environment's python")
    ap.add_argument("--report", help="JSON report written by install, read by check")
    args = ap.parse_args(argv)
    if args.action == "check":
        report = json.loads(open(args.report).read())
        problems = check(report, installed_build(args.python))
        for p in problems:
            print(f"torch_setup: {p}; re-run make setup TORCH={report['requested']}", file=sys.stderr)
        return 1 if problems else 0
    plan = make_plan(args.torch)
    if args.action == "plan":
        print(json.dumps(asdict(plan), indent=1))
        print("pip " + " ".join(plan.pip_args()))
        _warn_fallback(plan)
        return 0
    print(f"torch_setup: {plan.reason}; pip {' '.join(plan.pip_args())}", flush=True)
    rc = subprocess.run([args.python, "-m", "pip", *plan.pip_args()]).returncode
    if rc != 0:
        raise SystemExit(f"torch_setup: pip could not install the {plan.build} build ({' '.join(plan.packages)}); "
                         f"see pip's message above. Choose another build with make setup TORCH=... "
                         f"(one of {list(CHOICES)}).")
    installed = installed_build(args.python)
    report = {**asdict(plan), "installed": installed}
    problems = check(report, installed)
    if problems:
        raise SystemExit("torch_setup: " + "; ".join(problems))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    print(f"torch_setup: installed torch {installed['torch']} (CUDA build: {installed['cuda'] or 'none, CPU only'})",
          flush=True)
    _warn_fallback(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
