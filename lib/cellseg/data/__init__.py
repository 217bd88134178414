"""The data layer of cellseg: dataset readers, the prepared cache, HoVer-Net targets and the training dataset.

Public API: :func:`prepare_dataset` builds ``DATA_CACHE`` from a source dataset (synthetic, bccd, folder, pannuke,
consep), :func:`load_manifest` / :func:`load_sample` read it, :class:`CellDataset` serves it to PyTorch with
:func:`sample_weights` for rare-class oversampling, :func:`validate_dataset` checks a source without writing, and
:mod:`cellseg.data.targets` computes the HV maps.
"""

from cellseg.data.augment import AugmentConfig, build_augmentation
from cellseg.data.cache import load_manifest, load_sample, verify_cache
from cellseg.data.dataset import CellDataset, sample_weights
from cellseg.data.prepare import DATASETS, prepare_dataset, validate_dataset
from cellseg.data.safe_pickle import UnsafePickleError
from cellseg.data.sample import SPLITS
from cellseg.data.synthetic import generate_synthetic_sample
from cellseg.data.targets import hv_maps
from cellseg.data.validate import DataValidationError, Problem

__all__ = [
    "DATASETS",
    "SPLITS",
    "AugmentConfig",
    "CellDataset",
    "DataValidationError",
    "Problem",
    "UnsafePickleError",
    "build_augmentation",
    "generate_synthetic_sample",
    "hv_maps",
    "load_manifest",
    "load_sample",
    "prepare_dataset",
    "sample_weights",
    "validate_dataset",
    "verify_cache",
]
