"""Joint augmentation of an image and its label maps (albumentations), seeded per sample.

Geometric transforms (flips, rot90, affine scale/rotate/shear, elastic) move the image, the instance map, the type map,
the ignore mask and a "valid" mask together, labels with nearest-neighbour interpolation, so instance ids survive;
pixels brought in from outside the image become ignored. Photometric transforms touch the image only: colour jitter,
HED stain jitter (Tellez et al., "Quantifying the effects of data augmentation and stain color normalization", MedIA
2019: per-channel scale and shift in Ruifrok & Johnston's HED space), Gaussian blur and noise. HV targets are computed
afterwards (dataset.py), never warped, so their signs stay right after flips and rotations.

Randomness comes only from the integer seed handed to :func:`augment_arrays` (albumentations'
``Compose.set_random_seed``), so a sample is reproducible in any process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

from cellseg.data.sample import relabel_consecutive


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentations (defaults: moderate, HoVer-Net/CellViT-like)."""

    flip: float = 0.5  # each of horizontal and vertical
    rot90: float = 0.5
    affine: float = 0.5
    scale: tuple[float, float] = (0.8, 1.2)
    rotate: tuple[float, float] = (-45.0, 45.0)  # degrees
    shear: tuple[float, float] = (-8.0, 8.0)  # degrees
    elastic: float = 0.2
    elastic_alpha: float = 25.0  # displacement scale in pixels
    elastic_sigma: float = 6.0  # smoothness of the displacement field in pixels
    colour: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.03
    hed: float = 0.5
    hed_scale: float = 0.05  # Tellez et al.: alpha ~ U(1 - scale, 1 + scale) per HED channel
    hed_shift: float = 0.01  # beta ~ U(-shift, shift); skimage's HED values are ~0..0.2, so keep it small
    blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise: float = 0.2
    noise_std: tuple[float, float] = (0.01, 0.04)  # fraction of the 0..255 range

    def __post_init__(self) -> None:
        for name in ("flip", "rot90", "affine", "elastic", "colour", "hed", "blur", "noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} is a probability and must be in [0, 1], got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_OD_SCALE = -float(
    np.log(1e-6)
)  # skimage's normalisation of optical densities, so shifts match rgb2hed's units


class HEDJitter(A.ImageOnlyTransform):
    """HED stain jitter: scale and shift the haematoxylin, eosin and DAB channels (Tellez et al. 2019)."""

    def __init__(self, scale: float = 0.05, shift: float = 0.01, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.scale = scale
        self.shift = shift

    def get_params(self) -> dict[str, Any]:
        g = self.random_generator
        return {
            "alpha": g.uniform(1 - self.scale, 1 + self.scale, 3),
            "beta": g.uniform(-self.shift, self.shift, 3),
        }

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any) -> np.ndarray:
        # skimage's rgb2hed/hed2rgb clip negative stain concentrations, which shifts colours outside the HED cone
        # even with alpha = 1, beta = 0; the same transform without clipping is the identity for those
        od = -np.log((img.astype(np.float64) + 1.0) / 256.0) / _OD_SCALE
        hed = od @ hed_from_rgb
        od = ((hed * alpha + beta) @ rgb_from_hed) * _OD_SCALE
        return np.clip(np.round(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "shift")


def build_augmentation(config: AugmentConfig | None = None) -> A.Compose:
    """The albumentations pipeline for ``config`` (defaults when None). Targets: ``image`` and ``masks``."""
    c = config or AugmentConfig()
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    transforms = [
        A.HorizontalFlip(p=c.flip),
        A.VerticalFlip(p=c.flip),
        A.RandomRotate90(p=c.rot90),
        A.Affine(
            scale=c.scale,
            rotate=c.rotate,
            shear=c.shear,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=c.affine,
            **border,
        ),
        A.ElasticTransform(
            alpha=c.elastic_alpha,
            sigma=c.elastic_sigma,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=c.elastic,
            **border,
        ),
        A.ColorJitter(
            brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue, p=c.colour
        ),
        HEDJitter(scale=c.hed_scale, shift=c.hed_shift, p=c.hed),
        A.GaussianBlur(sigma_limit=c.blur_sigma, blur_limit=0, p=c.blur),
        A.GaussNoise(std_range=c.noise_std, p=c.noise),
    ]
    return A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST)


def augment_arrays(
    pipeline: A.Compose,
    image: np.ndarray,
    inst_map: np.ndarray,
    type_map: np.ndarray,
    ignore_mask: np.ndarray,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``pipeline`` jointly with the given seed; instances are relabelled 1..N afterwards.

    Pixels that came from outside the input (affine/elastic borders) are added to the ignore mask.

    Shape: (H, W, 3), (H, W), (H, W), (H, W) -> same shapes.
    """
    pipeline.set_random_seed(int(seed))
    valid = np.ones(inst_map.shape, dtype=np.uint8)
    out = pipeline(
        image=image,
        masks=[inst_map.astype(np.int32), type_map.astype(np.int32), ignore_mask.astype(np.uint8), valid],
    )
    inst, types, ignore, valid = out["masks"]
    inst = relabel_consecutive(np.asarray(inst))
    types = np.where(inst > 0, np.asarray(types), 0).astype(np.int32)
    ignore = (np.asarray(ignore) > 0) | (np.asarray(valid) == 0)
    return np.ascontiguousarray(out["image"]), inst, types, ignore
