"""``CellDataset``: the prepared cache as a ``torch.utils.data.Dataset`` of HoVer-Net targets.

Every item is built from ``np.random.default_rng([seed, epoch, index])`` alone (crop position, then the albumentations
seeds of the geometric and of the image-only transforms), never from global or per-worker random state, so ``(seed, epoch, index)`` gives bit-identical tensors in any
process and with any number of workers. The epoch lives in a shared-memory tensor: ``set_epoch`` in the main process
reaches persistent DataLoader workers too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from torch.utils.data import Dataset

from cellseg.branches import Branch
from cellseg.data.augment import AugmentConfig, augment_arrays, build_augmentation
from cellseg.data.cache import PREPARE_HINT, load_manifest, load_sample
from cellseg.data.sample import SPLITS, relabel_consecutive
from cellseg.data.targets import whole_cell_targets
from cellseg.imageops import normalize_image
from cellseg.scaling import check_scale, resize_image, resize_labels

log = logging.getLogger(__name__)

CONTEXT = (
    1.42  # augmented patches are cut with ~sqrt(2) context, so rotations bring in real pixels, not borders
)
RARE_CROP_FRACTION = 0.5  # share of training crops centred on a rare-class cell when rare_crops is on


def _window(
    sample: dict[str, np.ndarray], y0: int, x0: int, size_y: int, size_x: int
) -> dict[str, np.ndarray]:
    """Cut ``[y0, y0 + size_y) x [x0, x0 + size_x)``; outside the image: reflected image, label 0, ignored."""
    h, w = sample["inst_map"].shape
    top, left = max(0, -y0), max(0, -x0)
    bottom, right = max(0, y0 + size_y - h), max(0, x0 + size_x - w)
    ys, xs = slice(y0 + top, y0 + top + size_y), slice(x0 + left, x0 + left + size_x)
    out = {}
    for key, array in sample.items():
        if top or bottom or left or right:
            pad = ((top, bottom), (left, right)) + ((0, 0),) * (array.ndim - 2)
            if key == "image":
                array = np.pad(array, pad, mode="reflect" if min(h, w) > 1 else "edge")
            else:
                array = np.pad(array, pad, mode="constant", constant_values=(key == "ignore_mask"))
        out[key] = array[ys, xs]
    return out


def split_pipeline(pipeline: A.Compose) -> tuple[A.Compose, A.Compose]:
    """The geometric transforms (image and labels, applied to the context window) and the image-only ones (applied
    to the final patch, where they cost a fraction of the window's area), in their original order."""
    geometric = [t for t in pipeline.transforms if not isinstance(t, A.ImageOnlyTransform)]
    photometric = [t for t in pipeline.transforms if isinstance(t, A.ImageOnlyTransform)]
    return A.Compose(geometric, mask_interpolation=cv2.INTER_NEAREST), A.Compose(photometric)


def context_margin(inst_map: np.ndarray, y0: int, x0: int, size: int, base: int) -> int:
    """Margin around the patch ``[y0, y0 + size) x [x0, x0 + size)`` whose window holds every cell it may show whole.

    The patch grown by ``base`` (the rotation context) is the region whose pixels can reach the patch; the margin is
    ``base`` plus how far the bounding box of any instance touching that region reaches beyond it. So training
    targets are computed on whole cells (:func:`cellseg.data.targets.whole_cell_targets`) whatever their size: a
    margin from a typical diameter would cut BCCD's white cells, which reach 3.4x ``OBJECT_DIAMETER``.
    """
    h, w = inst_map.shape
    ry0, rx0 = y0 - base, x0 - base
    ry1, rx1 = y0 + size + base, x0 + size + base
    region = inst_map[max(ry0, 0) : max(min(ry1, h), 0), max(rx0, 0) : max(min(rx1, w), 0)]
    ids = np.unique(region)
    ids = ids[ids > 0]
    if ids.size == 0:
        return base
    boxes = ndi.find_objects(inst_map, max_label=int(ids.max()))
    extra = 0
    for i in ids:
        box = boxes[int(i) - 1]
        extra = max(extra, ry0 - box[0].start, box[0].stop - ry1, rx0 - box[1].start, box[1].stop - rx1)
    return base + extra


class CellDataset(Dataset):
    """Images and HoVer-Net targets of one split of a prepared cache.

    Args:
        cache_dir: DATA_CACHE prepared by :func:`cellseg.data.prepare_dataset`.
        split: ``train``, ``val`` or ``test``.
        patch_size: side of the square patches; None returns whole images (no crop).
        augment: random crop + augmentation (training); otherwise a centre crop and no augmentation.
        seed: base seed (>= 0) of every random choice.
        class_names: expected class names; must equal the cache's (guards against a cache of another dataset).
        augment_config: probabilities and ranges of the augmentations (defaults when None).
        normalization: the encoder's input normalisation {'mean', 'std'} (the model's ``arch['normalization']``, see
            :mod:`cellseg.model.normalization`); None = ImageNet statistics.
        scale: ``INPUT_SCALE``: resize each image (area) and its label maps (nearest) by this factor before cropping;
            HV targets are computed on the resized instances.

    Items (``P`` = patch size, or the image size when ``patch_size`` is None): ``image`` float32 (3, P, P) normalised
    with ``normalization``; ``np`` int64 (P, P) in {0, 1}; ``hv`` float32 (2, P, P); ``nc`` int64 (P, P) in 0..C;
    ``ignore`` bool (P, P); ``inst_map`` int64 (P, P); ``index`` int64 scalar.

    A patch is cut with a context window around it (:func:`context_margin`: the rotation context plus the full extent
    of every cell touching it), augmented, and its targets are computed on the window before the final crop
    (:func:`cellseg.data.targets.whole_cell_targets`): a cell cut by the patch border keeps its whole cell's HV field.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        split: str,
        *,
        patch_size: int | None,
        augment: bool,
        seed: int,
        class_names: list[str] | None = None,
        augment_config: AugmentConfig | None = None,
        normalization: dict | None = None,
        scale: float = 1.0,
        ignore_unlabelled: bool = True,
        rare_crops: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if patch_size is not None and patch_size < 1:
            raise ValueError(f"patch_size must be a positive number of pixels or None, got {patch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's default_rng), got {seed}")
        self.cache_dir = Path(cache_dir)
        manifest = load_manifest(self.cache_dir)
        self.class_names: list[str] = list(manifest["class_names"])
        if class_names is not None and list(class_names) != self.class_names:
            raise ValueError(
                f"class_names {list(class_names)} differ from the cache's {self.class_names} at {self.cache_dir}; "
                f"prepare the cache for this dataset again or pass class_names=None"
            )
        self.names: list[str] = list(manifest["splits"].get(split, []))
        if not self.names:
            raise ValueError(
                f"split '{split}' of the cache {self.cache_dir} is empty (splits: "
                f"{ {s: len(v) for s, v in manifest['splits'].items()} }); use another split or prepare the data "
                f"with a non-zero fraction for it ({PREPARE_HINT})"
            )
        self.split = split
        self.patch_size = patch_size
        self.augment = augment
        self.seed = int(seed)
        self.scale = check_scale(scale)
        # the cache's ignore_mask marks foreground no label claims (BCCD's unboxed cells); False trains it as
        # background, so the network learns which cells the annotators label (what box-level scores count)
        self.ignore_unlabelled = bool(ignore_unlabelled)
        # OVERSAMPLE_RARE: half of the training crops are centred on a cell of the image's rarest class. Sampling
        # images alone does not help a class that is in nearly every image but tiny (BCCD's platelets: 209 in 205
        # images, 0.7 % of the labelled pixels), since a random crop then misses it most of the time.
        self.rare_crops = bool(rare_crops)
        self._rarity: np.ndarray | None = None
        self.augment_config = augment_config or AugmentConfig()
        self.normalization = dict(normalization) if normalization else None
        self._pipeline = split_pipeline(build_augmentation(self.augment_config)) if augment else None
        self._image_counts = {n: manifest.get("image_counts", {}).get(f"{split}/{n}") for n in self.names}
        # shared memory, so persistent DataLoader workers see set_epoch from the main process
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __getstate__(self) -> dict[str, Any]:
        # the albumentations pipeline is rebuilt from its config: workers receive paths, names and numbers only
        state = self.__dict__.copy()
        state["_pipeline"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pipeline = split_pipeline(build_augmentation(self.augment_config)) if self.augment else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (crops and augmentations change per epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> dict[str, Any]:
        """The raw cached sample of ``index`` (internal sample format)."""
        return load_sample(self.cache_dir, self.split, self.names[index])

    def _crop(self, arrays: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
        """Cut the patch's context window; returns it and the margin around the patch (the patch is its centre)."""
        p = self.patch_size
        h, w = arrays["inst_map"].shape
        if p is None:
            return arrays, 0
        if self.augment:
            y0 = int(rng.integers(min(0, h - p), max(0, h - p) + 1))
            x0 = int(rng.integers(min(0, w - p), max(0, w - p) + 1))
            if self.rare_crops and rng.random() < RARE_CROP_FRACTION:
                y0, x0 = self._rare_crop_origin(arrays, rng, (y0, x0))
            base = int(math.ceil(p * (CONTEXT - 1) / 2))
        else:
            y0, x0, base = (h - p) // 2, (w - p) // 2, 0
        margin = context_margin(arrays["inst_map"], y0, x0, p, base)
        return _window(arrays, y0 - margin, x0 - margin, p + 2 * margin, p + 2 * margin), margin

    def _rare_crop_origin(self, arrays: dict[str, np.ndarray], rng: np.random.Generator,
                          fallback: tuple[int, int]) -> tuple[int, int]:
        """Top-left corner of a crop centred (within a quarter patch) on a random cell of the image's rarest class
        (rarity: the class's share of the split's instances); ``fallback`` for an image without labelled cells."""
        from scipy import ndimage as ndi

        if self._rarity is None:
            totals = self.class_counts_per_image().sum(0).astype(np.float64)
            self._rarity = np.where(totals > 0, totals.sum() / np.maximum(totals, 1.0), 0.0)
        inst, types = arrays["inst_map"], arrays["type_map"]
        present = np.unique(types[inst > 0])
        present = present[(present >= 1) & (present <= self.num_classes)]
        if present.size == 0:
            return fallback
        rare = int(present[np.argmax(self._rarity[present - 1])])
        ids = np.unique(inst[(types == rare) & (inst > 0)])
        cy, cx = ndi.center_of_mass(inst == int(ids[rng.integers(len(ids))]))
        p, (h, w) = self.patch_size, inst.shape
        jitter = rng.integers(-(p // 4), p // 4 + 1, size=2)
        y0 = int(np.clip(round(cy) - p // 2 + jitter[0], min(0, h - p), max(0, h - p)))
        x0 = int(np.clip(round(cx) - p // 2 + jitter[1], min(0, w - p), max(0, w - p)))
        return y0, x0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.names):
            raise IndexError(
                f"index {index} out of range for split '{self.split}' with {len(self.names)} images"
            )
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        sample = self.load(index)
        h, w = sample["inst_map"].shape
        arrays = {
            "image": sample["image"],
            "inst_map": sample["inst_map"],
            "type_map": sample["type_map"],
            "ignore_mask": (sample.get("ignore_mask", np.zeros((h, w), dtype=bool)) if self.ignore_unlabelled
                            else np.zeros((h, w), dtype=bool)),
        }
        if self.scale != 1.0:
            arrays = {k: resize_image(v, self.scale) if k == "image" else resize_labels(v, self.scale)
                      for k, v in arrays.items()}
        arrays, margin = self._crop(arrays, rng)
        image, inst, types, ignore = (
            arrays["image"],
            arrays["inst_map"],
            arrays["type_map"],
            arrays["ignore_mask"],
        )
        if self._pipeline is not None:
            geometric, photometric = self._pipeline
            aug_seed, photo_seed = (int(v) for v in rng.integers(0, 2**31 - 1, size=2))  # independent streams
            image, inst, types, ignore = augment_arrays(geometric, image, inst, types, ignore, aug_seed)
        # targets of whole cells on the (augmented) window, then the final crop: HoVer-Net's rule
        rows, cols = slice(margin, inst.shape[0] - margin), slice(margin, inst.shape[1] - margin)
        inst, types, hv = whole_cell_targets(inst, types, (rows, cols))
        image, ignore = image[rows, cols], ignore[rows, cols]
        if self._pipeline is not None:
            # colour, stain, blur and noise touch the image only: on the patch, not on the (larger) window
            photometric.set_random_seed(photo_seed)
            image = photometric(image=np.ascontiguousarray(image))["image"]
        inst = relabel_consecutive(inst)
        types = np.where(inst > 0, types, 0)
        return {
            "image": normalize_image(np.ascontiguousarray(image), self.normalization),
            Branch.NP.value: torch.from_numpy((inst > 0).astype(np.int64)),
            Branch.HV.value: torch.from_numpy(hv),
            Branch.NC.value: torch.from_numpy(types.astype(np.int64)),
            "ignore": torch.from_numpy(np.ascontiguousarray(ignore, dtype=bool)),
            "inst_map": torch.from_numpy(inst.astype(np.int64)),
            "index": torch.tensor(int(index), dtype=torch.int64),
        }

    def class_counts_per_image(self) -> np.ndarray:
        """Instances of each class in every image of the split, from the manifest (or the labels when absent).

        Shape: -> (N, C) int64.
        """
        from cellseg.data.sample import class_instance_counts

        rows = []
        for i, name in enumerate(self.names):
            counts = self._image_counts.get(name)
            if counts is None:
                s = self.load(i)
                counts = class_instance_counts(s["inst_map"], s["type_map"], self.num_classes)
            rows.append(counts)
        return np.asarray(rows, dtype=np.int64).reshape(len(self.names), self.num_classes)

    def class_pixel_counts(self) -> np.ndarray:
        """Labelled pixels of each class 1..C over the split (instance pixels only, at the cache's resolution).

        Shape: -> (C,) int64.
        """
        totals = np.zeros(self.num_classes + 1, dtype=np.int64)
        for i in range(len(self.names)):
            s = self.load(i)
            types = np.asarray(s["type_map"])[np.asarray(s["inst_map"]) > 0].astype(np.int64)
            totals += np.bincount(np.clip(types, 0, self.num_classes), minlength=self.num_classes + 1)
        return totals[1:]


def class_weights_from_counts(counts: np.ndarray, cap: float = 10.0) -> list[float]:
    """NC cross-entropy weights ``[background, class 1, ..., class C]`` from per-class counts of the training split:
    ``sqrt(n_max / n_c)`` (the commonest class weighs 1, a class 16 times rarer weighs 4), at most ``cap``; background
    and classes without counts weigh 1. The square root is a compromise: full inverse frequency over-corrects.

    The training default passes labelled *pixel* counts (:meth:`CellDataset.class_pixel_counts`): the NC loss is a
    per-pixel loss, so a class's share of pixels is what its gradient sees. Instance counts mislead when classes differ
    in size: on BCCD platelets are 8 % of the instances but 0.7 % of the labelled pixels, and with instance-based
    weights (3.4) the NC head never predicted one (benchmarks/RESULTS.md, issue 16); pixel-based weights give 10.

    Shape: (C,) or (N, C) counts -> C + 1 weights.
    """
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=0) if counts.ndim == 2 else counts
    if totals.size == 0 or totals.max() <= 0:
        return [1.0] * (totals.size + 1)
    with np.errstate(divide="ignore"):
        w = np.where(totals > 0, np.sqrt(totals.max() / np.where(totals > 0, totals, 1.0)), 1.0)
    return [1.0] + [round(float(min(cap, v)), 4) for v in w]


def sample_weights(dataset: CellDataset, power: float = 1.0) -> np.ndarray:
    """Per-image sampling weights that oversample images holding rare classes.

    The weight of an image is the largest ``(1 / f_c) ** power`` over the classes ``c`` it contains, where ``f_c`` is
    class ``c``'s share of all instances in the split; an image without instances gets ``1`` (as if its class were
    everything). Weights are normalised to sum to 1 (for ``torch.utils.data.WeightedRandomSampler``). ``power=0``
    gives uniform weights.

    Shape: -> (N,) float64.
    """
    if power < 0:
        raise ValueError(f"power must be >= 0 (0 = uniform, 1 = inverse frequency), got {power}")
    counts = dataset.class_counts_per_image()
    totals = counts.sum(axis=0).astype(np.float64)
    if totals.sum() == 0:
        return np.full(len(counts), 1.0 / len(counts))
    freq = totals / totals.sum()
    inv = np.where(freq > 0, 1.0 / np.where(freq > 0, freq, 1.0), 0.0) ** power
    weights = np.where(counts > 0, inv[None, :], 0.0).max(axis=1)
    weights[counts.sum(axis=1) == 0] = 1.0
    return weights / weights.sum()
