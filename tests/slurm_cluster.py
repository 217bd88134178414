"""A throw-away single-node SLURM cluster on this host, for testing the ``slurm/`` batch scripts for real.

It writes a munge key and a generated ``slurm.conf`` into a temporary directory (own ports, own state, spool and log
directories, no cgroups: ``proctrack/linuxproc``, ``task/none``), starts ``munged``, ``slurmctld`` and ``slurmd`` in the
foreground as child processes, waits until ``sinfo`` reports the node idle and stops the daemons by their pids. It
installs nothing: the Debian packages ``slurm-wlm`` and ``munge`` must be there (``apt-get install -y slurm-wlm munge``);
without them :func:`require_binaries` raises :class:`SlurmUnavailable` naming what is missing.

Every client command gets ``SLURM_CONF`` pointing at the generated file (:attr:`SlurmCluster.env`), and jobs inherit it
(``sbatch`` exports the environment), so ``scontrol``/``squeue`` inside the batch scripts talk to this cluster.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
INSTALL_HINT = "Install them with `apt-get update && apt-get install -y slurm-wlm munge` (`.ci/run` does this before `make test`)."
# Job states after which a job does nothing more (a requeued job passes through REQUEUED/PENDING instead).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"})


class SlurmUnavailable(RuntimeError):
    """The SLURM or munge binaries are missing, or the daemons did not come up; the message says what and how to fix."""


def require_binaries(names: Iterable[str] | None = None) -> dict[str, str]:
    """Map each binary (default: :data:`BINARIES`) to its path.

    Raises:
        SlurmUnavailable: one or more are not on ``PATH`` (or in ``/usr/sbin``), naming them and the install command.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {name: shutil.which(name, path=search) for name in (BINARIES if names is None else names)}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise SlurmUnavailable(f"SLURM test cluster needs {missing}, which are not installed. {INSTALL_HINT}")
    return {name: str(path) for name, path in found.items()}


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free right now (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_scontrol_record(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output (one line of ``Key=Value`` pairs) as a dict; values may contain spaces."""
    record: dict[str, str] = {}
    # Keys are CamelCase words followed by '='; a value runs until the next ' Key='.
    for match in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s[A-Za-z][A-Za-z0-9_:/]*=|\s*$)", text.strip()):
        record[match.group(1)] = match.group(2)
    return record


@dataclass
class SlurmCluster:
    """A running test cluster: its directory, config, node and partition, and the daemons' processes."""

    root: Path
    conf: Path
    node: str
    cpus: int
    partition: str = "debug"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and jobs: the caller's plus ``SLURM_CONF``."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin"])
        # A SLURM_* variable leaking in from an outer allocation would confuse sbatch and the scripts.
        for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[key]
        return env

    def run(self, args: Sequence[str], check: bool = True, env: Mapping[str, str | None] | None = None,
            cwd: str | Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a client command against this cluster; ``check`` raises with its output on a non-zero exit.

        ``env`` adds variables to :attr:`env`; a value of None removes one.
        """
        full_env = {k: v for k, v in (self.env | dict(env or {})).items() if v is not None}
        proc = subprocess.run(list(args), env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                               f"stderr: {proc.stderr}")
        return proc

    def sbatch(self, script: str | Path | None, args: Sequence[str] = (), options: Sequence[str] = (),
               env: Mapping[str, str | None] | None = None, cwd: str | Path | None = None) -> int:
        """Submit ``script`` (None with ``--wrap`` in ``options``) with sbatch ``options`` and script ``args``.

        Returns the job id.
        """
        target = [] if script is None else [str(script), *args]
        proc = self.run(["sbatch", "--parsable", *options, *target], env=env, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """The job's ``scontrol show job`` record (kept for ``MinJobAge`` after it ends)."""
        return parse_scontrol_record(self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout)

    def wait_job(self, job_id: int, until: Iterable[str] = FINAL_STATES, timeout: float = 120,
                 predicate=None) -> dict[str, str]:
        """Poll the job until its state is in ``until`` (and ``predicate(record)`` holds, if given).

        Raises:
            TimeoutError: not reached within ``timeout`` seconds; the message has the last record and the job's log.
        """
        wanted = set(until)
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if record.get("JobState") in wanted and (predicate is None or predicate(record)):
                return record
            time.sleep(0.5)
        log_text = ""
        if record.get("StdOut") and Path(record["StdOut"]).is_file():
            log_text = Path(record["StdOut"]).read_text()[-4000:]
        raise TimeoutError(f"job {job_id} did not reach {sorted(wanted)} within {timeout:.0f} s; last record: "
                           f"{record}\n--- job log tail ---\n{log_text}\n--- slurmctld log tail ---\n"
                           f"{self.log_tail('slurmctld')}")

    def log_tail(self, daemon: str, chars: int = 3000) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def stop(self) -> None:
        """Cancel jobs still queued or running (a failed test may leave one), then terminate the daemons by pid
        (slurmd, slurmctld, munged) and kill what did not exit."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


def _die_with_parent() -> None:
    """``preexec_fn`` for the daemons: SIGTERM when the test process dies (even by SIGKILL), so none outlives it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() still ends them


def _write_munge_key(path: Path) -> None:
    path.write_bytes(os.urandom(1024))
    path.chmod(0o600)


def slurm_conf_text(root: Path, node: str, cpus: int, ports: Sequence[int], munge_socket: Path,
                    partition: str = "debug", cred_expire: int = 5, gpus: int = 2) -> str:
    """The generated ``slurm.conf``: one node (this host), cgroup-free, everything under ``root``.

    ``cred_expire`` is also how long a requeued job waits before it may start again (SLURM's default: 120 s).
    ``gpus`` fake GPUs (a ``gres.conf`` count without device files) let the scripts' ``--gres=gpu:N`` lines be
    scheduled unchanged; no CUDA device is behind them, the tiny config runs on CPU.
    """
    ctld_port, slurmd_port, srun_lo = ports[0], ports[1], ports[2]
    user = os.environ.get("USER") or "root"
    return f"""# generated by tests/slurm_cluster.py
ClusterName=cellsegtest
SlurmctldHost={node}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SrunPortRange={srun_lo}-{srun_lo + 200}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{gpus} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def start_cluster(root: str | Path, cpus: int | None = None, timeout: float = 30) -> SlurmCluster:
    """Write the configuration under ``root`` and start munged, slurmctld and slurmd; wait for the node to be idle.

    Args:
        root: an empty (or new) directory for keys, config, state, spool and logs.
        cpus: CPUs the node advertises (default: this host's count, at least 2 so a 2-task job fits).
        timeout: seconds to wait for each daemon and for the idle node.

    Raises:
        SlurmUnavailable: binaries missing, or a daemon exited or the node did not become idle in time (with its log).
    """
    bins = require_binaries()
    root = Path(root).resolve()
    for sub in ("state", "spool", "run", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    node = socket.gethostname().split(".")[0]
    cpus = cpus or max(2, os.cpu_count() or 1)
    munge_socket = root / "munge" / "munge.socket"
    key = root / "munge" / "munge.key"
    _write_munge_key(key)
    (root / "plugstack.conf").write_text("")
    n_gpus = max(2, cpus)
    for i in range(n_gpus):
        (root / "run" / f"fakegpu{i}").touch()
    (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File={root}/run/fakegpu[0-{n_gpus - 1}]\n")
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf_text(root, node, cpus, free_ports(3), munge_socket, gpus=n_gpus))
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus)
    try:
        _spawn(cluster, "munged", [bins["munged"], "--foreground", "--force", f"--socket={munge_socket}",
                                   f"--key-file={key}", f"--pid-file={root / 'run' / 'munged.pid'}",
                                   f"--log-file={root / 'log' / 'munged.log'}",
                                   f"--seed-file={root / 'munge' / 'munged.seed'}"])
        _wait_for(lambda: munge_socket.exists(), timeout, cluster, "munged", "munged.stderr")
        _spawn(cluster, "slurmctld", [bins["slurmctld"], "-D", "-c", "-f", str(conf)])
        _wait_for(lambda: cluster.run(["scontrol", "ping"], check=False).returncode == 0, timeout, cluster, "slurmctld",
                  "slurmctld.log")
        _spawn(cluster, "slurmd", [bins["slurmd"], "-D", "-N", node, "-f", str(conf)])
        _wait_for(lambda: _node_state(cluster) == "idle", timeout, cluster, "slurmd", "slurmd.log")
    except BaseException:
        cluster.stop()
        raise
    log.info("SLURM test cluster up: node %s, %d CPUs, conf %s", node, cpus, conf)
    return cluster


def _spawn(cluster: SlurmCluster, name: str, argv: list[str]) -> None:
    """Start a daemon in the foreground as a child (its stderr in ``log/<name>.stderr``)."""
    with open(cluster.root / "log" / f"{name}.stderr", "w") as err:
        cluster.procs[name] = subprocess.Popen(argv, env=cluster.env, stdout=subprocess.DEVNULL, stderr=err,
                                               preexec_fn=_die_with_parent)


def _node_state(cluster: SlurmCluster) -> str:
    proc = cluster.run(["sinfo", "-h", "-N", "-n", cluster.node, "-o", "%t"], check=False)
    return proc.stdout.strip().rstrip("*~#$@") if proc.returncode == 0 else ""


def _wait_for(condition, timeout: float, cluster: SlurmCluster, daemon: str, log_name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = cluster.procs.get(daemon)
        if proc is not None and proc.poll() is not None:
            break
        if condition():
            return
        time.sleep(0.2)
    path = cluster.root / "log" / log_name
    tail = path.read_text(errors="replace")[-3000:] if path.is_file() else "(no log)"
    proc = cluster.procs.get(daemon)
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else "still running"
    raise SlurmUnavailable(f"{daemon} did not come up within {timeout:.0f} s ({state}); {path}:\n{tail}")


__all__ = ["SlurmCluster", "SlurmUnavailable", "start_cluster", "require_binaries", "free_ports",
           "parse_scontrol_record", "slurm_conf_text", "FINAL_STATES", "INSTALL_HINT"]
