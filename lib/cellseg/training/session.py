"""The steps of ``notebooks/01_train.ipynb``, one function per notebook section, shared with ``cellseg train``.

Phases hand off through files only: Phase 2 reads Phase 1's checkpoints from ``CHECKPOINT_DIR/phase1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from cellseg import __version__
from cellseg.config import Config
from cellseg.distributed import barrier
from cellseg.runtime import RunContext, setup_run

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    manifest: dict
    class_names: list[str]
    train: object
    val: object
    sample_weights: object = None


def load_training_data(cfg: Config) -> TrainData:
    """Open the prepared cache (written by notebooks/00_prepare_data.ipynb) for training and validation."""
    from cellseg.data import CellDataset, sample_weights
    from cellseg.data.provenance import check_cache
    from cellseg.model.normalization import resolve_normalization

    manifest = check_cache(cfg)  # refuses a cache prepared for other parameters (DATASET, DATA_ROOT, SEED, ...)
    names = list(manifest["class_names"])
    # the same resolution build_model_from_config makes; build_trainer checks that both agree
    norm, _ = resolve_normalization(cfg.ENCODER, cfg.ENCODER_WEIGHTS, cfg.NORM_MEAN, cfg.NORM_STD)
    train = CellDataset(cfg.data_cache, "train", patch_size=cfg.PATCH_SIZE, augment=cfg.AUGMENT, seed=cfg.SEED,
                        class_names=names, normalization=norm)
    val = CellDataset(cfg.data_cache, "val", patch_size=None, augment=False, seed=cfg.SEED, class_names=names,
                      normalization=norm)
    weights = sample_weights(train) if cfg.OVERSAMPLE_RARE else None
    log.info("data: %d training / %d validation images, classes %s (cache %s)", len(train), len(val), names,
             cfg.data_cache)
    return TrainData(manifest, names, train, val, weights)


def build_phase_model(cfg: Config, ctx: RunContext, class_names: list[str]):
    """Build the network, freeze / wrap it for the phase, and write ``params.json``. Returns (model, counts)."""
    from cellseg.model import build_model_from_config
    from cellseg.optim import configure_phase, count_params, write_params_json

    model = build_model_from_config(cfg, num_classes=len(class_names))
    n_lora = configure_phase(model, cfg)
    counts = write_params_json(model, cfg.phase_dir() / "params.json") if ctx.is_main else count_params(model)
    counts["lora_modules"] = n_lora
    return model, counts


def build_trainer(cfg: Config, ctx: RunContext, model, data: TrainData):
    """Loss, checkpoint manager, stop request, validation, optimizer and scheduler (built before any state is loaded)."""
    from cellseg.checkpoint import CheckpointManager
    from cellseg.losses import loss_from_config
    from cellseg.model.normalization import model_normalization
    from cellseg.stopping import StopRequest
    from cellseg.training.trainer import Trainer, autocast_context, resolve_precision
    from cellseg.training.validation import run_validation

    for ds in (data.train, data.val):
        if getattr(ds, "normalization", None) is not None and ds.normalization != model_normalization(model):
            raise ValueError(f"the {ds.split} data are normalised with {ds.normalization} but the model expects "
                             f"{model_normalization(model)}: build both from the same cfg (NORM_MEAN / NORM_STD, "
                             "ENCODER, ENCODER_WEIGHTS) by re-running the data and model cells.")
    loss_fn = loss_from_config(cfg, len(data.class_names))
    ckpt = CheckpointManager(cfg.checkpoint_dir(), phase=cfg.PHASE, keep_last=cfg.KEEP_LAST, is_main=ctx.is_main,
                             barrier=barrier, code_version=__version__)
    stop = StopRequest(list(cfg.STOP_SIGNALS), stop_file=ctx.run_dir / "STOP", deadline=cfg.STOP_AT or None)
    stop.install()
    precision = resolve_precision(cfg.PRECISION, ctx.device)

    def validate_fn(model, epoch):
        return run_validation(model, data.val, loss_fn.to(ctx.device), class_names=data.class_names,
                              device=ctx.device, rank=ctx.env.rank, world_size=ctx.env.world_size,
                              max_images=cfg.VAL_MAX_IMAGES, object_diameter=cfg.OBJECT_DIAMETER,
                              precision_ctx=partial(autocast_context, precision, ctx.device))

    return Trainer(ctx, model, loss_fn, data.train, validate_fn=validate_fn, ckpt=ckpt, stop=stop,
                   sample_weights=data.sample_weights, identity_facts=identity_facts(cfg, data.manifest))


def identity_facts(cfg: Config, manifest: dict) -> dict:
    """The run-identity facts the Trainer cannot see: the prepared cache's content fingerprint (the Trainer adds the
    encoder weights' hash, the effective batch and, in Phase 2, the Phase 1 file's hash itself)."""
    from cellseg.data.provenance import cache_fingerprint

    return {"dataset_fingerprint": cache_fingerprint(manifest)}


def start_phase(cfg: Config, trainer) -> str:
    """Resume this phase (``RESUME``) or, for a fresh Phase 2, load Phase 1's weights (``INIT_FROM``). Returns what
    happened, in words."""
    if trainer.resume():
        p = trainer.progress
        return f"resumed Phase {cfg.PHASE} at epoch {p['epoch']}, step {p['step']}"
    if cfg.PHASE == 2:
        from cellseg.checkpoint import init_phase2

        src = init_phase2(trainer.model, cfg.checkpoint_dir(1), cfg.INIT_FROM, strict=cfg.STRICT_LOAD,
                          merge_lora=cfg.MERGE_LORA, ledger_dir=cfg.checkpoint_dir(2))
        if src is not None:  # lineage: the file actually loaded (best.pt may have been rejected for latest.pt)
            from cellseg.checkpoint.identity import phase1_source

            trainer.identity["facts"]["phase1_sha256"] = phase1_source(src.parent, str(src))["sha256"]
        return f"Phase 2 starts from {src}" if src else "Phase 2 starts from a fresh model (INIT_FROM='fresh')"
    return "Phase 1 starts fresh"


def train_phase(cfg: Config) -> dict:
    """The whole of notebooks/01_train.ipynb without the notebook (``cellseg train``)."""
    from cellseg.plots import plot_history, read_history

    ctx = setup_run(cfg, "01_train")
    data = load_training_data(cfg)
    model, counts = build_phase_model(cfg, ctx, data.class_names)
    trainer = build_trainer(cfg, ctx, model, data)
    log.info(start_phase(cfg, trainer))
    summary = trainer.fit()
    trainer.stop.uninstall()
    if ctx.is_main and (cfg.phase_dir() / "history.jsonl").exists():
        plot_history(read_history(cfg.phase_dir() / "history.jsonl"), cfg.phase_dir())
    return {**summary, "params": counts}


__all__ = ["load_training_data", "build_phase_model", "build_trainer", "start_phase", "train_phase", "__version__"]
