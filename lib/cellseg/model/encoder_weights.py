"""Reading an encoder's weights file (``ENCODER_WEIGHTS``): ``.safetensors`` or a PyTorch state dict (``.pt``,
``.pth``, ``.bin``), from timm, torchvision, UNI or UNI2-h, with or without a classifier head.

A classifier checkpoint carries tensors that a segmentation encoder never uses: the head (``fc.*`` in timm/torchvision
ResNets, ``head.*`` in timm ViTs, ``classifier.*`` in EfficientNets and DenseNets), and for a ``features_only`` CNN
the layers after its last feature stage (EfficientNet's ``conv_head``/``bn2``). Those are dropped and listed; any
other unexpected, missing or shape-mismatched key is still an error, because it means the file holds another
architecture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("fc", "head", "head_dist", "classifier", "last_linear", "pre_logits")
# wrappers of a training checkpoint around the state dict (timm's train script, torchvision references, Lightning)
_NESTED = ("state_dict", "model", "model_state_dict")


@dataclass
class EncoderLoad:
    """What loading a weights file did: tensors loaded, and the ones dropped as unused by the encoder."""

    path: str
    loaded: int = 0
    dropped_head: list[str] = field(default_factory=list)
    dropped_unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} encoder tensors from {self.path}"]
        if self.dropped_head:
            parts.append(f"dropped {len(self.dropped_head)} classifier-head tensor(s): {', '.join(self.dropped_head)}")
        if self.dropped_unused:
            shown = ", ".join(self.dropped_unused[:8]) + (" ..." if len(self.dropped_unused) > 8 else "")
            parts.append(f"dropped {len(self.dropped_unused)} tensor(s) after the last feature stage, unused by the "
                         f"features-only encoder: {shown}")
        return "; ".join(parts)


def read_state_dict(path: Path, encoder: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from a training checkpoint's ``state_dict`` / ``model`` entry and
    from DDP / torch.compile key prefixes.

    Raises:
        RuntimeError: the file cannot be read, or holds no state dict of tensors (says what to do).
    """
    from cellseg.checkpoint.keys import strip_wrappers

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise many kinds for a bad file
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch state dict (.pt/.pth/.bin)"
        raise RuntimeError(f"ENCODER_WEIGHTS {path} could not be read as a {kind} ({type(e).__name__}: {e}). "
                           f"Download it again; it must be the plain state dict of '{encoder}'.") from e
    for key in _NESTED:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"ENCODER_WEIGHTS {path} holds no state dict of tensors (got {type(state).__name__}). Save "
                           f"it with torch.save(model.state_dict(), path) or safetensors' save_file.")
    return {strip_wrappers(k): v for k, v in state.items()}


def _is_head(key: str) -> bool:
    return key.split(".")[0] in HEAD_PREFIXES


def fit_state_dict(core: nn.Module, state: dict[str, torch.Tensor], path: Path, encoder: str,
                   full_keys: dict[str, tuple] | None = None) -> tuple[dict[str, torch.Tensor], EncoderLoad]:
    """The part of ``state`` that loads into ``core``, and what was dropped.

    Args:
        full_keys: key -> shape of the complete classifier architecture (for a ``features_only`` core): keys it
            has with the same shape but ``core`` lacks are layers after the last feature stage, dropped.

    Raises:
        RuntimeError: missing keys, shape mismatches, or unexpected keys that are neither a head nor unused layers.
    """
    own = core.state_dict()
    report = EncoderLoad(str(path))
    unexpected = []
    for k, v in state.items():
        if k in own:
            continue
        if _is_head(k):
            report.dropped_head.append(f"{k} {tuple(v.shape)}")
        elif full_keys is not None and tuple(full_keys.get(k, ())) == tuple(v.shape):
            report.dropped_unused.append(k)
        else:
            unexpected.append(k)
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"ENCODER_WEIGHTS {path} does not fit ENCODER='{encoder}': {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}), {len(wrong)} shape mismatches (file vs model, "
            f"e.g. {wrong[:3]}). Check that the file holds the '{encoder}' weights (classifier heads {HEAD_PREFIXES} "
            "are dropped by themselves; other keys must match)."
        )
    target = {k: state[k] for k in own}
    report.loaded = len(target)
    report.dropped_head.sort()
    report.dropped_unused.sort()
    return target, report


def load_encoder_weights(core: nn.Module, path: Path, encoder: str,
                         full_keys: dict[str, tuple] | None = None) -> EncoderLoad:
    """Read ``path`` and load it strictly into ``core`` (heads and unused trailing layers dropped, listed in the log).

    Raises:
        RuntimeError: see :func:`read_state_dict` and :func:`fit_state_dict`.
    """
    state = read_state_dict(path, encoder)
    target, report = fit_state_dict(core, state, path, encoder, full_keys)
    core.load_state_dict(target, strict=True)
    (log.warning if report.dropped_head or report.dropped_unused else log.info)("ENCODER_WEIGHTS: %s", report.summary())
    return report
