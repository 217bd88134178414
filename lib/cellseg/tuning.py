"""Post-processing tuning for an evaluation: which split to tune on, and the model's maps streamed through a disk
cache so that memory does not grow with the tuning split.

The grid search (:func:`cellseg.postprocess.tune_postprocess`) visits every image once per parameter setting. Keeping
every image's maps in memory (as this project did, against its docstring) costs ``H x W x 3`` float32 per image for
the whole split; here each image's maps are written once to ``.npy`` files in a temporary folder next to the
evaluation output (same filesystem as the run, not a small node-local ``/tmp``) and memory-mapped back one image at a
time, so the search holds one image's maps at any moment. The folder is removed afterwards.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from cellseg.inference import predict_image
from cellseg.postprocess import DEFAULT_GRID, tune_postprocess

log = logging.getLogger(__name__)


def choose_tune_split(eval_split: str, available: Sequence[str], preferred: str = "val") -> tuple[str, str]:
    """The split to tune post-processing on, never the evaluated one, and a sentence saying why.

    ``preferred`` when it exists and differs from ``eval_split``; otherwise ``train`` (then any other split),
    with a note that the tuning split was switched.

    Raises:
        ValueError: no split other than ``eval_split`` exists (tuning there would score the tuned split).
    """
    others = [s for s in available if s != eval_split]
    if preferred in others:
        return preferred, f"post-processing tuned on '{preferred}'"
    for candidate in ("train", *others):
        if candidate in others:
            note = (f"post-processing tuned on '{candidate}' instead of '{preferred}', because '{eval_split}' is the "
                    "evaluated split and tuning on it would inflate its scores")
            log.warning(note)
            return candidate, note
    raise ValueError(f"cannot tune post-processing for split {eval_split!r}: the cache has no other split "
                     f"(available: {list(available)}). Set TUNE_POSTPROCESS False or prepare a validation split.")


class DiskMaps(Sequence):
    """``(fg_prob, hv, gt_inst[, ignore_mask])`` per image, stored as ``.npy`` files and memory-mapped on access."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._items: list[tuple[Path, ...]] = []

    def append(self, fg_prob: np.ndarray, hv: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None) -> None:
        i = len(self._items)
        arrays = [("fg", fg_prob), ("hv", hv), ("gt", gt)] + ([("ignore", ignore)] if ignore is not None else [])
        paths = []
        for key, arr in arrays:
            path = self.folder / f"{i:06d}_{key}.npy"
            np.save(path, np.asarray(arr), allow_pickle=False)
            paths.append(path)
        self._items.append(tuple(paths))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in self._items[i])


def tune_on_split(
    model: nn.Module, cache_dir: Path, split: str, names: list[str], base: dict, infer: dict, progress: bool,
    work_dir: Path,
) -> dict:
    """Predict the maps of ``names`` once, cache them on disk under ``work_dir``, grid-search the post-processing.

    Returns ``{"params", "grid", "table", "tune_split", "n_images"}`` (written to ``postprocess.json``).
    """
    from cellseg.data import load_sample

    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tune-maps-", dir=work_dir) as tmp:
        samples = DiskMaps(Path(tmp))
        for name in tqdm(names, desc=f"tuning on {split}", disable=not progress):
            sample = load_sample(cache_dir, split, name)
            maps = predict_image(model, sample["image"], **infer)
            gt = np.asarray(sample["inst_map"])
            ignore = sample.get("ignore_mask")
            if ignore is not None:
                ignore = np.asarray(ignore).astype(bool)
                gt = np.where(ignore, 0, gt)
            samples.append(maps["fg_prob"], maps["hv"], gt, ignore)
            del maps, sample
        best, table = tune_postprocess(samples, DEFAULT_GRID, base_params=base)
    return {"params": best, "grid": DEFAULT_GRID, "table": table, "tune_split": split, "n_images": len(names)}
