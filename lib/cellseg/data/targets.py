"""Training targets of the HoVer-Net branches computed from an instance map.

HV maps follow HoVer-Net (Graham et al., Med. Image Anal. 2019, ``models/hovernet/targets.py``): for every instance the
horizontal and vertical offset of each pixel from the instance's centre of mass, negative and positive sides scaled to
[-1, 1] separately. Differences from HoVer-Net's generator, on purpose:

- the centre of mass is exact (not rounded to a pixel), so a symmetric instance gets symmetric maps and the pixels left
  of / above the centre are negative, right of / below positive;
- no off-by-one (HoVer-Net builds ``arange(1, w + 1)`` against a 0-based centre);
- both axes use their own extent (CellViT's generator uses ``shape[0]`` for x, wrong on non-square images);
- vectorised over horizontal runs of equal id instead of a full-image mask per instance, so the cost grows with the
  number of pixels, not instances x pixels (benchmarks/bench_hv_maps.py).

Offsets are kept as exact integers ``x * n - sum(x)`` (n = instance area) until the final division, so the result does
not depend on the frame the instance is computed in (crop, bounding box or full image).
"""

from __future__ import annotations

import numpy as np


def hv_maps(inst_map: np.ndarray) -> np.ndarray:
    """Horizontal (channel 0) and vertical (channel 1) distance maps to each instance's centre of mass.

    Args:
        inst_map: instance ids, 0 = background; ids need not be consecutive.

    Returns:
        float32 maps in [-1, 1], 0 on background.

    Shape: (H, W) -> (2, H, W).
    """
    if inst_map.ndim != 2:
        raise ValueError(f"hv_maps expects a 2-D instance map (H, W), got shape {tuple(inst_map.shape)}")
    if not np.issubdtype(inst_map.dtype, np.integer):
        raise ValueError(
            f"hv_maps expects an integer instance map, got dtype {inst_map.dtype}; cast with inst_map.astype(np.int32)"
        )
    h, w = inst_map.shape
    out = np.zeros((2, h, w), dtype=np.float32)
    if inst_map.size == 0:
        return out
    flat = inst_map.ravel()
    # horizontal runs of equal id, cut at row ends: every per-instance statistic is a sum over ~10x fewer runs than
    # pixels, and the per-pixel work is a few np.repeat calls
    change = np.empty(flat.size, dtype=bool)
    change[0] = True
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    change[::w] = True
    starts = np.flatnonzero(change)
    labels = flat[starts]
    lengths = np.diff(starts, append=flat.size)
    keep = labels != 0
    starts, lengths, labels = starts[keep], lengths[keep], labels[keep].astype(np.int64)
    if starts.size == 0:
        return out
    if labels.min() < 0:
        raise ValueError(f"hv_maps expects non-negative instance ids, got {int(labels.min())}")
    if labels.max() > 4 * labels.size + 1024:
        _, labels = np.unique(labels, return_inverse=True)  # huge sparse ids: keep the tables small
    y, x0 = np.divmod(starts, w)
    n = int(labels.max()) + 1
    # per instance: area and coordinate sums (exact integers, float64 is exact below 2**53)
    area = np.bincount(labels, weights=lengths, minlength=n)
    sum_x = np.bincount(labels, weights=(2 * x0 + lengths - 1) * lengths // 2, minlength=n)
    sum_y = np.bincount(labels, weights=y * lengths, minlength=n)
    lo_x, hi_x = np.full(n, w, dtype=np.int64), np.zeros(n, dtype=np.int64)
    lo_y, hi_y = np.full(n, h, dtype=np.int64), np.zeros(n, dtype=np.int64)
    np.minimum.at(lo_x, labels, x0)
    np.maximum.at(hi_x, labels, x0 + lengths - 1)
    np.minimum.at(lo_y, labels, y)
    np.maximum.at(hi_y, labels, y)
    # per run; offsets are scaled by the area: area * (coord - centre) = area * coord - sum, an exact integer
    a, sx, sy = area[labels], sum_x[labels], sum_y[labels]
    right, left = np.maximum(hi_x[labels] * a - sx, 1), np.maximum(sx - lo_x[labels] * a, 1)
    below, above = np.maximum(hi_y[labels] * a - sy, 1), np.maximum(sy - lo_y[labels] * a, 1)
    first = np.cumsum(lengths) - lengths  # index of each run's first pixel among the foreground pixels
    ramp = np.arange(int(lengths.sum()), dtype=np.int64)
    pixels = np.repeat(starts - first, lengths) + ramp  # flat index of every foreground pixel
    off_y = y * a - sy  # constant along a run
    out[1].ravel()[pixels] = np.repeat(
        (off_y / np.where(off_y > 0, below, above)).astype(np.float32), lengths
    )
    off_x = np.repeat(a, lengths) * (np.repeat(x0 - first, lengths) + ramp) - np.repeat(sx, lengths)
    den = np.where(off_x > 0, np.repeat(right, lengths), np.repeat(left, lengths))
    out[0].ravel()[pixels] = (off_x / den).astype(np.float32)
    return out


# A cut cell whose visible part is smaller than this fraction of the whole cell is dropped from the HV and NC targets
# (its pixels stay foreground for NP). HoVer-Net removes objects under 30 px from its HV targets
# (``remove_small_objects(min_size=30)`` in ``gen_instance_hv_map``), about a tenth of a 40x nucleus; a fraction of the
# cell's own area makes the same rule independent of magnification and cell type.
MIN_FRAGMENT_FRACTION = 0.1


def whole_cell_targets(
    inst_map: np.ndarray,
    type_map: np.ndarray,
    crop: tuple[slice, slice],
    *,
    min_fragment_fraction: float = MIN_FRAGMENT_FRACTION,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets of a patch cut from a larger window: HV maps of the whole cells, cropped afterwards.

    HoVer-Net's rule (targets on the larger input patch, then the centre crop to the output): a cell cut by the patch
    border keeps the HV field of the whole cell, centred on the whole cell's centre of mass, not on its visible
    fragment. A cut cell whose visible part holds less than ``min_fragment_fraction`` of its pixels is dropped from
    the HV target (0) and the NC target (type 0), as HoVer-Net drops small objects; NP and the instance map keep it.

    Args:
        inst_map: instance ids of the window (every cell touching ``crop`` should lie whole inside it).
        type_map: type ids of the window.
        crop: the patch inside the window, ``(rows, cols)`` slices with explicit bounds.
        min_fragment_fraction: in [0, 1); 0 keeps every fragment.

    Returns:
        ``(inst_map, type_map, hv)`` of the patch.

    Shape: (H, W), (H, W) -> (h, w), (h, w), (2, h, w).
    """
    if not 0.0 <= min_fragment_fraction < 1.0:
        raise ValueError(f"min_fragment_fraction must lie in [0, 1), got {min_fragment_fraction}")
    hv = hv_maps(inst_map)[:, crop[0], crop[1]]
    inst = inst_map[crop]
    types = type_map[crop].copy()
    if min_fragment_fraction > 0 and inst.size and inst.max() > 0:
        n = int(inst_map.max()) + 1
        whole = np.bincount(inst_map.ravel(), minlength=n)
        visible = np.bincount(inst.ravel(), minlength=n)
        fragment = (visible < whole) & (visible < min_fragment_fraction * whole)
        fragment[0] = False
        drop = fragment[inst]
        if drop.any():
            hv = hv.copy()
            hv[:, drop] = 0.0
            types[drop] = 0
    return inst, types, np.ascontiguousarray(hv)
