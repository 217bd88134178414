"""Evaluation run: a model over a split of the prepared cache -> predictions, metrics.json, report.md and figures.

Optionally tunes the post-processing on another split first (``postprocess.json``), as HoVer-Net and CellViT leave
their thresholds to the user. Metrics follow "stats, then reduce": each image is reduced to counts right after its
prediction, so memory does not grow with the split (only a few overlays and error crops are kept for the report).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cellseg.inference import predict_image, predict_instances
from cellseg.metrics import image_stats, reduce_stats
from cellseg.postprocess import DEFAULT_GRID, resolve_params, tune_postprocess
from cellseg.report import ErrorCrop, error_crops, write_report

log = logging.getLogger(__name__)

# Centroid matching radius as a fraction of the object diameter: HoVer-Net's 12 px for ~20 px nuclei.
RADIUS_PER_DIAMETER = 0.6


def save_prediction(path: Path, pred: dict) -> None:
    """Store ``inst_map``, ``type_map`` and ``scores`` as one ``.npy`` dict (the format ``cellseg evaluate`` reads)."""
    record = {
        "inst_map": np.asarray(pred["inst_map"], np.int32),
        "type_map": np.asarray(pred["type_map"], np.int32),
        "scores": np.asarray(pred["scores"], np.float32),
    }
    np.save(path, record, allow_pickle=True)


def _split_names(manifest: dict, split: str, cache_dir: Path, role: str) -> list[str]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(
            f"{role} split {split!r} is not in {cache_dir / 'manifest.json'}; available: {sorted(splits)}. "
            "Pick one of those (EVAL_SPLIT) or prepare the data again."
        )
    names = list(splits[split])
    if not names:
        raise ValueError(f"{role} split {split!r} of {cache_dir} holds no images")
    return names


def _tune(
    model: nn.Module, cache_dir: Path, split: str, names: list[str], base: dict, infer: dict, progress: bool
) -> dict:
    from cellseg.data import load_sample

    samples = []
    for name in tqdm(names, desc=f"tuning on {split}", disable=not progress):
        sample = load_sample(cache_dir, split, name)
        maps = predict_image(model, sample["image"], **infer)
        gt = np.asarray(sample["inst_map"])
        ignore = sample.get("ignore_mask")
        if ignore is not None:
            ignore = np.asarray(ignore).astype(bool)
            gt = np.where(ignore, 0, gt)
        samples.append((maps["fg_prob"], maps["hv"], gt, ignore))
    best, table = tune_postprocess(samples, DEFAULT_GRID, base_params=base)
    return {"params": best, "grid": DEFAULT_GRID, "table": table, "tune_split": split, "n_images": len(samples)}


def evaluate_model(
    model: nn.Module,
    cache_dir: str | Path,
    split: str,
    out_dir: str | Path,
    *,
    class_names: list[str],
    device: torch.device | str | None = None,
    tile_size: int | None = None,
    overlap: float = 0.25,
    tta: bool = False,
    amp: str = "none",
    pp_params: dict[str, Any] | None = None,
    tune_split: str | None = "val",
    max_images: int | None = None,
    progress: bool = True,
    n_overlays: int = 4,
    max_error_crops: int = 24,
    scale: float = 1.0,
    training: str | None = None,
) -> dict:
    """Run ``model`` over ``split`` of the prepared cache and write the evaluation into ``out_dir``.

    Args:
        model: returns the NP/HV/NC dict (see :func:`cellseg.inference.predict_image`).
        cache_dir: prepared dataset (``manifest.json`` with ``class_names`` and ``splits``, and per split
            ``<name>.png`` + ``<name>.npy``), read with :func:`cellseg.data.load_manifest` / ``load_sample``.
        split: the split to evaluate.
        out_dir: receives ``metrics.json``, ``report.md``, PNG figures, ``postprocess.json`` (when tuned) and
            ``predictions/<name>.npy`` (``inst_map``, ``type_map``, ``scores``; re-score with ``cellseg evaluate``).
        class_names: the C class names (type ids 1..C).
        device, tile_size, overlap, tta, amp: inference settings.
        pp_params: post-processing parameters (e.g. ``object_diameter``); with tuning, the fixed base of the grid.
        tune_split: split to grid-search the post-processing on first (None: no tuning).
        max_images: evaluate (and tune on) at most this many images of each split.
        progress: show tqdm bars.
        n_overlays: images drawn in ``overlays.png``.
        max_error_crops: crops in each of the false-positive / false-negative galleries.
        scale: ``INPUT_SCALE``: the network sees images resized by this factor; its maps are resampled back, so
            post-processing (``object_diameter``) and metrics are in full-resolution pixels.
        training: how the model was trained, in words (e.g. "full network ..."), for the report and metrics.json.

    Returns:
        The metrics (as in ``metrics.json``).

    Raises:
        ValueError: an unknown or empty split, class names that differ from the cache's, bad parameters.
    """
    from cellseg.data import load_manifest, load_sample

    cache_dir = Path(cache_dir)
    out_dir = Path(out_dir)
    manifest = load_manifest(cache_dir)
    cached = list(manifest.get("class_names", []))
    if cached and list(class_names) != cached:
        raise ValueError(
            f"class_names {list(class_names)} differ from the cache's {cached} ({cache_dir / 'manifest.json'}); "
            "pass the cache's class names"
        )
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be None (all) or >= 1, got {max_images}")
    names = _split_names(manifest, split, cache_dir, "evaluation")[:max_images]
    base = resolve_params(pp_params)
    infer = {"tile_size": tile_size, "overlap": overlap, "tta": tta, "amp": amp, "device": device, "scale": scale}
    out_dir.mkdir(parents=True, exist_ok=True)
    tuning = None
    if tune_split is not None:
        tune_names = _split_names(manifest, tune_split, cache_dir, "tuning")[:max_images]
        tuning = _tune(model, cache_dir, tune_split, tune_names, dict(pp_params or {}), infer, progress)
        (out_dir / "postprocess.json").write_text(json.dumps(tuning, indent=2))
        params = tuning["params"]
    else:
        params = base
    radius = RADIUS_PER_DIAMETER * params["object_diameter"]
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(exist_ok=True)
    stats, tissues, examples = [], [], []
    false_pos: list[ErrorCrop] = []
    false_neg: list[ErrorCrop] = []
    start = time.perf_counter()
    for name in tqdm(names, desc=f"evaluating {split}", disable=not progress):
        sample = load_sample(cache_dir, split, name)
        pred = predict_instances(model, sample["image"], pp_params=params, **infer)
        save_prediction(pred_dir / f"{name}.npy", pred)
        gt = {k: sample.get(k) for k in ("inst_map", "type_map", "ignore_mask")}
        stats.append(image_stats(gt, pred, len(class_names), match_radius=radius, where=f"{split}/{name}"))
        tissues.append((sample.get("meta") or {}).get("tissue"))
        if len(examples) < n_overlays:
            examples.append((name, sample["image"], np.asarray(sample["inst_map"]), pred["inst_map"]))
        if len(false_pos) < max_error_crops or len(false_neg) < max_error_crops:
            fp, fn = error_crops(sample["image"], np.asarray(sample["inst_map"]), pred["inst_map"], name, limit=4)
            false_pos += fp[: max_error_crops - len(false_pos)]
            false_neg += fn[: max_error_crops - len(false_neg)]
    seconds = time.perf_counter() - start
    use_tissues = tissues if all(t is not None for t in tissues) else None
    metrics = reduce_stats(stats, class_names, use_tissues, match_radius=radius)
    metrics.update(
        {
            "split": split,
            "postprocess": params,
            "postprocess_tuned_on": tune_split,
            "inference": {"tile_size": tile_size, "overlap": overlap, "tta": tta, "amp": amp, "input_scale": scale},
            "training_mode": training,
            "seconds_per_image": seconds / len(names),
        }
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    context = {
        "split": f"{split} ({len(names)} images)",
        "training": training or "not recorded",
        "inference": f"tile {tile_size or 'whole image'}, overlap {overlap}, TTA {tta}, AMP {amp}, input scale {scale:g}"
        + (" (maps resampled to full resolution)" if scale != 1 else ""),
        "post-processing": ", ".join(f"{k}={v:g}" for k, v in params.items())
        + (f" (tuned on {tune_split})" if tuning else ""),
        "seconds per image": f"{seconds / len(names):.3f}",
    }
    write_report(
        out_dir, metrics, examples=examples, false_positives=false_pos, false_negatives=false_neg,
        context=context, tuning=tuning, title=f"Evaluation on {split}",
    )
    log.info("evaluated %d images of %s: PQ %s, mPQ %s", len(names), split, metrics["pq"], metrics["mpq"])
    return metrics
