"""Encoders through timm: UNI / UNI2-h, any timm ViT (multi-level tokens via ``forward_intermediates``), or a CNN
through ``features_only``.

UNI (Chen et al., Nature Medicine 2024) is a ViT-L/16 created with ``vit_large_patch16_224`` and
``init_values=1e-5`` (LayerScale keys ``blocks.N.ls1.gamma``); UNI2-h is a ViT-giant/14 with SwiGLU MLPs and 8 register
tokens. Weights only ever come from a local file: compute nodes have no internet, and this module never downloads.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

UNI_KWARGS = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
UNI_WEIGHTS_HINT = (
    "UNI is a gated model (huggingface.co/MahmoodLab/UNI, CC-BY-NC-ND 4.0). On a login node with internet: request "
    "access, then `hf download MahmoodLab/UNI pytorch_model.bin --local-dir weights/uni` (huggingface_hub >= 1.0), and set "
    "ENCODER_WEIGHTS to that file (default 'weights/uni/pytorch_model.bin'). See HPC_SETUP_GUIDE.md."
)


def _uni2_kwargs() -> dict:
    return dict(
        img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
        num_classes=0, no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
        reg_tokens=8, dynamic_img_size=True,
    )


# name -> (timm architecture, kwargs builder)
FOUNDATION_MODELS = {
    "uni": ("vit_large_patch16_224", lambda: dict(UNI_KWARGS)),
    "uni2": ("vit_giant_patch14_224", _uni2_kwargs),
}


class ViTBackbone(nn.Module):
    """A timm VisionTransformer returning the patch tokens of chosen blocks as NCHW maps.

    Shape: (B, 3, H, W) -> list of len(indices) tensors (B, D, H/p, W/p); H and W must be multiples of p.
    """

    family = "vit"

    def __init__(self, core: nn.Module, indices: list[int]):
        super().__init__()
        self.core = core
        depth = len(core.blocks)
        bad = [i for i in indices if not -depth <= i < depth]
        if bad:
            raise ValueError(f"ENCODER_INDICES {bad} are outside the encoder's {depth} blocks (valid: 0..{depth - 1}).")
        self.indices = [i % depth for i in indices]
        # blocks after the deepest tapped one, the final norm and the head never run: drop them, so no parameter is
        # trainable-but-unused (DDP would fail on it) and no compute is wasted
        core.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.patch_size = int(core.patch_embed.patch_size[0])
        self.out_channels = [int(core.embed_dim)] * len(self.indices)
        self.strides = [self.patch_size] * len(self.indices)

    @property
    def size_multiple(self) -> int:
        return self.patch_size

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.core.forward_intermediates(
            x, indices=self.indices, norm=False, output_fmt="NCHW", intermediates_only=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            require_checkpointing_support(type(self.core).forward_intermediates, self.core)
        self.core.set_grad_checkpointing(enable)


class CNNBackbone(nn.Module):
    """A timm CNN with ``features_only=True``. Shape: (B, 3, H, W) -> list of (B, C_i, H/s_i, W/s_i)."""

    family = "cnn"

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core
        self.out_channels = list(core.feature_info.channels())
        self.strides = list(core.feature_info.reduction())

    @property
    def size_multiple(self) -> int:
        return max(self.strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.core(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not hasattr(self.core, "set_grad_checkpointing"):
            if enable:
                raise RuntimeError(f"GRAD_CHECKPOINTING=True, but timm {timm.__version__}'s feature extractor "
                                   f"{type(self.core).__name__} cannot checkpoint: the flag would save no memory. Set "
                                   "GRAD_CHECKPOINTING=False or choose another ENCODER.")
            return
        if enable:
            require_checkpointing_support(type(self.core).forward, self.core)
        self.core.set_grad_checkpointing(enable)


TIMM_CHECKPOINTING_VERSION = "1.0.16"  # first timm whose forward_intermediates honours set_grad_checkpointing


def require_checkpointing_support(forward, core: nn.Module) -> None:
    """Refuse ``GRAD_CHECKPOINTING`` where the forward the encoder runs ignores timm's ``grad_checkpointing`` flag
    (timm before 1.0.16 for ``forward_intermediates``): the flag would be a silent no-op while the memory model counts
    on the memory it saves.

    Raises:
        RuntimeError: naming the timm version, the class and the fix.
    """
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # no source shipped: trust timm's version instead
        source = "grad_checkpointing" if _version(timm.__version__) >= _version(TIMM_CHECKPOINTING_VERSION) else ""
    if "grad_checkpointing" not in source:
        raise RuntimeError(
            f"GRAD_CHECKPOINTING=True, but timm {timm.__version__}'s {type(core).__name__}.{forward.__name__} ignores "
            f"gradient checkpointing: the flag would save no memory (and the memory estimate assumes it does). "
            f"Upgrade timm (`pip install 'timm>={TIMM_CHECKPOINTING_VERSION}'`) or set GRAD_CHECKPOINTING=False.")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def default_indices(depth: int) -> list[int]:
    """Four evenly spaced blocks ending with the last: ViT-L (24) -> [5, 11, 17, 23] as in CellViT/UNETR."""
    return sorted({max(0, round(depth * k / 4) - 1) for k in (1, 2, 3, 4)})


def _load_weights(core: nn.Module, path: Path, encoder: str, arch: str, kwargs: dict, *, features: bool) -> dict:
    """Load ``path`` into ``core``; returns the file's identity (name, path, size, SHA-256) and the core keys it
    filled, which compact checkpoints leave out while they stay frozen."""
    from cellseg.checkpoint.fingerprint import file_identity
    from cellseg.model.encoder_weights import load_encoder_weights

    full_keys = None
    if features:  # the classifier architecture on the meta device: which file keys are layers features_only cuts off
        with torch.device("meta"):
            full = timm.create_model(arch, pretrained=False, **kwargs)
        full_keys = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    report = load_encoder_weights(core, path, encoder, full_keys)
    return {**file_identity(path), "keys": list(core.state_dict()), "dropped": report.dropped_head
            + report.dropped_unused}


def build_backbone(encoder: str, weights: str = "", indices: list[int] | None = None, *,
                   load_weights: bool = True) -> nn.Module:
    """Create the encoder named by ``ENCODER``.

    Args:
        encoder: 'uni', 'uni2', any timm ViT name (e.g. 'test_vit', 'vit_tiny_patch16_224') or a timm CNN
            ('resnet50', 'efficientnet_b4', ...).
        weights: local weights file (``.safetensors``, or a ``.pt`` / ``.pth`` / ``.bin`` state dict; a classifier
            head is dropped with a log line), or '' / 'none' for random init. Required for 'uni' and 'uni2'.
        indices: ViT blocks whose tokens feed the decoder; empty = four evenly spaced blocks.
        load_weights: False builds the same architecture with random weights and never touches ``weights`` (for
            shape-only uses on a login node: compatibility checks, memory estimates).

    Raises:
        FileNotFoundError: the weights file is missing (says where to get it).
        ValueError: the encoder name is unknown to timm.
    """
    weights = "" if weights in ("", "none", "None") or not load_weights else weights
    if encoder in FOUNDATION_MODELS:
        arch, kwargs = FOUNDATION_MODELS[encoder][0], FOUNDATION_MODELS[encoder][1]()
        if not weights and load_weights:
            raise FileNotFoundError(f"ENCODER='{encoder}' needs its weights: set ENCODER_WEIGHTS. {UNI_WEIGHTS_HINT}")
    else:
        if not timm.is_model(encoder):
            close = timm.list_models(f"*{encoder.split('_')[0]}*")[:8]
            raise ValueError(
                f"ENCODER must be 'uni', 'uni2' or a timm model name, got '{encoder}'. Similar timm names: {close}. "
                f"Set it in the parameters cell or with `-p ENCODER ...`."
            )
        arch, kwargs = encoder, {}
    if weights and not Path(weights).is_file():
        hint = UNI_WEIGHTS_HINT if encoder in FOUNDATION_MODELS else "Copy the state dict there or set ENCODER_WEIGHTS=''."
        raise FileNotFoundError(f"ENCODER_WEIGHTS file {weights} does not exist. {hint}")
    if encoder in FOUNDATION_MODELS or _is_vit(arch):
        kwargs = kwargs or dict(num_classes=0, dynamic_img_size=True)
        core = timm.create_model(arch, pretrained=False, **kwargs)
        source = _load_weights(core, Path(weights), encoder, arch, kwargs, features=False) if weights else None
        backbone = ViTBackbone(core, list(indices) if indices else default_indices(len(core.blocks)))
        return _with_source(backbone, source)
    if indices:
        raise ValueError(f"ENCODER_INDICES applies to ViT encoders only; '{encoder}' is a CNN. Set ENCODER_INDICES=[].")
    core = timm.create_model(arch, pretrained=False, features_only=True)
    source = _load_weights(core, Path(weights), encoder, arch, {}, features=True) if weights else None
    return _with_source(CNNBackbone(core), source)


def _with_source(backbone: nn.Module, source: dict | None) -> nn.Module:
    """Attach the weights file's identity; only the keys that survived pruning (ViT blocks past the deepest tapped
    one, the final norm) still come from the file."""
    if source is not None:
        own = set(backbone.core.state_dict())
        source["keys"] = [k for k in source["keys"] if k in own]
    backbone.weights_source = source
    return backbone


def _is_vit(arch: str) -> bool:
    """True for timm's plain VisionTransformer family (the one with ``forward_intermediates`` on patch tokens)."""
    return timm.models.model_entrypoint(arch).__module__.endswith("vision_transformer")
