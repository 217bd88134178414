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
    path = checkpoint_path(cfg)
    return load_checkpoint_model(path, cfg, num_classes=num_classes, device=device), path


def load_checkpoint_model(path: str | Path, cfg: Config, *, num_classes: int, device: torch.device | str,
                          base_weights: str | None = None):
    """The network of checkpoint ``path`` for inference, in eval mode on ``device``: either form of checkpoint.

    - A compact checkpoint (frozen base encoder weights left out, see :mod:`cellseg.checkpoint.base`) is completed
      from ``base_weights``, else ``ENCODER_WEIGHTS``, whose SHA-256 must be the recorded one.
    - A self-contained one (a full training checkpoint, or ``cellseg ckpt export --merge``) needs no base file: the
      encoder is built without reading ``ENCODER_WEIGHTS`` and every tensor comes from the checkpoint.

    The input normalisation is the checkpoint's (ImageNet for checkpoints that predate storing it, which were all
    trained with it), so predictions see inputs scaled as in training.

    Raises:
        ValueError: ``NORM_MEAN`` / ``NORM_STD`` set to values other than the checkpoint's.
        IncompatibleCheckpoint, CorruptCheckpoint: see :func:`cellseg.checkpoint.load_weights`.
    """
    from cellseg.checkpoint import load_weights, read_sidecar
    from cellseg.model import build_model_from_config
    from cellseg.model.lora import apply_lora
    from cellseg.model.normalization import IMAGENET

    path = Path(path)
    side = read_sidecar(path)
    arch = side.get("arch") or {}
    compact = bool(side.get("base_weights"))
    if not compact:
        log.info("%s is self-contained: the encoder comes from it, ENCODER_WEIGHTS is not read", path)
    # a compact checkpoint reads its base from ENCODER_WEIGHTS when that file is there; otherwise (or with an explicit
    # base_weights) load_weights tries the recorded path and explains a missing or different file
    own = cfg.ENCODER_WEIGHTS not in ("", "none", "None") and Path(cfg.ENCODER_WEIGHTS).is_file()
    model = build_model_from_config(cfg, num_classes=num_classes, load_weights=compact and own and not base_weights)
    norm = arch.get("normalization") or dict(IMAGENET)
    if cfg.NORM_MEAN and {"mean": [float(v) for v in cfg.NORM_MEAN], "std": [float(v) for v in cfg.NORM_STD]} != norm:
        raise ValueError(f"NORM_MEAN={cfg.NORM_MEAN} / NORM_STD={cfg.NORM_STD} differ from the normalisation {path} was "
                         f"trained with (mean {norm['mean']}, std {norm['std']}); predictions would see inputs scaled "
                         "differently from training. Leave NORM_MEAN and NORM_STD empty ([]) to use the checkpoint's.")
    model.arch["normalization"] = norm
    lora = arch.get("lora")
    if lora:
        apply_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["targets"],
                   blocks=lora["blocks"])
    report = load_weights(model, path, strict=cfg.STRICT_LOAD, merge_lora=cfg.MERGE_LORA, base_weights=base_weights)
    log.info("loaded %s: %s; input normalisation mean %s std %s", path, report, norm["mean"], norm["std"])
    model.checkpoint_file = str(path)  # inference names it in its errors (NaN outputs)
    return model.to(device).eval()

