"""Cooperative stopping: a signal (SIGTERM, SIGUSR1/2, ...), a ``STOP`` file or a wall-clock deadline (``STOP_AT``)
sets a flag; the training loop checks :attr:`StopRequest.reason` after every optimizer step, saves ``latest`` at that
step boundary, records the reason and ends cleanly with a "preempted, resumable" marker.

Nothing is saved inside the signal handler (Lightning's SLURM handler does, and hangs have been reported): the handler
only sets a flag. SLURM's ``--signal=B:USR1@120`` reaches the batch shell, torchrun forwards only INT/TERM/HUP/QUIT
to workers, and NCCL may catch USR1, so a ``STOP`` file checked between steps is the one route that reaches every
launcher.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_STATUSES = ("finished", "preempted", "failed")


def parse_deadline(deadline: str | float | int | None) -> float | None:
    """``STOP_AT`` -> seconds since the epoch: an ISO time ('2025-06-01T17:30', local time unless it carries an
    offset), seconds since the epoch (number or numeric string), or ''/None for no deadline.

    Raises:
        ValueError: anything else, naming STOP_AT and the accepted forms.
    """
    if deadline is None or (isinstance(deadline, str) and not deadline.strip()):
        return None
    if isinstance(deadline, bool):
        raise ValueError(f"STOP_AT must be an ISO time or seconds since the epoch, got {deadline!r}.")
    if isinstance(deadline, (int, float)):
        value = float(deadline)
    else:
        text = deadline.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                value = datetime.fromisoformat(text).timestamp()
            except ValueError as e:
                raise ValueError(
                    f"STOP_AT must be an ISO time such as '2025-06-01T17:30:00' (local time, or with an offset like "
                    f"'+02:00') or seconds since the epoch such as '1748791800', got {deadline!r}. Set it with "
                    "`-p STOP_AT ...` or leave it '' for no deadline.") from e
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"STOP_AT must be a finite time after 1970, got {deadline!r}.")
    return value


def signal_number(name: str) -> signal.Signals:
    """'SIGTERM' -> ``signal.SIGTERM``.

    Raises:
        ValueError: a name this platform does not know (lists the valid STOP_SIGNALS).
    """
    sig = getattr(signal, name, None) if isinstance(name, str) and name.startswith("SIG") else None
    if not isinstance(sig, signal.Signals) or name.startswith("SIG_"):
        raise ValueError(f"STOP_SIGNALS entries must be signal names such as 'SIGTERM', 'SIGUSR1', 'SIGUSR2', got "
                         f"{name!r}. Set STOP_SIGNALS in the parameters cell or with `-p STOP_SIGNALS ...`.")
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"STOP_SIGNALS cannot contain {name}: it cannot be caught. Use 'SIGTERM', 'SIGUSR1' or "
                         "'SIGUSR2'.")
    return sig


class StopRequest:
    """Collects stop requests; :attr:`reason` is None until one arrives.

    Args:
        signals: names of the signals that request a stop (``STOP_SIGNALS``), e.g. ['SIGTERM', 'SIGUSR1'].
        stop_file: a file whose existence requests a stop (``RUN_DIR/STOP``); None for none.
        deadline: ``STOP_AT``, see :func:`parse_deadline`.
        file_check_interval: seconds between two looks at ``stop_file`` (a ``stat`` on a cluster filesystem per step
            from every rank adds up); 0 checks every call.
        chain: also call a previously installed Python handler after setting the flag (never the default SIGINT
            handler, which would raise KeyboardInterrupt mid-step).

    A second SIGINT while a stop is pending raises KeyboardInterrupt, so an interactive user can still break out.
    """

    def __init__(self, signals: list[str], *, stop_file: str | Path | None = None,
                 deadline: str | float | None = None, file_check_interval: float = 1.0, chain: bool = False):
        self.signals = [signal_number(s) for s in signals]
        self.stop_file = Path(stop_file) if stop_file else None
        self.deadline = parse_deadline(deadline)
        self.file_check_interval = float(file_check_interval)
        self.chain = chain
        self._signal: str | None = None
        self._file_reason: str | None = None
        self._last_file_check = -math.inf
        self._previous: dict[signal.Signals, Any] = {}

    # ----- handlers -----
    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        if self._signal is None:
            self._signal = name  # only a flag: no I/O, no locks, no saving in a handler
        prev = self._previous.get(signal.Signals(signum))
        if self.chain and callable(prev) and prev is not signal.default_int_handler:
            prev(signum, frame)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopRequest:
        """Install the handlers (main thread only; elsewhere logs and does nothing). Returns self."""
        if threading.current_thread() is not threading.main_thread():
            log.info("StopRequest.install() called outside the main thread: signal handlers not installed; the STOP "
                     "file and STOP_AT still work")
            return self
        if self.installed:
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        log.info("stop requests: signals %s, STOP file %s, deadline %s", [s.name for s in self.signals],
                 self.stop_file, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.deadline))
                 if self.deadline else "none")
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    # ----- the check -----
    @property
    def reason(self) -> str | None:
        """Why to stop (a signal, the STOP file, the deadline), or None. Cheap: a flag, a clock read, and a ``stat``
        at most every ``file_check_interval`` seconds."""
        if self._signal is not None:
            return f"signal {self._signal}"
        if self.deadline is not None and time.time() >= self.deadline:
            return f"deadline STOP_AT reached ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.deadline))})"
        if self.stop_file is not None:
            if self._file_reason is not None:
                return self._file_reason
            now = time.monotonic()
            if now - self._last_file_check >= self.file_check_interval:
                self._last_file_check = now
                if self.stop_file.exists():
                    self._file_reason = f"STOP file {self.stop_file}"
                    return self._file_reason
        return None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        """Ask for a stop from code (e.g. a notebook cell or a test)."""
        self._signal = self._signal or reason


def write_run_status(path: str | Path, status: str, reason: str | None, **extra: Any) -> dict:
    """Write the run's small JSON status marker atomically (the SLURM scripts read it: "preempted, resumable" vs
    "finished" vs "failed"; torchrun's exit code alone cannot tell). Returns the record.

    Raises:
        ValueError: ``status`` is not one of 'finished', 'preempted', 'failed'.
    """
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {list(RUN_STATUSES)}, got {status!r}.")
    from cellseg.checkpoint.atomic import atomic_write_json

    record = {"status": status, "resumable": extra.pop("resumable", status == "preempted"), "reason": reason,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
              **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json.loads(json.dumps(record, default=str)))
    return record


def read_run_status(path: str | Path) -> dict | None:
    """The status marker, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank says so (all-reduce MAX), so that all ranks stop at the same step; the
    identity without an initialised process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
