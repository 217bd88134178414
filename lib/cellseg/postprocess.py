"""Post-processing: from the NP/HV/NC maps to labelled, classified instances.

Marker-controlled watershed after HoVer-Net (Graham et al., Medical Image Analysis 2019, ``process_np_hv``), with
two changes that matter on clean maps and make the parameters portable across object sizes:

* The HV maps are differentiated with a derivative-of-Gaussian whose width is a fraction of the expected object
  diameter, and the slopes are expressed in units of the slope an object of that diameter has inside (``2 /
  diameter`` per pixel, since HV runs from -1 to 1 across an object). HoVer-Net instead min-max normalises the Sobel
  response of each tile (kernel 21 px, for nuclei at 40x), so its thresholds depend on what else is in the tile.
* A pixel is a marker when *both* signed slopes (d h / d x and d v / d y) are clearly positive: inside an object HV
  increases along its axis, while at every boundary (between touching objects or against the background) it falls.
  Foreground components left without a marker become instances of their own instead of being dropped.

All sizes are relative to ``object_diameter`` (pixels): nuclei at 40x are ~20 px (the default), BCCD blood cells
~100 px. The watershed floods the negated smaller slope from the markers inside the foreground mask.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

log = logging.getLogger(__name__)

DEFAULT_PARAMS: dict[str, float] = {
    "object_diameter": 20.0,  # expected object diameter in pixels (nuclei at 40x)
    "fg_threshold": 0.5,  # foreground probability threshold
    "min_object_frac": 0.025,  # smallest object kept, as a fraction of diameter^2 (10 px for nuclei, as HoVer-Net)
    "sigma_frac": 0.1,  # derivative-of-Gaussian width as a fraction of the diameter
    "marker_threshold": 0.2,  # smallest normalised HV slope (1 = inside an object of the expected size) in markers
    "min_marker_frac": 0.05,  # smallest marker, as a fraction of diameter^2
}

# Grid searched by tune_postprocess when none is given: the knobs a trained model's maps are most sensitive to.
DEFAULT_GRID: dict[str, list[float]] = {
    "fg_threshold": [0.4, 0.5, 0.6],
    "marker_threshold": [0.1, 0.2, 0.35],
    "sigma_frac": [0.07, 0.1, 0.14],
}

_RANGES: dict[str, tuple[float, float]] = {
    "object_diameter": (1.0, 10_000.0),
    "fg_threshold": (0.0, 1.0),
    "min_object_frac": (0.0, 10.0),
    "sigma_frac": (0.0, 2.0),
    "marker_threshold": (-10.0, 10.0),
    "min_marker_frac": (0.0, 10.0),
}


def resolve_params(params: dict[str, Any] | None = None) -> dict[str, float]:
    """Defaults overridden by ``params``, validated.

    Raises:
        ValueError: an unknown name, a non-number, or a value out of range (the message names it).
    """
    out = dict(DEFAULT_PARAMS)
    for name, value in (params or {}).items():
        if name not in DEFAULT_PARAMS:
            raise ValueError(
                f"unknown post-processing parameter {name!r}; allowed: {sorted(DEFAULT_PARAMS)}. "
                "Fix the name in pp_params / postprocess.json."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"post-processing parameter {name!r} must be a number, got {value!r}")
        lo, hi = _RANGES[name]
        if not (lo <= float(value) <= hi) or not math.isfinite(float(value)):
            raise ValueError(f"post-processing parameter {name!r} must lie in [{lo}, {hi}], got {value!r}")
        out[name] = float(value)
    return out


def _dog_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian smoothing kernel and derivative kernel with exact unit response to a unit ramp (correlation)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    d = x * g
    d /= (x * d).sum()
    return g.astype(np.float32), d.astype(np.float32)


def hv_slopes(hv: np.ndarray, object_diameter: float, sigma_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """d h / d x and d v / d y, smoothed and normalised so that 1 is the slope inside an object of the given
    diameter. Shape: (2, H, W) -> (H, W), (H, W) float32."""
    h = np.clip(hv[0], -1.0, 1.0).astype(np.float32, copy=False)
    v = np.clip(hv[1], -1.0, 1.0).astype(np.float32, copy=False)
    scale = object_diameter / 2.0
    sigma = sigma_frac * object_diameter
    if sigma < 0.3:  # plain central differences
        gh = np.zeros_like(h)
        gv = np.zeros_like(v)
        gh[:, 1:-1] = (h[:, 2:] - h[:, :-2]) * (0.5 * scale)
        gv[1:-1] = (v[2:] - v[:-2]) * (0.5 * scale)
        return gh, gv
    g, d = _dog_kernels(sigma)
    gh = cv2.sepFilter2D(h, cv2.CV_32F, d * scale, g, borderType=cv2.BORDER_REPLICATE)
    gv = cv2.sepFilter2D(v, cv2.CV_32F, g, d * scale, borderType=cv2.BORDER_REPLICATE)
    return gh, gv


def _remove_small(labels: np.ndarray, n: int, min_area: float) -> tuple[np.ndarray, int]:
    """Drop components below ``min_area`` and relabel the rest consecutively."""
    if n == 0:
        return labels, 0
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = area >= min_area
    keep[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels], int(keep.sum())


def _check_maps(fg_prob: np.ndarray, hv: np.ndarray) -> None:
    if fg_prob.ndim != 2:
        raise ValueError(f"fg_prob must be (H, W), got shape {fg_prob.shape}")
    if hv.shape != (2, *fg_prob.shape):
        raise ValueError(f"hv must be (2, H, W) = {(2, *fg_prob.shape)} to match fg_prob, got {hv.shape}")


def hv_to_instances(fg_prob: np.ndarray, hv: np.ndarray, **params: float) -> np.ndarray:
    """Instances from the foreground probability and the HV maps by marker-controlled watershed.

    Args:
        fg_prob: foreground probability in [0, 1].
        hv: horizontal (x offset) and vertical (y offset) maps in [-1, 1], HoVer-Net convention.
        **params: overrides of :data:`DEFAULT_PARAMS` (``object_diameter`` in pixels, thresholds, sizes as
            fractions of the squared diameter).

    Returns:
        Instance map with consecutive ids 1..N (0 = background).

    Shape: (H, W), (2, H, W) -> (H, W) int32.

    Raises:
        ValueError: bad shapes or parameters.
    """
    _check_maps(fg_prob, hv)
    p = resolve_params(params)
    d = p["object_diameter"]
    fg = fg_prob >= p["fg_threshold"]
    labels, n = ndi.label(fg)
    labels, n = _remove_small(labels, n, p["min_object_frac"] * d * d)
    if n == 0:
        return np.zeros(fg_prob.shape, np.int32)
    fg = labels > 0
    gh, gv = hv_slopes(hv, d, p["sigma_frac"])
    slope = np.minimum(gh, gv)
    markers, n_markers = ndi.label(fg & (slope > p["marker_threshold"]))
    markers, n_markers = _remove_small(markers, n_markers, p["min_marker_frac"] * d * d)
    out = watershed(-slope, markers=markers, mask=fg).astype(np.int32) if n_markers else np.zeros_like(labels)
    # Foreground components without any marker (objects much larger than the diameter, blurry maps) are
    # kept whole rather than dropped, as HoVer-Net's watershed would.
    rest = fg & (out == 0)
    if rest.any():
        rest_labels, n_rest = ndi.label(rest)
        out[rest] = rest_labels[rest] + n_markers
    return out


def classify_instances(
    inst_map: np.ndarray, nc_prob: np.ndarray, fg_prob: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class, confidence and class probabilities of every instance.

    The class probabilities of instance k are the mean of the per-pixel softmax over its pixels, with the background
    channel dropped and the rest renormalised to sum to 1 (uniform when all of the mass is background). The class is
    their argmax: the soft form of :func:`cellseg.data.sample.vote_classes` (type 0 never votes, ties to the smaller
    id, no class mass -> class 0), so one-hot probabilities of a type map give exactly its vote. The confidence is ``mean foreground probability over the instance x probability of the chosen
    class``: high only when the model is sure both that it is an object and what it is (used to rank instances for
    COCO AP). Ids must be 1..N; an id that does not occur gets class 0, confidence 0 and zero probabilities.

    Shape: (H, W) ids 1..N, (C+1, H, W), (H, W) -> (N,) int32, (N,) float32, (N, C) float32.

    Raises:
        ValueError: shapes disagree or nc_prob has fewer than 2 channels.
    """
    if nc_prob.ndim != 3 or nc_prob.shape[0] < 2:
        raise ValueError(f"nc_prob must be (C+1, H, W) with C >= 1 classes, got shape {nc_prob.shape}")
    if inst_map.shape != nc_prob.shape[1:] or fg_prob.shape != inst_map.shape:
        raise ValueError(
            f"inst_map {inst_map.shape}, nc_prob {nc_prob.shape} and fg_prob {fg_prob.shape} must share (H, W)"
        )
    n_classes = nc_prob.shape[0] - 1
    n = int(inst_map.max()) if inst_map.size else 0
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros((0, n_classes), np.float32)
    ids = inst_map.ravel().astype(np.int64)
    sel = ids > 0
    ids = ids[sel]
    area = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)
    present = area > 0
    safe = np.where(present, area, 1.0)
    sums = np.stack(
        [np.bincount(ids, weights=nc_prob[c].ravel()[sel], minlength=n + 1)[1:] for c in range(1, n_classes + 1)],
        axis=1,
    )  # (N, C)
    total = sums.sum(axis=1, keepdims=True)
    probs = np.where(total > 0, sums / np.where(total > 0, total, 1.0), 1.0 / n_classes)
    probs[~present] = 0.0
    types = probs.argmax(axis=1).astype(np.int32) + 1
    # the shared class-vote rule (cellseg.data.sample.vote_classes): background never votes, so an instance without
    # any class mass is unclassified (0), not class 1
    types[~present | (total[:, 0] <= 0)] = 0
    fg_mean = np.bincount(ids, weights=fg_prob.ravel()[sel], minlength=n + 1)[1:] / safe
    conf = fg_mean * probs[np.arange(n), np.maximum(types - 1, 0)]
    conf[~present] = 0.0
    return types, conf.astype(np.float32), probs.astype(np.float32)


def instance_objectness(inst_map: np.ndarray, fg_prob: np.ndarray) -> np.ndarray:
    """Objectness of every instance: its mean foreground probability, independent of the class (ranks the
    class-agnostic AP, while :func:`classify_instances`' confidence ranks the per-class AP). An id that does not
    occur gets 0.

    Shape: (H, W) ids 1..N, (H, W) -> (N,) float32.

    Raises:
        ValueError: the shapes differ.
    """
    if fg_prob.shape != inst_map.shape:
        raise ValueError(f"inst_map {inst_map.shape} and fg_prob {fg_prob.shape} must have the same shape")
    n = int(inst_map.max()) if inst_map.size else 0
    if n == 0:
        return np.zeros(0, np.float32)
    ids = inst_map.ravel().astype(np.int64)
    area = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)
    total = np.bincount(ids, weights=fg_prob.ravel().astype(np.float64), minlength=n + 1)[1:]
    return np.where(area > 0, total / np.maximum(area, 1.0), 0.0).astype(np.float32)


def instances_to_type_map(inst_map: np.ndarray, inst_types: np.ndarray) -> np.ndarray:
    """Paint each instance k with ``inst_types[k - 1]``. Shape: (H, W), (N,) -> (H, W) int32.

    Raises:
        ValueError: the map holds an id above ``len(inst_types)`` or a negative id.
    """
    inst_types = np.asarray(inst_types)
    n = int(inst_map.max()) if inst_map.size else 0
    if inst_map.size and int(inst_map.min()) < 0:
        raise ValueError(f"inst_map ids must be >= 0, got a minimum of {int(inst_map.min())}")
    if n > inst_types.shape[0]:
        raise ValueError(
            f"inst_map has ids up to {n} but inst_types has only {inst_types.shape[0]} entries "
            "(inst_types[k - 1] is the class of instance k)"
        )
    lut = np.concatenate([[0], inst_types.astype(np.int32)])
    return lut[inst_map]


def tune_postprocess(
    samples: Sequence[tuple[np.ndarray, ...]],
    grid: dict[str, Sequence[float]] | None = None,
    *,
    base_params: dict[str, float] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Grid search of :func:`hv_to_instances` parameters for the best mean PQ.

    Args:
        samples: ``(fg_prob (H, W), hv (2, H, W), gt_inst (H, W))`` per image, optionally with a fourth element,
            the ``ignore_mask`` (H, W) bool: predictions lying mostly inside it are dropped, as in the metrics.
            Any sequence: items are read once per parameter setting and not kept, so a lazy sequence such as
            :class:`cellseg.tuning.DiskMaps` keeps memory at one image's maps.
        grid: parameter name -> candidate values (default :data:`DEFAULT_GRID`); the full product is searched.
        base_params: fixed values for the parameters not in the grid (e.g. ``object_diameter``).

    Returns:
        The best full parameter set (ties go to the first in grid order) and one row per combination with the
        parameters and the mean ``pq``, ``sq``, ``rq`` over images (an image with neither ground truth nor
        prediction is left out; None when no image is left), plain floats so that the table can be written as
        JSON.

    Raises:
        ValueError: no samples, an empty grid entry, or an unknown parameter.
    """
    from cellseg.metrics.pairwise import drop_ignored, pair_table
    from cellseg.metrics.panoptic import panoptic_counts

    if len(samples) == 0:
        raise ValueError("tune_postprocess needs at least one (fg_prob, hv, gt_inst) sample; the tuning split is empty")
    grid = dict(DEFAULT_GRID if grid is None else grid)
    for name, values in grid.items():
        if len(values) == 0:
            raise ValueError(f"grid entry {name!r} is empty; give at least one value")
    base = resolve_params(base_params)
    names = list(grid)
    table: list[dict[str, Any]] = []
    best: tuple[float, dict[str, float]] | None = None
    for combo in itertools.product(*(grid[k] for k in names)):
        params = resolve_params({**base, **dict(zip(names, combo))})
        stats = []
        for fg_prob, hv, gt, *rest in samples:
            pred = drop_ignored(hv_to_instances(fg_prob, hv, **params), rest[0] if rest else None)
            counts, _ = panoptic_counts(pair_table(gt, pred))
            stats.append([float(v) for v in counts.quality().values()])
        arr = np.asarray(stats, dtype=np.float64)
        valid = ~np.isnan(arr[:, 0])
        means = arr[valid].mean(axis=0) if valid.any() else np.full(3, np.nan)
        score = -1.0 if math.isnan(means[0]) else float(means[0])
        row: dict[str, Any] = dict(params)
        row.update({k: None if math.isnan(v) else float(v) for k, v in zip(("pq", "sq", "rq"), means)})
        row["n_images"] = int(valid.sum())
        table.append(row)
        if best is None or score > best[0]:
            best = (score, params)
        log.debug("post-processing %s: PQ %.4f", dict(zip(names, combo)), score)
    assert best is not None
    log.info("best post-processing parameters %s (mean PQ %.4f)", best[1], best[0])
    return dict(best[1]), table
