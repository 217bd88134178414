"""Small convolutional building blocks shared by the decoders (conv-norm-ReLU, squeeze-and-excitation, attention gate).

The decoders normalise with GroupNorm, not BatchNorm: with the micro-batches of 2-4 images that fit next to a ViT-L,
batch statistics are noise, and a batch-independent norm makes gradient accumulation and DDP exactly equivalent to one
large batch (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    """Conv, GroupNorm, ReLU (the name keeps the familiar pattern; see the module docstring for the norm)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), norm(cout), nn.ReLU(inplace=True))


class Deconv(nn.Sequential):
    """UNETR's upsampling step: 2x transposed conv then conv-BN-ReLU. Shape: (B, Cin, h, w) -> (B, Cout, 2h, 2w)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.ConvTranspose2d(cin, cout, 2, stride=2), conv_bn_relu(cout, cout))


class SqueezeExcite(nn.Module):
    """Channel re-weighting (Hu et al., 2018). Shape: (B, C, H, W) -> same."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3)))  # (B, C)
        return x * w[:, :, None, None]


class ResSEBlock(nn.Module):
    """Residual double conv followed by squeeze-and-excitation. Shape: (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm(cout),
        )
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                                                        norm(cout))
        self.se = SqueezeExcite(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(F.relu(self.body(x) + self.shortcut(x)))


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al., Attention U-Net, 2018).

    Shape: skip (B, Cs, H, W), gate (B, Cg, H, W) -> (B, Cs, H, W).
    """

    def __init__(self, skip_channels: int, gate_channels: int):
        super().__init__()
        inter = max(4, skip_channels // 2)
        self.wx = nn.Conv2d(skip_channels, inter, 1, bias=False)
        self.wg = nn.Conv2d(gate_channels, inter, 1, bias=True)
        self.psi = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(inter, 1, 1), nn.Sigmoid())

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(self.wx(skip) + self.wg(gate))


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
