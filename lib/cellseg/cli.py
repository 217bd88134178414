"""The ``cellseg`` command: ``train``, ``evaluate``, ``predict``, ``ckpt inspect|check|export``, ``preflight``,
``runs summarize``, ``data fetch``, ``doctor``.

Subcommands live in :mod:`cellseg.commands`, each with ``add_parser(subparsers)`` and ``run(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cellseg.config import ConfigError

SUBCOMMANDS = ("train", "evaluate", "predict", "ckpt", "preflight", "runs", "data", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"cellseg.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cellseg.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"cellseg.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"cellseg {args.command}: parameter error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
