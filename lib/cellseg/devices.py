"""What the device really is: native bf16, GPUs the scheduler allocated, and why CUDA is missing when it should not be.

A job inside a GPU allocation whose driver is too old for the installed torch build sees no CUDA device; with
``DEVICE='auto'`` it used to train on the CPU for the whole time limit. Here that is an error that prints both sides
(torch's CUDA build, the driver and the CUDA version it supports) and the fix. ``torch.cuda.is_bf16_supported()``
counts emulated bf16 as support (T4, V100): native bf16 needs compute capability 8.0 (Ampere) or newer, which is what
``PRECISION='auto'`` and the memory model (:data:`cellseg.memory.GPUS`) go by.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

NATIVE_BF16_CAPABILITY = (8, 0)
# Variables through which SLURM (and plain CUDA) say which GPUs this job may use: lists of GPU ids, and counts
# (SLURM's ``--gpus*`` options, optionally typed as ``a100:2``).
GPU_ID_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")
GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")


def native_bf16(device: torch.device | str) -> bool:
    """True on CUDA devices that run bf16 in hardware (compute capability >= 8.0), False elsewhere.

    The CPU runs bf16 autocast too, but ``PRECISION='auto'`` keeps the CPU in fp32 (slow and only for checks there).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CAPABILITY


def gpu_allocation(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables that name GPUs for this process (SLURM's ``--gres``/``--gpus`` or
    ``CUDA_VISIBLE_DEVICES``); empty when none does. A count of 0 or ``NoDevFiles`` names none."""
    env = os.environ if environ is None else environ
    found = {}
    for var in GPU_ID_VARS:
        value = env.get(var, "").strip()
        if value and value.lower() != "nodevfiles" and not value.startswith("-"):
            found[var] = value
    for var in GPU_COUNT_VARS:
        value = env.get(var, "").strip()
        counts = [int(n) for n in re.findall(r"(?:^|[:,])(\d+)(?=,|$)", value)]
        if counts and sum(counts) > 0:
            found[var] = value
    return found


def driver_info() -> dict[str, str]:
    """The NVIDIA driver version and the CUDA version it supports, as ``nvidia-smi`` (or ``/proc``) tells; empty
    values when neither can be read."""
    info = {"driver": "", "driver_cuda": ""}
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    m = re.search(r"Driver Version:\s*([\d.]+)", out)
    if m:
        info["driver"] = m.group(1)
    m = re.search(r"CUDA Version:\s*([\d.]+)", out)
    if m:
        info["driver_cuda"] = m.group(1)
    if not info["driver"]:
        try:
            text = open("/proc/driver/nvidia/version").read()
            m = re.search(r"Kernel Module\s+([\d.]+)", text)
            info["driver"] = m.group(1) if m else ""
        except OSError:
            pass
    return info


def no_cuda_in_gpu_allocation(allocation: Mapping[str, str], driver: Mapping[str, str] | None = None) -> str:
    """The message for ``DEVICE='auto'`` in a GPU allocation where torch sees no CUDA device: the likely cause
    (torch's CUDA build vs the driver, both printed when readable) and the fix."""
    driver = driver_info() if driver is None else driver
    alloc = ", ".join(f"{k}={v}" for k, v in allocation.items())
    built = torch.version.cuda
    if built is None:
        cause = (f"this torch ({torch.__version__}) is a CPU-only build, so it can never use the GPUs. Install a CUDA "
                 "build of torch and torchvision (a matched pair) into this environment: HPC_SETUP_GUIDE.md, section 1 "
                 "(the PyTorch index for your driver's CUDA line).")
    else:
        have = (f"the driver is {driver['driver'] or 'unreadable (no nvidia-smi here)'}"
                + (f", which supports CUDA up to {driver['driver_cuda']}" if driver.get("driver_cuda") else ""))
        cause = (f"torch {torch.__version__} is built for CUDA {built} and {have}. A driver older than the CUDA build "
                 f"needs (CUDA 13.x: driver 580 or newer; 12.x: 525 or newer) hides every GPU from torch. Install the "
                 f"torch/torchvision pair built for the driver's CUDA line (the PyTorch index, e.g. "
                 f"https://download.pytorch.org/whl/cu126, as the first pip line of environment.yml: "
                 f"HPC_SETUP_GUIDE.md, section 1), or ask for nodes with a newer driver. "
                 f"`python -c \"import torch; torch.cuda.init()\"` prints torch's own reason.")
    return (f"DEVICE='auto' but this job was given GPUs ({alloc}) and torch sees no usable CUDA device: training "
            f"would run on the CPU for the whole time limit. Likely cause: {cause} To train on the CPU on purpose, set "
            f"DEVICE='cpu' (or submit without --gres/--gpus).")


def check_auto_device(environ: Mapping[str, str] | None = None) -> None:
    """``DEVICE='auto'`` without CUDA: fine outside a GPU allocation, an error inside one.

    Raises:
        RuntimeError: GPUs are allocated but torch cannot use any (message from :func:`no_cuda_in_gpu_allocation`).
    """
    allocation = gpu_allocation(environ)
    if allocation and not torch.cuda.is_available():
        raise RuntimeError(no_cuda_in_gpu_allocation(allocation))


def describe_device(device: torch.device) -> str:
    """One line for the start of every run's log: device, GPU name and memory, driver, torch and CUDA versions."""
    versions = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only torch)'}"
    if device.type != "cuda":
        return f"device {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), {versions}"
    props = torch.cuda.get_device_properties(device)
    cap = torch.cuda.get_device_capability(device)
    driver = driver_info()
    return (f"device {device}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {cap[0]}.{cap[1]} "
            f"({'native' if tuple(cap) >= NATIVE_BF16_CAPABILITY else 'no native'} bf16), driver "
            f"{driver['driver'] or 'unknown'}{' (CUDA ' + driver['driver_cuda'] + ')' if driver['driver_cuda'] else ''}, "
            f"{versions}")


__all__ = ["native_bf16", "gpu_allocation", "driver_info", "no_cuda_in_gpu_allocation", "check_auto_device",
           "describe_device", "NATIVE_BF16_CAPABILITY"]
