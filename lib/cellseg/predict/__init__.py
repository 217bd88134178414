"""Apply a trained model to new images and whole slides: readers, tissue detection, windows with a seam rule,
resumable streaming prediction and exports for QuPath, napari and spreadsheets (issue 13).

``cellseg predict`` and ``notebooks/03_predict.ipynb`` both call :func:`load_predictor` then
:func:`predict_inputs`.
"""

from cellseg.predict.readers import InputError, collect_inputs, open_reader
from cellseg.predict.run import PredictSettings, predict_inputs, predict_one
from cellseg.predict.settings import (
    CheckpointMismatch,
    Predictor,
    load_predictor,
    postprocess_sidecar_path,
    write_postprocess_sidecar,
)
from cellseg.predict.tiling import Window, owned_instances, plan_windows

__all__ = ["InputError", "collect_inputs", "open_reader", "PredictSettings", "predict_inputs", "predict_one",
           "CheckpointMismatch", "Predictor", "load_predictor", "postprocess_sidecar_path",
           "write_postprocess_sidecar", "Window", "owned_instances", "plan_windows", "settings_from_config",
           "predict_checkpoint_path", "resolve_inputs"]


def settings_from_config(cfg, device) -> PredictSettings:
    """:class:`PredictSettings` from a validated :class:`cellseg.config.Config` (``PREDICT_*``, ``TILE_*``, ``TTA``,
    ``PRECISION``)."""
    from pathlib import Path

    from cellseg.training.trainer import resolve_precision

    out = Path(cfg.PREDICT_OUT) if cfg.PREDICT_OUT else cfg.run_dir / "predict"
    return PredictSettings(out_dir=out, level=cfg.PREDICT_LEVEL, mpp=cfg.PREDICT_MPP or None, tissue=cfg.PREDICT_TISSUE,
                           window=cfg.PREDICT_WINDOW, tile_size=cfg.TILE_SIZE or None, overlap=cfg.TILE_OVERLAP,
                           tta=cfg.TTA, amp=resolve_precision(cfg.PRECISION, device).replace("fp32", "none"),
                           batch_size=cfg.PREDICT_BATCH, device=device)


def predict_checkpoint_path(cfg):
    """``PREDICT_CHECKPOINT`` ('best' | 'latest' of ``EVAL_PHASE``, or a path) as a path (existence is checked by
    :func:`load_predictor`)."""
    from pathlib import Path

    if cfg.PREDICT_CHECKPOINT in ("best", "latest"):
        return cfg.checkpoint_dir(cfg.EVAL_PHASE) / f"{cfg.PREDICT_CHECKPOINT}.pt"
    return Path(cfg.PREDICT_CHECKPOINT)


def resolve_inputs(cfg) -> list[str]:
    """``PREDICT_INPUT``, or when empty the ``EVAL_SPLIT`` folder of the prepared cache (a demo on held-out images)."""
    if cfg.PREDICT_INPUT:
        return list(cfg.PREDICT_INPUT)
    return [str(cfg.data_cache / cfg.EVAL_SPLIT / "*.png")]
