"""``cellseg ckpt export PATH OUT [--merge] [--base-weights FILE]``: a self-contained inference file.

Compact checkpoints leave the frozen base encoder weights in their own (possibly gated) file. ``export`` writes one
file with everything a prediction or evaluation needs (see :mod:`cellseg.checkpoint.export`): exit 0 written, 1 when
the base weights file is missing or differs, 2 for an unreadable checkpoint or bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_OK, EXIT_BAD, EXIT_ERROR = 0, 1, 2


def add_export_parser(sub: Any) -> None:
    """Register ``export`` on the ``cellseg ckpt`` subparsers."""
    exp = sub.add_parser("export", help="self-contained inference file: base encoder weights included, LoRA merged")
    exp.add_argument("path", help="a .pt checkpoint (compact or full)")
    exp.add_argument("out", help="the .pt file to write (with its .json sidecar)")
    exp.add_argument("--merge", action="store_true",
                     help="fold LoRA adapters into the base weights (W + alpha/r * B @ A): a plain network")
    exp.add_argument("--base-weights", default=None, metavar="FILE",
                     help="the base encoder weights file (default: the path recorded in the checkpoint); its SHA-256 "
                          "must equal the recorded one")


def run_export(args: argparse.Namespace) -> int:
    from cellseg.checkpoint.compat import IncompatibleCheckpoint
    from cellseg.checkpoint.export import export_checkpoint
    from cellseg.checkpoint.sidecar import CorruptCheckpoint

    try:
        info = export_checkpoint(args.path, args.out, merge=args.merge, base_weights=args.base_weights)
    except IncompatibleCheckpoint as e:
        print(f"cellseg ckpt export: {e}", file=sys.stderr)
        return EXIT_BAD
    except (CorruptCheckpoint, ValueError, FileNotFoundError) as e:
        print(f"cellseg ckpt export: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {info['out']} ({info['size'] / 1e6:.1f} MB, {info['tensors']} tensors, "
          f"{info['merged_lora_layers']} LoRA layers merged, {info['base_tensors_added']} base encoder tensors "
          f"included), SHA-256 {info['sha256']}")
    return EXIT_OK
