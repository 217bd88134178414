"""Sparse table of pairwise intersections between ground-truth and predicted instances.

Every instance metric in :mod:`cellseg.metrics` (PQ, AJI, detection, COCO AP) is computed from this one table, built
with a single joint ``bincount`` over ``(gt_id, pred_id)`` pixel pairs instead of HoVer-Net's per-instance
full-image masks (``get_fast_pq`` costs O(instances x pixels); this costs O(pixels + pairs)).
Instances are relabelled to consecutive ids first, which is what HoVer-Net's ``remap_label`` guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Up to this many (gt, pred) cells the joint histogram is a dense bincount; beyond it, a sort-based np.unique.
_DENSE_PAIR_LIMIT = 1 << 24  # 128 MB of int64 counts


def relabel_sequential(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel instance ids to 1..N in increasing order of the original id (0 stays background).

    Shape: (H, W) int -> (H, W) int64, (N,) original ids.

    Raises:
        ValueError: negative ids, or a non-integer array.
    """
    if not np.issubdtype(inst_map.dtype, np.integer) and inst_map.dtype != np.bool_:
        raise ValueError(f"instance maps must hold integer ids, got dtype {inst_map.dtype}; cast with .astype(np.int32)")
    flat = inst_map.ravel()
    if flat.size == 0:
        return np.zeros(inst_map.shape, np.int64), np.zeros(0, np.int64)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0:
        raise ValueError(f"instance ids must be >= 0 (0 = background), got a minimum of {lo}")
    if hi <= 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=hi + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(hi + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[inst_map], ids.astype(np.int64)
    uniq, inverse = np.unique(flat, return_inverse=True)
    if uniq[0] != 0:
        return (inverse + 1).reshape(inst_map.shape).astype(np.int64), uniq.astype(np.int64)
    return inverse.reshape(inst_map.shape).astype(np.int64), uniq[1:].astype(np.int64)


@dataclass(frozen=True)
class PairTable:
    """Areas of the instances of one image and the intersections of every overlapping (gt, pred) pair.

    Indices are 0-based: ``gt_index[k] == i`` refers to the ground-truth instance with relabelled id ``i + 1``
    (original id ``gt_ids[i]``). Pairs are sorted by ``(gt_index, pred_index)``.
    """

    gt_areas: np.ndarray  # (n_gt,) int64
    pred_areas: np.ndarray  # (n_pred,) int64
    gt_index: np.ndarray  # (K,) int64
    pred_index: np.ndarray  # (K,) int64
    inter: np.ndarray  # (K,) int64
    gt_ids: np.ndarray  # (n_gt,) original ids
    pred_ids: np.ndarray  # (n_pred,) original ids
    gt_classes: np.ndarray | None = None  # (n_gt,) int64 class per instance (0 = unclassified), if types were given
    pred_classes: np.ndarray | None = None  # (n_pred,)
    gt_centroids: np.ndarray | None = None  # (n_gt, 2) float64 (y, x) centres of mass, if asked for
    pred_centroids: np.ndarray | None = None  # (n_pred, 2)

    @property
    def n_gt(self) -> int:
        return int(self.gt_areas.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_areas.size)

    @property
    def union(self) -> np.ndarray:
        """Union area of every pair. Shape: (K,)."""
        return self.gt_areas[self.gt_index] + self.pred_areas[self.pred_index] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """IoU of every pair (all > 0). Shape: (K,)."""
        return self.inter / self.union


def pair_table(
    gt_inst: np.ndarray,
    pred_inst: np.ndarray,
    gt_types: np.ndarray | None = None,
    pred_types: np.ndarray | None = None,
    *,
    with_centroids: bool = False,
) -> PairTable:
    """Build the :class:`PairTable` of two instance maps of the same shape; with type maps, also the class of every
    instance (:func:`instance_classes`).

    Shape: (H, W), (H, W)[, (H, W), (H, W)] -> table with (n_gt,), (n_pred,) areas and (K,) pairs.

    Raises:
        ValueError: shapes differ.
    """
    for name, arr in (("gt_types", gt_types), ("pred_types", pred_types), ("pred_inst", pred_inst)):
        if arr is not None and arr.shape != gt_inst.shape:
            raise ValueError(f"{name} has shape {arr.shape} but the ground-truth instance map has {gt_inst.shape}")
    g, gt_ids = relabel_sequential(gt_inst)
    p, pred_ids = relabel_sequential(pred_inst)
    n_g, n_p = gt_ids.size, pred_ids.size
    gt_areas = np.bincount(g.ravel(), minlength=n_g + 1)[1:].astype(np.int64)
    pred_areas = np.bincount(p.ravel(), minlength=n_p + 1)[1:].astype(np.int64)
    both = (g > 0) & (p > 0)
    stride = n_p + 1
    key = g[both] * stride + p[both]
    if (n_g + 1) * stride <= _DENSE_PAIR_LIMIT:
        counts = np.bincount(key, minlength=(n_g + 1) * stride)
        nz = np.flatnonzero(counts)
        inter = counts[nz].astype(np.int64)
    else:
        nz, inter = np.unique(key, return_counts=True)
        inter = inter.astype(np.int64)
    return PairTable(
        gt_areas=gt_areas,
        pred_areas=pred_areas,
        gt_index=nz // stride - 1,
        pred_index=nz % stride - 1,
        inter=inter,
        gt_ids=gt_ids,
        pred_ids=pred_ids,
        gt_classes=None if gt_types is None else instance_classes(g, gt_types, n_g),
        pred_classes=None if pred_types is None else instance_classes(p, pred_types, n_p),
        gt_centroids=centroids(g, n_g) if with_centroids else None,
        pred_centroids=centroids(p, n_p) if with_centroids else None,
    )


def centroids(inst_map: np.ndarray, n_instances: int) -> np.ndarray:
    """Centres of mass (y, x) of the instances of a relabelled map (ids 1..N). Shape: (H, W) -> (N, 2) float64."""
    if n_instances == 0:
        return np.zeros((0, 2))
    flat = inst_map.ravel()
    area = np.bincount(flat, minlength=n_instances + 1)[1:].astype(np.float64)
    h, w = inst_map.shape
    yy = np.repeat(np.arange(h, dtype=np.float64), w)
    xx = np.tile(np.arange(w, dtype=np.float64), h)
    cy = np.bincount(flat, weights=yy, minlength=n_instances + 1)[1:]
    cx = np.bincount(flat, weights=xx, minlength=n_instances + 1)[1:]
    safe = np.maximum(area, 1.0)
    return np.stack([cy / safe, cx / safe], axis=1)


def instance_classes(inst_map: np.ndarray, type_map: np.ndarray, n_instances: int) -> np.ndarray:
    """Class of each instance of a relabelled map: :func:`cellseg.data.sample.vote_classes`, the rule shared with
    the data checks and post-processing (type 0 never votes, ties to the smaller class id, all type 0 -> class 0,
    which counts in class-agnostic metrics and in no class). Shape: (H, W) relabelled 1..N, (H, W) -> (N,) int64.
    """
    from cellseg.data.sample import vote_classes

    return vote_classes(inst_map, type_map, n_instances)


def drop_ignored(pred_inst: np.ndarray, ignore_mask: np.ndarray | None) -> np.ndarray:
    """Remove predicted instances lying mostly (more than half their pixels) in ``ignore_mask``, and blank the
    ignored pixels of the rest, so that ignored pixels count nowhere.

    Shape: (H, W), (H, W) bool -> (H, W).

    Raises:
        ValueError: the mask's shape differs from the map's.
    """
    if ignore_mask is None:
        return pred_inst
    if ignore_mask.shape != pred_inst.shape:
        raise ValueError(f"ignore_mask has shape {ignore_mask.shape} but the instance map has {pred_inst.shape}")
    ignore = ignore_mask.astype(bool)
    if not ignore.any():
        return pred_inst
    flat = pred_inst.ravel().astype(np.int64)
    n = int(flat.max()) + 1 if flat.size else 1
    total = np.bincount(flat, minlength=n)
    inside = np.bincount(flat[ignore.ravel()], minlength=n)
    dropped = 2 * inside > total
    dropped[0] = False
    out = pred_inst.copy()
    out[dropped[flat].reshape(pred_inst.shape) | ignore] = 0
    return out
