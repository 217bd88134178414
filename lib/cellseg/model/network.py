"""The full network: encoder + three-branch decoder, with padding to the encoder's size multiple and frozen-encoder
handling (no activations kept, norm/dropout layers held in eval mode)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from cellseg.branches import Branch
from cellseg.model.backbones import build_backbone
from cellseg.model.decoders import DECODERS

log = logging.getLogger(__name__)


class CellSegModel(nn.Module):
    """Encoder + decoder. Shape: (B, 3, H, W) -> {np: (B, 2, H, W), hv: (B, 2, H, W), nc: (B, C+1, H, W)}."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, arch: dict):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.arch = arch  # plain dict: the architecture fingerprint stored in checkpoints
        self.lora_config: dict | None = None
        # The encoder weights file's identity (file, path, size, sha256) and the canonical keys still holding its
        # values: compact checkpoints leave those out while they are frozen (cellseg.checkpoint.base). A load that
        # writes other values into one of them removes it from base_keys.
        source = getattr(encoder, "weights_source", None)
        self.base_weights: dict | None = {k: source[k] for k in ("file", "path", "size", "sha256")} if source else None
        self.base_keys: set[str] = {f"encoder.core.{k}" for k in source["keys"]} if source else set()

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True) -> CellSegModel:
        super().train(mode)
        if mode and self.encoder_frozen:
            self.encoder.eval()  # frozen means frozen: no BN statistics drift, no dropout noise
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        m = self.encoder.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:  # pad to the patch/stride multiple, crop back below
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "constant")
        if self.encoder_frozen:
            with torch.no_grad():
                feats = self.encoder(x)
        else:
            feats = self.encoder(x)
        out = self.decoder(x, feats)
        if ph or pw:
            out = {k: v[..., :h, :w] for k, v in out.items()}
        return out

    def arch_info(self) -> dict:
        """The architecture fingerprint (plain types), LoRA settings included."""
        return {**self.arch, "lora": dict(self.lora_config) if self.lora_config else None}


def build_model(encoder: str, *, num_classes: int, decoder: str = "hovernet", weights: str = "",
                indices: list[int] | None = None, width: int = 64, load_weights: bool = True,
                norm_mean: list | None = None, norm_std: list | None = None) -> CellSegModel:
    """Build encoder + decoder from the parameters ``ENCODER``, ``DECODER``, ``ENCODER_WEIGHTS``, ``ENCODER_INDICES``,
    ``DECODER_WIDTH``, ``NORM_MEAN``, ``NORM_STD``; ``num_classes`` counts cell classes without background. The input
    normalisation (see :mod:`cellseg.model.normalization`) goes into ``arch['normalization']``.

    Raises:
        ValueError: unknown decoder or encoder, a non-positive class count, or a bad normalisation.
    """
    from cellseg.model.normalization import resolve_normalization

    if decoder not in DECODERS:
        raise ValueError(f"DECODER must be one of {list(DECODERS)}, got '{decoder}'.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (cell classes, background excluded), got {num_classes}.")
    norm, norm_source = resolve_normalization(encoder, weights, norm_mean, norm_std)
    backbone = build_backbone(encoder, weights, indices, load_weights=load_weights)
    head = DECODERS[decoder](backbone.family, backbone.out_channels, num_classes, width)
    arch = {
        "encoder": encoder,
        "family": backbone.family,
        "encoder_channels": list(backbone.out_channels),
        "encoder_strides": list(backbone.strides),
        "encoder_indices": list(getattr(backbone, "indices", [])),
        "decoder": decoder,
        "decoder_width": width,
        "num_classes": num_classes,
        "branches": [b.value for b in Branch],
        "normalization": norm,
    }
    log.info("input normalisation mean %s std %s (from %s)", norm["mean"], norm["std"], norm_source)
    return CellSegModel(backbone, head, arch)


def build_model_from_config(cfg, num_classes: int, *, load_weights: bool = True) -> CellSegModel:
    """:func:`build_model` with the values of a :class:`cellseg.config.Config`."""
    return build_model(cfg.ENCODER, num_classes=num_classes, decoder=cfg.DECODER, weights=cfg.ENCODER_WEIGHTS,
                       indices=list(cfg.ENCODER_INDICES), width=cfg.DECODER_WIDTH, load_weights=load_weights,
                       norm_mean=list(cfg.NORM_MEAN), norm_std=list(cfg.NORM_STD))
