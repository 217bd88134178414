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
    class_weights: list | None = None  # NC weights in use: CLASS_WEIGHTS, or derived from the training split
    class_weights_source: str = "CLASS_WEIGHTS"


def load_training_data(cfg: Config) -> TrainData:
    """Open the prepared cache (written by notebooks/00_prepare_data.ipynb) for training and validation."""
    from cellseg.data import CellDataset, sample_weights
    from cellseg.data.dataset import class_weights_from_counts
    from cellseg.data.provenance import check_cache
    from cellseg.model.normalization import resolve_normalization

    manifest = check_cache(cfg, notebook="01_train")  # refuses a cache prepared for other parameters (DATASET, DATA_ROOT, SEED, ...)
    names = list(manifest["class_names"])
    # the same resolution build_model_from_config makes; build_trainer checks that both agree
    norm, _ = resolve_normalization(cfg.ENCODER, cfg.ENCODER_WEIGHTS, cfg.NORM_MEAN, cfg.NORM_STD)
    train = CellDataset(cfg.data_cache, "train", patch_size=cfg.PATCH_SIZE, augment=cfg.AUGMENT, seed=cfg.SEED,
                        class_names=names, normalization=norm, scale=cfg.INPUT_SCALE,
                        ignore_unlabelled=cfg.IGNORE_UNLABELLED, rare_crops=cfg.OVERSAMPLE_RARE)
    val = CellDataset(cfg.data_cache, "val", patch_size=None, augment=False, seed=cfg.SEED, class_names=names,
                      normalization=norm, scale=cfg.INPUT_SCALE, ignore_unlabelled=cfg.IGNORE_UNLABELLED)
    weights = sample_weights(train) if cfg.OVERSAMPLE_RARE else None
    if cfg.CLASS_WEIGHTS:
        cw, source = list(cfg.CLASS_WEIGHTS), "CLASS_WEIGHTS"
    else:  # class imbalance by default: weights from the training split's labelled pixels (the NC loss is per pixel)
        cw, source = class_weights_from_counts(train.class_pixel_counts()), "pixel frequencies (sqrt, cap 10)"
    log.info("data: %d training / %d validation images, classes %s (cache %s); NC class weights %s from %s",
             len(train), len(val), names, cfg.data_cache, cw, source)
    return TrainData(manifest, names, train, val, weights, cw, source)


def build_phase_model(cfg: Config, ctx: RunContext, class_names: list[str]):
    """Build the network, freeze / wrap it for the phase, and write ``params.json``. Returns (model, counts)."""
    from cellseg.model import build_model_from_config
    from cellseg.optim import (
        check_encoder_source,
        configure_phase,
        count_params,
        training_mode,
        write_params_json,
    )

    check_encoder_source(cfg)  # before building: a random encoder must not be frozen
    model = build_model_from_config(cfg, num_classes=len(class_names))
    n_lora = configure_phase(model, cfg)
    extra = {"mode": training_mode(cfg), "train_encoder_p1": cfg.TRAIN_ENCODER_P1, "input_scale": cfg.INPUT_SCALE}
    counts = (write_params_json(model, cfg.phase_dir() / "params.json", extra) if ctx.is_main
              else {**count_params(model), **extra})
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
    loss_fn = loss_from_config(cfg, len(data.class_names), data.class_weights)
    if ctx.is_main:
        record_params(cfg, class_weights=data.class_weights, class_weights_source=data.class_weights_source)
    ckpt = CheckpointManager(cfg.checkpoint_dir(), phase=cfg.PHASE, keep_last=cfg.KEEP_LAST, is_main=ctx.is_main,
                             barrier=barrier, code_version=__version__)
    stop = StopRequest(list(cfg.STOP_SIGNALS), stop_file=ctx.run_dir / "STOP", deadline=cfg.STOP_AT or None)
    stop.install()
    precision = resolve_precision(cfg.PRECISION, ctx.device)

    def validate_fn(model, epoch):
        return run_validation(model, data.val, loss_fn.to(ctx.device), class_names=data.class_names,
                              device=ctx.device, rank=ctx.env.rank, world_size=ctx.env.world_size,
                              max_images=cfg.VAL_MAX_IMAGES, object_diameter=cfg.OBJECT_DIAMETER * cfg.INPUT_SCALE,
                              precision_ctx=partial(autocast_context, precision, ctx.device))

    return Trainer(ctx, model, loss_fn, data.train, validate_fn=validate_fn, ckpt=ckpt, stop=stop,
                   sample_weights=data.sample_weights, identity_facts=identity_facts(cfg, data.manifest))


def identity_facts(cfg: Config, manifest: dict) -> dict:
    """The run-identity facts the Trainer cannot see: the prepared cache's content fingerprint (the Trainer adds the
    encoder weights' hash, the effective batch and, in Phase 2, the Phase 1 file's hash itself)."""
    from cellseg.data.provenance import cache_fingerprint

    return {"dataset_fingerprint": cache_fingerprint(manifest)}


def record_params(cfg: Config, **entries) -> dict:
    """Add entries to the phase's ``params.json`` (what the run's summary and the evaluation report read back)."""
    import json

    path = cfg.phase_dir() / "params.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def read_params(cfg: Config, phase: int | None = None) -> dict:
    """The phase's ``params.json`` ({} when the phase has not been set up)."""
    import json

    path = cfg.phase_dir(phase) / "params.json"
    return json.loads(path.read_text()) if path.exists() else {}


def training_description(cfg: Config) -> str:
    """How the evaluated checkpoint was trained, from the phases' ``params.json`` (for the evaluation report)."""
    parts = []
    for phase in range(1, cfg.EVAL_PHASE + 1):
        mode = read_params(cfg, phase).get("mode")
        parts.append(f"Phase {phase}: {mode or 'not recorded (no params.json)'}")
    return "; ".join(parts)


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


__all__ = ["load_training_data", "build_phase_model", "build_trainer", "start_phase", "train_phase", "record_params",
           "read_params", "training_description", "__version__"]
