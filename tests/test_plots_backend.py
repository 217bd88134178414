"""No library import changes the plotting backend (a Jupyter kernel keeps its inline plots)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_plotting_modules_keeps_the_inline_backend(tmp_path):
    # the modules that touch matplotlib at all (importing every module would mostly time torch/timm imports)
    lib = ROOT / "lib"
    modules = sorted(".".join(p.relative_to(lib).with_suffix("").parts) for p in (lib / "cellseg").rglob("*.py")
                     if "matplotlib" in p.read_text() and p.name != "__main__.py")
    modules = [m.removesuffix(".__init__") for m in modules]
    assert "cellseg.plots" in modules
    code = ("import importlib, matplotlib\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "import matplotlib.pyplot as plt\n"
            "from cellseg.plots import plot_history\n"
            "print(matplotlib.get_backend())\n")
    env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "module://matplotlib_inline.backend_inline"


def test_plots_are_written_without_a_display(tmp_path):
    history = [{"epoch": e, "train_loss": {"total": 1.0 / (e + 1)}, "lr": {"decoder": 1e-3}, "val": {"pq": 0.1 * e}}
               for e in range(3)]
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])
    code = (f"from cellseg.plots import plot_history\nprint(plot_history({history!r}, {str(tmp_path)!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all((tmp_path / f).stat().st_size > 0 for f in ("loss_curves.png", "lr_curves.png", "val_curves.png"))
