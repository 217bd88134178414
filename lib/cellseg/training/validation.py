"""Validation during training: losses on whole validation images, instances by the standard post-processing, the
evaluation metrics, and the class-collapse check (a class present in the ground truth that is never predicted)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from cellseg.branches import Branch
from cellseg.distributed import all_gather_objects
from cellseg.training.together import fail_together

log = logging.getLogger(__name__)


def outputs_to_instances(out: dict[str, torch.Tensor], *, object_diameter: float) -> dict:
    """Post-process one image's network outputs into instances, classes and confidences.

    Shape: out[np] (1, 2, H, W), out[hv] (1, 2, H, W), out[nc] (1, C+1, H, W).
    """
    from cellseg.postprocess import (
        classify_instances,
        hv_to_instances,
        instance_objectness,
        instances_to_type_map,
    )

    fg = out[Branch.NP].float().softmax(1)[0, 1].cpu().numpy()
    hv = out[Branch.HV].float()[0].cpu().numpy()
    nc = out[Branch.NC].float().softmax(1)[0].cpu().numpy()
    inst = hv_to_instances(fg, hv, object_diameter=object_diameter)
    types, scores, _ = classify_instances(inst, nc, fg)
    return {"inst_map": inst, "type_map": instances_to_type_map(inst, types), "scores": scores,
            "objectness": instance_objectness(inst, fg), "pixel_types": nc.argmax(0) * (fg > 0.5)}


@torch.no_grad()
def run_validation(model, dataset, loss_fn, *, class_names: list[str], device, rank: int = 0, world_size: int = 1,
                   max_images: int = 0, object_diameter: float = 20.0, precision_ctx=None) -> dict:
    """Validate on this rank's share of ``dataset`` (whole images), gather, and compute the metrics on every rank."""
    from cellseg.metrics import evaluate_instances
    from cellseg.metrics.detection import centroid_radius

    n = len(dataset) if not max_images else min(max_images, len(dataset))
    loss_sums: dict[str, float] = {}
    items = []
    error = None
    try:  # an error on one rank must reach the others before the gather below, or they wait forever
        for i in range(rank, n, world_size):
            sample = dataset[i]
            batch = {k: (v[None] if torch.is_tensor(v) and v.ndim >= 1 else v) for k, v in sample.items()}
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with precision_ctx() if precision_ctx else _null():
                out = model(batch["image"])
                losses = loss_fn(out, batch)
            for k, v in losses.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v)
            pred = outputs_to_instances(out, object_diameter=object_diameter)
            gt = {"inst_map": sample["inst_map"].numpy().astype(np.int32), "type_map": sample["nc"].numpy().astype(np.int32),
                  "ignore_mask": sample["ignore"].numpy()}
            items.append((i, gt, pred, {k: float(v) for k, v in losses.items()}))
    except Exception as e:
        error = e
    fail_together(error, where="in validation")
    gathered = sorted((x for part in all_gather_objects(items) for x in part), key=lambda t: t[0])
    gts = [g for _, g, _, _ in gathered]
    preds = [{k: p[k] for k in ("inst_map", "type_map", "scores", "objectness")} for _, _, p, _ in gathered]
    # the evaluation's centroid radius (0.6 x OBJECT_DIAMETER), not a fixed 12 px
    metrics = evaluate_instances(gts, preds, class_names, match_radius=centroid_radius(object_diameter))
    val: dict = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    val["per_class"] = metrics.get("per_class", {})
    for key in gathered[0][3]:
        val[f"val_loss_{key}" if key != "total" else "val_loss"] = float(np.mean([t[3][key] for t in gathered]))
    # class collapse: fraction of predicted pixels per class, and classes present in GT but never predicted
    pix = np.zeros(len(class_names) + 1)
    for _, _, p, _ in gathered:
        pix += np.bincount(p["pixel_types"].ravel(), minlength=len(class_names) + 1)[: len(class_names) + 1]
    fg_total = max(1.0, pix[1:].sum())
    val["pred_pixel_fraction"] = {c: float(pix[i + 1] / fg_total) for i, c in enumerate(class_names)}
    gt_present = {c for g in gts for i, c in enumerate(class_names) if (g["type_map"] == i + 1).any()}
    pred_present = {c for p in preds for i, c in enumerate(class_names) if (p["type_map"] == i + 1).any()}
    val["class_collapse"] = sorted(gt_present - pred_present)
    return val


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
