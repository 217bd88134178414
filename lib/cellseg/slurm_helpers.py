"""What the ``slurm/*.sh`` batch scripts need from Python: the run's locations from papermill-style arguments, the
kernelspec check, the ``STOP_AT`` deadline from the job's end time, and the verdict of an attempt (finished /
preempted / failed, and whether to requeue).

The scripts stay thin shell (signals, ``srun``, ``scontrol``) and call ``python -m cellseg.slurm_helpers <command>``;
each command prints ``NAME=value`` lines quoted for ``eval`` in bash. The verdict reads the run's own status marker
(``RUN_DIR/phase{N}/status.json``, written by :func:`cellseg.stopping.write_run_status`), never the launcher's exit
code alone: torchrun exits 1 after forwarding SIGTERM to a worker that finished cleanly, and papermill exits 0 after a
cooperative stop (see FIELD_NOTES, "SLURM, torchrun, papermill").

Exit codes of the batch scripts (see ``slurm/common.sh`` and HPC_SETUP_GUIDE.md): 0 finished, or preempted and
requeued (the log says ``REQUEUED``); 1 failed; 2 setup error (parameters, environment, kernelspec); 3 stopped and
resumable but not requeued (manual STOP, a user ``STOP_AT``, the ``MAX_REQUEUES`` cap, no progress since the last
attempt, or not running under SLURM): resubmit the same command to continue.

Imports stay light (no torch): the scripts call this several times per job.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cellseg.config import NOTEBOOK_PARAMS, ConfigError, load_params_file, resolve_config

log = logging.getLogger(__name__)

EXIT_FINISHED = 0
EXIT_REQUEUED = 0
EXIT_FAILED = 1
EXIT_SETUP = 2
EXIT_STOPPED = 3
OUTCOMES = ("finished", "preempted", "failed")
# papermill's options that carry parameters, and the order in which papermill applies them (by kind, not by position
# on the command line: a -p always beats a -f, whatever comes first).
_PARAM_OPTIONS = {"-f": "file", "--parameters_file": "file", "-y": "yaml", "--parameters_yaml": "yaml",
                  "-p": "param", "--parameters": "param", "-r": "raw", "--parameters_raw": "raw"}
_FORBIDDEN_OPTIONS = {"-k": "CELLSEG_KERNEL", "--kernel": "CELLSEG_KERNEL", "--cwd": "CELLSEG_ROOT",
                      "-b": "-f/-y", "--parameters_base64": "-f/-y", "--prepare-only": None,
                      "--inject-paths": None, "--inject-input-path": None, "--inject-output-path": None}


class SlurmHelperError(ValueError):
    """A bad argument to the batch scripts or their helpers; the message names it and how to fix it."""


# ----------------------------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------------------------
def papermill_value(raw: str) -> Any:
    """Type a ``-p NAME VALUE`` value exactly as papermill's command line does (True/False/None, int, float, else
    the string): ``-p TTA false`` stays the *string* 'false', and the notebook's config check rejects it."""
    if raw == "True":
        return True
    if raw == "False":
        return False
    if raw == "None":
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw


def _yaml_mapping(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SlurmHelperError(f"{origin} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SlurmHelperError(f"{origin} must be a YAML mapping NAME: value, got {type(data).__name__}.")
    return data


def parse_papermill_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Collect the parameters from papermill-style arguments as papermill will apply them.

    Args:
        argv: the batch script's arguments, e.g. ``['-f', 'configs/tiny_cpu.yaml', '-p', 'PHASE', '2']``.

    Returns:
        (parameters, other papermill options passed through unchanged, e.g. ``['--log-output']``).

    Raises:
        SlurmHelperError: a positional argument (the scripts choose notebook and output), an option the scripts set
            themselves (``-k``, ``--cwd``), or an option missing its value.
    """
    buckets: dict[str, list] = {"file": [], "yaml": [], "param": [], "raw": []}
    passthrough: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        opt, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if opt in _FORBIDDEN_OPTIONS:
            instead = _FORBIDDEN_OPTIONS[opt]
            hint = f" Use {instead} instead." if instead else ""
            raise SlurmHelperError(f"papermill option {opt} cannot be passed to the cellseg batch scripts: they set it "
                                   f"themselves.{hint}")
        kind = _PARAM_OPTIONS.get(opt)
        if kind is None:
            if not arg.startswith("-"):
                raise SlurmHelperError(
                    f"unexpected argument {arg!r}: the batch scripts choose the notebook and the output path; pass "
                    "only papermill options such as `-f configs/my.yaml -p PHASE 2`.")
            passthrough.append(arg)
            i += 1
            continue
        width = 2 if kind in ("param", "raw") else 1
        values = [inline] if eq else []
        values += argv[i + 1:i + 1 + width - len(values)]
        if len(values) < width or any(v.startswith("-") and kind == "file" for v in values):
            what = "NAME VALUE" if width == 2 else ("FILE" if kind == "file" else "YAML")
            raise SlurmHelperError(f"papermill option {opt} needs {what}, got {argv[i + 1:i + 1 + width]!r}.")
        buckets[kind].append(values)
        i += 1 + width - (1 if eq else 0)
    params: dict[str, Any] = {}
    for (path,) in buckets["file"]:
        try:
            params.update(load_params_file(path))
        except ConfigError as e:
            raise SlurmHelperError(str(e)) from e
    for (text,) in buckets["yaml"]:
        params.update(_yaml_mapping(text, f"-y {text!r}"))
    for name, value in buckets["param"]:
        params[name] = papermill_value(value)
    for name, value in buckets["raw"]:
        params[name] = value
    return params, passthrough


@dataclass(frozen=True)
class RunInfo:
    """Where a notebook run puts things, as absolute paths (relative parameters are relative to ``root``)."""

    notebook: str
    run_dir: str
    checkpoint_dir: str
    data_cache: str
    phase: int
    status_file: str
    resume: str
    stop_at: str
    metrics_file: str

    def shell(self, prefix: str = "CS_") -> str:
        """``PREFIX_NAME=value`` lines, quoted for bash ``eval``."""
        return "".join(f"{prefix}{k.upper()}={shlex.quote(str(v))}\n" for k, v in asdict(self).items())


def run_info(argv: list[str], notebook: str, root: str | Path = ".") -> RunInfo:
    """Validate the arguments as ``notebooks/<notebook>.ipynb`` will and return the run's locations.

    Raises:
        SlurmHelperError: unknown notebook, bad arguments, or a parameter the notebook would reject (the config's
            message, which names the parameter and the allowed values).
    """
    if notebook not in NOTEBOOK_PARAMS:
        raise SlurmHelperError(f"notebook must be one of {list(NOTEBOOK_PARAMS)}, got {notebook!r}.")
    params, _ = parse_papermill_args(argv)
    try:
        cfg = resolve_config(params, notebook)
    except ConfigError as e:
        raise SlurmHelperError(f"parameter error for notebooks/{notebook}.ipynb: {e}") from e
    root = Path(root).resolve()

    def absolute(p: str | Path) -> str:
        return str(p if Path(p).is_absolute() else root / p)

    from cellseg.eval_index import eval_dir

    phase = cfg.EVAL_PHASE if notebook == "02_evaluate" else cfg.PHASE
    return RunInfo(notebook=notebook, run_dir=absolute(cfg.run_dir), checkpoint_dir=absolute(cfg.checkpoint_root),
                   data_cache=absolute(cfg.data_cache), phase=phase,
                   status_file=absolute(cfg.phase_dir(phase) / "status.json"), resume=cfg.RESUME, stop_at=cfg.STOP_AT,
                   metrics_file=absolute(eval_dir(cfg) / "metrics.json"))


# ----------------------------------------------------------------------------------------------------------------
# kernelspec
# ----------------------------------------------------------------------------------------------------------------
def check_kernelspec(name: str, python: str | None = None) -> str:
    """Check that kernelspec ``name`` exists and starts this environment's Python; returns its directory.

    papermill resolves the name the same way (user dirs before ``sys.prefix``), so a stale ``~/.local`` spec of the
    same name that points at another environment is caught here, before the job spends its allocation.

    Raises:
        SlurmHelperError: no such kernelspec, or its interpreter is another environment's (both with the fix).
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    python = python or sys.executable
    install = (f"Install it with `{python} -m ipykernel install --sys-prefix --name {name} --display-name "
               f"\"Python ({name})\"` (`make setup` does this), or choose another with CELLSEG_KERNEL.")
    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(name)
    except NoSuchKernel as e:
        raise SlurmHelperError(f"Jupyter kernelspec {name!r} not found (known: {sorted(manager.find_kernel_specs())}). "
                               f"{install}") from e
    argv0 = spec.argv[0] if spec.argv else ""
    target_prefix = _python_prefix(argv0)
    own_prefix = _python_prefix(python)
    if target_prefix is None or target_prefix != own_prefix:
        raise SlurmHelperError(
            f"Jupyter kernelspec {name!r} in {spec.resource_dir} starts {argv0!r} (environment "
            f"{target_prefix or 'not runnable'}), not this environment's Python {python} ({own_prefix}): the notebook "
            f"would run with other packages. {install} Remove the stale one with `jupyter kernelspec remove {name}` "
            "if it lives in ~/.local/share/jupyter/kernels.")
    return str(spec.resource_dir)


def _python_prefix(python: str) -> str | None:
    """``sys.prefix`` of an interpreter (resolving symlinks would make every venv look like its base Python)."""
    if python == sys.executable:
        return str(Path(sys.prefix).resolve())
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                             timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return str(Path(out.stdout.strip()).resolve())


# ----------------------------------------------------------------------------------------------------------------
# deadline
# ----------------------------------------------------------------------------------------------------------------
def stop_at_from_end_time(end_time: str, margin_s: float, now: float | None = None) -> float | None:
    """The ``STOP_AT`` deadline (seconds since the epoch) for a job ending at ``end_time`` (``squeue -o %e``, local
    time), ``margin_s`` seconds early; None when the job has no end time (``Unknown``, ``N/A``, unlimited).

    Raises:
        SlurmHelperError: ``margin_s`` is negative, or the job ends within ``margin_s`` of ``now`` (every attempt would
            stop at once and requeue forever): ask for a longer ``--time`` or a smaller ``CELLSEG_STOP_MARGIN``.
    """
    if margin_s < 0:
        raise SlurmHelperError(f"CELLSEG_STOP_MARGIN must be >= 0 seconds, got {margin_s}.")
    text = end_time.strip()
    if not text or text in ("Unknown", "N/A", "NONE", "None", "UNLIMITED", "INFINITE"):
        return None
    try:
        end = datetime.fromisoformat(text).timestamp()
    except ValueError as e:
        raise SlurmHelperError(f"job end time {end_time!r} (from `squeue -o %e`) is not an ISO time.") from e
    now = time.time() if now is None else now
    deadline = end - margin_s
    if deadline <= now:
        raise SlurmHelperError(
            f"the job ends at {text}, {max(0.0, end - now):.0f} s from now, within CELLSEG_STOP_MARGIN={margin_s:g} s: "
            "training would stop at once and requeue in a loop. Ask for a longer --time or lower CELLSEG_STOP_MARGIN.")
    return deadline


# ----------------------------------------------------------------------------------------------------------------
# verdict of one attempt
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What an attempt achieved, from its marker: ``status`` is 'finished', 'preempted' or 'failed'."""

    status: str
    reason: str
    epoch: int | None = None
    step: int | None = None
    marker: str = ""


def _marker_time(record: dict, path: Path) -> float:
    value = record.get("time")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        for fmt in ("%Y-%m-%dT%H:%M:%S%z", None):
            try:
                return (datetime.strptime(value, fmt) if fmt else datetime.fromisoformat(value)).timestamp()
            except ValueError:
                continue
    return path.stat().st_mtime


def read_outcome(status_file: str | Path, since: float, exit_code: int, *, job_id: str | None = None,
                 restart_count: str | None = None, expect_file: str | Path | None = None) -> Outcome:
    """Tell finished / preempted / failed for the attempt that started at ``since`` (seconds since the epoch).

    A training attempt is judged by its status marker: 'finished' or 'preempted' only when the marker was written by
    this attempt (its time is not before ``since``; and, when it records them, the same SLURM job and restart
    count), whatever the launcher's ``exit_code``. Without a fresh marker it failed. An attempt with no marker
    (evaluation: ``status_file`` empty) finished when ``exit_code`` is 0 and ``expect_file`` was written by it.
    """
    if not status_file:
        fresh = bool(expect_file) and Path(expect_file).is_file() and Path(expect_file).stat().st_mtime >= since - 1
        if exit_code == 0 and fresh:
            return Outcome("finished", f"exit code 0, wrote {expect_file}")
        why = f"exit code {exit_code}" if exit_code else f"exit code 0 but {expect_file} was not written by this job"
        return Outcome("failed", why)
    path = Path(status_file)
    crash = f"exit code {exit_code}" + ("" if exit_code else " (the notebook ended without a status marker)")
    if not path.is_file():
        return Outcome("failed", f"{crash}; no status marker {path}")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return Outcome("failed", f"{crash}; unreadable status marker {path}: {e}")
    stamp = _marker_time(record, path)
    same_job = (job_id is None or record.get("slurm_job_id") in (None, job_id)) and (
        restart_count is None or record.get("slurm_restart_count") in (None, restart_count)
        or (restart_count == "0" and record.get("slurm_restart_count") is None))
    if stamp < since - 1 or not same_job:
        return Outcome("failed", f"{crash}; the status marker {path} ({record.get('status')}, "
                                 f"{record.get('time')}) is from an earlier attempt", marker=str(path))
    status = record.get("status")
    if status not in ("finished", "preempted"):
        return Outcome("failed", f"{crash}; status marker says {status!r}: {record.get('reason')}", marker=str(path))
    if exit_code != 0:
        log.warning("launcher exit code %d, but the run's marker says %s: trusting the marker", exit_code, status)
    step = record.get("step", record.get("steps"))
    epoch = record.get("epoch", record.get("epochs_done"))
    return Outcome(status, str(record.get("reason") or status), epoch=epoch, step=step, marker=str(path))


@dataclass(frozen=True)
class Decision:
    """What the batch script does next: ``action`` 'exit' or 'requeue', with its exit code and a log line."""

    outcome: str
    action: str
    exit_code: int
    message: str

    def shell(self, prefix: str = "CS_") -> str:
        return "".join(f"{prefix}{k.upper()}={shlex.quote(str(v))}\n" for k, v in asdict(self).items())


def decide(outcome: Outcome, *, scheduler_stop: bool, in_slurm: bool, restart_count: int, max_requeues: int,
           previous_step: int | None = None) -> Decision:
    """Requeue a preempted attempt only when the scheduler asked for the stop (its warning signal reached the batch
    script, or the script's own ``STOP_AT`` passed), under ``MAX_REQUEUES`` and with progress since the previous
    attempt (``previous_step``: the step the last preempted attempt of this job stopped at).

    Raises:
        SlurmHelperError: ``max_requeues`` or ``restart_count`` is negative.
    """
    if max_requeues < 0 or restart_count < 0:
        raise SlurmHelperError(f"MAX_REQUEUES and SLURM_RESTART_COUNT must be >= 0, got {max_requeues} and "
                               f"{restart_count}.")
    where = f"epoch {outcome.epoch}, step {outcome.step}"
    if outcome.status == "finished":
        at = f" ({where})" if outcome.step is not None else ""
        return Decision("finished", "exit", EXIT_FINISHED, f"FINISHED: {outcome.reason}{at}")
    if outcome.status != "preempted":
        return Decision("failed", "exit", EXIT_FAILED, f"FAILED: {outcome.reason}")
    resumable = f"PREEMPTED at {where} ({outcome.reason}), resumable"
    resubmit = "resubmit the same command to continue from latest.pt"
    if not scheduler_stop:
        return Decision("preempted", "exit", EXIT_STOPPED,
                        f"{resumable}; stopped on request (STOP file or your STOP_AT), not requeued: {resubmit}")
    if not in_slurm:
        return Decision("preempted", "exit", EXIT_STOPPED, f"{resumable}; not a SLURM job, cannot requeue: {resubmit}")
    if restart_count >= max_requeues:
        return Decision("preempted", "exit", EXIT_STOPPED,
                        f"{resumable}; requeue cap reached (SLURM_RESTART_COUNT={restart_count} >= MAX_REQUEUES="
                        f"{max_requeues}): {resubmit}, or raise MAX_REQUEUES")
    if previous_step is not None and outcome.step is not None and outcome.step <= previous_step:
        return Decision("preempted", "exit", EXIT_STOPPED,
                        f"{resumable}; no progress since the previous attempt (also stopped at step {previous_step}): "
                        "not requeued, to avoid a requeue loop. Check the time limit against the start-up time "
                        "and CELLSEG_STOP_MARGIN")
    return Decision("preempted", "requeue", EXIT_REQUEUED,
                    f"{resumable}; REQUEUED (restart {restart_count + 1} of at most {max_requeues})")


def previous_stop_step(attempts_file: str | Path) -> int | None:
    """The step at which the last preempted attempt recorded in ``attempts.jsonl`` stopped (None if none)."""
    path = Path(attempts_file)
    if not path.is_file():
        return None
    step = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("outcome") == "preempted" and record.get("step") is not None:
            step = int(record["step"])
    return step


def append_attempt(attempts_file: str | Path, record: dict[str, Any]) -> None:
    """Append one attempt's record (job, restart, outcome, step, exit code, message) to ``attempts.jsonl``."""
    path = Path(attempts_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def conclude(args: argparse.Namespace) -> Decision:
    """The ``conclude`` command: judge the attempt, decide, and append it to the job's ``attempts.jsonl``."""
    outcome = read_outcome(args.status_file, args.since, args.exit_code, job_id=args.job_id or None,
                           restart_count=args.restart_count if args.job_id else None,
                           expect_file=args.expect_file or None)
    scheduler_stop = bool(args.signal) or (args.deadline is not None and time.time() >= args.deadline)
    previous = previous_stop_step(args.attempts_file) if args.attempts_file else None
    decision = decide(outcome, scheduler_stop=scheduler_stop, in_slurm=bool(args.job_id),
                      restart_count=int(args.restart_count), max_requeues=args.max_requeues, previous_step=previous)
    if args.attempts_file:
        append_attempt(args.attempts_file, {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job_id": args.job_id or None,
            "restart": int(args.restart_count), "notebook": args.notebook, "outcome": outcome.status,
            "reason": outcome.reason, "epoch": outcome.epoch, "step": outcome.step, "signal": args.signal or None,
            "launcher_exit_code": args.exit_code, "action": decision.action, "exit_code": decision.exit_code,
            "message": decision.message, "seconds": round(time.time() - args.since, 1)})
    return decision


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cellseg.slurm_helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run-info", help="validate papermill arguments; print the run's locations as CS_* lines")
    p.add_argument("--notebook", required=True, choices=sorted(NOTEBOOK_PARAMS))
    p.add_argument("--root", default=".", help="project root that relative paths are relative to")
    p.add_argument("papermill_args", nargs=argparse.REMAINDER, help="after --: the papermill options")
    p = sub.add_parser("check-kernel", help="the kernelspec exists and runs this environment's python")
    p.add_argument("--name", default="cellseg")
    p = sub.add_parser("stop-at", help="STOP_AT (epoch seconds) from a job end time; empty when unlimited")
    p.add_argument("--end-time", required=True, help="`squeue -h -j JOBID -o %%e` output")
    p.add_argument("--margin", type=float, required=True, help="seconds before the end")
    p = sub.add_parser("conclude", help="judge an attempt, decide requeue/exit, record it; prints CS_* lines")
    p.add_argument("--notebook", default="01_train")
    p.add_argument("--status-file", default="", help="RUN_DIR/phase{N}/status.json; '' for notebooks without one")
    p.add_argument("--expect-file", default="", help="without a status file: the output the notebook must write")
    p.add_argument("--since", type=float, required=True, help="attempt start, seconds since the epoch")
    p.add_argument("--exit-code", type=int, required=True, help="papermill's / srun's exit code")
    p.add_argument("--signal", default="", help="the signal the batch script caught, '' if none")
    p.add_argument("--deadline", type=float, default=None, help="STOP_AT the script computed (epoch seconds)")
    p.add_argument("--job-id", default="", help="SLURM_JOB_ID, '' outside SLURM")
    p.add_argument("--restart-count", default="0", help="SLURM_RESTART_COUNT")
    p.add_argument("--max-requeues", type=int, default=10)
    p.add_argument("--attempts-file", default="", help="the job's attempts.jsonl")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run-info":
            rest = args.papermill_args[1:] if args.papermill_args[:1] == ["--"] else args.papermill_args
            sys.stdout.write(run_info(rest, args.notebook, args.root).shell())
        elif args.command == "check-kernel":
            print(check_kernelspec(args.name))
        elif args.command == "stop-at":
            deadline = stop_at_from_end_time(args.end_time, args.margin)
            print("" if deadline is None else f"{math.floor(deadline)}")
        elif args.command == "conclude":
            sys.stdout.write(conclude(args).shell())
    except SlurmHelperError as e:
        print(f"cellseg slurm: {e}", file=sys.stderr)
        return EXIT_SETUP
    return 0


if __name__ == "__main__":
    sys.exit(main())
