"""Building the prepared cache from a source dataset (``prepare_dataset``) and checking a source (``validate_dataset``).

Every image is loaded, checked and converted (:func:`cellseg.data.validate.standardize_sample`), then written as
``<split>/<name>.png`` + ``.npy``; problems are collected over the whole dataset and raised once. The manifest is written
last, so an interrupted run leaves no manifest and the next run rebuilds. A run whose inputs (parameters and the source
folder's listing: names, sizes, modification times) match the fingerprint of an existing complete cache reuses it.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cellseg.data import bccd, folder, formats, synthetic
from cellseg.data.cache import (
    FORMAT_VERSION,
    MANIFEST,
    MARKER,
    cache_is_complete,
    fingerprint,
    load_manifest,
    write_manifest,
    write_sample,
)
from cellseg.data.records import DatasetSource, Record, check_fractions, seeded_split, split_of
from cellseg.data.sample import SPLITS, class_instance_counts
from cellseg.data.validate import DataValidationError, Problem, standardize_sample

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("synthetic", "bccd", "folder", "pannuke", "consep")
# the options that change each dataset's cache (the fingerprint ignores the others)
RELEVANT_OPTIONS: dict[str, tuple[str, ...]] = {
    "synthetic": ("seed", "synth_num_images", "synth_image_size", "val_fraction", "test_fraction"),
    "bccd": (),
    "folder": ("seed", "val_fraction", "test_fraction"),
    "pannuke": ("pannuke_fold_splits",),
    "consep": ("seed", "val_fraction", "consep_merge_classes"),
}
POOL_MIN_RECORDS = 64  # below this, starting worker processes costs more than it saves


def _synthetic_source(
    *, seed: int, num_images: int, image_size: int, val_fraction: float, test_fraction: float
) -> DatasetSource:
    if num_images < 1:
        raise ValueError(f"synth_num_images must be >= 1, got {num_images}")
    if image_size < 32:
        raise ValueError(f"synth_image_size must be >= 32 pixels, got {image_size}; use 64 or more")
    names = [f"synth_{i:04d}" for i in range(num_images)]
    where = split_of(seeded_split(names, val_fraction, test_fraction, seed))
    records = [
        Record(
            where[name],
            name,
            f"synthetic[seed={seed}, index={i}]",
            partial(synthetic.generate_synthetic_sample, seed, i, image_size),
        )
        for i, name in enumerate(names)
    ]
    return DatasetSource("synthetic", list(synthetic.CLASS_NAMES), records)


def _build_source(dataset: str, data_root: Path | None, options: dict[str, Any]) -> DatasetSource:
    """The ``name -> reader`` table of the supported datasets."""
    seed, val, test = options["seed"], options["val_fraction"], options["test_fraction"]
    builders: dict[str, Callable[[], DatasetSource]] = {
        "synthetic": lambda: _synthetic_source(
            seed=seed,
            num_images=options["synth_num_images"],
            image_size=options["synth_image_size"],
            val_fraction=val,
            test_fraction=test,
        ),
        "bccd": lambda: bccd.bccd_source(data_root),
        "folder": lambda: folder.folder_source(
            data_root, seed=seed, val_fraction=val, test_fraction=test, group_key=options.get("group_key", "")
        ),
        "pannuke": lambda: formats.pannuke_source(data_root, fold_splits=options["pannuke_fold_splits"]),
        "consep": lambda: formats.consep_source(
            data_root, seed=seed, val_fraction=val, merge_classes=options["consep_merge_classes"]
        ),
    }
    return builders[dataset]()


def _check_dataset_name(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(
            f"DATASET must be one of {list(DATASETS)}, got {dataset!r}. Set DATASET in the parameters cell "
            f"or with -p DATASET ..."
        )


def _convert(record: Record, class_names: list[str], cache_dir: Path | None) -> dict[str, Any]:
    """Load, check and (when ``cache_dir`` is given) write one record. Runs in worker processes, so it returns plain data."""
    result: dict[str, Any] = {"split": record.split, "name": record.name, "problems": []}
    try:
        raw = record.load()
    except DataValidationError as e:
        result["problems"] = e.problems
        return result
    except (ValueError, OSError) as e:
        message = str(e)
        result["problems"] = [Problem(record.source, message.removeprefix(f"{record.source}: "))]
        return result
    sample, problems = standardize_sample(raw, class_names, record.source)
    if sample is None:
        result["problems"] = problems
        return result
    result["degenerate_boxes"] = list(sample["meta"].get("degenerate_boxes", []))
    result["size"] = [int(sample["image"].shape[0]), int(sample["image"].shape[1])]
    result["counts"] = class_instance_counts(sample["inst_map"], sample["type_map"], len(class_names))
    if cache_dir is not None:
        result["checksums"] = write_sample(cache_dir, record.split, record.name, sample)
    return result


def _run(
    records: list[Record],
    work: Callable[[Record], dict[str, Any]],
    num_workers: int,
    progress: bool,
    desc: str,
) -> Iterator[dict[str, Any]]:
    # disable=None: tqdm turns itself off when stderr is not a terminal (batch logs)
    bar = dict(total=len(records), desc=desc, disable=True if not progress else None, unit="img")
    if num_workers > 1 and len(records) >= POOL_MIN_RECORDS:
        # forkserver: no fork of a process that may hold torch/OpenMP threads; workers import cellseg fresh
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(num_workers) as pool:
            yield from tqdm(pool.imap(work, records, chunksize=4), **bar)
    else:
        yield from tqdm(map(work, records), **bar)


def _empty_split_problems(
    source: DatasetSource, data_root: Path | None, allowed_empty: set[str]
) -> list[Problem]:
    present = {r.split for r in source.records}
    where = str(data_root) if data_root is not None else source.dataset
    return [
        Problem(
            where,
            f"empty split '{s}': no image of DATASET='{source.dataset}' goes to it; add images or "
            f"raise the fraction that feeds it",
        )
        for s in SPLITS
        if s not in present and s not in allowed_empty
    ]


def _options(
    seed: int,
    synth_num_images: int,
    synth_image_size: int,
    val_fraction: float,
    test_fraction: float,
    consep_merge_classes: bool,
    pannuke_fold_splits: dict[int, str] | None,
) -> dict[str, Any]:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    check_fractions(val_fraction, test_fraction)
    bad = {k: v for k, v in (pannuke_fold_splits or {}).items() if v not in SPLITS}
    if bad:
        raise ValueError(
            f"pannuke_fold_splits maps folds to splits {list(SPLITS)}, got {bad}; e.g. {formats.PANNUKE_FOLD_SPLITS}"
        )
    return {
        "seed": int(seed),
        "synth_num_images": int(synth_num_images),
        "synth_image_size": int(synth_image_size),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "consep_merge_classes": bool(consep_merge_classes),
        "pannuke_fold_splits": {
            int(k): v for k, v in (pannuke_fold_splits or formats.PANNUKE_FOLD_SPLITS).items()
        },
    }


def _allowed_empty(dataset: str, options: dict[str, Any]) -> set[str]:
    """Splits the user asked to leave empty (a zero fraction, or a PanNuke mapping without them)."""
    empty = set()
    if options["val_fraction"] == 0 and dataset in ("synthetic", "folder", "consep"):
        empty.add("val")
    if options["test_fraction"] == 0 and dataset in ("synthetic", "folder"):
        empty.add("test")
    if dataset == "pannuke":
        empty |= set(SPLITS) - set(options["pannuke_fold_splits"].values())
    return empty


def validate_dataset(
    dataset: str,
    data_root: str | Path | None,
    *,
    seed: int = 0,
    synth_num_images: int = 48,
    synth_image_size: int = 256,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    consep_merge_classes: bool = True,
    pannuke_fold_splits: dict[int, str] | None = None,
    num_workers: int = 2,
    progress: bool = False,
    group_key: str = "",
) -> list[Problem]:
    """Check every image of a source dataset without writing anything; returns all problems found (empty when clean).

    Problems cover unreadable images, masks of another size than their image, non-integer or negative instance ids,
    unknown class ids, missing labels and empty splits, each naming its file.
    """
    _check_dataset_name(dataset)
    options = _options(
        seed,
        synth_num_images,
        synth_image_size,
        val_fraction,
        test_fraction,
        consep_merge_classes,
        pannuke_fold_splits,
    )
    options["group_key"] = group_key
    root = Path(data_root) if data_root is not None else None
    source = _build_source(dataset, root, options)
    problems = list(source.problems) + _empty_split_problems(source, root, _allowed_empty(dataset, options))
    work = partial(_convert, class_names=source.class_names, cache_dir=None)
    for result in _run(source.records, work, num_workers, progress, f"checking {dataset}"):
        problems.extend(result["problems"])
    return problems


def _reusable(cache_dir: Path, digest: str) -> dict[str, Any] | None:
    if not (cache_dir / MANIFEST).exists():
        return None
    try:
        manifest = load_manifest(cache_dir)
    except ValueError:
        return None
    if manifest.get("fingerprint") != digest or not cache_is_complete(cache_dir, manifest):
        return None
    return manifest


def _reset_cache_dir(cache_dir: Path) -> None:
    """Empty a previous cache in place; refuse to touch a non-empty folder that is not a cellseg cache."""
    if cache_dir.exists() and any(cache_dir.iterdir()) and not (cache_dir / MARKER).exists():
        raise FileExistsError(
            f"DATA_CACHE={cache_dir} is not empty and is not a cellseg cache (no {MARKER} marker); choose an empty "
            f"or new folder for DATA_CACHE so that nothing of yours is overwritten"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST).unlink(missing_ok=True)  # first: an interrupted rebuild must not look complete
    for split in SPLITS:
        if (cache_dir / split).is_dir():
            shutil.rmtree(cache_dir / split)
    (cache_dir / MARKER).write_text(
        "prepared by cellseg.data.prepare_dataset; safe to delete the whole folder\n"
    )


def prepare_dataset(
    dataset: str,
    data_root: str | Path | None,
    cache_dir: str | Path,
    *,
    seed: int = 0,
    synth_num_images: int = 48,
    synth_image_size: int = 256,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    consep_merge_classes: bool = True,
    qa_dir: str | Path | None = None,
    qa_overlays: int = 6,
    progress: bool = True,
    pannuke_fold_splits: dict[int, str] | None = None,
    num_workers: int = 2,
    duplicates: str = "keep",
    group_key: str = "",
) -> dict[str, Any]:
    """Build (or reuse) the prepared cache of ``dataset`` in ``cache_dir`` and return its manifest.

    Args:
        dataset: one of :data:`DATASETS`.
        data_root: the source folder (unused for ``synthetic``; BCCD is downloaded there when absent).
        cache_dir: DATA_CACHE, the folder to fill (a new or empty folder, or a previous cellseg cache).
        seed: seed of the generated images and of the seeded splits.
        synth_num_images, synth_image_size: size of the synthetic dataset.
        val_fraction, test_fraction: fractions of a seeded split (datasets without an official one; CoNSeP's val).
        consep_merge_classes: HoVer-Net's merge of CoNSeP's 7 classes into 4.
        qa_dir: where to write ``qa_report.md``, ``qa.json`` and overlays (none when None).
        qa_overlays: number of overlay PNGs in the QA report.
        progress: show a progress bar.
        pannuke_fold_splits: PanNuke fold -> split (default {1: "train", 2: "val", 3: "test"}).
        num_workers: worker processes for the conversion (used for 64 images or more).
        duplicates: images identical or nearly identical to one of another split (listed in the manifest and the QA
            report, :mod:`cellseg.data.duplicates`): ``keep`` them, or ``drop`` them from val/test.
        group_key: ``folder`` only: keep the tiles of one group (slide, patient) in one split; ``""`` (none),
            ``prefix:SEP`` (the file name up to the first ``SEP``) or ``groups.csv`` (``name,group`` rows in DATA_ROOT).

    Raises:
        ValueError: unknown ``dataset`` or bad parameters, naming them and the allowed values.
        DataValidationError: every problem of the source data at once, each naming its file.
        FileNotFoundError: the source is missing (for BCCD, after a failed download: what to fetch and where).
    """
    _check_dataset_name(dataset)
    options = _options(
        seed,
        synth_num_images,
        synth_image_size,
        val_fraction,
        test_fraction,
        consep_merge_classes,
        pannuke_fold_splits,
    )
    cache_dir = Path(cache_dir)
    root = Path(data_root) if data_root is not None and dataset != "synthetic" else None
    if dataset == "bccd" and root is not None and not root.exists():
        bccd.download_bccd(root)
    if root is not None and not root.exists():
        raise FileNotFoundError(
            f"DATA_ROOT={root} does not exist; set DATA_ROOT to the {dataset} dataset folder"
        )
    relevant = {k: options[k] for k in RELEVANT_OPTIONS[dataset]}
    # only non-default choices enter the fingerprint, so caches prepared before these options existed stay valid
    relevant.update({k: v for k, v in (("duplicates", duplicates), ("group_key", group_key)) if v not in ("keep", "")})
    from cellseg.data.duplicates import DUPLICATE_CHOICES

    if duplicates not in DUPLICATE_CHOICES:
        raise ValueError(
            f"DUPLICATES must be one of {list(DUPLICATE_CHOICES)}, got {duplicates!r}. Set it in "
            f"notebooks/00_prepare_data.ipynb's parameters cell or with -p DUPLICATES ..."
        )
    options["group_key"] = group_key
    digest = fingerprint({"dataset": dataset, **relevant}, root, cache_dir)
    manifest = _reusable(cache_dir, digest)
    if manifest is not None:
        log.info("reusing the prepared cache at %s (same inputs, fingerprint %s)", cache_dir, digest)
    else:
        manifest = _build(dataset, root, cache_dir, options, digest, num_workers, progress, duplicates)
    if qa_dir is not None:
        from cellseg.data.qa import qa_is_current, write_qa_report

        if qa_is_current(qa_dir, digest, qa_overlays):
            log.info("reusing the QA report in %s", qa_dir)
        else:
            write_qa_report(cache_dir, qa_dir, n_overlays=qa_overlays, seed=seed, fingerprint=digest)
    return manifest


def _build(
    dataset: str,
    root: Path | None,
    cache_dir: Path,
    options: dict[str, Any],
    digest: str,
    num_workers: int,
    progress: bool,
    duplicates: str = "keep",
) -> dict[str, Any]:
    source = _build_source(dataset, root, options)
    log.info("preparing %s: %d images -> %s", dataset, len(source.records), cache_dir)
    problems = list(source.problems) + _empty_split_problems(source, root, _allowed_empty(dataset, options))
    if problems and not source.records:
        raise DataValidationError(problems, f"DATASET='{dataset}' at DATA_ROOT={root}")
    _reset_cache_dir(cache_dir)
    seen = Counter(f"{r.split}/{r.name}" for r in source.records)
    duplicated = sorted(n for n, k in seen.items() if k > 1)
    problems += [Problem(n, "two source images map to this cache name; rename one") for n in duplicated]
    work = partial(_convert, class_names=source.class_names, cache_dir=cache_dir)
    results = []
    for result in _run(source.records, work, num_workers, progress, f"preparing {dataset}"):
        problems.extend(result["problems"])
        if not result["problems"]:
            results.append(result)
        for d in result.get("degenerate_boxes", []):
            log.warning(
                "%s: degenerate %s box xmin=%s ymin=%s xmax=%s ymax=%s (%s) left out",
                d["file"], d["class"], d["xmin"], d["ymin"], d["xmax"], d["ymax"], d["reason"],
            )  # fmt: skip
    if problems:
        raise DataValidationError(problems, f"DATASET='{dataset}' at DATA_ROOT={root}")
    manifest = _manifest(source, results, root, {k: options[k] for k in RELEVANT_OPTIONS[dataset]}, digest)
    manifest = _record_duplicates(manifest, cache_dir, duplicates)
    write_manifest(cache_dir, manifest)
    total = {c: sum(manifest["counts"][s][c] for s in SPLITS) for c in source.class_names}
    log.info(
        "prepared %s: %s images, instances per class %s",
        dataset,
        {s: len(manifest["splits"][s]) for s in SPLITS},
        total,
    )
    return manifest


def _manifest(
    source: DatasetSource,
    results: list[dict[str, Any]],
    root: Path | None,
    options: dict[str, Any],
    digest: str,
) -> dict[str, Any]:
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = {s: {c: 0 for c in source.class_names} for s in SPLITS}
    for r in sorted(results, key=lambda r: (SPLITS.index(r["split"]), r["name"])):
        splits[r["split"]].append(r["name"])
        for c, n in zip(source.class_names, r["counts"]):
            counts[r["split"]][c] += int(n)
    key = lambda r: f"{r['split']}/{r['name']}"  # noqa: E731
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dataset": source.dataset,
        "class_names": list(source.class_names),
        "splits": splits,
        "counts": counts,
        "image_sizes": {key(r): r["size"] for r in results},
        "image_counts": {key(r): [int(n) for n in r["counts"]] for r in results},
        "checksums": {key(r): r["checksums"] for r in results},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(root.resolve()) if root is not None else f"{source.dataset} (embedded generator)",
        "fingerprint": digest,
        "parameters": {
            k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()})
            for k, v in options.items()
        },
    }
    manifest.update(source.manifest_extra)
    if "tissues" in manifest:
        kept = set(manifest["image_sizes"])
        manifest["tissues"] = {k: v for k, v in manifest["tissues"].items() if k in kept}
    from cellseg.data.provenance import content_fingerprint

    manifest["content_fingerprint"] = content_fingerprint(manifest)  # what it holds (training records it)
    return manifest


def _record_duplicates(manifest: dict[str, Any], cache_dir: Path, duplicates: str) -> dict[str, Any]:
    """List images repeated across splits in the manifest (and drop them from val/test when asked); warn about them."""
    from cellseg.data.duplicates import apply_duplicates

    manifest = apply_duplicates(manifest, cache_dir, duplicates)
    for pair in manifest["near_duplicates"]:
        log.warning(
            "%s is %s %s (dHash distance %d bits): %s",
            pair["image"], "identical to" if pair["kind"] == "identical" else "a near duplicate of", pair["other"],
            pair["distance"],
            "dropped (DUPLICATES='drop')" if pair["image"] in manifest["dropped_duplicates"]
            else "kept; its scores are not independent of training (DUPLICATES='drop' removes it)",
        )  # fmt: skip
    return manifest
