"""Process-group set-up for torchrun and SLURM launches, with a single-process fallback.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``srun`` sets SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID and the node list (the master is its first host). NCCL on GPUs, gloo on CPU. Only rank 0 logs and writes.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    note: str = ""  # why a multi-task allocation runs as one process (logged by setup_run)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30,
                             check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; sets MASTER_ADDR/MASTER_PORT for SLURM launches when missing."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if not _started_per_rank_by_srun(env):
            return DistEnv(note=(
                f"this process runs alone (rank 0 of 1) although the SLURM allocation has SLURM_NTASKS="
                f"{env['SLURM_NTASKS']} tasks: it was not started per rank by srun or torchrun (a Jupyter kernel, or the "
                "batch script itself), so no other rank would ever join. To train on every task, run the notebook per "
                "rank: `sbatch slurm/slurm_train_ddp.sh ...` (HPC_SETUP_GUIDE.md, section 5)."))
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return DistEnv()


def _started_per_rank_by_srun(env) -> bool:
    """srun gives every task of a multi-task step SLURM_STEP_NUM_TASKS; a batch script or an interactive shell (and a
    Jupyter kernel started from either) inherits the allocation's SLURM_NTASKS without it."""
    try:
        return int(env.get("SLURM_STEP_NUM_TASKS", "0")) > 1
    except ValueError:
        return False


def pick_device(pref: str, env: DistEnv) -> torch.device:
    """``DEVICE``: 'auto' is CUDA (this rank's local GPU) when present, else CPU; inside a GPU allocation without a
    usable CUDA device 'auto' is an error (:func:`cellseg.devices.check_auto_device`), never a silent CPU run."""
    if pref == "auto":
        if not torch.cuda.is_available():
            from cellseg.devices import check_auto_device

            check_auto_device()
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"DEVICE='{pref}' but no CUDA device is visible here. Use DEVICE='auto' or 'cpu'.")
        dev = torch.device(pref if ":" in pref else f"cuda:{env.local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(dev)
        return dev
    return torch.device(pref)


def init_distributed(env: DistEnv, device: torch.device) -> None:
    if not env.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():  # gloo on GPUs would be slow and is never what was meant
        raise RuntimeError(f"DDP on {device} needs NCCL, which this torch build ({torch.__version__}) lacks. Install a "
                           "CUDA build of torch with NCCL (HPC_SETUP_GUIDE.md, 'Installing').")
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    log.info("process group: %s, rank %d/%d via %s", backend, env.rank, env.world_size, env.launcher)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool) -> bool:
    """True on every rank when any rank says so (so all ranks stop at the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
