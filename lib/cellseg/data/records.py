"""What a dataset reader hands to :func:`cellseg.data.prepare_dataset`: a list of records, one per image.

A record knows its split, its name and how to load its raw sample; loading is deferred (and picklable, a
``functools.partial`` of a module-level function) so that images can be converted in worker processes and every
problem of a dataset can be collected in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellseg.data.sample import SPLITS
from cellseg.data.validate import Problem


@dataclass
class Record:
    """One image of a dataset: where it goes in the cache and how to load its raw sample."""

    split: str
    name: str
    source: str  # the file named in messages
    load: Callable[[], dict[str, Any]]


@dataclass
class DatasetSource:
    """A dataset as found on disk: class names, records, problems found while listing and extra manifest fields."""

    dataset: str
    class_names: list[str]
    records: list[Record]
    problems: list[Problem] = field(default_factory=list)
    manifest_extra: dict[str, Any] = field(default_factory=dict)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject split fractions outside [0, 1) or adding up to 1 or more, naming the parameter."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}; e.g. {name}=0.2")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training images, got {val_fraction} + {test_fraction}"
        )


def seeded_split(
    names: list[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Split names into train/val/test by fraction with a seeded permutation (sorted input, so stable).

    A non-zero fraction gets at least one image when there are at least three images.
    """
    check_fractions(val_fraction, test_fraction)
    names = sorted(names)
    n = len(names)
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
    n_val = min(n_val, max(n - n_test - 1, 0))
    test = sorted(names[i] for i in order[:n_test])
    val = sorted(names[i] for i in order[n_test : n_test + n_val])
    train = sorted(names[i] for i in order[n_test + n_val :])
    return {"train": train, "val": val, "test": test}


def grouped_split(
    groups: dict[str, str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Split names by group (slide, patient): the groups are split as :func:`seeded_split` splits names, and every
    name follows its group, so no group straddles two splits. Fractions count groups, not images.

    Args:
        groups: ``name -> group``.
    """
    by_group = seeded_split(sorted(set(groups.values())), val_fraction, test_fraction, seed)
    where = split_of(by_group)
    return {s: sorted(n for n, g in groups.items() if where[g] == s) for s in SPLITS}


def split_of(splits: dict[str, list[str]]) -> dict[str, str]:
    """Invert ``{split: [names]}`` to ``{name: split}``."""
    return {name: split for split in SPLITS for name in splits.get(split, [])}
