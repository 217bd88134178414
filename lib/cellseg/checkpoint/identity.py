"""A run's identity: what it trains and how, stored in every checkpoint and compared before ``RESUME`` continues one.

The identity is the resolved value of every parameter that changes what is trained or how, plus facts the parameters
do not pin down: the prepared cache's content fingerprint, the encoder weights file's SHA-256, the effective batch,
the number of training images, the resolved precision and (Phase 2) the SHA-256 of the Phase 1 file it started from.
Parameters listed in :data:`MAY_CHANGE` may differ between attempts of the same run (logging, workers, deadlines,
``EPOCHS`` to extend, ``BATCH_SIZE`` as a memory knob at equal effective batch, ...); any other difference stops the
resume before training with a table and the ways out. ``ALLOW_CHANGES`` names the differences a user accepts.

A checkpoint written before identities existed is compared on its stored parameters (``config``) alone.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from cellseg.checkpoint.compat import IncompatibleCheckpoint
from cellseg.checkpoint.fingerprint import file_sha256

log = logging.getLogger(__name__)

IDENTITY_VERSION = 1

# Parameters that may differ between attempts of one run, and why that is safe.
MAY_CHANGE: dict[str, str] = {
    "RUN_DIR": "where outputs go",
    "CHECKPOINT_DIR": "where checkpoints go",
    "DATA_CACHE": "where the cache is; its content fingerprint is compared instead",
    "DATA_ROOT": "where the source is; the cache's content fingerprint is compared instead",
    "ENCODER_WEIGHTS": "where the weights are; their SHA-256 is compared instead",
    "DEVICE": "the same computation on another device",
    "NUM_WORKERS": "loading speed only",
    "BATCH_SIZE": "a per-device memory knob: the effective batch is compared instead",
    "GRAD_ACCUM_TARGET": "the effective batch it sets is compared instead",
    "PRECISION": "the resolved precision is compared instead",
    "EPOCHS": "extends (or shortens) the run",
    "PATIENCE_P1": "early stopping only",
    "PATIENCE_P2": "early stopping only",
    "USE_COMPILE": "speed only",
    "CHANNELS_LAST": "speed only",
    "GRAD_CHECKPOINTING": "memory only (recomputes the same activations)",
    "DETERMINISTIC": "bit-exactness only",
    "RESUME": "how to resume",
    "INIT_FROM": "the SHA-256 of the Phase 1 file is compared instead",
    "SAVE_EVERY_STEPS": "checkpoint frequency",
    "KEEP_LAST": "checkpoint retention",
    "FORCE_RECREATE": "what to do with incompatible checkpoints",
    "STRICT_LOAD": "how strictly to load",
    "IGNORE_RESUME_NETWORK": "what to restore",
    "MERGE_LORA": "how to load LoRA weights",
    "STOP_SIGNALS": "when to stop",
    "STOP_AT": "when to stop",
    "LOG_EVERY": "logging",
    "TENSORBOARD": "logging",
    "ALLOW_CHANGES": "this list itself",
}
# Parameters training never reads: data preparation (its result is the cache, fingerprinted) and evaluation.
NOT_TRAINING = ("SYNTH_NUM_IMAGES", "SYNTH_IMAGE_SIZE", "VAL_FRACTION", "TEST_FRACTION", "CONSEP_MERGE_CLASSES",
                "QA_OVERLAYS", "EVAL_PHASE", "EVAL_CHECKPOINT", "EVAL_SPLIT", "TILE_SIZE", "TILE_OVERLAP", "TTA",
                "TUNE_POSTPROCESS", "EVAL_MAX_IMAGES")
# Facts beyond the parameters, and what they stand for.
FACTS: dict[str, str] = {
    "dataset_fingerprint": "content fingerprint of the prepared cache (DATASET, DATA_ROOT, preparation parameters)",
    "encoder_weights_sha256": "SHA-256 of the ENCODER_WEIGHTS file",
    "effective_batch": "images per optimizer step (GRAD_ACCUM_TARGET, or BATCH_SIZE x ranks)",
    "train_images": "images in the training split",
    "precision": "resolved PRECISION",
    "phase1_sha256": "SHA-256 of the Phase 1 checkpoint Phase 2 started from (INIT_FROM)",
}


def identity_parameter_names() -> list[str]:
    """The parameters of the identity: every Config field neither in MAY_CHANGE nor in NOT_TRAINING (so a new
    parameter is part of the identity until someone decides otherwise)."""
    from cellseg.config import Config

    return [f.name for f in fields(Config) if f.name not in MAY_CHANGE and f.name not in NOT_TRAINING]


def allowed_change_names() -> list[str]:
    """What ``ALLOW_CHANGES`` may name."""
    return identity_parameter_names() + list(FACTS)


# one hash cache for the project (path + size + mtime, in memory and on disk): cellseg.checkpoint.fingerprint
sha256_cached = file_sha256


def encoder_weights_sha256(weights: str) -> str:
    """'' for random initialisation, the file's SHA-256 otherwise ('missing: PATH' when it is not there: the model
    build reports that with its own message)."""
    if not weights:
        return ""
    path = Path(weights)
    return sha256_cached(path) if path.is_file() else f"missing: {path}"


def run_identity(cfg, *, world_size: int, train_images: int, precision: str | None = None,
                 facts: dict[str, Any] | None = None) -> dict:
    """The identity of the run ``cfg`` sets up (plain types, stored as the checkpoint's ``identity`` entry).

    Args:
        cfg: the validated Config.
        world_size: ranks of this attempt.
        train_images: images in the training split.
        precision: the resolved precision ('fp32' | 'bf16' | 'fp16').
        facts: more facts, e.g. ``dataset_fingerprint`` and ``phase1_sha256`` (see :data:`FACTS`).
    """
    values = cfg.to_dict()
    out_facts = {"encoder_weights_sha256": encoder_weights_sha256(cfg.ENCODER_WEIGHTS),
                 "effective_batch": int(cfg.GRAD_ACCUM_TARGET or cfg.BATCH_SIZE * world_size),
                 "train_images": int(train_images)}
    if precision is not None:
        out_facts["precision"] = precision
    out_facts.update(facts or {})
    unknown = sorted(set(out_facts) - set(FACTS))
    assert not unknown, f"undocumented identity facts {unknown}"
    return {"version": IDENTITY_VERSION, "parameters": {k: values[k] for k in identity_parameter_names()},
            "facts": out_facts}


def identity_of_checkpoint(payload: dict) -> dict | None:
    """The checkpoint's identity; for a checkpoint older than identities, its stored parameters only."""
    ident = payload.get("identity")
    if isinstance(ident, dict):
        return ident
    config = payload.get("config")
    if isinstance(config, dict):
        return {"version": 0, "parameters": {k: config[k] for k in identity_parameter_names() if k in config},
                "facts": {}}
    return None


def identity_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(name, checkpoint value, current value) for every parameter or fact both sides know and that differs."""
    rows = []
    for section in ("parameters", "facts"):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for name in [k for k in b if k in a]:
            if _norm(a[name]) != _norm(b[name]):
                rows.append((name, a[name], b[name]))
    return rows


def _norm(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


class IdentityMismatch(IncompatibleCheckpoint):
    """The checkpoint belongs to a run with other parameters (or data, weights, Phase 1 file)."""


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def mismatch_message(path: str | Path, rows: list[tuple[str, Any, Any]], checkpoint_dir: str | Path) -> str:
    """The table (parameter, checkpoint value, current value) and the ways out."""
    w = max(len("parameter"), *(len(r[0]) for r in rows))
    c = max(len("checkpoint value"), *(len(_short(r[1])) for r in rows))
    lines = [f"RESUME: {path} belongs to a run with other settings, so continuing it would mix two experiments:",
             "",
             f"  {'parameter'.ljust(w)}  {'checkpoint value'.ljust(c)}  current value",
             f"  {'-' * w}  {'-' * c}  {'-' * 13}"]
    lines += [f"  {n.ljust(w)}  {_short(a).ljust(c)}  {_short(b)}" for n, a, b in rows]
    notes = [f"  {n}: {FACTS[n]}" for n, _, _ in rows if n in FACTS]
    if notes:
        lines += ["", *notes]
    if any(n == "phase1_sha256" for n, _, _ in rows):
        lines += ["", "Phase 1's checkpoint changed since this Phase 2 run started from it (Phase 1 was re-run?): "
                  "continuing would train on weights that never saw the new Phase 1."]
    names = ", ".join(repr(n) for n, _, _ in rows)
    lines += ["",
              "Ways out (pick one):",
              "  - a new experiment: set a new RUN_DIR (checkpoints go to RUN_DIR/checkpoints by default);",
              f"  - start this phase over here: RESUME='never' (the checkpoints in {checkpoint_dir} are moved aside, "
              "not deleted);",
              "  - or go back to the checkpoint's values above;",
              f"  - or continue this run with the new values on purpose: ALLOW_CHANGES=[{names}]."]
    return "\n".join(lines)


def check_identity(saved: dict | None, current: dict | None, *, path: str | Path, checkpoint_dir: str | Path,
                   allow_changes: tuple[str, ...] | list[str] = ()) -> list[tuple[str, Any, Any]]:
    """Refuse a checkpoint whose identity differs from the current run's, except the changes named in
    ``allow_changes``; returns the accepted differences.

    Raises:
        IdentityMismatch: with the table and the ways out.
    """
    if saved is None or current is None:
        return []
    rows = identity_differences(saved, current)
    refused = [r for r in rows if r[0] not in set(allow_changes)]
    if refused:
        raise IdentityMismatch(mismatch_message(path, refused, checkpoint_dir), path=path,
                               differences=[f"{n}: checkpoint {a!r}, now {b!r}" for n, a, b in refused])
    for name, a, b in rows:
        log.warning("ALLOW_CHANGES: %s changes from %r (checkpoint) to %r (now) in this run", name, a, b)
    if saved.get("version", 0) == 0:
        log.warning("%s predates run identities: compared on its stored parameters only (not on the data, encoder "
                    "weights or Phase 1 file)", path)
    return rows


def parameter_problems(side: dict, cfg, *, path: str | Path) -> str | None:
    """For ``cellseg preflight``: the identity table of the parameters that differ between a checkpoint's sidecar and
    ``cfg`` (beyond ``ALLOW_CHANGES``), or None. Facts (data, weights, ranks) are compared when the job starts."""
    saved = side.get("identity")
    if not isinstance(saved, dict):
        return None
    current = {"parameters": {k: v for k, v in cfg.to_dict().items() if k in identity_parameter_names()}}
    rows = [r for r in identity_differences({"parameters": saved.get("parameters") or {}}, current)
            if r[0] not in set(cfg.ALLOW_CHANGES)]
    return mismatch_message(path, rows, Path(path).parent) if rows else None


def check_resume_position(progress: dict, plan: dict, *, where: str) -> None:
    """A mid-epoch checkpoint can continue only with the same sample plan (same images, effective batch, SEED and
    plan version); an epoch-end checkpoint always can.

    Raises:
        ValueError: naming what differs and how to continue.
    """
    if not progress.get("batch_in_epoch") and not progress.get("step_in_epoch"):
        return
    saved = progress.get("sample_plan")
    if saved is None or "step_in_epoch" not in progress:
        raise ValueError(f"{where} stopped in the middle of epoch {progress.get('epoch')} and was written by a cellseg "
                         "version whose sample order depended on BATCH_SIZE and the number of ranks, so the exact "
                         "next image is unknown. Resume it with the version that wrote it, or RESUME=<the last "
                         "epoch_XXXX.pt of the phase> (the epoch is retrained), or RESUME='never'.")
    diff = {k: (saved.get(k), plan.get(k)) for k in plan if saved.get(k) != plan.get(k)}
    if diff:
        words = {"n": "training images", "effective_batch": "effective batch (GRAD_ACCUM_TARGET)",
                 "steps_per_epoch": "optimizer steps per epoch (MAX_STEPS_PER_EPOCH, images, effective batch)",
                 "seed": "SEED", "weighted": "OVERSAMPLE_RARE", "version": "sample-plan version"}
        what = "; ".join(f"{words.get(k, k)}: checkpoint {a}, now {b}" for k, (a, b) in diff.items())
        raise ValueError(f"{where} stopped in the middle of epoch {progress.get('epoch')} (step "
                         f"{progress.get('step_in_epoch')} of {saved.get('steps_per_epoch')}), and this run would "
                         f"draw the epoch's images differently ({what}), so it cannot continue at the exact image. "
                         "Restore those values (BATCH_SIZE may change as long as GRAD_ACCUM_TARGET stays), or "
                         "resume from the last epoch_XXXX.pt of the phase with RESUME=<path>, or RESUME='never'.")


def phase1_source(phase1_dir: str | Path, init_from: str) -> dict:
    """The Phase 1 file ``INIT_FROM`` names now and its SHA-256 (from its sidecar: no hashing of the payload):
    'auto' is best.pt when present, else latest.pt. ``{}`` when there is none or for 'fresh'."""
    from cellseg.checkpoint.layout import BEST, LATEST
    from cellseg.checkpoint.sidecar import CorruptCheckpoint, read_sidecar

    if init_from == "fresh":
        return {"path": "fresh", "sha256": "fresh"}
    paths = [Path(phase1_dir) / BEST, Path(phase1_dir) / LATEST] if init_from == "auto" else [Path(init_from)]
    for p in paths:
        if not p.exists():
            continue
        try:
            return {"path": str(p), "sha256": read_sidecar(p)["sha256"]}
        except (CorruptCheckpoint, KeyError):
            return {"path": str(p), "sha256": sha256_cached(p)}
    return {}


__all__ = ["MAY_CHANGE", "NOT_TRAINING", "FACTS", "IdentityMismatch", "run_identity", "identity_of_checkpoint",
           "identity_differences", "check_identity", "check_resume_position", "phase1_source", "sha256_cached",
           "identity_parameter_names", "allowed_change_names"]
