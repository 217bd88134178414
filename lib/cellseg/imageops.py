"""Image normalisation shared by training, inference and evaluation.

UNI and the timm ImageNet encoders expect ImageNet mean/std normalisation of RGB in [0, 1] (UNI's model card),
not min-max scaling; other encoders were pretrained with other statistics, so callers pass the model's own
``normalization`` ({'mean', 'std'}, see :mod:`cellseg.model.normalization`). ImageNet is the default only for callers
that have no model (display, old checkpoints, which were all trained with it).
"""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(normalization: dict | None, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    norm = normalization or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return (torch.tensor(norm["mean"], dtype=torch.float32, device=device).view(3, 1, 1),
            torch.tensor(norm["std"], dtype=torch.float32, device=device).view(3, 1, 1))


def normalize_image(image: np.ndarray, normalization: dict | None = None) -> torch.Tensor:
    """Turn an RGB ``uint8`` image into a normalised float tensor, ``(x / 255 - mean) / std`` with the encoder's
    ``normalization`` ({'mean': 3 floats, 'std': 3 floats}; None = ImageNet).

    Shape: (H, W, 3) uint8 -> (3, H, W) float32.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"normalize_image expects an (H, W, 3) RGB image, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"normalize_image expects uint8 pixels, got {image.dtype}; convert with skimage.util.img_as_ubyte")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean, std = _stats(normalization)
    return (x - mean) / std


def denormalize_image(x: torch.Tensor, normalization: dict | None = None) -> np.ndarray:
    """Inverse of :func:`normalize_image` for display. Shape: (3, H, W) -> (H, W, 3) uint8."""
    mean, std = _stats(normalization, x.device)
    img = (x.float() * std + mean).clamp_(0, 1).mul_(255).round_().byte()
    return img.permute(1, 2, 0).cpu().numpy()
