"""Identical and near-duplicate images across splits of a prepared cache (leakage between train and val/test).

Identical images: equal SHA-256 of the cached PNGs (the cache writes every image with the same encoder, so equal
pixels give equal files; the manifest already holds these hashes). Near duplicates: the difference hash (dHash,
Krawetz 2013: the signs of horizontal brightness differences on a 9x8 grey thumbnail, 64 bits) of two images differ
in at most ``NEAR_DUPLICATE_BITS`` bits. Thumbnails make the hash blind to JPEG noise and small shifts, so two
exposures of the same field (BCCD's ``BloodImage_00037`` and ``00038``) collide while different fields do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cellseg.data.sample import SPLITS

# Hamming distance (of 64 bits) at or below which two images count as the same field. Measured on BCCD
# over all 364 images: the near-duplicate pair 00037/00038 is at 5 bits, the closest pair of distinct fields at 13.
NEAR_DUPLICATE_BITS = 8
DUPLICATE_CHOICES = ("keep", "drop")


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of an RGB or grey image. Shape: (H, W[, 3]) -> int."""
    grey = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("L").resize((9, 8), Image.Resampling.BOX)
    a = np.asarray(grey, dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def find_duplicates(
    hashes: dict[str, int], checksums: dict[str, str], max_bits: int = NEAR_DUPLICATE_BITS
) -> list[dict[str, Any]]:
    """Pairs of images in different splits that are identical (same file hash) or near duplicates (dHash).

    Args:
        hashes: ``"split/name" -> dhash``.
        checksums: ``"split/name" -> SHA-256`` of the image file.
        max_bits: largest Hamming distance that counts as a near duplicate.

    Returns:
        one dict per pair (``image`` in the later split, ``other`` in the earlier one, ``kind`` "identical" or
        "near", ``distance`` in bits), ordered by split and name.
    """
    keys = sorted(hashes, key=lambda k: (SPLITS.index(k.split("/", 1)[0]), k))
    values = np.array([hashes[k] for k in keys], dtype=np.uint64)
    pairs = []
    for j, key in enumerate(keys):
        split = key.split("/", 1)[0]
        for i in range(j):
            other = keys[i]
            if other.split("/", 1)[0] == split:
                continue
            same_file = checksums.get(key) is not None and checksums.get(key) == checksums.get(other)
            distance = int(np.unpackbits(np.array([values[i] ^ values[j]]).view(np.uint8)).sum())
            if same_file or distance <= max_bits:
                pairs.append(
                    {"image": key, "other": other, "kind": "identical" if same_file else "near", "distance": distance}
                )
    return pairs


def image_hashes(cache_dir: str | Path, splits: dict[str, list[str]]) -> dict[str, int]:
    """dHash of every cached image (``"split/name" -> int``)."""
    from cellseg.data.cache import sample_paths
    from cellseg.data.files import read_image

    return {
        f"{split}/{name}": dhash(read_image(sample_paths(cache_dir, split, name)[0]))
        for split in SPLITS
        for name in splits.get(split, [])
    }


def apply_duplicates(manifest: dict[str, Any], cache_dir: str | Path, duplicates: str) -> dict[str, Any]:
    """Record the cross-split duplicates in the manifest and, with ``duplicates='drop'``, remove them from val/test.

    The image of the later split is dropped (val when paired with train, test when paired with train or val), so the
    training split never shrinks. Raises ValueError for an unknown choice, naming the parameter.
    """
    if duplicates not in DUPLICATE_CHOICES:
        raise ValueError(
            f"DUPLICATES must be one of {list(DUPLICATE_CHOICES)}, got {duplicates!r}. Set it in "
            f"notebooks/00_prepare_data.ipynb's parameters cell or with -p DUPLICATES ..."
        )
    checksums = {k: v.get("png") for k, v in manifest.get("checksums", {}).items()}
    pairs = find_duplicates(image_hashes(cache_dir, manifest["splits"]), checksums)
    manifest["near_duplicates"] = pairs
    dropped: list[str] = []
    if duplicates == "drop":
        dropped = sorted({p["image"] for p in pairs}, key=lambda k: (SPLITS.index(k.split("/", 1)[0]), k))
        for key in dropped:
            split, name = key.split("/", 1)
            manifest["splits"][split].remove(name)
            counts = manifest["image_counts"].pop(key)
            for c, n in zip(manifest["class_names"], counts):
                manifest["counts"][split][c] -= int(n)
    manifest["dropped_duplicates"] = dropped
    return manifest
