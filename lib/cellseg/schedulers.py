"""Learning-rate schedulers that declare when they step, so the loop steps each exactly then.

``interval`` is 'step' (once per *optimizer* step: never per micro-batch, never when AMP skipped the step),
'epoch' (once per finished epoch) or 'metric' (ReduceLROnPlateau, on the monitored validation metric). Every
closed form is a multiplicative factor on each group's own base rate, so groups keep their ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

SCHEDULE_INTERVAL = {
    "cosine_warmup": "step", "onecycle": "step", "cosine_restarts": "step",
    "exponential": "epoch", "step": "epoch", "cosine": "epoch", "constant": "epoch",
    "plateau": "metric",
}


def warmup_cosine_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def restarts_factor(step: int, period: int, min_ratio: float) -> float:
    """Cosine from 1 to ``min_ratio`` over ``period`` steps, restarting (SGDR, Loshchilov & Hutter 2017)."""
    p = (step % period) / period
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def epoch_factor(kind: str, epoch: int, *, gamma: float, step_size: int, epochs: int, min_ratio: float) -> float:
    """Per-epoch closed forms after ``epoch`` finished epochs."""
    if kind == "exponential":
        return gamma ** epoch
    if kind == "step":
        return gamma ** (epoch // step_size)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))
    if kind == "constant":
        return 1.0
    raise ValueError(f"not a per-epoch schedule: {kind}")


class Scheduler:
    """A torch scheduler plus the moment it must step."""

    def __init__(self, kind: str, inner, interval: str):
        self.kind, self.inner, self.interval = kind, inner, interval

    def step_on_optimizer_step(self) -> None:
        if self.interval == "step":
            self.inner.step()

    def step_on_epoch_end(self, metric: float | None = None) -> None:
        if self.interval == "epoch":
            self.inner.step()
        elif self.interval == "metric":
            if metric is None or math.isnan(metric):
                raise ValueError("SCHEDULER='plateau' needs the monitored validation metric after every epoch, got none.")
            self.inner.step(metric)

    def state_dict(self) -> dict:
        state = self.inner.state_dict()  # LambdaLR stores None for plain functions: rebuilt from the parameters
        return {"kind": self.kind, "interval": self.interval, "inner": state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint scheduler is '{state.get('kind')}', the parameters ask for '{self.kind}' "
                             f"(SCHEDULER). Resume with the same SCHEDULER or start a fresh run.")
        self.inner.load_state_dict(state["inner"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, *, steps_per_epoch: int) -> Scheduler:
    """Build ``SCHEDULER`` for a phase of ``EPOCHS`` epochs of ``steps_per_epoch`` optimizer steps.

    Raises:
        ValueError: unknown scheduler name (lists the allowed ones).
    """
    kind = cfg.SCHEDULER
    if kind not in SCHEDULE_INTERVAL:
        raise ValueError(f"SCHEDULER must be one of {list(SCHEDULE_INTERVAL)}, got '{kind}'.")
    total = max(1, cfg.EPOCHS * steps_per_epoch)
    fn: Callable[[int], float]
    if kind == "cosine_warmup":
        def fn(s):
            return warmup_cosine_factor(s, cfg.WARMUP_STEPS, total, cfg.MIN_LR_RATIO)
        inner = LambdaLR(optimizer, fn)
    elif kind == "cosine_restarts":
        period = max(1, cfg.RESTART_EPOCHS * steps_per_epoch)

        def fn(s):
            return restarts_factor(s, period, cfg.MIN_LR_RATIO)
        inner = LambdaLR(optimizer, fn)
    elif kind == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        pct = min(0.5, max(0.01, cfg.WARMUP_STEPS / total))
        inner = OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total + 1, pct_start=pct,
                           cycle_momentum=False)
    elif kind == "plateau":
        inner = ReduceLROnPlateau(optimizer, mode=cfg.MONITOR_MODE, factor=cfg.PLATEAU_FACTOR,
                                  patience=cfg.PLATEAU_PATIENCE)
    else:
        def fn(e):
            return epoch_factor(kind, e, gamma=cfg.GAMMA, step_size=cfg.STEP_SIZE, epochs=cfg.EPOCHS,
                                min_ratio=cfg.MIN_LR_RATIO)
        inner = LambdaLR(optimizer, fn)
    return Scheduler(kind, inner, SCHEDULE_INTERVAL[kind])


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Param-group name -> learning rate now."""
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
