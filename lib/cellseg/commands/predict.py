"""``cellseg predict --checkpoint FILE --input PATH [PATH ...] --out DIR [-f YAML] [-p NAME VALUE ...]``: apply a
trained model to images, folders, globs, pyramidal TIFFs and slides (the steps of notebooks/03_predict.ipynb).

Exit codes: 0 every input predicted; 1 some inputs could not be predicted (listed; the others were); 2 a parameter or
checkpoint error (nothing was read); 3 stopped by a signal, ``DIR/STOP`` or ``STOP_AT``: run the same command again to
continue.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cellseg.commands.train import add_param_args

log = logging.getLogger(__name__)

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="apply a trained checkpoint to images and slides (same steps as notebooks/03_predict.ipynb)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="trained .pt (default: PREDICT_CHECKPOINT, 'best' of EVAL_PHASE under CHECKPOINT_DIR)")
    p.add_argument("--input", nargs="+", default=None, metavar="PATH",
                   help="images, folders, globs (quote them), pyramidal TIFFs, slides (default: PREDICT_INPUT)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: PREDICT_OUT or RUN_DIR/predict)")
    add_param_args(p)


def _given(files: list[str], pairs: list[list[str]]) -> dict:
    """The parameters the user set explicitly (a checkpoint that contradicts them is explained, not overridden)."""
    from cellseg.config import load_params_file, parse_cli_value

    values: dict = {}
    for f in files or []:
        values.update(load_params_file(f))
    for name, raw in pairs or []:
        values[name] = parse_cli_value(raw)
    return values


def run(args: argparse.Namespace) -> int:
    from cellseg.config import config_from_cli
    from cellseg.distributed import detect_env, pick_device
    from cellseg.predict import (
        CheckpointMismatch,
        load_predictor,
        predict_checkpoint_path,
        predict_inputs,
        resolve_inputs,
        settings_from_config,
    )
    from cellseg.stopping import StopRequest, write_run_status

    pairs = list(args.pairs)
    if args.checkpoint:
        pairs.append(["PREDICT_CHECKPOINT", args.checkpoint])
    if args.out:
        pairs.append(["PREDICT_OUT", args.out])
    cfg = config_from_cli(args.files, pairs, "03_predict")
    if args.input:
        from cellseg.config import replace

        cfg = replace(cfg, PREDICT_INPUT=list(args.input))
    device = pick_device(cfg.DEVICE, detect_env())
    settings = settings_from_config(cfg, device)
    from cellseg.checkpoint import CorruptCheckpoint, IncompatibleCheckpoint

    try:
        predictor = load_predictor(predict_checkpoint_path(cfg), device=device, given=_given(args.files, args.pairs))
    except (FileNotFoundError, CheckpointMismatch, CorruptCheckpoint, IncompatibleCheckpoint) as e:
        print(f"cellseg predict: {e}", file=sys.stderr)
        return EXIT_USAGE
    stop = StopRequest(list(cfg.STOP_SIGNALS), stop_file=settings.out_dir / "STOP", deadline=cfg.STOP_AT or None)
    with stop:
        report = predict_inputs(predictor, resolve_inputs(cfg), settings, stop)
    status = "preempted" if report["stopped"] else "finished"
    write_run_status(settings.out_dir / "status.json", status, stop.reason, failed=report["failed"],
                     finished=report["finished"])
    print(f"predicted {len(report['finished'])} input(s) into {settings.out_dir}; summary: {report['summary_csv']}")
    if report["failed"]:
        print(f"{len(report['failed'])} input(s) could not be predicted:", file=sys.stderr)
        for name, why in report["failed"]:
            print(f"  - {name}: {why}", file=sys.stderr)
    if report["stopped"]:
        print(f"stopped at {report['stopped']} ({stop.reason}); run the same command again to continue",
              file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_SOME_FAILED if report["failed"] else EXIT_OK
