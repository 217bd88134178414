"""Load a trained checkpoint for inference: rebuild the network the checkpoint describes (LoRA included) and load
its weights through the checkpoint module's compatibility checks."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cellseg.config import Config

log = logging.getLogger(__name__)


def checkpoint_path(cfg: Config) -> Path:
    """``EVAL_CHECKPOINT`` ('best' | 'latest' | a path) of phase ``EVAL_PHASE``, which must exist."""
    if cfg.EVAL_CHECKPOINT in ("best", "latest"):
        path = cfg.checkpoint_dir(cfg.EVAL_PHASE) / f"{cfg.EVAL_CHECKPOINT}.pt"
    else:
        path = Path(cfg.EVAL_CHECKPOINT)
    if not path.is_file():
        raise FileNotFoundError(
            f"EVAL_CHECKPOINT='{cfg.EVAL_CHECKPOINT}' (EVAL_PHASE={cfg.EVAL_PHASE}) -> {path} does not exist. Train that "
            f"phase first (notebooks/01_train.ipynb -p PHASE {cfg.EVAL_PHASE}), or set EVAL_CHECKPOINT to 'latest' or a "
            "path.")
    return path


def load_trained_model(cfg: Config, *, num_classes: int, device: torch.device):
    """Build the model for ``cfg``, add the checkpoint's LoRA adapters if it has them, load, move, eval mode.

    Returns (model, checkpoint path).
    """
    from cellseg.checkpoint import load_weights, read_sidecar
    from cellseg.model import build_model_from_config
    from cellseg.model.lora import apply_lora

    path = checkpoint_path(cfg)
    model = build_model_from_config(cfg, num_classes=num_classes)
    lora = (read_sidecar(path).get("arch") or {}).get("lora")
    if lora:
        apply_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["targets"],
                   blocks=lora["blocks"])
    report = load_weights(model, path, strict=cfg.STRICT_LOAD, merge_lora=cfg.MERGE_LORA)
    log.info("loaded %s: %s", path, report)
    model.checkpoint_file = str(path)  # inference names it in its errors (NaN outputs)
    return model.to(device).eval(), path
