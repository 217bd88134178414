"""``cellseg train -f PARAMS.yaml [-p NAME VALUE ...]``: notebooks/01_train.ipynb without the notebook (same steps)."""

from __future__ import annotations

import argparse
import json


def add_param_args(p: argparse.ArgumentParser) -> None:
    """papermill's parameter syntax: ``-f FILE`` (repeatable) and ``-p NAME VALUE`` (repeatable, later wins)."""
    p.add_argument("-f", "--parameters-file", dest="files", action="append", default=[], metavar="FILE",
                   help="YAML parameter file (papermill -f syntax)")
    p.add_argument("-p", "--parameter", dest="pairs", action="append", nargs=2, default=[], metavar=("NAME", "VALUE"),
                   help="one parameter (papermill -p syntax)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one phase (same steps as notebooks/01_train.ipynb)")
    add_param_args(p)


def run(args: argparse.Namespace) -> int:
    from cellseg.config import config_from_cli
    from cellseg.training.session import train_phase

    cfg = config_from_cli(args.files, args.pairs, "01_train")
    summary = train_phase(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "params"}, default=str))
    return 0
