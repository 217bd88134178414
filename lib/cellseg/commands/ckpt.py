"""``cellseg ckpt inspect PATH [--json]``, ``cellseg ckpt check PATH -f PARAMS.yaml [-p NAME VALUE ...]`` and
``cellseg ckpt export PATH OUT [--merge] [--base-weights FILE]`` (see :mod:`cellseg.commands.ckpt_export`).

``inspect`` shows what a checkpoint (or every checkpoint of a phase directory) holds and whether it matches its
sidecar: exit 0 when every file is valid, 1 otherwise. ``check`` answers, before a job is submitted, whether the
parameters build a network the checkpoint fits (the same check ``RESUME`` / ``INIT_FROM`` make): exit 0 compatible,
1 incompatible (with the explanation), 2 when the check itself cannot run (bad parameters, unreadable file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_BAD, EXIT_ERROR = 0, 1, 2


def _add_param_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--parameters-file", dest="files", action="append", default=[], metavar="FILE",
                   help="YAML parameter file (papermill -f syntax, repeatable)")
    p.add_argument("-p", "--parameter", dest="pairs", action="append", nargs=2, default=[], metavar=("NAME", "VALUE"),
                   help="one parameter (papermill -p syntax, repeatable, later wins)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("ckpt", help="inspect checkpoints, check them against parameters")
    sub = p.add_subparsers(dest="ckpt_command", required=True)
    ins = sub.add_parser("inspect", help="phase, epoch, step, metric, architecture, LoRA, sidecar check")
    ins.add_argument("path", help="a .pt checkpoint or a phase directory (CHECKPOINT_DIR/phaseN)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    chk = sub.add_parser("check", help="would these parameters load this checkpoint? exit 0 yes, 1 no")
    chk.add_argument("path", help="a .pt checkpoint")
    _add_param_args(chk)
    chk.add_argument("--num-classes", type=int, default=None,
                     help="cell classes of the data the parameters use (default: the checkpoint's)")
    from cellseg.commands.ckpt_export import add_export_parser

    add_export_parser(sub)


# ----- inspect -----
def _sidecar_status(path: Path) -> tuple[str, dict | None]:
    from cellseg.checkpoint.sidecar import CorruptCheckpoint, read_sidecar, verify_file

    try:
        side = read_sidecar(path)
    except CorruptCheckpoint as e:
        return e.reason, None
    try:
        verify_file(path, side)
    except CorruptCheckpoint as e:
        return f"{e.reason}: {e.detail}" if e.detail else e.reason, side
    return "ok", side


def inspect_file(path: str | Path) -> dict:
    """What one checkpoint file holds, read from its sidecar (the payload only when the sidecar is missing)."""
    from cellseg.checkpoint.base import full_manifest
    from cellseg.checkpoint.contents import contents_of
    from cellseg.checkpoint.sidecar import CorruptCheckpoint, read_payload

    path = Path(path)
    info: dict[str, Any] = {"path": str(path), "exists": path.exists(),
                            "size": path.stat().st_size if path.exists() else None}
    status, side = _sidecar_status(path)
    info["sidecar"] = status
    meta = side
    if side is None and path.exists():
        try:
            payload = read_payload(path)
        except CorruptCheckpoint as e:
            info["payload"] = f"{e.reason}: {e.detail}"
            info["valid"] = False
            return info
        progress = payload.get("progress") or {}
        meta = {"format_version": payload.get("format_version"), "contents": contents_of(payload),
                "phase": payload.get("phase"),
                "epoch": progress.get("epoch"), "step": progress.get("step"),
                "batch_in_epoch": progress.get("batch_in_epoch"),
                "monitor": {**(progress.get("monitor") or {}), "best": progress.get("best_metric")},
                "arch": payload.get("arch"), "lora": payload.get("lora"), "manifest": full_manifest(payload),
                "base_weights": payload.get("base_weights")}
        info["payload"] = "readable (no sidecar to verify it against)"
    if meta is not None:
        info["contents"] = contents_of(meta)
        for key in ("format_version", "phase", "epoch", "step", "batch_in_epoch", "monitor", "arch", "lora",
                    "parent", "code_version", "time", "reason", "sha256", "base_weights"):
            if key in meta:
                info[key] = meta[key]
        mani = meta.get("manifest") or {}
        info["tensors"] = len(mani)
        info["parameters"] = int(sum(math.prod(s) for s in mani.values()))
    info["valid"] = status == "ok"
    return info


_CONTENTS = {"full": "full (weights + optimizer, schedule, RNG: resumable exactly)",
             "weights": "weights only (evaluation, prediction, INIT_FROM; RESUME='auto' does not continue from it)"}


def _format_info(info: dict) -> str:
    if not info["exists"]:
        return f"{info['path']}: missing"
    arch = info.get("arch") or {}
    mon = info.get("monitor") or {}
    lora = info.get("lora")
    lines = [
        f"{info['path']} ({(info['size'] or 0) / 1e6:.1f} MB)",
        f"  sidecar:      {info['sidecar']}" + (f"; payload {info['payload']}" if "payload" in info else ""),
        f"  phase {info.get('phase')}, epoch {info.get('epoch')}, step {info.get('step')}, "
        f"batch_in_epoch {info.get('batch_in_epoch')}",
        f"  monitor:      {mon.get('metric')} ({mon.get('mode')}) value {mon.get('value')}, best {mon.get('best')}"
        + (f" at epoch {mon.get('best_epoch')}" if mon.get("best_epoch") is not None else ""),
        f"  architecture: encoder '{arch.get('encoder')}' ({arch.get('family')}, channels "
        f"{arch.get('encoder_channels')}), decoder '{arch.get('decoder')}' width {arch.get('decoder_width')}, "
        f"{arch.get('num_classes')} classes",
        f"  LoRA:         {lora if lora else 'none'}",
        f"  contents:     {_CONTENTS.get(info.get('contents'), 'unknown')}",
        f"  tensors:      {info.get('tensors')} ({info.get('parameters', 0):,} values)",
    ]
    base = info.get("base_weights")
    if base:
        lines.append(f"  base weights: {len(base['manifest'])} frozen encoder tensors not stored, read from "
                     f"{base['file']} (SHA-256 {base['sha256']}, {base['size']:,} bytes, recorded at {base['path']})")
    if info.get("parent"):
        lines.append(f"  parent:       {info['parent'].get('path')}")
    if info.get("time"):
        lines.append(f"  written:      {info['time']} by cellseg {info.get('code_version')} ({info.get('reason')})")
    return "\n".join(lines)


def run_inspect(path: str, as_json: bool) -> int:
    from cellseg.checkpoint.layout import checkpoint_files

    p = Path(path)
    if p.is_dir():
        files = [f for f in checkpoint_files(p) if f.suffix == ".pt"]
        if not files:
            print(f"cellseg ckpt inspect: {p} holds no .pt checkpoint", file=sys.stderr)
            return EXIT_BAD
        infos = [inspect_file(f) for f in files]
    elif p.exists():
        infos = [inspect_file(p)]
    else:
        print(f"cellseg ckpt inspect: {p} does not exist. Give a .pt file or a CHECKPOINT_DIR/phaseN directory.",
              file=sys.stderr)
        return EXIT_BAD
    if as_json:
        print(json.dumps(infos if p.is_dir() else infos[0], indent=2, default=str))
    else:
        print("\n".join(_format_info(i) for i in infos))
    return EXIT_OK if all(i["valid"] for i in infos) else EXIT_BAD


# ----- check -----
def build_network_skeleton(cfg: Any, num_classes: int):
    """The network the parameters build for ``cfg.PHASE`` (LoRA applied in Phase 2 on a ViT), on the meta device:
    only names and shapes, no memory, no initialisation cost."""
    import torch

    from cellseg.model.lora import apply_lora
    from cellseg.model.network import build_model_from_config

    with torch.device("meta"):
        model = build_model_from_config(cfg, num_classes=num_classes, load_weights=False)
        if cfg.PHASE == 2 and model.encoder.family == "vit":
            apply_lora(model, r=cfg.LORA_R, alpha=cfg.LORA_ALPHA, dropout=cfg.LORA_DROPOUT,
                       targets=list(cfg.LORA_TARGETS), blocks=cfg.LORA_BLOCKS)
    return model


def check_checkpoint(path: str | Path, cfg: Any, num_classes: int | None = None) -> tuple[bool, str]:
    """(compatible?, explanation) of checkpoint ``path`` against the parameters ``cfg``.

    Raises:
        CorruptCheckpoint: the checkpoint cannot be read (neither sidecar nor payload).
    """
    from cellseg.checkpoint.base import full_manifest
    from cellseg.checkpoint.compat import IncompatibleCheckpoint
    from cellseg.checkpoint.sidecar import CorruptCheckpoint, read_payload, read_sidecar
    from cellseg.checkpoint.weights import check_compatibility

    path = Path(path)
    try:
        meta = read_sidecar(path)
    except CorruptCheckpoint:
        payload = read_payload(path)
        meta = {"arch": payload.get("arch"), "lora": payload.get("lora"), "phase": payload.get("phase"),
                "manifest": full_manifest(payload), "base_weights": payload.get("base_weights")}
        del payload
    if num_classes is None:
        num_classes = int((meta.get("arch") or {}).get("num_classes") or 1)
    model = build_network_skeleton(cfg, num_classes)
    use = ("RESUME (same phase)" if meta.get("phase") in (None, cfg.PHASE)
           else f"INIT_FROM (a Phase {meta.get('phase')} checkpoint starting Phase {cfg.PHASE})")
    try:
        plan, differences = check_compatibility(meta, model, strict=cfg.STRICT_LOAD, merge_lora=cfg.MERGE_LORA,
                                                path=path, checkpoint_dir=cfg.checkpoint_dir())
    except IncompatibleCheckpoint as e:
        return False, str(e)
    lines = [f"compatible for {use}: {len(plan.direct)} tensors load by name"
             + (f", {len(plan.merges)} LoRA layers merged" if plan.merges else "")
             + (f", {len(plan.adapters_kept)} LoRA adapter tensors start fresh" if plan.adapters_kept else "")]
    if not plan.clean or differences:
        from cellseg.checkpoint.compat import describe_plan

        lines.append("STRICT_LOAD=False: the rest is left as it is:")
        lines += [f"  - {d}" for d in differences]
        lines.append(describe_plan(plan))
    return True, "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    from cellseg.checkpoint.sidecar import CorruptCheckpoint
    from cellseg.config import ConfigError, config_from_cli

    if not args.files and not args.pairs:
        print("cellseg ckpt check: give the parameters with -f PARAMS.yaml and/or -p NAME VALUE.", file=sys.stderr)
        return EXIT_ERROR
    if not Path(args.path).exists():
        print(f"cellseg ckpt check: {args.path} does not exist.", file=sys.stderr)
        return EXIT_ERROR
    try:
        cfg = config_from_cli(args.files, args.pairs, "01_train")
        ok, text = check_checkpoint(args.path, cfg, args.num_classes)
    except ConfigError as e:
        print(f"cellseg ckpt check: parameter error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (CorruptCheckpoint, FileNotFoundError, ValueError) as e:
        print(f"cellseg ckpt check: cannot check: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(text)
    return EXIT_OK if ok else EXIT_BAD


def run(args: argparse.Namespace) -> int:
    if args.ckpt_command == "inspect":
        return run_inspect(args.path, args.json)
    if args.ckpt_command == "export":
        from cellseg.commands.ckpt_export import run_export

        return run_export(args)
    return run_check(args)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m cellseg.commands.ckpt ...``), same as ``cellseg ckpt ...``."""
    parser = argparse.ArgumentParser(prog="cellseg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
