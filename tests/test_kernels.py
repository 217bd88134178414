"""Papermill kernels over IPC: no "Kernel is running over TCP without encryption" warning, same results."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from cellseg.kernels import MAX_SOCKET_PATH, IPCKernelManager

ROOT = Path(__file__).resolve().parents[1]


def test_papermill_cli_with_ipc_kernels_prints_no_tcp_warning(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "cellseg", "language": "python",
                                                           "display_name": "Python (cellseg)"}})
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os\nprint('x is', x, os.environ['JUPYTER_RUNTIME_DIR'])")]
    nbformat.write(nb, tmp_path / "in.ipynb")
    runtime = Path(tempfile.mkdtemp(prefix="cs-rt-", dir="/tmp"))  # short: Unix socket paths are limited
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "cellseg.kernels", str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                          "-k", "cellseg", "-p", "x", "5", "--log-output", "--no-progress-bar"],
                         capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"x is 5 {runtime}" in out.stderr + out.stdout  # log_output streams the cell's print
    assert "without encryption" not in out.stderr + out.stdout
    shutil.rmtree(runtime, ignore_errors=True)


def test_too_long_runtime_path_falls_back_to_tcp(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / ("d" * MAX_SOCKET_PATH)))
    assert IPCKernelManager().transport == "tcp"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", "/tmp/rt")
    assert IPCKernelManager().transport == "ipc"


def test_two_kernel_managers_never_share_a_socket_path(monkeypatch):
    """DDP ranks start their kernels at the same moment in the same folder: each manager's IPC address is its own,
    absolute, in the runtime directory (jupyter_client's default, a relative 'kernel-ipc', made two ranks collide)."""
    import tempfile

    from cellseg.kernels import IPCKernelManager

    tmp_path = tempfile.mkdtemp(prefix="k", dir="/tmp")  # short: Unix socket paths are limited
    os.rmdir(tmp_path)  # a fresh account has no runtime directory yet: the manager makes it
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", tmp_path)

    a, b = IPCKernelManager(), IPCKernelManager()
    assert a.transport == b.transport == "ipc"
    assert a.ip != b.ip and a.ip.startswith(tmp_path) and b.ip.startswith(tmp_path)
    assert os.path.isdir(tmp_path)
