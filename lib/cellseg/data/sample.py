"""The internal sample format shared by every dataset reader, the cache and the training dataset.

A sample is a plain dict:

- ``image``: (H, W, 3) uint8 RGB.
- ``inst_map``: (H, W) int32, 0 = background, instances 1..N consecutive.
- ``type_map``: (H, W) int32, 0 = background, classes 1..C (class name ``i`` of the class list -> type id ``i + 1``).
- ``ignore_mask``: (H, W) bool, optional: pixels excluded from losses and metrics.
- ``meta``: dict of plain values (name, source file, ...).

The same layout as HoVer-Net's ``inst_map``/``type_map`` label dicts (and CellViT's), so converters stay thin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")

Sample = dict[str, Any]


def relabel_consecutive(inst_map: np.ndarray) -> np.ndarray:
    """Map instance ids to 1..N in order of their original id (0 stays background).

    Instances with no pixels simply disappear, which is what cropping or warping needs.

    Shape: (H, W) -> (H, W) int32.
    """
    if inst_map.size == 0:
        return inst_map.astype(np.int32)
    top = int(inst_map.max())
    if int(inst_map.min()) >= 0 and top <= 4 * inst_map.size + 1024:
        # a lookup table over the id range: linear time, no sort
        present = np.bincount(inst_map.ravel(), minlength=top + 1) > 0
        lut = np.cumsum(present).astype(np.int32) - np.int32(present[0])
        lut[0] = 0
        return lut[inst_map]
    ids, inverse = np.unique(inst_map, return_inverse=True)
    new = np.arange(ids.size, dtype=np.int32) + (0 if ids[0] == 0 else 1)
    return new[inverse.reshape(inst_map.shape)]


def vote_classes(inst_map: np.ndarray, type_map: np.ndarray, n_instances: int) -> np.ndarray:
    """The class of every instance 1..N: the majority of its non-zero ``type_map`` pixels.

    The one class-vote rule of cellseg, shared by the data checks, the metrics and post-processing: type 0 never
    votes (an instance half background-typed and half class 2 is class 2), ties go to the smaller class id, and an
    instance whose pixels are all type 0 (or that has no pixel) gets class 0 (unclassified).

    Shape: (H, W) ids 1..N, (H, W) -> (N,) int64.
    """
    if n_instances == 0:
        return np.zeros(0, np.int64)
    inst = inst_map.ravel().astype(np.int64)
    types = type_map.ravel().astype(np.int64)
    sel = (inst > 0) & (inst <= n_instances) & (types > 0)
    if not sel.any():
        return np.zeros(n_instances, np.int64)
    n_types = int(types[sel].max()) + 1
    # one joint histogram over (instance, type): argmax per row is the majority type (first maximum: smaller id)
    votes = np.bincount((inst[sel] - 1) * n_types + types[sel], minlength=n_instances * n_types)
    votes = votes.reshape(n_instances, n_types)
    out = votes.argmax(axis=1).astype(np.int64)
    out[votes.max(axis=1) == 0] = 0
    return out


def instance_types(inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """Class of every instance 1..N by :func:`vote_classes` (index 0 is background and always 0).

    Shape: (H, W), (H, W) -> (N + 1,) int64.
    """
    n = int(inst_map.max(initial=0))
    return np.concatenate([[0], vote_classes(inst_map, type_map, n)]).astype(np.int64)


def class_instance_counts(inst_map: np.ndarray, type_map: np.ndarray, num_classes: int) -> list[int]:
    """Number of instances of each class 1..C (list of length C)."""
    types = instance_types(inst_map, type_map)[1:]
    counts = np.bincount(types, minlength=num_classes + 1)[1 : num_classes + 1]
    return [int(c) for c in counts]
