"""The three HoVer-Net output branches, one enum used for model outputs, targets and losses.

Follows MONAI's ``HoVerNetBranch``: NP (nuclear/cell pixel, foreground vs background), HV (horizontal and
vertical distance to the instance's centre of mass) and NC (per-pixel class, background included).
"""

from __future__ import annotations

from enum import StrEnum


class Branch(StrEnum):
    """Keys of model outputs, targets and losses. A ``str`` enum, so ``out["np"] is out[Branch.NP]``."""

    NP = "np"
    HV = "hv"
    NC = "nc"
