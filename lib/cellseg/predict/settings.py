"""Everything prediction takes from the checkpoint: the network (through :func:`cellseg.loading.load_trained_model`),
class names, normalisation, ``OBJECT_DIAMETER``, the training resolution when known, and the post-processing
parameters that ``02_evaluate`` tuned (the ``<checkpoint>.postprocess.json`` sidecar, tied to the checkpoint by its
SHA-256), or the defaults, saying so. A checkpoint that does not fit the parameters given is explained here, before
any image is read.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cellseg.config import Config, resolve_config
from cellseg.postprocess import resolve_params

log = logging.getLogger(__name__)

POSTPROCESS_SUFFIX = ".postprocess.json"
# Parameters that fix the network's shape: prediction takes them from the checkpoint; a different value given by the
# user is a misunderstanding to explain, not to silently ignore.
# what the network was built and trained with; INPUT_SCALE is the resolution it saw (issue 16), so predicting at
# another scale would be out of distribution
ARCH_PARAMS = ("ENCODER", "DECODER", "DECODER_WIDTH", "ENCODER_INDICES", "INPUT_SCALE")


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the prediction parameters; the message says which and how to fix it."""


@dataclass
class Predictor:
    """A loaded model and the settings that travel with its checkpoint."""

    model: torch.nn.Module
    checkpoint: Path
    sha256: str
    class_names: list[str]
    class_names_source: str
    pp_params: dict[str, float]
    pp_source: str
    train_mpp: float | None
    normalization: str
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    input_scale: float = 1.0  # INPUT_SCALE of training: the network sees images resized by it, maps come back full size

    @property
    def object_diameter(self) -> float:
        return float(self.pp_params["object_diameter"])

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description for ``summary.json``."""
        return {"checkpoint": str(self.checkpoint), "sha256": self.sha256, "class_names": self.class_names,
                "class_names_source": self.class_names_source, "postprocess": self.pp_params,
                "postprocess_source": self.pp_source, "train_mpp": self.train_mpp,
                "normalization": self.normalization, "encoder": self.config.get("ENCODER"),
                "input_scale": self.input_scale, "notes": self.notes}


def training_data_info(dataset: Any) -> dict[str, Any]:
    """What a checkpoint records about its training data (payload key ``data``): the class names of type ids 1..C
    and the resolution in µm per pixel (the cache manifest's ``mpp``; None when it states none), plain types."""
    names = list(getattr(dataset, "class_names", None) or []) or None
    mpp = None
    cache = getattr(dataset, "cache_dir", None)
    if cache is not None:
        from cellseg.data import load_manifest

        try:
            mpp = load_manifest(cache).get("mpp")
        except (FileNotFoundError, ValueError):
            mpp = None
    return {"class_names": names, "mpp": float(mpp) if mpp else None}


def postprocess_sidecar_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + POSTPROCESS_SUFFIX)


def checkpoint_sha256(path: str | Path) -> str:
    """The checkpoint's SHA-256: from its sidecar when it has one (``load_weights`` verifies the file against it),
    else hashed."""
    from cellseg.checkpoint import CorruptCheckpoint, read_sidecar
    from cellseg.checkpoint.atomic import sha256_file

    try:
        return str(read_sidecar(path)["sha256"])
    except CorruptCheckpoint:
        return sha256_file(Path(path))


def write_postprocess_sidecar(checkpoint: str | Path, metrics: dict) -> Path | None:
    """Store the post-processing parameters that ``02_evaluate`` tuned next to the checkpoint
    (``<checkpoint>.postprocess.json``, with the checkpoint's SHA-256, so that prediction can tell a stale file).
    Does nothing (and says so) when the evaluation did not tune. Returns the sidecar's path or None."""
    from cellseg.checkpoint.atomic import atomic_write_json

    tuned_on = metrics.get("postprocess_tuned_on")
    if not tuned_on:
        log.info("post-processing was not tuned (TUNE_POSTPROCESS=False): no %s written; prediction uses the "
                 "defaults", postprocess_sidecar_path(checkpoint).name)
        return None
    path = postprocess_sidecar_path(checkpoint)
    record = {"checkpoint": Path(checkpoint).name, "sha256": checkpoint_sha256(checkpoint),
              "params": dict(metrics["postprocess"]), "tuned_on": tuned_on, "split": metrics.get("split"),
              "pq": metrics.get("pq"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(path, record)
    log.info("tuned post-processing parameters written to %s", path)
    return path


def read_postprocess(checkpoint: Path, sha256: str, object_diameter: float) -> tuple[dict[str, float], str]:
    """(parameters, where they come from): the tuned sidecar when it belongs to this checkpoint, else the defaults
    with the checkpoint's ``OBJECT_DIAMETER``.

    Raises:
        ValueError: the sidecar is unreadable or holds invalid parameters (names the file).
    """
    side = postprocess_sidecar_path(checkpoint)
    defaults = resolve_params({"object_diameter": object_diameter})
    if not side.exists():
        return defaults, (f"defaults (no {side.name} next to the checkpoint; run 02_evaluate with "
                          "TUNE_POSTPROCESS=True to tune them)")
    try:
        record = json.loads(side.read_text())
        params = resolve_params(record["params"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{side} is not a valid post-processing sidecar ({type(e).__name__}: {e}); delete it or "
                         "re-run 02_evaluate on this checkpoint") from e
    if record.get("sha256") != sha256:
        msg = (f"defaults: {side.name} is stale (tuned for a checkpoint with SHA-256 "
               f"{str(record.get('sha256'))[:12]}..., this one is {sha256[:12]}...); re-run 02_evaluate to tune again")
        log.warning("%s", msg)
        return defaults, msg
    return params, f"tuned by 02_evaluate on split '{record.get('tuned_on')}' ({side.name})"


def read_checkpoint_info(path: Path) -> dict[str, Any]:
    """The checkpoint's stored config, architecture and data description, read memory-mapped (no second copy of
    the weights).

    Raises:
        ValueError: the file is not a cellseg training checkpoint (names it).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler errors all mean "not a checkpoint"
        raise CheckpointMismatch(f"PREDICT_CHECKPOINT {path} cannot be read as a checkpoint: {type(e).__name__}: "
                                 f"{e}") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict) or "model" not in payload:
        raise CheckpointMismatch(f"PREDICT_CHECKPOINT {path} is not a cellseg training checkpoint (it has no stored "
                                 "configuration); pass a best.pt / latest.pt written by 01_train")
    return {"config": payload["config"], "arch": payload.get("arch") or {}, "data": payload.get("data") or {},
            "normalization": payload.get("normalization")}


def _class_names(info: dict, n_classes: int | None) -> tuple[list[str], str]:
    names = info["data"].get("class_names")
    if names:
        return list(names), "checkpoint"
    cfg = info["config"]
    from cellseg.data import load_manifest

    cache = Path(cfg.get("DATA_CACHE") or Path(cfg.get("RUN_DIR", ".")) / "data")
    try:
        manifest_names = list(load_manifest(cache).get("class_names") or [])
    except (FileNotFoundError, ValueError):
        manifest_names = []
    if manifest_names and (n_classes is None or len(manifest_names) == n_classes):
        return manifest_names, f"the training data's manifest ({cache / 'manifest.json'}): the checkpoint stores none"
    if n_classes is None:
        raise CheckpointMismatch("the checkpoint stores neither class names nor the number of classes; pass a "
                                 "checkpoint written by 01_train")
    return [f"class{i}" for i in range(1, n_classes + 1)], (
        "generic names class1..classC: neither the checkpoint nor its training data's manifest names the classes")


def check_fit(stored: dict[str, Any], given: dict[str, Any], path: Path) -> list[str]:
    """Compare the architecture parameters the user gave with the checkpoint's. Returns notes.

    Raises:
        CheckpointMismatch: a given architecture parameter differs (lists each, and how to fix it).
    """
    bad = [f"{k}: the checkpoint was trained with {stored.get(k)!r}, the parameters give {given[k]!r}"
           for k in ARCH_PARAMS if k in given and k in stored and given[k] != stored[k]]
    if bad:
        raise CheckpointMismatch(
            f"PREDICT_CHECKPOINT {path} does not fit the parameters given:\n  - " + "\n  - ".join(bad)
            + "\nPrediction rebuilds the network from the checkpoint: drop these parameters from -f/-p (or the "
            "parameters cell), or pick the checkpoint trained with them.")
    return []


def load_predictor(checkpoint: str | Path, *, device: torch.device, given: dict[str, Any] | None = None) -> Predictor:
    """Load a trained checkpoint for prediction, with everything it carries.

    Args:
        checkpoint: a ``.pt`` written by ``01_train``.
        device: where the model runs.
        given: parameters the user set explicitly (``-f`` / ``-p``); architecture parameters must match the
            checkpoint's, ``ENCODER_WEIGHTS`` replaces the stored path (the base encoder file on this machine), and
            ``OBJECT_DIAMETER`` replaces the stored diameter (noted).

    Raises:
        FileNotFoundError: no such checkpoint.
        CheckpointMismatch: not a checkpoint, or it does not fit the given parameters.
        cellseg.checkpoint.IncompatibleCheckpoint, CorruptCheckpoint: from the weights' loader.
    """
    from cellseg.loading import load_trained_model

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"PREDICT_CHECKPOINT {path} does not exist. Give the best.pt or latest.pt of a "
                                "trained phase (CHECKPOINT_DIR/phase2/best.pt), or train first.")
    given = dict(given or {})
    info = read_checkpoint_info(path)
    stored = info["config"]
    notes = check_fit(stored, given, path)
    n_classes = info["arch"].get("num_classes")
    class_names, names_source = _class_names(info, n_classes)
    if n_classes is not None and len(class_names) != n_classes:
        raise CheckpointMismatch(f"{path}: {len(class_names)} class names {class_names} for a network with "
                                 f"{n_classes} classes")
    known = {f.name for f in fields(Config)}
    values = {k: v for k, v in stored.items() if k in known}
    values.update({"EVAL_CHECKPOINT": str(path), "STRICT_LOAD": True})
    if "ENCODER_WEIGHTS" in given:
        values["ENCODER_WEIGHTS"] = given["ENCODER_WEIGHTS"]
    cfg = resolve_config(values, notebook="02_evaluate")
    sha = checkpoint_sha256(path)
    diameter = float(stored.get("OBJECT_DIAMETER", Config.OBJECT_DIAMETER))
    pp, pp_source = read_postprocess(path, sha, diameter)
    if "OBJECT_DIAMETER" in given and float(given["OBJECT_DIAMETER"]) != pp["object_diameter"]:
        notes.append(f"OBJECT_DIAMETER {given['OBJECT_DIAMETER']} given replaces the checkpoint's "
                     f"{pp['object_diameter']:g}")
        pp = resolve_params({**pp, "object_diameter": float(given["OBJECT_DIAMETER"])})
    model, _ = load_trained_model(cfg, num_classes=len(class_names), device=device)
    norm = (getattr(model, "arch", None) or {}).get("normalization")
    normalization = (f"mean {norm['mean']} std {norm['std']} (from the checkpoint)" if norm
                     else "ImageNet mean/std (cellseg.imageops; the checkpoint records none)")
    train_mpp = info["data"].get("mpp")
    pred = Predictor(model=model, checkpoint=path, sha256=sha, class_names=class_names,
                     class_names_source=names_source, pp_params=pp, pp_source=pp_source,
                     train_mpp=float(train_mpp) if train_mpp else None, normalization=str(normalization),
                     config=stored, notes=notes, input_scale=float(stored.get("INPUT_SCALE", 1.0)))
    log.info("checkpoint %s: classes %s (%s); post-processing %s; training resolution %s", path, class_names,
             names_source, pp_source, f"{pred.train_mpp:g} µm/px" if pred.train_mpp else "unknown")
    for note in notes:
        log.warning("%s", note)
    return pred
