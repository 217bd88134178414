"""The checkpoint directory of one phase: atomic saves and validated resumes.

``CHECKPOINT_DIR/phase{N}/`` holds ``latest.pt`` (every epoch and every ``SAVE_EVERY_STEPS`` steps), ``best.pt``
(only on improvement, never replaced by a worse metric), ``epoch_XXXX.pt`` (the last ``KEEP_LAST``), a JSON sidecar
next to each and the append-only ``ledger.jsonl``. ``latest.pt`` and the epoch files are full (exact resume needs the
optimizer, scheduler and RNG states); ``best.pt`` is weights-only (``contents='weights'``: what evaluation, prediction
and Phase 2 read), which makes a compact UNI ``best.pt`` the decoder's size instead of three times it. Known failures elsewhere that this avoids: CellViT's resume retrains
the last finished epoch; Lightning saves inside the signal handler and its ``last.ckpt`` can silently equal ``best``;
detectron2 keeps the best metric in memory only, so the first evaluation after a resume overwrites ``model_best``;
Accelerate resumes the highest-numbered folder without checking it is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg.checkpoint.atomic import commit, copy_to_temp, fsync_dir, open_temp, remove_stale_temps
from cellseg.checkpoint.base import full_manifest
from cellseg.checkpoint.compat import IncompatibleCheckpoint, describe_optimizer_change, ways_out
from cellseg.checkpoint.contents import (
    FULL,
    WEIGHTS,
    LandedOnWeights,
    WeightsOnlyCheckpoint,
    contents_of,
    refusal,
    weights_only,
)
from cellseg.checkpoint.layout import (
    BEST,
    LATEST,
    checkpoint_files,
    default_code_version,
    epoch_file,
    epoch_files,
    move_aside,
)
from cellseg.checkpoint.ledger import Ledger, now_iso
from cellseg.checkpoint.sidecar import (
    CorruptCheckpoint,
    build_sidecar,
    read_payload,
    read_sidecar,
    sidecar_path,
    verify_file,
)
from cellseg.checkpoint.state import optimizer_param_names, restore_training_state
from cellseg.checkpoint.weights import check_compatibility, load_weights

log = logging.getLogger(__name__)


def _worse(new: float | None, old: float | None, mode: str) -> bool:
    """True when ``new`` is strictly worse than ``old`` under ``mode``; NaN/None is worse than any number."""
    def bad(v: Any) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v))

    if bad(old):
        return False
    if bad(new):
        return True
    return new < old if mode == "max" else new > old


class CheckpointManager:
    """Saves and resumes the checkpoints of one phase directory (``CHECKPOINT_DIR/phase{N}``).

    Only ``is_main`` writes files and the ledger; the other ranks call ``barrier()`` where the main rank does, so a
    slow save never lets them run ahead.
    """

    def __init__(self, directory: str | Path, *, phase: int, keep_last: int = 3, is_main: bool = True,
                 barrier: Callable[[], None] | None = None, code_version: str | None = None):
        if keep_last < 1:
            raise ValueError(f"KEEP_LAST must be >= 1 (epoch files kept besides latest.pt and best.pt), got {keep_last}.")
        if phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2 (PHASE), got {phase!r}.")
        self.directory = Path(directory)
        self.phase = phase
        self.keep_last = keep_last
        self.is_main = is_main
        self.barrier = barrier
        self.code_version = code_version if code_version is not None else default_code_version()
        self.ledger = Ledger(self.directory, enabled=is_main)
        self.parent: dict | None = None  # identity of the last file saved or resumed from
        self.resumed_from: Path | None = None
        self.last_report = None
        self.notes: list[str] = []

    # ----- small helpers -----
    def _sync(self) -> None:
        if self.barrier is not None:
            self.barrier()

    def ledger_event(self, event: str, **fields: Any) -> None:
        """Append an event (e.g. 'stop' with its reason) to the ledger (main rank only)."""
        self.ledger.append(event, phase=self.phase, **fields)

    def path(self, name: str) -> Path:
        return self.directory / name

    # ----- saving -----
    def save(self, state: dict | None, *, epoch_end: bool, is_best: bool, reason: str = "epoch") -> None:
        """Write ``latest.pt`` (always), ``epoch_XXXX.pt`` (when ``epoch_end``; older ones beyond ``keep_last`` are
        pruned) and ``best.pt`` (when ``is_best`` and not worse than the stored best; weights only, see
        :mod:`cellseg.checkpoint.contents`), each atomically with its sidecar; then a ledger line. Non-main ranks
        only wait at the barrier (``state`` may be None there).

        Raises:
            ValueError: ``state`` is missing on the main rank or belongs to another phase.
        """
        if not self.is_main:
            self._sync()
            return
        try:
            self._save(state, epoch_end=epoch_end, is_best=is_best, reason=reason)
        finally:
            self._sync()

    def _save(self, state: dict | None, *, epoch_end: bool, is_best: bool, reason: str) -> None:
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError("CheckpointManager.save needs the dict of collect_state(...) on the main rank, got "
                             f"{type(state).__name__}.")
        phase = state.get("phase")
        if phase is None:
            state["phase"] = phase = self.phase
        if phase != self.phase:
            raise ValueError(f"state is of Phase {phase} but this manager writes Phase {self.phase} ({self.directory}). "
                             "Build the manager with cfg.checkpoint_dir(PHASE) and phase=PHASE.")
        t0 = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        progress = state.get("progress") or {}
        targets = [LATEST]
        if epoch_end:
            targets.append(epoch_file(int(progress.get("epoch", 0))))
        if is_best:
            if self._best_allowed(progress):
                targets.append(BEST)
        if state.get("contents") != FULL:
            state = {**state, "contents": FULL}  # latest.pt and the epoch files: everything an exact resume needs
        mani = full_manifest(state)  # the whole network, base weights included: what compatibility is checked on
        temps: list[Path] = []
        try:
            with open_temp(self.path(LATEST)) as (writer, tmp):
                temps.append(tmp)
                torch.save(state, writer)
            sha, size = writer.sha256, writer.size
            payload_tmp = {LATEST: tmp}
            written = {name: (state, sha, size) for name in targets}
            for name in targets[1:]:
                if name == BEST:  # weights only: evaluation, prediction and Phase 2 never read the optimizer state
                    light = weights_only(state)
                    with open_temp(self.path(BEST)) as (bw, btmp):
                        temps.append(btmp)
                        torch.save(light, bw)
                    payload_tmp[BEST] = btmp
                    written[BEST] = (light, bw.sha256, bw.size)
                    continue
                payload_tmp[name] = copy_to_temp(tmp, self.path(name))
                temps.append(payload_tmp[name])
            stamp = now_iso()
            side_tmp = {}
            for name in targets:
                payload, f_sha, f_size = written[name]
                side = build_sidecar(payload=payload, manifest=mani, sha256=f_sha, size=f_size, file_name=name,
                                     parent=self.parent, code_version=self.code_version, reason=reason, time=stamp)
                with open_temp(sidecar_path(self.path(name))) as (w, stmp):
                    temps.append(stmp)
                    w.write((json.dumps(side, indent=1) + "\n").encode())
                side_tmp[name] = stmp
            # Each payload is renamed first, its sidecar right after: a crash in between leaves a pair whose hashes
            # disagree, which resume rejects, never a pair that silently lies. latest.pt goes last: a crash before it
            # leaves the previous latest.pt (one step older) valid, and a crash inside it falls back to the epoch
            # file just written with the same state; either way at most one step is lost.
            for name in targets[1:] + targets[:1]:
                commit(payload_tmp[name], self.path(name), sync_dir=False)
                commit(side_tmp[name], sidecar_path(self.path(name)), sync_dir=False)
            fsync_dir(self.directory)
        finally:
            for t in temps:
                with contextlib.suppress(OSError):
                    t.unlink()
        pruned = self._prune() if epoch_end else []
        seconds = time.perf_counter() - t0
        self.parent = {"path": str(self.path(LATEST)), "sha256": sha}
        best = {"best_sha256": written[BEST][1], "best_size": written[BEST][2]} if BEST in written else {}
        self.ledger_event("save", files=targets, reason=reason, epoch=progress.get("epoch"), step=progress.get("step"),
                          batch_in_epoch=progress.get("batch_in_epoch"), sha256=sha, size=size, **best,
                          seconds=round(seconds, 3), pruned=[p.name for p in pruned])
        log.info("saved %s at epoch %s step %s (%s, %.1f MB%s, %.2f s)", " + ".join(targets), progress.get("epoch"),
                 progress.get("step"), reason, size / 1e6,
                 f"; best.pt weights only, {best['best_size'] / 1e6:.1f} MB" if best else "", seconds)

    def _best_allowed(self, progress: dict) -> bool:
        """Belt and braces: refuse to replace ``best.pt`` with a worse monitored value than the one it holds."""
        side_file = sidecar_path(self.path(BEST))
        if not self.path(BEST).exists() or not side_file.exists():
            return True
        try:
            old = read_sidecar(self.path(BEST))
        except CorruptCheckpoint as e:
            log.warning("best.pt's sidecar is unreadable (%s): replacing best.pt", e.reason)
            return True
        monitor = progress.get("monitor") or {}
        old_mon = old.get("monitor") or {}
        mode = monitor.get("mode") or old_mon.get("mode") or "max"
        if monitor.get("metric") and old_mon.get("metric") and monitor["metric"] != old_mon["metric"]:
            log.warning("best.pt monitors '%s', this run '%s': replacing best.pt", old_mon["metric"], monitor["metric"])
            return True
        new_v, old_v = progress.get("best_metric"), old_mon.get("best")
        if _worse(new_v, old_v, mode):
            log.warning("NOT replacing best.pt: its %s=%s (epoch %s) is better than the new %s (mode '%s'); the loop "
                        "flagged an improvement that is not one", old_mon.get("metric"), old_v, old.get("epoch"),
                        new_v, mode)
            self.ledger_event("refused_best", old=old_v, new=new_v, mode=mode, epoch=progress.get("epoch"))
            return False
        return True

    def _prune(self) -> list[Path]:
        pruned = []
        for p in epoch_files(self.directory)[self.keep_last:]:
            for f in (p, sidecar_path(p)):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            pruned.append(p)
        if pruned:
            fsync_dir(self.directory)
        return pruned

    # ----- resuming -----
    def candidates(self) -> list[Path]:
        """What ``RESUME='auto'`` tries, in order: latest, epoch files newest first, best."""
        return [self.path(LATEST)] + epoch_files(self.directory) + [self.path(BEST)]

    def resume(self, mode: str, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any,
               scaler: Any, strict: bool = True, ignore_network: bool = False, merge_lora: bool = False,
               force_recreate: bool = False, generators: dict[str, torch.Generator] | None = None,
               identity: dict | None = None, allow_changes: tuple[str, ...] = ()) -> dict | None:
        """Restore the newest valid checkpoint (``RESUME``: 'auto' | 'never' | a path). Returns its ``progress``, or
        None for a fresh start.

        'auto' tries latest -> epoch files (newest first) -> best; a missing, truncated/unreadable or hash-mismatched
        file is rejected with its reason (logged, ledgered) and the next one is tried. Landing on a weights-only
        ``best.pt`` is refused (:class:`WeightsOnlyCheckpoint`): continuing it needs an explicit ``RESUME=path``,
        which restores weights and counters with a fresh optimizer and schedule and says so in the log and ledger. An *incompatible* checkpoint is
        an error, never a reason to fall back to an older one. With ``force_recreate`` an incompatible checkpoint
        instead sends every checkpoint of the phase aside (timestamped folder) and the run starts fresh; a compatible
        one is resumed as usual, so a requeued job that still carries FORCE_RECREATE=True does not lose its progress.
        Starting fresh in a directory that holds checkpoints also moves them aside, so nothing is overwritten.

        Order (the optimizer and scheduler are built before the call): network weights, optimizer, scheduler (so
        the loaded learning rates survive), GradScaler, RNG states.

        ``identity`` (:func:`cellseg.checkpoint.identity.run_identity`) is compared with the checkpoint's: a run
        with other parameters, data, encoder weights or Phase 1 file is refused (:class:`IdentityMismatch`, a
        kind of IncompatibleCheckpoint) unless ``allow_changes`` names each difference.

        Raises:
            IncompatibleCheckpoint: architecture, keys, optimizer parameters or scheduler differ (see the message).
            FileNotFoundError / CorruptCheckpoint: an explicit path that is missing or invalid.
            ValueError: an explicit path of the other phase, or an unknown mode.
            WeightsOnlyCheckpoint: 'auto' found no usable full checkpoint, only a weights-only one.
        """
        if mode not in ("auto", "never") and not str(mode).endswith(".pt"):
            raise ValueError(f"RESUME must be 'auto', 'never' or a path to a .pt checkpoint, got {mode!r}.")
        self.notes = []
        if mode == "never":
            self._sync()
            self._start_fresh("RESUME='never'")
            self._sync()
            return None
        explicit = mode != "auto"
        if explicit and not Path(mode).exists():
            raise FileNotFoundError(f"RESUME={mode!r}: no such file. Give an existing .pt checkpoint, or RESUME='auto' "
                                    f"(newest valid checkpoint in {self.directory}) or 'never'.")
        rejected: list[tuple[Path, str]] = []
        chosen: tuple[Path, dict, dict | None, tuple[bool, bool]] | None = None
        recreate: IncompatibleCheckpoint | None = None
        for path in ([Path(mode)] if explicit else self.candidates()):
            self.notes = []
            try:
                payload, side, flags = self._examine(
                    path, model=model, optimizer=optimizer, scheduler=scheduler, strict=strict, merge_lora=merge_lora,
                    ignore_network=ignore_network, require_sidecar=not explicit, identity=identity,
                    allow_changes=allow_changes)
            except CorruptCheckpoint as e:
                (log.info if e.reason == "missing" else log.warning)("RESUME: %s", e)
                rejected.append((path, e.reason if not e.detail else f"{e.reason} ({e.detail})"))
                if explicit:
                    self.ledger_event("reject", file=str(path), reason=rejected[-1][1])
                    raise
                continue
            except LandedOnWeights as e:
                unusable = [f"{p.name}: {r}" for p, r in rejected]
                self.ledger_event("refuse", file=str(path), reason="weights only", rejected=unusable)
                raise WeightsOnlyCheckpoint(refusal(self.directory, self.phase, path, e.side, unusable), path=path,
                                            rejected=unusable) from None
            except IncompatibleCheckpoint as e:
                self.ledger_event("reject", file=str(path), reason="incompatible", differences=e.differences)
                if not force_recreate:
                    raise
                recreate = e
                break
            chosen = (path, payload, side, flags)
            break
        real_rejections = [(p, r) for p, r in rejected if not r.startswith("missing")]
        if chosen is None:
            self._sync()
            for p, r in rejected:
                self.ledger_event("reject", file=str(p), reason=r)
            if recreate is not None:
                log.warning("FORCE_RECREATE=True: the checkpoints in %s do not fit the parameters:\n%s",
                            self.directory, recreate)
                self._start_fresh("FORCE_RECREATE=True and the checkpoints are incompatible", label="recreated")
            else:
                detail = "; ".join(f"{p.name}: {r}" for p, r in rejected) or "no checkpoint files"
                self._start_fresh(f"no valid checkpoint ({detail})")
            self._sync()
            return None
        path, payload, side, (restore_opt, restore_sched) = chosen
        if force_recreate:
            log.info("FORCE_RECREATE=True but %s fits the parameters: resuming it (RESUME='never' starts over)", path)
        weights = contents_of(side if side is not None else payload) == WEIGHTS
        progress = self._apply(path, payload, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                               strict=strict, merge_lora=merge_lora, ignore_network=ignore_network,
                               restore_optimizer=restore_opt, restore_scheduler=restore_sched, generators=generators)
        del payload
        if weights:  # only ever an explicit RESUME=path (see _examine): said loudly, and kept in the ledger
            log.warning("RESUME=%r is a weights-only checkpoint: continuing from its weights and counters (epoch %s, "
                        "step %s) with a FRESH optimizer, the learning-rate schedule RESTARTED and the random streams "
                        "as seeded; this run does not equal an uninterrupted one", str(path), progress.get("epoch"),
                        progress.get("step"))
            self.ledger_event("weights_only_resume", file=str(path), epoch=progress.get("epoch"),
                              step=progress.get("step"))
        self._sync()
        for p, r in rejected:
            self.ledger_event("reject", file=str(p), reason=r)
        if real_rejections and self.is_main:
            moved = [f for p, _ in real_rejections for f in (p, sidecar_path(p)) if f.exists()]
            if moved:
                dest = move_aside(self.directory, moved, "rejected")
                self.ledger_event("moved_aside", files=[f.name for f in moved], to=str(dest),
                                  reason="rejected on resume (kept for inspection)")
                log.warning("moved the rejected file(s) %s aside to %s", [f.name for f in moved], dest)
        self.resumed_from = path
        self.parent = {"path": str(path), "sha256": side.get("sha256") if side else None}
        self.ledger_event("load", file=str(path), epoch=progress.get("epoch"), step=progress.get("step"),
                          batch_in_epoch=progress.get("batch_in_epoch"), ignore_network=ignore_network, strict=strict,
                          rejected=[f"{p.name}: {r}" for p, r in rejected], notes=self.notes)
        log.info("resumed from %s: epoch %s, step %s, batch %s of the epoch%s", path, progress.get("epoch"),
                 progress.get("step"), progress.get("batch_in_epoch"),
                 f" (after rejecting {', '.join(p.name for p, _ in real_rejections)})" if real_rejections else "")
        self._sync()
        return progress

    def _examine(self, path: Path, *, model, optimizer, scheduler, strict: bool, merge_lora: bool,
                 ignore_network: bool, require_sidecar: bool, identity: dict | None = None,
                 allow_changes: tuple[str, ...] = ()) -> tuple[dict, dict | None, tuple[bool, bool]]:
        """Validate one candidate; returns (payload, sidecar, (restore optimizer?, restore scheduler?)).
        Compatibility is decided from the sidecar before the payload is read; the hash is checked before
        ``torch.load``."""
        if not path.exists():
            raise CorruptCheckpoint(path, "missing")
        side = None
        try:
            side = read_sidecar(path)
        except CorruptCheckpoint as e:
            if require_sidecar:
                raise
            log.warning("%s: %s; loading it unverified because it was named explicitly", path, e.reason)
        if side is not None:
            self._check_phase(side, path)
            flags = self._check(side, model=model, optimizer=optimizer, scheduler=scheduler, strict=strict,
                                merge_lora=merge_lora, path=path, network=not ignore_network)
            if identity is not None and isinstance(side.get("identity"), dict):  # refused before reading tensors
                self._check_identity(side["identity"], identity, path, allow_changes)
            verify_file(path, side)
            if require_sidecar and contents_of(side) == WEIGHTS:  # 'auto' never continues without the optimizer
                raise LandedOnWeights(side)
        payload = read_payload(path)
        # a weights-only file named explicitly continues with fresh optimizer/RNG; it still needs its counters
        needed = ("progress",) if contents_of(side if side is not None else payload) == WEIGHTS else ("progress", "rng")
        missing = [k for k in needed if not isinstance(payload.get(k), dict)]
        if missing:  # checked before anything is loaded: a resume is all or nothing
            raise CorruptCheckpoint(path, "incomplete payload", f"no {missing} entries: not a training checkpoint "
                                    "(weights only?); use it with INIT_FROM or load_weights instead")
        if side is None:
            self._check_phase(payload, path)
            meta = {**payload, "manifest": full_manifest(payload),
                    "scheduler": {"kind": payload.get("scheduler_kind"), "interval": payload.get("scheduler_interval")}}
            flags = self._check(meta, model=model, optimizer=optimizer, scheduler=scheduler, strict=strict,
                                merge_lora=merge_lora, path=path, network=not ignore_network)
        if identity is not None and not isinstance((side or {}).get("identity"), dict):
            from cellseg.checkpoint.identity import identity_of_checkpoint

            self._check_identity(identity_of_checkpoint(payload), identity, path, allow_changes)
        return payload, side, flags

    def _check_identity(self, saved: dict | None, identity: dict, path: Path, allow_changes: tuple[str, ...]) -> None:
        from cellseg.checkpoint.identity import check_identity

        accepted = check_identity(saved, identity, path=path, checkpoint_dir=self.directory,
                                  allow_changes=allow_changes)
        if accepted:
            self.ledger_event("allowed_changes", file=str(path),
                              changes=[{"name": n, "checkpoint": a, "now": b} for n, a, b in accepted])

    def _check_phase(self, meta: dict, path: Path) -> None:
        phase = meta.get("phase")
        if phase is not None and phase != self.phase:
            raise ValueError(f"RESUME={str(path)!r} is a Phase {phase} checkpoint but this run is Phase {self.phase}. "
                             f"To start Phase {self.phase} from it use INIT_FROM={str(path)!r}; RESUME continues a run "
                             "of the same phase.")

    def _check(self, meta: dict, *, model, optimizer, scheduler, strict: bool, merge_lora: bool, path: Path,
               network: bool = True) -> tuple[bool, bool]:
        """Network, optimizer-parameter and scheduler compatibility from ``meta`` (no tensor read). Returns whether
        the optimizer and the scheduler state may be restored (not after a non-strict partial load)."""
        restore_opt, restore_sched = network, True
        problems = []
        if network:
            plan, differences = check_compatibility(meta, model, strict=strict, merge_lora=merge_lora, path=path,
                                                    checkpoint_dir=self.directory)
            restore_opt = plan.clean and not plan.merges and not differences
            if not restore_opt:
                self.notes.append("network loaded partially or merged: the optimizer starts fresh")
            saved = meta.get("optimizer_params")
            if optimizer is not None and saved is not None and restore_opt:
                now = optimizer_param_names(optimizer, model)
                if now != saved:
                    problems.append(describe_optimizer_change(saved, now))
                    restore_opt = False
        sched = meta.get("scheduler") or {}
        if scheduler is not None and sched.get("kind") is not None:
            kind, interval = getattr(scheduler, "kind", type(scheduler).__name__), getattr(scheduler, "interval", None)
            if sched["kind"] != kind or sched.get("interval") != interval:
                problems.append(f"checkpoint scheduler is '{sched['kind']}' stepping per '{sched.get('interval')}'; "
                                f"the parameters build '{kind}' stepping per '{interval}' (SCHEDULER)")
                restore_sched = False
        if problems:
            if strict:
                raise IncompatibleCheckpoint(
                    f"checkpoint {path} does not fit the training set-up the parameters build:\n"
                    + "\n".join(f"  - {p}" for p in problems) + "\n" + ways_out(self.directory),
                    path=path, differences=problems)
            self.notes += [f"{p.splitlines()[0]}: starting it fresh (STRICT_LOAD=False)" for p in problems]
        return restore_opt, restore_sched

    def _apply(self, path: Path, payload: dict, *, model, optimizer, scheduler, scaler, strict: bool,
               merge_lora: bool, ignore_network: bool, restore_optimizer: bool, restore_scheduler: bool,
               generators: dict[str, torch.Generator] | None) -> dict:
        for note in self.notes:  # from the compatibility check of this candidate
            log.warning("%s", note)
        if ignore_network:
            log.warning("IGNORE_RESUME_NETWORK=True: restoring counters, history, scheduler and RNG from %s; the "
                        "network and the optimizer keep their current state", path)
        else:
            self.last_report = load_weights(model, payload, strict=strict, merge_lora=merge_lora,
                                            checkpoint_dir=self.directory, source_name=str(path))
        self.notes += restore_training_state(payload, optimizer=optimizer, scheduler=scheduler if restore_scheduler else None,
                                             scaler=scaler, restore_optimizer=restore_optimizer and not ignore_network,
                                             generators=generators)
        return payload["progress"]

    def _start_fresh(self, why: str, label: str = "aside") -> None:
        """Start from step 0; checkpoints already in the directory are moved aside first (main rank)."""
        if self.is_main:
            remove_stale_temps(self.directory)
            files = checkpoint_files(self.directory)
            if files:
                dest = move_aside(self.directory, files, label)
                self.ledger_event("moved_aside", files=[f.name for f in files], to=str(dest), reason=why)
                log.warning("moved %d old checkpoint file(s) of %s aside to %s (nothing deleted)", len(files),
                            self.directory, dest)
            self.ledger_event("fresh_start", reason=why)
        log.warning("Phase %d: starting fresh from step 0: %s", self.phase, why)
