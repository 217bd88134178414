"""Is a checkpoint compatible with the network the parameters build? Answered from the sidecar's architecture
fingerprint and key -> shape manifest before any tensor is read, and explained in words.

Lightning, Accelerate, detectron2 and timm let a mismatch surface deep inside ``load_state_dict`` as a wall of keys;
here the error says what differs (``checkpoint encoder is 'resnet50' with skip channels [...]; the parameters ask for
'efficientnet_b4' with [...]``), lists the mismatched keys grouped by prefix, and names the ways out.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from cellseg.checkpoint.lora_keys import LoadPlan

# fingerprint field -> (the parameter that sets it, words)
_FIELDS = {
    "decoder": ("DECODER", "decoder"),
    "decoder_width": ("DECODER_WIDTH", "decoder width"),
    "num_classes": ("the dataset's classes", "number of cell classes"),
    "encoder_indices": ("ENCODER_INDICES", "encoder blocks feeding the decoder"),
    "encoder_strides": ("ENCODER", "encoder strides"),
    "branches": ("the code version", "output branches"),
    "normalization": ("NORM_MEAN / NORM_STD, or the encoder's weights config", "input normalisation"),
}
_LORA_FIELDS = {"r": "LORA_R", "alpha": "LORA_ALPHA", "targets": "LORA_TARGETS", "blocks": "LORA_BLOCKS"}


class IncompatibleCheckpoint(ValueError):
    """The checkpoint does not fit the network the parameters build; the message explains why and the ways out."""

    def __init__(self, message: str, *, path: str | Path | None = None, differences: list[str] | None = None,
                 plan: LoadPlan | None = None):
        super().__init__(message)
        self.path = path
        self.differences = differences or []
        self.plan = plan


def fingerprint_differences(ckpt: dict | None, model: dict) -> list[str]:
    """Sentences naming each architecture difference (LoRA presence is left to the key plan; LoRA *settings*
    that differ on both sides are reported, except dropout, which does not change the weights)."""
    if not ckpt:
        return ["the checkpoint carries no architecture fingerprint (not written by cellseg?)"]
    out = []
    ce, me = ckpt.get("encoder"), model.get("encoder")
    cc, mc = ckpt.get("encoder_channels"), model.get("encoder_channels")
    if ce != me or cc != mc:
        out.append(f"checkpoint encoder is '{ce}' with skip channels {cc}; the parameters ask for '{me}' with {mc} "
                   "(ENCODER)")
    for key, (param, words) in _FIELDS.items():
        if key in ckpt and key in model and ckpt[key] != model[key] and not (key == "encoder_strides" and ce != me):
            out.append(f"checkpoint {words} is {ckpt[key]!r}; the parameters give {model[key]!r} ({param})")
    cl, ml = ckpt.get("lora"), model.get("lora")
    if cl and ml:
        for key, param in _LORA_FIELDS.items():
            if cl.get(key) != ml.get(key):
                out.append(f"checkpoint LoRA {key} is {cl.get(key)!r}; the parameters give {ml.get(key)!r} ({param})")
    return out


def group_keys(keys: list[str], depth: int = 3) -> OrderedDict[str, list[str]]:
    """Keys grouped by their first ``depth`` name segments, in first-seen order."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for k in keys:
        groups.setdefault(".".join(k.split(".")[:depth]), []).append(k)
    return groups


def describe_keys(title: str, keys: list[str], *, examples: int = 3, max_groups: int = 8) -> str:
    """``title (N): prefix (n): a, b, c, +k more`` lines, a few examples per group and counts for the rest."""
    if not keys:
        return ""
    groups = group_keys(keys)
    lines = [f"  {title} ({len(keys)}):"]
    for i, (prefix, members) in enumerate(groups.items()):
        if i == max_groups:
            rest = sum(len(m) for m in list(groups.values())[max_groups:])
            lines.append(f"    ... and {len(groups) - max_groups} more groups ({rest} keys)")
            break
        shown = ", ".join(m[len(prefix) + 1:] or m for m in members[:examples])
        more = f", +{len(members) - examples} more" if len(members) > examples else ""
        lines.append(f"    {prefix}.* ({len(members)}): {shown}{more}")
    return "\n".join(lines)


def describe_plan(plan: LoadPlan) -> str:
    """The key problems of a plan, grouped by prefix."""
    mism = [f"{k} {c}->{m}" for k, c, m in plan.mismatched]
    parts = [
        describe_keys("shape-mismatched (checkpoint -> model)", mism),
        describe_keys("missing from the checkpoint", plan.missing),
        describe_keys("unexpected in the checkpoint", plan.unexpected),
        describe_keys("LoRA layers in the checkpoint but plain in the model", plan.needs_merge),
    ]
    return "\n".join(p for p in parts if p)


def ways_out(checkpoint_dir: str | Path | None, *, needs_merge: bool = False) -> str:
    where = f" in {checkpoint_dir}" if checkpoint_dir else ""
    lines = ["Ways out (set in the parameters cell or with `-p NAME VALUE`):",
             f"  - FORCE_RECREATE=True: start from scratch; the old checkpoints{where} are moved aside to a "
             "timestamped folder (never overwritten or deleted).",
             "  - STRICT_LOAD=False: load every tensor whose name and shape match, and report the loaded / "
             "shape-mismatched / missing / unexpected ones grouped by prefix.",
             "  - or change the parameters back to the checkpoint's architecture."]
    if needs_merge:
        lines.insert(1, "  - MERGE_LORA=True: fold the checkpoint's LoRA adapters into the base weights "
                        "(W + alpha/r * B @ A), or apply LoRA with the checkpoint's settings before loading.")
    return "\n".join(lines)


def explain(path: str | Path, differences: list[str], plan: LoadPlan, *, checkpoint_dir: str | Path | None = None) \
        -> str:
    """The full explanation of an incompatible checkpoint."""
    lines = [f"checkpoint {path} does not fit the network the parameters build:"]
    lines += [f"  - {d}" for d in differences]
    if plan.needs_merge:
        lines.append(f"  - the checkpoint has trained LoRA adapters on {len(plan.needs_merge)} layer(s) that are plain "
                     "in this model; loading only the base weights would drop them. Set MERGE_LORA=True to merge them.")
    detail = describe_plan(plan)
    if detail:
        lines.append(f"Keys ({len(plan.direct)} match):")
        lines.append(detail)
    lines.append(ways_out(checkpoint_dir, needs_merge=bool(plan.needs_merge)))
    return "\n".join(lines)


def describe_optimizer_change(saved: list[list[str]], now: list[list[str]]) -> str:
    """Why a checkpoint's optimizer state cannot be restored: the trained parameters (canonical names per group)
    differ from those the parameters build now."""
    if len(saved) != len(now):
        return (f"optimizer parameter groups differ: the checkpoint has {len(saved)} groups {[len(g) for g in saved]}, "
                f"the parameters build {len(now)} {[len(g) for g in now]}")
    flat_s = {n for g in saved for n in g}
    flat_n = {n for g in now for n in g}
    lines = [f"optimizer parameters differ (sizes per group: checkpoint {[len(g) for g in saved]}, now "
             f"{[len(g) for g in now]}); optimizer state is matched by position, so it cannot be restored"]
    gone, new = sorted(flat_s - flat_n), sorted(flat_n - flat_s)
    if gone:
        lines.append(describe_keys("trained in the checkpoint, not now", gone))
    if new:
        lines.append(describe_keys("trained now, not in the checkpoint", new))
    if not gone and not new:
        lines.append("  same parameters in a different order or grouping")
    return "\n".join(lines)
