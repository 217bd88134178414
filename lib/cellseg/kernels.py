"""Papermill kernels that talk over local IPC sockets instead of TCP, each with its own runtime directory.

ipykernel warns "Kernel is running over TCP without encryption" once per kernel started over TCP: four lines per
``make demo`` and one per notebook in every SLURM log, about ports that only this machine uses. A kernel on the same
machine can use Unix sockets (``transport='ipc'``) in its runtime directory, which nobody else can reach and which
need no free port (no clash between kernels starting at once on a shared node).

``python -m cellseg.kernels ARGS`` is the ``papermill`` command with such kernels (the SLURM scripts use it);
:func:`engine_kwargs` gives the same to ``papermill.execute_notebook`` (``cellseg.workflow``).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from traitlets import default

log = logging.getLogger(__name__)

# Unix socket paths are limited to 107 bytes (sun_path); the kernel adds "-<port>" to "<connection file>-ipc".
MAX_SOCKET_PATH = 100


def runtime_dir() -> str:
    """Where connection files and sockets go: $JUPYTER_RUNTIME_DIR (the SLURM scripts set one per job and rank)."""
    from jupyter_core.paths import jupyter_runtime_dir

    return jupyter_runtime_dir()


class IPCKernelManager(AsyncKernelManager):
    """A kernel manager whose kernels listen on Unix sockets (TCP when the runtime path is too long for one)."""

    @default("transport")
    def _default_transport(self) -> str:
        probe = os.path.join(runtime_dir(), "kernel-00000000-0000-0000-0000-000000000000-ipc-12345")
        if len(probe) <= MAX_SOCKET_PATH:
            return "ipc"
        log.warning("Jupyter runtime directory %s is too long for Unix sockets (%d > %d characters): the kernel uses "
                    "TCP; set JUPYTER_RUNTIME_DIR to a shorter path", runtime_dir(), len(probe), MAX_SOCKET_PATH)
        return "tcp"

    @default("ip")
    def _default_ip(self) -> str:
        # jupyter_client's ipc default is "kernel-ipc" relative to the working directory when the address is read
        # before the connection file is named: two kernels started at once (DDP ranks in one folder) then bind the
        # same socket ("Address already in use"). A per-process path in the runtime directory cannot collide.
        if self.transport == "ipc":
            os.makedirs(runtime_dir(), exist_ok=True)  # a fresh account has no Jupyter runtime directory yet
            return os.path.join(runtime_dir(), f"cs-{os.getpid()}-{uuid.uuid4().hex[:8]}-ipc")
        return "127.0.0.1"


def engine_kwargs() -> dict[str, Any]:
    """Extra ``papermill.execute_notebook`` keyword arguments that select :class:`IPCKernelManager`."""
    return {"kernel_manager_class": IPCKernelManager}


def register_engine() -> None:
    """Make papermill's default engine start :class:`IPCKernelManager` kernels."""
    from papermill.engines import NBClientEngine, papermill_engines

    class IPCEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            kwargs.setdefault("kernel_manager_class", IPCKernelManager)
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(None, IPCEngine)
    papermill_engines.register("nbclient", IPCEngine)


def main(argv: list[str] | None = None) -> int:
    """The ``papermill`` command line, with IPC kernels."""
    from papermill.cli import papermill

    register_engine()
    os.makedirs(runtime_dir(), exist_ok=True)
    try:
        papermill.main(args=sys.argv[1:] if argv is None else argv, prog_name="papermill", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
