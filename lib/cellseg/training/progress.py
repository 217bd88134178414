"""The training progress line (one every ``LOG_EVERY`` optimizer steps): epoch, step, loss, best metric, learning
rates, throughput and the time left, so a SLURM log or ``make demo`` shows where a run stands without Jupyter."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def time_left_s(epoch: int, epochs: int, step: int, steps: int, sec_per_step: float, val_s: float | None) -> float:
    """Seconds until the last epoch ends, at this epoch's pace: the rest of this epoch, the later epochs, and one
    validation per epoch left (this one included) when a validation was timed already (else none is counted).

    ``epoch`` is 0-based, ``step`` the optimizer steps done in this epoch out of ``steps``.
    """
    later = max(0, epochs - epoch - 1)
    train = (steps - step) * sec_per_step + later * steps * sec_per_step
    return train + (later + 1) * (val_s or 0.0)


def progress_line(*, epoch: int, epochs: int, step: int, steps: int, loss: float, lrs: dict[str, float],
                  img_per_s: float, metric: str, best: float | None, sec_per_step: float,
                  val_s: float | None) -> str:
    """One log line; the time left says whether it includes validation (not before the first one was timed)."""
    best_text = f"best {metric} {best:.4f}" if best is not None else f"best {metric} -"
    left = format_duration(time_left_s(epoch, epochs, step, steps, sec_per_step, val_s))
    left_text = f"time left ~{left}" + ("" if val_s is not None else " + validation")
    lr_text = " ".join(f"{k}={v:.2e}" for k, v in lrs.items())
    return (f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss:.4f} {best_text} lr {lr_text} "
            f"{img_per_s:.1f} img/s {left_text}")
