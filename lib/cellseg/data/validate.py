"""Checking raw samples and turning them into the internal sample format, collecting every problem.

A reader hands over raw samples (image + label maps as found on disk); :func:`standardize_sample` checks them and
returns either a clean sample or the list of problems, each naming its file, so that a whole dataset can be checked in
one pass and reported at once (:class:`DataValidationError`) instead of failing on the first bad file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellseg.data.files import ImageReadError, to_uint8_rgb
from cellseg.data.sample import Sample, instance_types, relabel_consecutive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One problem with the data: the file it is in and what is wrong."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


class DataValidationError(ValueError):
    """Raised once with every problem found in a dataset."""

    def __init__(self, problems: list[Problem], context: str) -> None:
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) found in {context}:"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(
            "Fix or remove these files (or change the parameters named above) and prepare the data again."
        )
        super().__init__("\n".join(lines))


def _label_map(
    array: Any, what: str, source: str, shape: tuple[int, int], problems: list[Problem]
) -> np.ndarray | None:
    """Check one label map and return it as int64, or None after recording the problems."""
    if array is None:
        problems.append(Problem(source, f"no {what}"))
        return None
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        problems.append(Problem(source, f"{what} must be 2-D (H, W), got shape {tuple(array.shape)}"))
        return None
    if array.shape != shape:
        problems.append(
            Problem(
                source,
                f"{what} is {array.shape[0]}x{array.shape[1]} but the image is {shape[0]}x{shape[1]} (HxW); "
                f"masks must have the image's size",
            )
        )
        return None
    if array.dtype == np.bool_:
        array = array.astype(np.int64)
    elif np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            problems.append(Problem(source, f"{what} holds NaN or infinite values"))
            return None
        frac = array != np.round(array)
        if frac.any():
            problems.append(
                Problem(
                    source,
                    f"{what} holds non-integer ids (e.g. {float(array[frac][0])}); ids must be integers",
                )
            )
            return None
    elif not np.issubdtype(array.dtype, np.integer):
        problems.append(Problem(source, f"{what} has dtype {array.dtype}; expected integer ids"))
        return None
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        problems.append(
            Problem(source, f"{what} holds negative ids (min {int(array.min())}); ids must be >= 0")
        )
        return None
    return array


def standardize_sample(
    raw: dict[str, Any], class_names: list[str], source: str
) -> tuple[Sample | None, list[Problem]]:
    """Check a raw sample and convert it to the internal format.

    ``raw`` holds ``image`` (any RGB/grey array), ``inst_map``, optional ``type_map`` (without one, every instance
    gets class 1, allowed only for a single-class dataset), optional ``ignore_mask`` and ``meta``. Instance ids are
    relabelled to 1..N; every instance takes the majority type of its pixels; type ids outside 0..C are a problem.

    Returns:
        ``(sample, [])`` or ``(None, problems)``, every problem naming ``source``.
    """
    problems: list[Problem] = []
    try:
        image = to_uint8_rgb(np.asarray(raw["image"]), source)
    except ImageReadError as e:
        return None, [Problem(source, str(e).removeprefix(f"{source}: "))]
    shape = image.shape[:2]
    inst = _label_map(raw.get("inst_map"), "inst_map", source, shape, problems)
    type_raw = raw.get("type_map")
    if type_raw is None and inst is not None:
        if len(class_names) != 1:
            problems.append(
                Problem(
                    source,
                    f"no type_map, but the dataset has {len(class_names)} classes {class_names}; "
                    f"give a type_map (or classes.csv) or use a single class name",
                )
            )
            type_map = None
        else:
            type_map = (inst > 0).astype(np.int64)
    elif type_raw is None:
        type_map = None  # no instances either: already reported
    else:
        type_map = _label_map(type_raw, "type_map", source, shape, problems)
    ignore = raw.get("ignore_mask")
    if ignore is not None:
        ignore = np.asarray(ignore)
        if ignore.shape != shape:
            problems.append(
                Problem(
                    source,
                    f"ignore_mask is {ignore.shape} but the image is {shape}; masks must match the image",
                )
            )
    if type_map is not None:
        bad = np.unique(type_map[type_map > len(class_names)])
        if bad.size:
            problems.append(
                Problem(
                    source,
                    f"unknown class id(s) {bad.tolist()} in type_map; allowed are 0 (background) and "
                    f"1..{len(class_names)} for classes {class_names}",
                )
            )
            type_map = None
    if problems or inst is None or type_map is None:
        return None, problems
    inst = relabel_consecutive(inst)
    types = instance_types(inst, type_map)
    unclassed = np.flatnonzero(types[1:] == 0) + 1
    if unclassed.size:
        return None, [
            Problem(
                source,
                f"{unclassed.size} instance(s) have no class (type_map is 0 on all their pixels), e.g. instance "
                f"{int(unclassed[0])} after relabelling; give every instance a class id 1..{len(class_names)}",
            )
        ]
    sample: Sample = {
        "image": image,
        "inst_map": inst.astype(np.int32),
        "type_map": types[inst].astype(np.int32),
        "meta": dict(raw.get("meta") or {}),
    }
    if ignore is not None:
        sample["ignore_mask"] = ignore.astype(bool)
    return sample, []
