"""Shared pieces of the prediction tests: a mosaic of disjoint disks laid over the window seams, and an "oracle"
network whose maps are computed from the image itself, so tiled and one-pass prediction can be compared exactly."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from cellseg.data.targets import hv_maps
from cellseg.imageops import IMAGENET_MEAN, IMAGENET_STD
from cellseg.postprocess import resolve_params
from cellseg.predict import Predictor

CLASS_NAMES = ["RBC", "WBC"]
DIAMETER = 13.0


def disk_mosaic(size: int = 256, spacing: int = 17, radius: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                                             np.ndarray]:
    """RGB image, instance map and class per instance of disjoint disks on a jittered lattice (cells fall on every
    window seam). Class 1 cells are red, class 2 red with green."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.ogrid[:size, :size]
    n = 0
    classes = []
    for cy in range(radius + 1, size - radius - 1, spacing):
        for cx in range(radius + 1, size - radius - 1, spacing):
            jy, jx = rng.integers(-1, 2, size=2)  # gaps of >= 2 px: disks never touch
            disk = (yy - cy - jy) ** 2 + (xx - cx - jx) ** 2 <= radius ** 2
            if (inst[disk] > 0).any():
                continue
            n += 1
            inst[disk] = n
            classes.append(1 + int(rng.random() < 0.3))
    img = np.full((size, size, 3), 235, np.uint8)
    cls = np.asarray(classes, np.int32)
    lut = np.concatenate([[0], cls])
    img[inst > 0] = (200, 40, 60)
    img[(inst > 0) & (lut[inst] == 2)] = (200, 160, 60)
    return img, inst, cls


class OracleNet(nn.Module):
    """NP/HV/NC logits from the image: red pixels are cells, connected components are instances (HV exactly as the
    training targets), green marks class 2. Optionally sends itself SIGTERM on its ``kill_at``-th forward."""

    def __init__(self, kill_at: int | None = None):
        super().__init__()
        self.calls = 0
        self.kill_at = kill_at

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        img = (x * std + mean).numpy()
        nps, hvs, ncs = [], [], []
        for b in range(img.shape[0]):
            fg = (img[b, 0] > 0.6) & (img[b, 2] < 0.5)
            green = img[b, 1] > 0.4
            lab, _ = ndi.label(fg)
            big = np.where(fg, 8.0, -8.0)
            nps.append(np.stack([-big, big]))
            hvs.append(hv_maps(lab))
            ncs.append(np.stack([-big, np.where(fg & ~green, 8.0, -8.0), np.where(fg & green, 8.0, -8.0)]))
        return {"np": torch.tensor(np.stack(nps), dtype=torch.float32),
                "hv": torch.tensor(np.stack(hvs), dtype=torch.float32),
                "nc": torch.tensor(np.stack(ncs), dtype=torch.float32)}


def oracle_predictor(model: nn.Module | None = None, mpp: float | None = None) -> Predictor:
    return Predictor(model=model or OracleNet(), checkpoint=Path("oracle.pt"), sha256="0" * 64,
                     class_names=list(CLASS_NAMES), class_names_source="test", pp_params=resolve_params(
                         {"object_diameter": DIAMETER}), pp_source="defaults (test)", train_mpp=mpp,
                     normalization="ImageNet", config={})
