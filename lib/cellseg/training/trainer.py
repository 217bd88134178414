"""The training loop of one phase: accumulation, AMP, clipping, schedulers stepped when they declare, validation,
best/patience bookkeeping, checkpoints and cooperative stopping.

The notebook keeps the epoch loop visible (nanoGPT's readable loop)::

    for epoch in trainer.remaining_epochs():
        stats = trainer.train_one_epoch(epoch)
        if stats is None:            # a stop was requested: latest.pt saved, status 'preempted'
            break
        val = trainer.validate(epoch)
        if not trainer.end_epoch(epoch, stats, val):   # early stopping
            break
    trainer.finish()

``Trainer.fit()`` runs the same loop for the ``cellseg train`` command.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cellseg.branches import Branch
from cellseg.distributed import all_reduce_mean, any_true, barrier
from cellseg.schedulers import build_scheduler, current_lrs
from cellseg.training.plan import SamplePlan, StepBatchSampler, build_plan
from cellseg.training.progress import progress_line
from cellseg.training.sampler import EpochIndexed

log = logging.getLogger(__name__)

LOSS_KEYS = ("total", Branch.NP.value, Branch.HV.value, Branch.NC.value)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``PRECISION`` 'auto' is bf16 on CUDA devices that run it natively (compute capability >= 8.0), fp32 elsewhere:
    ``torch.cuda.is_bf16_supported()`` also counts the emulated bf16 of T4/V100-class GPUs."""
    from cellseg.devices import native_bf16

    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        log.warning("PRECISION='bf16' on %s, which only emulates bf16 (compute capability < 8.0): slow. "
                    "PRECISION='fp16' (GradScaler) or 'fp32' suits this GPU.", torch.cuda.get_device_name(device))
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("PRECISION='fp16' needs a CUDA device (GradScaler); use 'fp32' or 'bf16' on CPU.")
    return precision


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def accumulation_steps(cfg, world_size: int) -> int:
    """Micro-batches per optimizer step so that BATCH_SIZE x world x steps reaches GRAD_ACCUM_TARGET."""
    if not cfg.GRAD_ACCUM_TARGET:
        return 1
    return max(1, math.ceil(cfg.GRAD_ACCUM_TARGET / (cfg.BATCH_SIZE * world_size)))


def effective_batch(cfg, world_size: int) -> int:
    """Images per optimizer step over all ranks: ``GRAD_ACCUM_TARGET``, or ``BATCH_SIZE`` x ranks without it."""
    return cfg.GRAD_ACCUM_TARGET or cfg.BATCH_SIZE * world_size


def param_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the trainable weights (compared across ranks and runs in the logs)."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum().item() for p in model.parameters() if p.requires_grad))


def make_loader(dataset, sampler: StepBatchSampler, cfg, *, seed: int) -> DataLoader:
    """A DataLoader that works inside Jupyter kernels (forkserver workers, persistent) and whose worker seeds come
    from its own generator, never from the global RNG the model's dropout uses."""
    kw: dict = {}
    if cfg.NUM_WORKERS > 0:
        kw = dict(multiprocessing_context="forkserver", persistent_workers=True, prefetch_factor=2)
    return DataLoader(EpochIndexed(dataset), batch_sampler=sampler, num_workers=cfg.NUM_WORKERS,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed), **kw)


class Trainer:
    """One phase of training. ``ckpt`` is a :class:`cellseg.checkpoint.CheckpointManager`, ``stop`` a
    :class:`cellseg.stopping.StopRequest`; ``validate_fn(model, epoch) -> dict`` computes validation metrics."""

    def __init__(self, ctx, model, loss_fn, train_ds, *, validate_fn, ckpt, stop, sample_weights=None,
                 identity_facts: dict | None = None):
        self.ctx, self.cfg, self.device = ctx, ctx.cfg, ctx.device
        cfg = self.cfg
        self.model = model.to(self.device)
        if cfg.CHANNELS_LAST:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = loss_fn.to(self.device)
        self.validate_fn, self.ckpt, self.stop = validate_fn, ckpt, stop
        from cellseg.predict.settings import training_data_info

        self.data_info = training_data_info(train_ds)
        self.precision = resolve_precision(cfg.PRECISION, self.device)
        self.patience = cfg.PATIENCE_P1 if cfg.PHASE == 1 else cfg.PATIENCE_P2
        env = ctx.env
        # the sample plan depends on SEED, the images and the effective batch only (not BATCH_SIZE, not the ranks)
        self.plan: SamplePlan = build_plan(len(train_ds), effective_batch=effective_batch(cfg, env.world_size),
                                           max_steps=cfg.MAX_STEPS_PER_EPOCH, seed=cfg.SEED,
                                           weighted=sample_weights is not None)
        self.sampler = StepBatchSampler(self.plan, rank=env.rank, world_size=env.world_size,
                                        batch_size=cfg.BATCH_SIZE, weights=sample_weights)
        self.loader = make_loader(train_ds, self.sampler, cfg, seed=cfg.SEED)
        self.accum = accumulation_steps(cfg, env.world_size)
        self.steps_per_epoch = self.plan.steps_per_epoch
        from cellseg.checkpoint.identity import phase1_source, run_identity

        # what this run is: compared with a checkpoint's before RESUME continues it; Phase 2 includes the Phase 1 file
        # INIT_FROM names now (lineage), replaced by the file actually loaded when Phase 2 starts fresh
        facts = dict(identity_facts or {})
        if cfg.PHASE == 2 and "phase1_sha256" not in facts:
            facts["phase1_sha256"] = phase1_source(cfg.checkpoint_dir(1), cfg.INIT_FROM).get("sha256", "none")
        self.identity = run_identity(cfg, world_size=env.world_size, train_images=len(train_ds),
                                     precision=self.precision, facts=facts)
        from cellseg.optim import build_optimizer  # local: optim imports peft, slow to import

        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, steps_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.net = self.model
        if env.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.USE_COMPILE:
            self.net = torch.compile(self.net)
        self._last_val_s: float | None = None  # seconds of the last validation, for the time left
        self.progress = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "step_in_epoch": 0,
                         "sample_plan": self.plan.to_dict(), "best_metric": None, "best_epoch": None,
                         "patience_counter": 0, "history": [], "epoch_sums": {}, "epoch_samples": 0,
                         "monitor": {"metric": cfg.MONITOR_METRIC, "mode": cfg.MONITOR_MODE}}
        self.stopped_reason: str | None = None
        self.early_stopped = False
        self.phase_dir = Path(cfg.phase_dir())
        self.tb = None
        if cfg.TENSORBOARD and ctx.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("TENSORBOARD=True needs the tensorboard package: `pip install -e '.[tensorboard]'` "
                                  "(or set TENSORBOARD=False).") from e

            self.tb = SummaryWriter(str(self.phase_dir / "tensorboard"))

    # ----- state -----
    def collect(self) -> dict | None:
        """The checkpoint payload on rank 0 (None elsewhere). Every rank contributes its RNG states (a collective),
        so a multi-rank resume restores each rank's own stream."""
        from cellseg.checkpoint import collect_state
        from cellseg.checkpoint.state import collect_rng_all_ranks

        generators = {"loader": self.loader.generator}
        rng_ranks = collect_rng_all_ranks(generators) if self.ctx.env.distributed else None
        if not self.ctx.is_main:
            return None
        state = collect_state(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                              progress=self.progress, config=self.cfg.to_dict(), generators=generators,
                              rng_ranks=rng_ranks)
        state["identity"] = self.identity  # plain types: what this run is (checked by RESUME='auto')
        state["data"] = dict(self.data_info)  # prediction reads class names and resolution from here (issue 13)
        return state

    def resume(self) -> bool:
        """Restore from the phase's checkpoints according to ``RESUME``; True when something was restored."""
        cfg = self.cfg
        progress = self.ckpt.resume(cfg.RESUME, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                    scaler=self.scaler, strict=cfg.STRICT_LOAD,
                                    ignore_network=cfg.IGNORE_RESUME_NETWORK, merge_lora=cfg.MERGE_LORA,
                                    force_recreate=cfg.FORCE_RECREATE, generators={"loader": self.loader.generator},
                                    identity=self.identity, allow_changes=tuple(cfg.ALLOW_CHANGES))
        if progress is None:
            return False
        from cellseg.checkpoint.identity import check_resume_position

        check_resume_position(progress, self.plan.to_dict(), where=str(self.ckpt.resumed_from or cfg.RESUME))
        self.progress.update(progress)
        self.progress["sample_plan"] = self.plan.to_dict()
        log.info("resumed Phase %d at epoch %d, step %d (batch %d of the epoch), best %s=%s, patience %d/%d",
                 cfg.PHASE, self.progress["epoch"], self.progress["step"], self.progress["batch_in_epoch"],
                 cfg.MONITOR_METRIC, self.progress["best_metric"], self.progress["patience_counter"], self.patience)
        self._rewrite_history()
        return True

    def remaining_epochs(self):
        while self.progress["epoch"] < self.cfg.EPOCHS and not self.early_stopped and self.stopped_reason is None:
            yield self.progress["epoch"]

    # ----- one epoch -----
    def _save(self, *, epoch_end: bool, is_best: bool, reason: str) -> None:
        state = self.collect()
        self.ckpt.save(state, epoch_end=epoch_end, is_best=is_best, reason=reason)

    def _check_stop(self) -> str | None:
        reason = self.stop.reason if self.stop is not None else None
        if any_true(reason is not None):
            return reason or "another rank stopped"
        return None

    def train_one_epoch(self, epoch: int) -> dict | None:
        """Train one epoch (or its remainder after a mid-epoch resume). Returns mean losses, or None when stopped.

        An error on any rank stops every rank at the same micro-batch (:mod:`cellseg.training.together`) and rank 0
        writes ``status.json`` 'failed' with the reason and the failing rank.
        """
        try:
            return self._train_epoch(epoch)
        except Exception as e:
            self._record_failure(e)
            raise

    def _record_failure(self, error: BaseException) -> None:
        from cellseg.stopping import write_run_status
        from cellseg.training.together import RankFailure, describe_error

        rank = error.rank if isinstance(error, RankFailure) else self.ctx.env.rank
        reason = error.args[0] if isinstance(error, RankFailure) else describe_error(error)
        if self.ctx.is_main:
            write_run_status(self.phase_dir / "status.json", "failed", reason, resumable=False, rank=rank,
                             world_size=self.ctx.env.world_size, epoch=self.progress["epoch"],
                             step=self.progress["step"], phase=self.cfg.PHASE)

    def _train_epoch(self, epoch: int) -> dict | None:
        from cellseg.training.together import fail_together

        cfg, p = self.cfg, self.progress
        start_step = p.get("step_in_epoch", 0)
        if start_step == 0:
            p["epoch_sums"], p["epoch_samples"], p["batch_in_epoch"] = {}, 0, 0
        n_steps, world = self.plan.steps_per_epoch, self.ctx.env.world_size
        self.sampler.set_epoch(epoch, start_step=start_step)
        self.net.train()
        it = iter(self.loader)
        t0, seen = time.perf_counter(), 0
        for g_idx, (block, micro) in enumerate(self.sampler.steps(epoch, start_step), start=start_step):
            sizes = [len(mb) for mb in micro]
            self.optimizer.zero_grad(set_to_none=True)
            for k, n_b in enumerate(sizes):
                error = None
                try:
                    batch = {key: v.to(self.device, non_blocking=True) for key, v in next(it).items()}
                except Exception as e:  # every rank must hear of it before the forward pass's collectives
                    error = e
                fail_together(error, where=f"loading a batch at epoch {epoch}, step {p['step']}")
                try:
                    x = batch["image"]
                    if cfg.CHANNELS_LAST:
                        x = x.contiguous(memory_format=torch.channels_last)
                    sync = k == len(sizes) - 1 or not hasattr(self.net, "no_sync")
                    with (nullcontext() if sync else self.net.no_sync()), autocast_context(self.precision, self.device):
                        out = self.net(x)
                        losses = self.loss_fn(out, batch)
                    # this micro-batch's share of the step's block (DDP averages over ranks, hence x world): the
                    # step's gradient is the mean over the block however it is split; an empty share (weight 0) only
                    # joins the all-reduce
                    loss = losses["total"] * (n_b * world / len(block))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss at epoch {epoch}, step {p['step']}: "
                            f"{ {k2: float(v.detach()) for k2, v in losses.items()} }. Lower the learning rate "
                            "or use PRECISION='bf16'/'fp32'.")
                except Exception as e:  # before backward: the gradient all-reduce would wait for this rank forever
                    error = e
                fail_together(error, where=f"in the forward pass or loss at epoch {epoch}, step {p['step']}")
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                for key in LOSS_KEYS:
                    p["epoch_sums"][key] = p["epoch_sums"].get(key, 0.0) + float(losses[key].detach()) * n_b
                p["epoch_samples"] += n_b
                seen += n_b
            stepped = self._optimizer_step()
            p["step"] += 1
            p["step_in_epoch"] = g_idx + 1
            p["batch_in_epoch"] += len(sizes)
            if stepped:
                self.scheduler.step_on_optimizer_step()
            if p["step"] % cfg.LOG_EVERY == 0 and self.ctx.is_main:
                mean = p["epoch_sums"]["total"] / max(1, p["epoch_samples"])
                lrs = current_lrs(self.optimizer)
                elapsed = max(1e-9, time.perf_counter() - t0)
                log.info(progress_line(epoch=epoch, epochs=cfg.EPOCHS, step=g_idx + 1, steps=n_steps, loss=mean,
                                       lrs=lrs, img_per_s=seen * self.ctx.env.world_size / elapsed,
                                       metric=cfg.MONITOR_METRIC, best=p["best_metric"],
                                       sec_per_step=elapsed / (g_idx + 1 - start_step),
                                       val_s=self._last_val_s))
            reason = self._check_stop()
            if reason is not None:
                self._stop(reason)
                return None
            if cfg.SAVE_EVERY_STEPS and p["step"] % cfg.SAVE_EVERY_STEPS == 0 and g_idx < n_steps - 1:
                self._save(epoch_end=False, is_best=False, reason="step")
        # ranks may hold different image counts (a short last block): reduce sums and counts, then divide
        sums = all_reduce_mean({**p["epoch_sums"], "__samples__": float(p["epoch_samples"])})
        count = sums.pop("__samples__")
        return {k: v / max(1e-12, count) for k, v in sums.items()}

    def _optimizer_step(self) -> bool:
        """Clip, step; returns False when AMP skipped the step (inf/nan gradients). The first step of this phase's
        process audits the gradients first (:func:`cellseg.training.audit.audit_gradients`)."""
        params = [q for g in self.optimizer.param_groups for q in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # unscale before clipping
        if not getattr(self, "_gradients_audited", False):
            from cellseg.training.audit import audit_gradients

            n = audit_gradients(self.model, phase=self.cfg.PHASE, grad_checkpointing=self.cfg.GRAD_CHECKPOINTING,
                                allow_non_finite=self.scaler is not None)
            self._gradients_audited = True
            log.info("gradient audit: all %d trainable parameters received finite gradients, frozen ones none", n)
        if self.scaler is not None:
            if self.cfg.GRAD_CLIP:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.GRAD_CLIP)
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return self.scaler.get_scale() >= scale
        if self.cfg.GRAD_CLIP:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.GRAD_CLIP)
        self.optimizer.step()
        return True

    def _stop(self, reason: str) -> None:
        from cellseg.stopping import write_run_status

        self.stopped_reason = reason
        log.warning("stop requested (%s): saving latest at epoch %d step %d", reason, self.progress["epoch"],
                    self.progress["step"])
        self._save(epoch_end=False, is_best=False, reason=f"stop: {reason}")
        if self.ctx.is_main:
            self.ckpt.ledger_event("stop", reason=reason, epoch=self.progress["epoch"], step=self.progress["step"])
            write_run_status(self.phase_dir / "status.json", "preempted", reason, resumable=True,
                             epoch=self.progress["epoch"], step=self.progress["step"], phase=self.cfg.PHASE)
            _consume_stop_file(Path(self.cfg.RUN_DIR) / "STOP")
        barrier()

    # ----- epoch end -----
    def validate(self, epoch: int) -> dict:
        self.net.eval()
        t0 = time.perf_counter()
        try:
            return self.validate_fn(self.model, epoch)
        except Exception as e:
            self._record_failure(e)
            raise
        finally:
            self._last_val_s = time.perf_counter() - t0  # for the progress line's time left
            self.net.train()

    def improved(self, value: float) -> bool:
        best = self.progress["best_metric"]
        if value is None or math.isnan(value):
            return False
        if best is None:
            return True
        return value > best if self.cfg.MONITOR_MODE == "max" else value < best

    def end_epoch(self, epoch: int, train_stats: dict, val: dict) -> bool:
        """Scheduler, history, best/patience, checkpoints. Returns False when early stopping ends the phase."""
        cfg, p = self.cfg, self.progress
        if cfg.MONITOR_METRIC not in val:
            raise KeyError(f"MONITOR_METRIC='{cfg.MONITOR_METRIC}' is not among the validation metrics "
                           f"{sorted(k for k, v in val.items() if isinstance(v, (int, float)))}.")
        value = float(val[cfg.MONITOR_METRIC])
        self.scheduler.step_on_epoch_end(value)
        is_best = self.improved(value)
        if is_best:
            p["best_metric"], p["best_epoch"], p["patience_counter"] = value, epoch, 0
        else:
            p["patience_counter"] += 1
        record = {"epoch": epoch, "step": p["step"], "lr": current_lrs(self.optimizer),
                  "train_loss": {k: float(v) for k, v in train_stats.items()}, "val": _jsonable(val),
                  "monitor": {cfg.MONITOR_METRIC: value}, "is_best": is_best, "best_metric": p["best_metric"],
                  "patience_counter": p["patience_counter"]}
        if val.get("class_collapse"):
            record["class_collapse"] = val["class_collapse"]
            log.warning("CLASS COLLAPSE at epoch %d: classes present in the ground truth but never predicted: %s",
                        epoch, val["class_collapse"])
        p["history"].append(record)
        p["epoch"], p["batch_in_epoch"], p["step_in_epoch"] = epoch + 1, 0, 0
        p["epoch_sums"], p["epoch_samples"] = {}, 0
        self._save(epoch_end=True, is_best=is_best, reason="epoch")
        if self.ctx.is_main:
            self._append_history(record)
            if self.tb is not None:
                for k, v in record["train_loss"].items():
                    self.tb.add_scalar(f"train/{k}", v, epoch)
                for k, v in record["lr"].items():
                    self.tb.add_scalar(f"lr/{k}", v, epoch)
                for k, v in record["val"].items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"val/{k}", v, epoch)
            log.info("epoch %d done: loss %.4f, %s %.4f%s, patience %d/%d", epoch, train_stats["total"],
                     cfg.MONITOR_METRIC, value, " (best)" if is_best else "", p["patience_counter"], self.patience)
        if self.patience and p["patience_counter"] >= self.patience:
            log.info("early stopping: %s did not improve for %d epochs (best %.4f at epoch %s)", cfg.MONITOR_METRIC,
                     self.patience, p["best_metric"], p["best_epoch"])
            self.early_stopped = True
            return False
        return True

    def finish(self) -> dict:
        """Write the final status marker; returns a short summary."""
        from cellseg.stopping import write_run_status

        summary = {"phase": self.cfg.PHASE, "epochs_done": self.progress["epoch"], "steps": self.progress["step"],
                   "best_metric": self.progress["best_metric"], "best_epoch": self.progress["best_epoch"],
                   "stopped": self.stopped_reason, "early_stopped": self.early_stopped,
                   "param_checksum": param_checksum(self.model)}
        # printed, not logged: non-main ranks log warnings only, and the DDP checks compare every rank's line
        print(f"rank {self.ctx.env.rank} parameter checksum {summary['param_checksum']:.10e}", flush=True)
        if self.stopped_reason is None and self.ctx.is_main:
            self.ckpt.ledger_event("finished", epoch=self.progress["epoch"], step=self.progress["step"])
            write_run_status(self.phase_dir / "status.json", "finished", "early stopping" if self.early_stopped
                             else "all epochs done", resumable=False, **{k: summary[k] for k in ("epochs_done", "steps")},
                             phase=self.cfg.PHASE)
        if self.tb is not None:
            self.tb.close()
        barrier()
        return summary

    def fit(self) -> dict:
        for epoch in self.remaining_epochs():
            stats = self.train_one_epoch(epoch)
            if stats is None:
                break
            if not self.end_epoch(epoch, stats, self.validate(epoch)):
                break
        return self.finish()

    # ----- history file -----
    def _append_history(self, record: dict) -> None:
        self.phase_dir.mkdir(parents=True, exist_ok=True)
        with open(self.phase_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rewrite_history(self) -> None:
        """After a resume the checkpoint's history is the truth (a killed run may have logged an epoch it never saved)."""
        if not self.ctx.is_main:
            return
        self.phase_dir.mkdir(parents=True, exist_ok=True)
        path = self.phase_dir / "history.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.progress["history"]))
        tmp.replace(path)


def _consume_stop_file(path: Path) -> None:
    """Rename a STOP file that was acted on, so the requeued job does not stop again at once."""
    if path.exists():
        path.replace(path.with_name(f"STOP.handled-{time.strftime('%Y%m%dT%H%M%S')}"))


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, (list, tuple)):
            out[k] = [float(x) if hasattr(x, "item") else x for x in v]
        elif hasattr(v, "item"):
            out[k] = v.item()
        else:
            out[k] = v
    return out
