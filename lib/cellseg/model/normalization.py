"""The input normalisation (per-channel mean/std of RGB in [0, 1]) an encoder was pretrained with.

An encoder only computes what it learned when its input is scaled as in pretraining: ImageNet statistics for UNI
(its model card) and torchvision/timm ImageNet models, (0.5, 0.5, 0.5) for many timm ViTs, CLIP's for CLIP towers.
The values come, first match wins, from ``NORM_MEAN`` / ``NORM_STD`` (an explicit override), the ``config.json`` next to
``ENCODER_WEIGHTS`` (the Hugging Face / timm hub layout: ``pretrained_cfg.mean`` / ``.std`` or top-level ``mean`` /
``std``), UNI's model card for 'uni' / 'uni2', then timm's ``pretrained_cfg`` of the architecture. They are stored in
the model's architecture fingerprint (so in every checkpoint) and reused by evaluation and prediction.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# UNI / UNI2-h model cards: ImageNet mean/std on RGB in [0, 1]
FOUNDATION_NORMALIZATION = {"uni": IMAGENET, "uni2": IMAGENET}


def check_normalization(mean: list, std: list, where: str = "NORM_MEAN / NORM_STD") -> dict:
    """``{'mean': [...], 'std': [...]}`` as floats after checking three finite values each and std > 0.

    Raises:
        ValueError: wrong lengths, non-numbers, or a std that is not > 0 (names ``where``).
    """
    try:
        m, s = [float(v) for v in mean], [float(v) for v in std]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: mean and std must be lists of 3 numbers (RGB), got {mean!r} and {std!r}.") from e
    if len(m) != 3 or len(s) != 3 or not all(math.isfinite(v) for v in m + s) or not all(v > 0 for v in s):
        raise ValueError(f"{where}: mean and std must be 3 finite numbers each (RGB in [0, 1]), std > 0, got mean {m} "
                         f"and std {s}. Example: NORM_MEAN=[0.485, 0.456, 0.406] NORM_STD=[0.229, 0.224, 0.225] "
                         "(ImageNet); leave both empty ([]) to use the encoder's own.")
    return {"mean": m, "std": s}


def _from_config_json(weights: str) -> dict | None:
    if not weights:
        return None
    cfg_file = Path(weights).with_name("config.json")
    if not cfg_file.is_file():
        return None
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file} (next to ENCODER_WEIGHTS) is not readable JSON ({e}); it would give the "
                         "encoder's normalisation. Fix or remove it, or set NORM_MEAN and NORM_STD.") from e
    for block in (data.get("pretrained_cfg") or {}, data):
        if isinstance(block, dict) and "mean" in block and "std" in block:
            return check_normalization(block["mean"], block["std"], where=str(cfg_file))
    return None


def resolve_normalization(encoder: str, weights: str = "", mean: list | None = None,
                          std: list | None = None) -> tuple[dict, str]:
    """The normalisation for ``ENCODER`` / ``ENCODER_WEIGHTS`` and the override ``NORM_MEAN`` / ``NORM_STD``.

    Returns ({'mean': [3 floats], 'std': [3 floats]}, where the values came from, in words).

    Raises:
        ValueError: only one of mean/std given, or bad values (see :func:`check_normalization`).
    """
    mean, std = list(mean or []), list(std or [])
    if bool(mean) != bool(std):
        raise ValueError(f"NORM_MEAN and NORM_STD go together: got NORM_MEAN={mean} and NORM_STD={std}. Set both "
                         "(3 numbers each) or leave both empty ([]) to use the encoder's own normalisation.")
    if mean:
        return check_normalization(mean, std), "NORM_MEAN / NORM_STD"
    weights = "" if weights in ("", "none", "None") else weights
    found = _from_config_json(weights)
    if found is not None:
        return found, f"{Path(weights).with_name('config.json')}"
    if encoder in FOUNDATION_NORMALIZATION:
        return dict(FOUNDATION_NORMALIZATION[encoder]), f"the '{encoder}' model card (ImageNet mean/std)"
    import timm

    cfg = timm.get_pretrained_cfg(encoder) if timm.is_model(encoder) else None
    if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
        return check_normalization(cfg.mean, cfg.std, where=f"timm pretrained_cfg of {encoder}"), \
            f"timm's pretrained_cfg of '{encoder}'"
    return dict(IMAGENET), f"ImageNet mean/std (timm has no pretrained_cfg for '{encoder}')"


def model_normalization(model) -> dict:
    """The normalisation a (possibly wrapped) cellseg model was trained with; ImageNet for other modules and for
    checkpoints written before the normalisation was stored (they were all trained with ImageNet statistics)."""
    from cellseg.checkpoint.keys import unwrap_model

    arch = getattr(unwrap_model(model), "arch", None)
    norm = arch.get("normalization") if isinstance(arch, dict) else None
    return dict(norm) if norm else dict(IMAGENET)
