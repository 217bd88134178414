"""Full vs weights-only checkpoint payloads (issue 15).

``latest.pt`` and the epoch files are ``contents='full'``: network, optimizer (AdamW's two moments), scheduler,
GradScaler and RNG states, everything an exact resume needs. ``best.pt`` and exported files are ``'weights'``: the
same network, base-weights identity, architecture, LoRA settings, parameters, progress and run identity, without the
resume-only state, which is twice the size of the trained weights with AdamW and which evaluation, prediction and
Phase 2 never read. ``RESUME='auto'`` does not continue from a weights-only file (a fresh optimizer mid-run would
quietly change the training); naming it in ``RESUME`` does, loudly.
"""

from __future__ import annotations

from pathlib import Path

FULL, WEIGHTS = "full", "weights"
# what a weights-only payload leaves out: the state only an exact resume needs, and the descriptions of that state
# (a weights file is compared with the network only, never with the optimizer or schedule the parameters build)
RESUME_ONLY = ("optimizer", "optimizer_params", "scheduler", "scheduler_interval", "scheduler_kind", "scaler", "rng",
               "rng_ranks")


class WeightsOnlyCheckpoint(ValueError):
    """``RESUME='auto'`` would continue from a weights-only file (``best.pt``) with a fresh optimizer and schedule;
    the message names the file, why the full ones were unusable, and the ways out."""

    def __init__(self, message: str, *, path: str | Path, rejected: list[str] | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.rejected = rejected or []


class LandedOnWeights(Exception):
    """Internal: a resume candidate in 'auto' mode is weights-only (the manager words the refusal)."""

    def __init__(self, side: dict):
        super().__init__("weights-only checkpoint")
        self.side = side


def weights_only(state: dict) -> dict:
    """``state`` (a full payload) as a weights-only payload: the same network, base-weights identity, architecture,
    LoRA settings, parameters, progress and run identity; the entries of ``RESUME_ONLY`` set to None and
    ``contents='weights'``. A shallow copy: the tensors are shared, nothing is copied."""
    return {**state, **dict.fromkeys(RESUME_ONLY), "contents": WEIGHTS}


def contents_of(meta: dict) -> str:
    """'full' or 'weights' for a payload or sidecar. Files written before the field existed: exported files are
    weights-only, every other file (``best.pt`` included, then a byte copy of ``latest.pt``) is full."""
    value = meta.get("contents")
    if value in (FULL, WEIGHTS):
        return value
    return WEIGHTS if meta.get("exported_from") or meta.get("reason") == "export" else FULL


def refusal(directory: Path, phase: int, path: Path, side: dict, unusable: list[str]) -> str:
    """The message of :class:`WeightsOnlyCheckpoint`: the file, why each full file was unusable, the ways out."""
    epoch, step = side.get("epoch"), side.get("step")
    return (f"RESUME='auto' stops: the only checkpoint of {directory} it could continue from is {path.name} "
            f"(epoch {epoch}, step {step}), which holds weights only (no optimizer moments, learning-rate "
            "schedule, GradScaler or RNG states: best.pt is written weights-only to stay small). Continuing from "
            "it would silently restart AdamW and the schedule in the middle of the run.\n"
            f"  The full checkpoints were unusable: {'; '.join(unusable) or 'none found'}.\n"
            "Ways out:\n"
            f"  - RESUME={str(path)!r}: continue from its weights and counters (epoch {epoch}) with a fresh "
            "optimizer, the schedule restarted and the random streams as seeded (announced in the log and in "
            "ledger.jsonl as 'weights_only_resume');\n"
            f"  - RESUME='never': start Phase {phase} over (the checkpoints are moved aside, nothing is "
            "deleted);\n"
            "  - or put a full latest.pt / epoch_XXXX.pt back (with its .json sidecar) and run again.")
