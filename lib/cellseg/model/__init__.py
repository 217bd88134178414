"""Encoders (timm), three-branch decoders, LoRA."""

from cellseg.model.network import CellSegModel, build_model, build_model_from_config

__all__ = ["CellSegModel", "build_model", "build_model_from_config"]
