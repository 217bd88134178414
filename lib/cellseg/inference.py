"""Inference on whole images: sliding-window tiling with blending, flip/rot90 test-time augmentation, AMP.

Tiles overlap and are blended with a raised-cosine (Hann) window, as MONAI's ``SlidingWindowInferer`` blends with a
Gaussian, so that tile borders, where the network sees no context, weigh little. Probabilities (softmax of NP and NC)
and HV maps are averaged, never logits. Test-time augmentation runs the 8 flips/rotations of the square (dihedral
group D4) and maps each output back; the HV vectors are transformed too (a horizontal flip negates the horizontal
map, a vertical flip the vertical one, a quarter turn swaps them with a sign), which HoVer-Net-style TTA code often
forgets. ``scale`` (the ``INPUT_SCALE`` parameter) runs the network on a resized image and maps its outputs back
onto the full-resolution grid (:mod:`cellseg.scaling`), so everything after the network is in original pixels.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from cellseg.branches import Branch
from cellseg.imageops import normalize_image
from cellseg.postprocess import (
    classify_instances,
    hv_to_instances,
    instance_objectness,
    instances_to_type_map,
)
from cellseg.scaling import check_scale, maps_to_full_resolution, resize_image

log = logging.getLogger(__name__)

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# (flip the x axis first?, then quarter turns with torch.rot90(dims=(-2, -1))): the 8 elements of D4.
TTA_TRANSFORMS: tuple[tuple[bool, int], ...] = tuple((flip, k) for flip in (False, True) for k in range(4))

_ROT = np.array([[0, 1], [-1, 0]])  # rot90(k=1): (x, y) -> (y, W-1-x), so offsets (dx, dy) -> (dy, -dx)
_FLIP = np.array([[-1, 0], [0, 1]])  # x flip: dx -> -dx


class NonFiniteOutputError(FloatingPointError):
    """The network returned NaN or Inf for an image: post-processing would silently merge, drop or mis-classify
    instances. The message names the image, the checkpoint and the branches."""


def check_finite_outputs(out: dict[str, torch.Tensor], *, image_name: str | None, checkpoint: str | None,
                         amp: str = "none") -> None:
    """Raise :class:`NonFiniteOutputError` when any branch output holds NaN or Inf.

    Raises:
        NonFiniteOutputError: naming the image, the checkpoint, each bad branch with its NaN / Inf counts, and fixes.
    """
    bad = {}
    for key, y in out.items():
        finite = torch.isfinite(y)
        if not bool(finite.all()):
            bad[key] = (int(torch.isnan(y).sum()), int((~finite).sum() - torch.isnan(y).sum()))
    if not bad:
        return
    what = ", ".join(f"'{k}' {n} NaN / {i} Inf of {out[k].numel()}" for k, (n, i) in bad.items())
    amp_hint = (f" AMP '{amp}' can overflow: try amp='none' (PRECISION='fp32')." if amp == "fp16" else "")
    raise NonFiniteOutputError(
        f"non-finite network output for image {image_name or '(unnamed)'} with checkpoint {checkpoint or '(unknown)'}: "
        f"{what}. Instances from these maps would be wrong (merged, missing or mis-classified cells), so inference "
        f"stops. Check the checkpoint (`cellseg ckpt inspect {checkpoint or 'FILE'}`: a run that diverged saves NaN "
        f"weights) and the image's pixel values.{amp_hint}")




def hv_matrix(flip: bool, k: int) -> np.ndarray:
    """The 2x2 matrix that a transform applies to (dx, dy) offset vectors, i.e. to the HV channels."""
    a = np.linalg.matrix_power(_ROT, k % 4)
    return a @ _FLIP if flip else a


def apply_transform(x: torch.Tensor, flip: bool, k: int) -> torch.Tensor:
    """Flip the last axis (optionally), then rotate by ``k`` quarter turns. Shape: (..., H, W) -> (..., H', W')."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x


def invert_outputs(out: dict[str, torch.Tensor], flip: bool, k: int) -> dict[str, torch.Tensor]:
    """Undo :func:`apply_transform` on the model's (probability) outputs, HV vectors included."""
    res = {}
    for key, y in out.items():
        if k % 4:
            y = torch.rot90(y, -k, dims=(-2, -1))
        if flip:
            y = y.flip(-1)
        res[key] = y
    inv = hv_matrix(flip, k).T  # orthogonal: inverse = transpose
    hv = res[Branch.HV.value]
    res[Branch.HV.value] = torch.stack(
        [inv[0, 0] * hv[:, 0] + inv[0, 1] * hv[:, 1], inv[1, 0] * hv[:, 0] + inv[1, 1] * hv[:, 1]], dim=1
    )
    return res


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least the given overlap; the last
    tile ends exactly at ``length``."""
    if length <= tile:
        return [0]
    stride = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(h: int, w: int) -> torch.Tensor:
    """Separable Hann window with a floor so that every pixel keeps a positive weight. Shape: (h, w)."""

    def one(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        return (0.5 - 0.5 * torch.cos(2 * torch.pi * (i + 0.5) / n)).clamp_min(1e-3)

    return one(h)[:, None] * one(w)[None, :]


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    params = list(model.parameters())
    model_device = params[0].device if params else torch.device("cpu")
    if device is None:
        return model_device
    device = torch.device(device)
    if params and model_device.type != device.type:
        raise ValueError(
            f"device={str(device)!r} but the model's parameters are on {str(model_device)!r}; "
            f"move the model first with model.to({str(device)!r})"
        )
    return device


def warn_if_tiles_split_cells(tile_size: int | None, overlap: float, object_diameter: float) -> bool:
    """Warn (and return True) when tiles overlap by less than one object diameter.

    Blending only repairs a cell that lies whole inside some tile; with an overlap band narrower than a cell, cells on
    the seams are seen only in pieces and come out split in two.
    """
    if not tile_size or tile_size * overlap >= object_diameter:
        return False
    warnings.warn(
        f"TILE_SIZE x TILE_OVERLAP = {tile_size} x {overlap} = {tile_size * overlap:g} px is smaller than "
        f"OBJECT_DIAMETER = {object_diameter:g} px: cells on tile seams are never seen whole and may be split. "
        f"Raise TILE_OVERLAP to at least {object_diameter / tile_size:.2f} (or TILE_SIZE), or use TILE_SIZE=0.",
        UserWarning,
        stacklevel=2,
    )
    return True


def _check_args(tile_size: int | None, overlap: float, amp: str) -> None:
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 8):
        raise ValueError(f"tile_size must be None (whole image) or an integer >= 8, got {tile_size!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap!r}")


def _forward_probs(model: nn.Module, x: torch.Tensor, amp: str, names: tuple[str | None, str | None] = (None, None)
                   ) -> dict[str, torch.Tensor]:
    """One forward pass -> float32 probabilities: NP foreground (B, 1, h, w), HV (B, 2, h, w), NC (B, C+1, h, w).
    ``names``: (image, checkpoint) for the error on non-finite outputs."""
    dtype = AMP_DTYPES[amp]
    ctx = torch.autocast(device_type=x.device.type, dtype=dtype) if dtype is not None else nullcontext()
    with ctx:
        out = model(x)
    missing = [b.value for b in Branch if b.value not in out]
    if missing:
        raise ValueError(f"the model's output lacks the keys {missing}; it must return a dict with 'np', 'hv', 'nc'")
    np_logits, hv, nc_logits = (out[b.value].float() for b in Branch)
    b, _, h, w = x.shape
    if np_logits.shape != (b, 2, h, w) or hv.shape != (b, 2, h, w) or nc_logits.shape[-2:] != (h, w):
        raise ValueError(
            f"model outputs must be np (B, 2, H, W), hv (B, 2, H, W), nc (B, C+1, H, W) for input {tuple(x.shape)}; "
            f"got np {tuple(np_logits.shape)}, hv {tuple(hv.shape)}, nc {tuple(nc_logits.shape)}"
        )
    check_finite_outputs({Branch.NP.value: np_logits, Branch.HV.value: hv, Branch.NC.value: nc_logits},
                         image_name=names[0], checkpoint=names[1], amp=amp)
    return {
        Branch.NP.value: torch.softmax(np_logits, dim=1)[:, 1:2],
        Branch.HV.value: hv,
        Branch.NC.value: torch.softmax(nc_logits, dim=1),
    }


def _predict_batch(model: nn.Module, x: torch.Tensor, tta: bool, amp: str,
                   names: tuple[str | None, str | None] = (None, None)) -> dict[str, torch.Tensor]:
    if not tta:
        return _forward_probs(model, x, amp, names)
    acc: dict[str, torch.Tensor] | None = None
    for flip, k in TTA_TRANSFORMS:
        out = invert_outputs(_forward_probs(model, apply_transform(x, flip, k), amp, names), flip, k)
        acc = out if acc is None else {key: acc[key] + out[key] for key in acc}
    assert acc is not None
    return {key: v / len(TTA_TRANSFORMS) for key, v in acc.items()}


@torch.inference_mode()
def predict_image(
    model: nn.Module,
    image: np.ndarray,
    *,
    tile_size: int | None = None,
    overlap: float = 0.25,
    tta: bool = False,
    amp: str = "none",
    device: torch.device | str | None = None,
    batch_size: int = 4,
    image_name: str | None = None,
    checkpoint: str | None = None,
    scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """Per-pixel maps of one RGB image.

    Args:
        model: returns ``{"np": (B, 2, H, W), "hv": (B, 2, H, W), "nc": (B, C+1, H, W)}`` logits/maps; the image is
            normalised with the model's own ``arch['normalization']`` (ImageNet for other modules); put in eval
            mode for the call (its mode is restored afterwards).
        image: RGB ``uint8`` image.
        tile_size: None runs the whole image at once; otherwise tiles of this size (images no larger run whole).
        overlap: fraction of a tile shared with its neighbour.
        tta: average over the 8 flips/rotations (8x the compute).
        amp: "none", "bf16" or "fp16" autocast.
        device: where to run; defaults to the model's device.
        batch_size: tiles per forward pass.
        image_name, checkpoint: named in the error on NaN / Inf outputs; ``checkpoint`` defaults to the file
            :func:`cellseg.loading.load_trained_model` recorded on the model (``model.checkpoint_file``).
        scale: run the network on the image resized by this factor (``INPUT_SCALE``; tiles are in resized pixels);
            the maps are resampled back to the full (H, W) grid.

    Returns:
        ``fg_prob`` (H, W), ``hv`` (2, H, W), ``nc_prob`` (C+1, H, W), all float32 numpy arrays at full resolution.

    Shape: (H, W, 3) uint8 -> (H, W), (2, H, W), (C+1, H, W).

    Raises:
        ValueError: bad arguments, a model on another device, or model outputs of the wrong form.
        NonFiniteOutputError: NaN or Inf in the network's outputs (names the image and the checkpoint).
    """
    _check_args(tile_size, overlap, amp)
    names = (image_name, checkpoint or getattr(model, "checkpoint_file", None))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scale = check_scale(scale)
    device = _resolve_device(model, device)
    if isinstance(image, np.ndarray) and not image.flags.writeable:  # torch.from_numpy warns on read-only arrays
        image = image.copy()
    from cellseg.model.normalization import model_normalization

    full_hw = image.shape[:2]
    # the statistics the model was trained with, at the network's INPUT_SCALE
    x = normalize_image(resize_image(image, scale), model_normalization(model)).to(device)
    _, height, width = x.shape
    was_training = model.training
    model.eval()
    try:
        if tile_size is None or (height <= tile_size and width <= tile_size):
            out = _predict_batch(model, x[None], tta, amp, names)
            result = {key: v[0] for key, v in out.items()}
        else:
            result = _predict_tiled(model, x, tile_size, overlap, tta, amp, batch_size, names)
    finally:
        model.train(was_training)
    if (height, width) != full_hw:
        result = {k: v[0] for k, v in maps_to_full_resolution({k: v[None] for k, v in result.items()}, *full_hw).items()}
    return {
        "fg_prob": result[Branch.NP.value][0].cpu().numpy().astype(np.float32),
        "hv": result[Branch.HV.value].cpu().numpy().astype(np.float32),
        "nc_prob": result[Branch.NC.value].cpu().numpy().astype(np.float32),
    }


def _predict_tiled(
    model: nn.Module, x: torch.Tensor, tile: int, overlap: float, tta: bool, amp: str, batch_size: int,
    names: tuple[str | None, str | None] = (None, None),
) -> dict[str, torch.Tensor]:
    _, height, width = x.shape
    th, tw = min(tile, height), min(tile, width)
    boxes = [(y, xx) for y in tile_starts(height, th, overlap) for xx in tile_starts(width, tw, overlap)]
    window = blend_window(th, tw).to(x.device)
    acc: dict[str, torch.Tensor] = {}
    weight = torch.zeros(height, width, device=x.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        batch = torch.stack([x[:, y : y + th, xx : xx + tw] for y, xx in chunk])
        out = _predict_batch(model, batch, tta, amp, names)
        if not acc:
            acc = {key: torch.zeros(v.shape[1], height, width, device=x.device) for key, v in out.items()}
        for j, (y, xx) in enumerate(chunk):
            for key, v in out.items():
                acc[key][:, y : y + th, xx : xx + tw] += v[j] * window
            weight[y : y + th, xx : xx + tw] += window
    log.debug("blended %d tiles of %dx%d over a %dx%d image", len(boxes), th, tw, height, width)
    return {key: v / weight for key, v in acc.items()}


def predict_instances(
    model: nn.Module,
    image: np.ndarray,
    *,
    pp_params: dict[str, Any] | None = None,
    tile_size: int | None = None,
    overlap: float = 0.25,
    tta: bool = False,
    amp: str = "none",
    device: torch.device | str | None = None,
    batch_size: int = 4,
    image_name: str | None = None,
    checkpoint: str | None = None,
    scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """:func:`predict_image` (at ``scale``, maps back at full resolution), then :func:`~cellseg.postprocess.hv_to_instances` and
    :func:`~cellseg.postprocess.classify_instances`.

    Returns:
        ``inst_map`` (H, W) int32 ids 1..N, ``type_map`` (H, W) int32, ``inst_types`` (N,) int32 classes 1..C,
        ``scores`` (N,) float32 with ``scores[k - 1]`` the class-aware confidence of instance k, ``objectness`` (N,)
        float32 its mean foreground probability (ranks class-agnostic AP), ``class_probs`` (N, C), and the
        maps ``fg_prob``, ``hv``, ``nc_prob``.
    """
    maps = predict_image(
        model, image, tile_size=tile_size, overlap=overlap, tta=tta, amp=amp, device=device, batch_size=batch_size,
        image_name=image_name, checkpoint=checkpoint,
        scale=scale,
    )
    inst_map = hv_to_instances(maps["fg_prob"], maps["hv"], **(pp_params or {}))
    types, scores, probs = classify_instances(inst_map, maps["nc_prob"], maps["fg_prob"])
    return {
        "inst_map": inst_map,
        "type_map": instances_to_type_map(inst_map, types),
        "inst_types": types,
        "scores": scores,
        "objectness": instance_objectness(inst_map, maps["fg_prob"]),
        "class_probs": probs,
        **maps,
    }
