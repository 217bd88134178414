"""Run set-up shared by the notebooks and the ``cellseg`` command: seed, determinism, device, distributed, logging,
run directory and the resolved configuration written next to the outputs."""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cellseg.config import Config
from cellseg.distributed import DistEnv, detect_env, init_distributed, pick_device

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    cfg: Config
    env: DistEnv
    device: torch.device
    run_dir: Path

    @property
    def is_main(self) -> bool:
        return self.env.is_main


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def configure_logging(is_main: bool, log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Library logs to stdout on rank 0 only (other ranks: warnings and above)."""
    root = logging.getLogger("cellseg")
    root.setLevel(level if is_main else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_cellseg", False):
            root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        h._cellseg = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False


def enter_project_root() -> None:
    """Jupyter starts kernels in ``notebooks/``; relative paths in the parameters mean the project root, as headless."""
    cwd = Path.cwd()
    if cwd.name == "notebooks" and (cwd.parent / "lib" / "cellseg").is_dir():
        os.chdir(cwd.parent)
        log.info("working directory: %s (relative paths in the parameters are relative to it)", cwd.parent)


def setup_run(cfg: Config, notebook: str) -> RunContext:
    """Seed, pick the device, join the process group, configure logging and write ``RUN_DIR/config_<notebook>.json``."""
    enter_project_root()
    env = detect_env()
    device = pick_device(cfg.DEVICE, env)
    init_distributed(env, device)
    run_dir = Path(cfg.RUN_DIR)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{notebook}_phase{cfg.PHASE}" if notebook == "01_train" else notebook  # phases must not overwrite
    configure_logging(env.is_main, run_dir / "logs" / f"{tag}.log")
    if env.note:
        log.warning(env.note)
    seed_everything(cfg.SEED + env.rank, cfg.DETERMINISTIC)
    if env.is_main:
        cfg.save(run_dir / f"config_{tag}.json")
    log.info("%s: device %s, rank %d/%d, run dir %s", notebook, device, env.rank, env.world_size, run_dir)
    from cellseg.devices import describe_device

    log.info(describe_device(device))
    return RunContext(cfg, env, device, run_dir)
