"""Evaluation run: a model over a split of the prepared cache -> predictions, metrics.json, report.md and figures.

Optionally tunes the post-processing on another split first (``postprocess.json``), as HoVer-Net and CellViT leave
their thresholds to the user; tuning on the evaluated split itself is refused (:func:`cellseg.tuning.choose_tune_split`
picks another). Metrics follow "stats, then reduce": each image is reduced to counts right after its prediction, and
tuning streams its maps through a disk cache (:mod:`cellseg.tuning`), so memory does not grow with either split (only
a few overlays and error crops are kept for the report). Per-checkpoint folders, their index and the ``latest``
pointer are :mod:`cellseg.eval_index`'s.
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

from cellseg.inference import predict_instances, warn_if_tiles_split_cells
from cellseg.metrics import image_stats, reduce_stats
from cellseg.metrics.boxes import BoxScorer
from cellseg.metrics.detection import centroid_radius
from cellseg.postprocess import resolve_params
from cellseg.report import ErrorCrop, error_crops, write_report
from cellseg.tuning import tune_on_split

log = logging.getLogger(__name__)



def save_prediction(path: Path, pred: dict) -> None:
    """Store ``inst_map``, ``type_map``, ``scores`` and (when present) ``objectness`` as one ``.npy`` dict (the
    format ``cellseg evaluate`` reads)."""
    record = {
        "inst_map": np.asarray(pred["inst_map"], np.int32),
        "type_map": np.asarray(pred["type_map"], np.int32),
        "scores": np.asarray(pred["scores"], np.float32),
    }
    if pred.get("objectness") is not None:
        record["objectness"] = np.asarray(pred["objectness"], np.float32)
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
    checkpoint: dict[str, Any] | None = None,
    tune_note: str | None = None,
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
            ``predictions/<name>.npy`` (``inst_map``, ``type_map``, ``scores``, ``objectness``; re-score with
            ``cellseg evaluate``). Predictions and ``postprocess.json`` of an earlier run into the same folder are
            removed first. Use :func:`cellseg.eval_index.eval_dir` for the per-checkpoint folder.
        class_names: the C class names (type ids 1..C).
        device, tile_size, overlap, tta, amp: inference settings.
        pp_params: post-processing parameters (e.g. ``object_diameter``); with tuning, the fixed base of the grid.
        tune_split: split to grid-search the post-processing on first (None: no tuning); never ``split`` itself.
        max_images: evaluate (and tune on) at most this many images of each split.
        progress: show tqdm bars.
        n_overlays: images drawn in ``overlays.png``.
        max_error_crops: crops in each of the false-positive / false-negative galleries.
        checkpoint: the evaluated checkpoint's record (:func:`cellseg.eval_index.checkpoint_record`: path, SHA-256,
            phase, epoch, step), stored in ``metrics.json`` and printed in the report.
        tune_note: a sentence on how the tuning split was chosen (:func:`cellseg.tuning.choose_tune_split`).
        scale: ``INPUT_SCALE``: the network sees images resized by this factor; its maps are resampled back, so
            post-processing (``object_diameter``) and metrics are in full-resolution pixels.
        training: how the model was trained, in words (e.g. "full network ..."), for the report and metrics.json.

    Returns:
        The metrics (as in ``metrics.json``).

    Raises:
        ValueError: an unknown or empty split, tuning on the evaluated split, class names that differ from the
            cache's, bad parameters.
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
    if tune_split is not None and tune_split == split:
        raise ValueError(
            f"tune_split {tune_split!r} is the evaluated split: its scores would be inflated by tuning on it. Tune on "
            "another split (cellseg.tuning.choose_tune_split picks one) or pass tune_split=None.")
    base = resolve_params(pp_params)
    warn_if_tiles_split_cells(tile_size, overlap, base["object_diameter"])
    infer = {"tile_size": tile_size, "overlap": overlap, "tta": tta, "amp": amp, "device": device, "scale": scale}
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(exist_ok=True)
    # A re-run into the same folder must not leave another checkpoint's predictions or tuning behind.
    for stale in [*pred_dir.glob("*.npy"), out_dir / "postprocess.json"]:
        stale.unlink(missing_ok=True)
    tuning = None
    if tune_split is not None:
        tune_names = _split_names(manifest, tune_split, cache_dir, "tuning")[:max_images]
        tuning = tune_on_split(model, cache_dir, tune_split, tune_names, dict(pp_params or {}), infer, progress,
                               out_dir)
        if tune_note:
            tuning["note"] = tune_note
        (out_dir / "postprocess.json").write_text(json.dumps(tuning, indent=2))
        params = tuning["params"]
    else:
        params = base
    radius = centroid_radius(params["object_diameter"])
    stats, tissues, examples = [], [], []
    false_pos: list[ErrorCrop] = []
    false_neg: list[ErrorCrop] = []
    boxes = BoxScorer(class_names)  # box-level scores where the cache kept box annotations (BCCD)
    start = time.perf_counter()
    for name in tqdm(names, desc=f"evaluating {split}", disable=not progress):
        sample = load_sample(cache_dir, split, name)
        pred = predict_instances(model, sample["image"], pp_params=params, image_name=f"{cache_dir / split / name}.png",
                                 **infer)
        save_prediction(pred_dir / f"{name}.npy", pred)
        gt = {k: sample.get(k) for k in ("inst_map", "type_map", "ignore_mask")}
        stats.append(image_stats(gt, pred, len(class_names), match_radius=radius, where=f"{split}/{name}"))
        boxes.add(sample, pred)
        tissues.append((sample.get("meta") or {}).get("tissue"))
        if len(examples) < n_overlays:
            examples.append((name, sample["image"], np.asarray(sample["inst_map"]), pred["inst_map"],
                             np.asarray(sample["type_map"]), pred["type_map"]))
        if len(false_pos) < max_error_crops or len(false_neg) < max_error_crops:
            fp, fn = error_crops(sample["image"], np.asarray(sample["inst_map"]), pred["inst_map"], name, limit=4,
                                 ignore_mask=sample.get("ignore_mask"))
            false_pos += fp[: max_error_crops - len(false_pos)]
            false_neg += fn[: max_error_crops - len(false_neg)]
    seconds = time.perf_counter() - start
    use_tissues = tissues if all(t is not None for t in tissues) else None
    if use_tissues is None and any(t is not None for t in tissues):
        log.warning("%d of %d images of %s lack a tissue label: bPQ/mPQ are averaged over images, not tissues",
                    sum(t is None for t in tissues), len(tissues), split)
    metrics = reduce_stats(stats, class_names, use_tissues, match_radius=radius)
    metrics.update(boxes.result())
    if boxes.stats:  # the masks were derived from boxes: say so wherever a mask score is printed
        metrics["mask_ground_truth"] = "vs box-derived masks"
    metrics.update(
        {
            "split": split,
            "postprocess": params,
            "postprocess_tuned_on": tune_split,
            "checkpoint": checkpoint,
            "inference": {"tile_size": tile_size, "overlap": overlap, "tta": tta, "amp": amp, "input_scale": scale},
            "training_mode": training,
            "seconds_per_image": seconds / len(names),
        }
    )
    if checkpoint is not None:
        metrics["checkpoint"] = dict(checkpoint)
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
    if checkpoint:
        context["checkpoint"] = (f"{checkpoint.get('path')} (Phase {checkpoint.get('phase')}, epoch "
                                 f"{checkpoint.get('epoch')}, step {checkpoint.get('step')}, "
                                 f"SHA-256 {checkpoint.get('sha256')})")
    if tune_note:
        context["tuning split"] = tune_note
    write_report(
        out_dir, metrics, examples=examples, false_positives=false_pos, false_negatives=false_neg,
        context=context, tuning=tuning, title=f"Evaluation on {split}", class_names=class_names,
    )
    log.info("evaluated %d images of %s: PQ %s, mPQ %s", len(names), split, metrics["pq"], metrics["mpq"])
    return metrics
