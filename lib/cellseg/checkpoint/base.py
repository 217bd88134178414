"""Compact checkpoints: the frozen encoder weights stay in their own file, the checkpoint names it by SHA-256.

A checkpoint stores what training changed (decoder, LoRA adapters, trained encoder parts, optimizer and run state);
the encoder tensors that still hold the values of ``ENCODER_WEIGHTS`` and are frozen are left out and replaced by the
file's identity (``base_weights``: file name, path, size, SHA-256, and the key -> shape manifest of the tensors left
out). With UNI a Phase 1 checkpoint shrinks from about 1.2 GB to the decoder's size, and saving it no longer eats the
preemption warning margin. An encoder that was not loaded from a file (random init) is stored in full, as before.

Loading takes the left-out tensors from the base file after checking its SHA-256: from the model itself when it was
built from the same file (nothing is read twice), else from a file given explicitly, else from the recorded path. A
missing or different file is refused with the expected hash and the ways out. ``cellseg ckpt export --merge`` writes
a self-contained file (base included, LoRA merged) for machines without the gated base file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from cellseg.checkpoint.compat import IncompatibleCheckpoint
from cellseg.checkpoint.keys import canonical_param_names, manifest

log = logging.getLogger(__name__)

IDENTITY_FIELDS = ("file", "path", "size", "sha256")


def split_base(inner: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors to store, ``base_weights`` entry or None) of a canonical state dict of ``inner``.

    Left out: keys still holding the base file's values (``inner.base_keys``) whose parameter is frozen; buffers
    (BatchNorm statistics) only while the whole encoder is frozen, as only then is it held in eval mode.
    """
    identity = getattr(inner, "base_weights", None)
    keys = getattr(inner, "base_keys", None)
    if not identity or not keys:
        return state, None
    names = canonical_param_names(inner)
    params = {names[id(p)]: p for p in inner.parameters()}
    encoder_frozen = bool(getattr(inner, "encoder_frozen", False))
    omit = sorted(k for k in keys if k in state and (
        (k in params and not params[k].requires_grad) or (k not in params and encoder_frozen)))
    if not omit:
        return state, None
    left = set(omit)
    entry = {**{f: identity[f] for f in IDENTITY_FIELDS}, "manifest": {k: list(state[k].shape) for k in omit}}
    return {k: v for k, v in state.items() if k not in left}, entry


def full_manifest(payload: dict) -> dict[str, list[int]]:
    """key -> shape of the whole network a payload describes: the stored tensors plus the base file's."""
    mani = manifest(payload["model"])
    base = payload.get("base_weights")
    if base:
        mani.update({k: list(v) for k, v in base["manifest"].items()})
    return mani


def describe_base(base: dict) -> str:
    return f"{base['file']} ({base['size']:,} bytes, SHA-256 {base['sha256']}, recorded at {base['path']})"


def ways_out(base: dict, source: str) -> str:
    return ("Ways out:\n"
            f"  - set ENCODER_WEIGHTS to the file with SHA-256 {base['sha256']} (check with `sha256sum FILE`; UNI: "
            "download it again as HPC_SETUP_GUIDE.md says);\n"
            f"  - or, where that file exists, write a self-contained file: `cellseg ckpt export {source} OUT.pt "
            "--merge` (base included, LoRA merged) and evaluate / predict with OUT.pt.")


def resolve_base_file(base: dict, model: nn.Module | None, explicit: str | Path | None, source: str) -> Path:
    """The base weights file to read for ``base``, verified by size and SHA-256: ``explicit`` when given, else the
    file the model was built from (``ENCODER_WEIGHTS``), else the recorded path when the model has none.

    Raises:
        IncompatibleCheckpoint: the file is missing or is a different file (names the expected hash and the ways out).
    """
    from cellseg.checkpoint.fingerprint import file_sha256

    own = getattr(model, "base_weights", None) if model is not None else None
    if explicit:
        path, how = Path(explicit), "the base weights file given"
    elif own:
        path, how = Path(own["path"]), "ENCODER_WEIGHTS"
    else:
        path, how = Path(base["path"]), "the recorded path (the model was built without ENCODER_WEIGHTS)"
    head = (f"checkpoint {source} stores only what training changed; its frozen encoder weights are those of "
            f"{describe_base(base)}.")
    if not path.is_file():
        raise IncompatibleCheckpoint(f"{head} {how} {path} does not exist.\n{ways_out(base, source)}", path=source,
                                     differences=[f"base weights file {path} missing"])
    digest = file_sha256(path)
    if digest != base["sha256"]:
        raise IncompatibleCheckpoint(
            f"{head} {how} {path} is a different file (SHA-256 {digest}, {path.stat().st_size:,} bytes); loading "
            f"would combine the trained decoder with other encoder weights.\n{ways_out(base, source)}", path=source,
            differences=[f"base weights SHA-256 {digest[:12]}... differs from the checkpoint's {base['sha256'][:12]}..."])
    return path


def base_tensors(arch: dict, path: Path, keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The canonical tensors ``keys`` of the encoder ``arch`` describes, loaded from ``path`` (already verified)."""
    from cellseg.model.backbones import build_backbone

    backbone = build_backbone(arch["encoder"], str(path), list(arch.get("encoder_indices") or []) or None)
    state = {f"encoder.{k}": v for k, v in backbone.state_dict().items()}
    bad = [k for k, shape in keys.items() if k not in state or list(state[k].shape) != list(shape)]
    if bad:  # the hash matched, so only a code change in how the encoder is built can get here
        raise IncompatibleCheckpoint(f"the base weights file {path} has the checkpoint's SHA-256 but the encoder built "
                                     f"from it lacks or reshapes {len(bad)} of the left-out tensors (e.g. {bad[:3]}): "
                                     "was the checkpoint written by another cellseg version?", path=str(path))
    return {k: state[k] for k in keys}


def fill_base(state: dict[str, torch.Tensor], base: dict, *, arch: dict | None, model: nn.Module | None,
              explicit: str | Path | None, source: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Complete a compact checkpoint's canonical ``state``. Returns (state, keys the model already holds).

    When ``model`` was built from the same file and still holds its values for every left-out key, nothing is read:
    those keys are returned to be skipped. Otherwise the verified file is read and its tensors added to ``state``.
    """
    keys = base["manifest"]
    own = getattr(model, "base_weights", None) if model is not None else None
    if not explicit and own and own.get("sha256") == base["sha256"] and set(keys) <= getattr(model, "base_keys", set()):
        return state, set(keys)
    if arch is None:
        raise IncompatibleCheckpoint(f"checkpoint {source} leaves out its base encoder weights but has no architecture "
                                     "fingerprint to rebuild them from: it is not a cellseg checkpoint.", path=source)
    path = resolve_base_file(base, model, explicit, source)
    log.info("reading the %d frozen encoder tensors of %s from %s (SHA-256 verified)", len(keys), source, path)
    return {**base_tensors(arch, path, keys), **state}, set()
