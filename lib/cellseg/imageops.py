"""Image normalisation shared by training, inference and evaluation.

UNI and the timm ImageNet encoders expect ImageNet mean/std normalisation of RGB in [0, 1] (UNI's model card),
not min-max scaling.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """Turn an RGB ``uint8`` image into a normalised float tensor.

    Shape: (H, W, 3) uint8 -> (3, H, W) float32.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"normalize_image expects an (H, W, 3) RGB image, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"normalize_image expects uint8 pixels, got {image.dtype}; convert with skimage.util.img_as_ubyte")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalize_image(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize_image` for display. Shape: (3, H, W) -> (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    img = (x.float() * std + mean).clamp_(0, 1).mul_(255).round_().byte()
    return img.permute(1, 2, 0).cpu().numpy()
