"""HoVer-Net-style three-branch decoders over multi-level encoder features.

- ``hovernet``: UNETR-style (Hatamizadeh et al., 2022) as used by CellViT (Hörst et al., 2024): ViT tokens of several
  blocks are lifted to a pyramid by transposed convolutions, a shallow convolutional skip comes from the image, and each
  branch (NP, HV, NC) has its own upsampling path, as in HoVer-Net (Graham et al., 2019).
- ``unet_resattn``: one U-Net path with attention gates on the skips and residual squeeze-and-excitation blocks
  (the UNet-ResAttn-V3 design), ending in three heads.

Both take the image (for the shallow skip) and the encoder's feature list, and work at any input size: every upsampling
step resizes to the next skip's exact size.
"""

from __future__ import annotations

import torch
from torch import nn

from cellseg.branches import Branch
from cellseg.model.blocks import AttentionGate, Deconv, ResSEBlock, conv_bn_relu, upsample_to


def branch_channels(num_classes: int) -> dict[Branch, int]:
    """Output channels per branch: NP 2 logits, HV 2 maps, NC background + classes."""
    return {Branch.NP: 2, Branch.HV: 2, Branch.NC: num_classes + 1}


class Neck(nn.Module):
    """Turn encoder features into skips ordered fine -> coarse, plus a full-resolution image skip.

    ViT: feature i of n (all at stride p) is lifted by 2^(n-1-i) with UNETR's deconvolutions, so the deepest block
    stays at stride p and the shallowest reaches p / 2^(n-1). CNN: 1x1 lateral projections of each level.
    Shape: image (B, 3, H, W), feats list -> list of (B, C_j, h_j, w_j), finest first.
    """

    def __init__(self, family: str, in_channels: list[int], width: int):
        super().__init__()
        n = len(in_channels)
        self.widths = [width * 2 ** min(i, 3) for i in range(n)]  # finest first
        self.stem = nn.Sequential(conv_bn_relu(3, width // 2), conv_bn_relu(width // 2, width // 2))
        if family == "vit":
            lifts = []
            for i, cin in enumerate(in_channels):
                steps = n - 1 - i
                c = self.widths[i]
                layers: list[nn.Module] = [conv_bn_relu(cin, c, 1)] if steps == 0 else []
                for s in range(steps):
                    layers.append(Deconv(cin if s == 0 else c, c))
                lifts.append(nn.Sequential(*layers))
            self.lifts = nn.ModuleList(lifts)
        else:
            self.lifts = nn.ModuleList(conv_bn_relu(cin, c, 1) for cin, c in zip(in_channels, self.widths))
        self.out_channels = [width // 2] + self.widths

    def forward(self, image: torch.Tensor, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.stem(image)] + [lift(f) for lift, f in zip(self.lifts, feats)]


class UpPath(nn.Module):
    """Coarse-to-fine path: resize to the next skip, concatenate, convolve. Shape: skips -> (B, C_0, H, W)."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn_relu(channels[j + 1] + channels[j], channels[j]), conv_bn_relu(channels[j], channels[j]))
            for j in reversed(range(len(channels) - 1)))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for block, skip in zip(self.blocks, reversed(skips[:-1])):
            x = block(torch.cat([upsample_to(x, skip.shape[-2:]), skip], dim=1))
        return x


class HoVerNetDecoder(nn.Module):
    """UNETR-style neck, then one upsampling path and one 1x1 head per branch."""

    def __init__(self, family: str, in_channels: list[int], num_classes: int, width: int = 64):
        super().__init__()
        self.neck = Neck(family, in_channels, width)
        chans = self.neck.out_channels
        outs = branch_channels(num_classes)
        self.paths = nn.ModuleDict({b.value: UpPath(chans) for b in Branch})
        self.heads = nn.ModuleDict({b.value: nn.Conv2d(chans[0], outs[b], 1) for b in Branch})

    def forward(self, image: torch.Tensor, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        skips = self.neck(image, feats)
        return {b: self.heads[b.value](self.paths[b.value](skips)) for b in Branch}


class UNetResAttnDecoder(nn.Module):
    """One U-Net path with attention-gated skips and residual SE blocks, then three small heads."""

    def __init__(self, family: str, in_channels: list[int], num_classes: int, width: int = 64):
        super().__init__()
        self.neck = Neck(family, in_channels, width)
        chans = self.neck.out_channels
        order = list(reversed(range(len(chans) - 1)))
        self.gates = nn.ModuleList(AttentionGate(chans[j], chans[j + 1]) for j in order)
        self.blocks = nn.ModuleList(ResSEBlock(chans[j + 1] + chans[j], chans[j]) for j in order)
        outs = branch_channels(num_classes)
        self.heads = nn.ModuleDict({b.value: nn.Sequential(conv_bn_relu(chans[0], chans[0]), nn.Conv2d(chans[0], outs[b], 1))
                                    for b in Branch})

    def forward(self, image: torch.Tensor, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        skips = self.neck(image, feats)
        x = skips[-1]
        for gate, block, skip in zip(self.gates, self.blocks, reversed(skips[:-1])):
            x = upsample_to(x, skip.shape[-2:])
            x = block(torch.cat([x, gate(skip, x)], dim=1))
        return {b: self.heads[b.value](x) for b in Branch}


DECODERS = {"hovernet": HoVerNetDecoder, "unet_resattn": UNetResAttnDecoder}
