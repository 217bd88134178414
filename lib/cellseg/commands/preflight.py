"""``cellseg preflight -f PARAMS.yaml [-p NAME VALUE ...] [--gpu NAME|GB] [--skip-steps]``: on the login node, before a
long job is queued, check what would make it fail hours later, and list every problem found.

1. parameters: every invalid parameter of ``notebooks/01_train.ipynb`` (each named, not only the first);
2. data: the prepared cache (``manifest.json`` at ``DATA_CACHE``, else ``RUN_DIR/data``) with non-empty train and
   val splits;
3. checkpoints: the checkpoint ``RESUME`` would pick (``CHECKPOINT_DIR/phase{N}``) and, for a fresh Phase 2, the Phase 1
   checkpoint ``INIT_FROM`` would load, against the network the parameters build (from the JSON sidecars; no tensor is
   read): architecture, LoRA, optimizer parameters and scheduler, as resuming checks them;
4. memory: :mod:`cellseg.memory`'s estimate against ``--gpu`` (an over-budget estimate names a batch size x
   accumulation that fits and keeps the effective batch);
5. training steps: two optimizer steps on the CPU with a tiny stand-in (``test_vit`` or a tiny CNN of the same family,
   64 px, batch 2, synthetic disks) and the same decoder, phase, LoRA, loss, scheduler and accumulation settings,
   through the real :class:`cellseg.training.trainer.Trainer`, and a checkpoint save.

Prints one ``OK`` / ``PROBLEM`` / ``NOTE`` line per finding; exit 0 when there is no problem, 1 otherwise, 2 when the
arguments themselves are unusable (a missing ``-f`` file, an unknown ``--gpu``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg.config import Config, ConfigError, load_params_file, parse_cli_value, resolve_config

log = logging.getLogger(__name__)

EXIT_OK, EXIT_PROBLEMS, EXIT_ARGS = 0, 1, 2
STEP_SIZE, STEP_BATCH, STEP_COUNT = 64, 2, 2


@dataclass
class Report:
    """The checklist: (status, check, message) lines, status 'OK' | 'PROBLEM' | 'NOTE'."""

    lines: list[tuple[str, str, str]] = field(default_factory=list)

    def ok(self, check: str, message: str) -> None:
        self.lines.append(("OK", check, message))

    def problem(self, check: str, message: str) -> None:
        self.lines.append(("PROBLEM", check, message))

    def note(self, check: str, message: str) -> None:
        self.lines.append(("NOTE", check, message))

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        return [line for line in self.lines if line[0] == "PROBLEM"]

    def render(self) -> str:
        out = []
        for status, check, message in self.lines:
            first, *rest = str(message).splitlines() or [""]
            out.append(f"{status:<8} {check:<11} {first}")
            out += [f"{'':<21}{line}" for line in rest]
        n = len(self.problems)
        out.append(f"{n} problem(s) found." if n else "no problems found.")
        return "\n".join(out)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("preflight", help="check parameters, data, checkpoints, GPU memory and two CPU steps "
                                                "before queueing a job (exit 1 when anything would fail)")
    p.add_argument("-f", "--parameters-file", dest="files", action="append", default=[], metavar="FILE",
                   help="YAML parameter file (papermill -f syntax, repeatable)")
    p.add_argument("-p", "--parameter", dest="pairs", action="append", nargs=2, default=[], metavar=("NAME", "VALUE"),
                   help="one parameter (papermill -p syntax, repeatable, later wins)")
    p.add_argument("--gpu", default=None, metavar="NAME|GB",
                   help="target GPU for the memory check: a100-40gb, a100-80gb, h100-80gb, v100-16gb, v100-32gb, "
                        "rtx3090-24gb, titan-12gb, ... or a size such as 12gb (default: estimate only)")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="GPUs of the DDP job (default 1)")
    p.add_argument("--skip-steps", action="store_true", help="skip the two CPU training steps")


# ----- 1. parameters
def _collect_values(files: list[str], pairs: list[list[str]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in files:
        values.update(load_params_file(f))
    for name, raw in pairs:
        values[name] = parse_cli_value(raw)
    return values


def _culprits(message: str, values: dict[str, Any]) -> list[str]:
    """The given parameter(s) a ConfigError message is about: the unknown names, else every given name it
    mentions (both sides of a rule between two parameters)."""
    known = {f.name for f in fields(Config)}
    if message.startswith("unknown parameter"):
        return [k for k in values if k not in known]
    return [k for k in values if re.search(rf"\b{k}\b", message)]


def check_parameters(values: dict[str, Any], report: Report) -> Config:
    """Every invalid parameter becomes a problem; returns the config with defaults in their place."""
    values = dict(values)
    bad: list[str] = []
    while True:
        try:
            cfg = resolve_config(values, "01_train")
            break
        except ConfigError as e:
            report.problem("parameters", str(e))
            names = _culprits(str(e), values)
            if not names:
                report.note("parameters", "the other checks use the default parameters")
                return Config()
            bad += names
            for k in names:
                values.pop(k)
    if bad:
        report.note("parameters", f"the other checks use the defaults in place of {bad}")
    else:
        report.ok("parameters", f"valid for notebooks/01_train.ipynb: Phase {cfg.PHASE}, ENCODER={cfg.ENCODER!r}, "
                                f"DECODER={cfg.DECODER!r}, PATCH_SIZE={cfg.PATCH_SIZE}, BATCH_SIZE={cfg.BATCH_SIZE}, "
                                f"GRAD_ACCUM_TARGET={cfg.GRAD_ACCUM_TARGET}, PRECISION={cfg.PRECISION!r}")
    return cfg


# ----- 2. data
def _read_manifest(cache: Path) -> dict:
    try:
        from cellseg.data import load_manifest
    except ImportError:  # without the data package (or an older one), read the file it writes
        path = cache / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist") from None
        return json.loads(path.read_text())
    return load_manifest(cache)


def check_data(cfg: Config, report: Report) -> list[str] | None:
    """The prepared cache's class names, or None when it is missing or unusable."""
    cache = cfg.data_cache
    fix = (f"Prepare it first with the same parameters: papermill notebooks/00_prepare_data.ipynb out.ipynb -f "
           f"PARAMS.yaml (writes {cache}/manifest.json), or point DATA_CACHE at a prepared folder.")
    try:
        manifest = _read_manifest(cache)
    except (OSError, ValueError, KeyError) as e:
        report.problem("data", f"no usable prepared data at {cache}: {e}. {fix}")
        return None
    splits = manifest.get("splits") or {}
    empty = [s for s in ("train", "val") if not splits.get(s)]
    names = list(manifest.get("class_names") or [])
    if empty:
        report.problem("data", f"{cache}/manifest.json has no images in split(s) {empty} (splits: "
                               f"{ {k: len(v) for k, v in splits.items()} }). {fix}")
    if not names:
        report.problem("data", f"{cache}/manifest.json lists no class_names. {fix}")
    if empty or not names:
        return None
    report.ok("data", f"{cache}: {len(splits['train'])} train / {len(splits['val'])} val images, classes {names}")
    return names


# ----- 3. checkpoints
def _checkpoint_problems(path: Path, side: dict, model: torch.nn.Module, cfg: Config, *, resume: bool) -> list[str]:
    from cellseg.checkpoint import IncompatibleCheckpoint, check_compatibility

    out = []
    if resume and side.get("phase") not in (None, cfg.PHASE):
        out.append(f"{path} is a Phase {side.get('phase')} checkpoint in the Phase {cfg.PHASE} directory; RESUME "
                   "continues a run of the same phase. Move it away or set RESUME='never'.")
    if resume:  # the run identity (parameters part): RESUME refuses another run's checkpoint before training
        from cellseg.checkpoint.identity import parameter_problems

        out += [t for t in [parameter_problems(side, cfg, path=path)] if t]
    try:
        check_compatibility(side, model, strict=cfg.STRICT_LOAD, merge_lora=cfg.MERGE_LORA, path=path,
                            checkpoint_dir=path.parent)
    except IncompatibleCheckpoint as e:
        out.append(str(e))
        return out
    if resume and not cfg.IGNORE_RESUME_NETWORK:
        out += _training_state_problems(path, side, model, cfg)
    return out


def _training_state_problems(path: Path, side: dict, model: torch.nn.Module, cfg: Config) -> list[str]:
    """Optimizer parameters and scheduler, as a strict resume compares them."""
    from cellseg.checkpoint.state import optimizer_param_names
    from cellseg.optim import build_optimizer
    from cellseg.schedulers import SCHEDULE_INTERVAL

    out = []
    saved = side.get("optimizer_params")
    if saved is not None:
        now = optimizer_param_names(build_optimizer(model, cfg, fused=False), model)
        if now != saved:
            out.append(f"{path}: the optimizer's parameters differ from the checkpoint's (groups {[len(g) for g in saved]}"
                       f" vs {[len(g) for g in now]}), so resuming fails. Resume with the checkpoint's PHASE / LoRA "
                       "settings, or set FORCE_RECREATE=True / RESUME='never' to start over.")
    sched = side.get("scheduler") or {}
    if sched.get("kind") is not None and (sched["kind"], sched.get("interval")) != (cfg.SCHEDULER,
                                                                                     SCHEDULE_INTERVAL[cfg.SCHEDULER]):
        out.append(f"{path}: its scheduler is '{sched['kind']}', the parameters ask for SCHEDULER='{cfg.SCHEDULER}'; "
                   "resuming fails. Keep SCHEDULER as it was, or start over with FORCE_RECREATE=True.")
    return out if cfg.STRICT_LOAD else []


def _first_valid(paths: list[Path], report: Report, *, explicit: bool = False) -> tuple[Path, dict] | None:
    """The first candidate whose sidecar reads and whose size matches it (what RESUME='auto' would pick)."""
    from cellseg.checkpoint import CorruptCheckpoint, read_sidecar

    for path in paths:
        if not path.exists():
            continue
        try:
            side = read_sidecar(path)
        except CorruptCheckpoint as e:
            if explicit:  # a file named explicitly is loaded without its sidecar, unverified
                report.note("checkpoints", f"{path}: {e.reason}; it is loaded unverified and its compatibility is "
                                           "only checked when the job loads it")
                return None
            report.note("checkpoints", f"{path} would be skipped: {e.reason} ({e.detail})")
            continue
        if side.get("size") is not None and path.stat().st_size != side["size"]:
            what = f"{path.stat().st_size} bytes on disk, its sidecar says {side['size']} (truncated)"
            if explicit:  # named explicitly: the job fails on it instead of falling back
                report.problem("checkpoints", f"{path}: {what}; loading it fails. Name another file.")
                return None
            report.note("checkpoints", f"{path} would be skipped: {what}")
            continue
        return path, side
    return None


def check_checkpoints(cfg: Config, model: torch.nn.Module, report: Report) -> None:
    from cellseg.checkpoint import CheckpointManager
    from cellseg.checkpoint.contents import contents_of
    from cellseg.checkpoint.manager import BEST, LATEST

    phase_dir = cfg.checkpoint_dir()
    resumed = None
    if cfg.RESUME == "never":
        report.note("checkpoints", f"RESUME='never': checkpoints in {phase_dir} (if any) are moved aside at start")
    else:
        explicit = cfg.RESUME != "auto"
        cands = [Path(cfg.RESUME)] if explicit else CheckpointManager(phase_dir, phase=cfg.PHASE,
                                                                      code_version="preflight").candidates()
        if explicit and not cands[0].exists():
            report.problem("checkpoints", f"RESUME={cfg.RESUME!r}: no such file. Give an existing .pt file, 'auto' or "
                                          "'never'.")
        found = _first_valid(cands, report, explicit=explicit)
        if found is not None and not explicit and contents_of(found[1]) == "weights":
            report.problem("checkpoints", f"RESUME='auto' stops: {found[0]} is the only checkpoint left and it holds "
                                          "weights only (no optimizer or schedule state). Set RESUME to its path to "
                                          "continue from it with a fresh optimizer, or RESUME='never' to start over.")
            found = None
        elif found is not None:
            resumed = found[0]
            issues = _checkpoint_problems(found[0], found[1], model, cfg, resume=True)
            if issues and cfg.FORCE_RECREATE:
                report.note("checkpoints", f"{found[0]} does not fit the parameters; FORCE_RECREATE=True moves the "
                                           "phase's checkpoints aside and starts fresh")
                resumed = None
            for text in issues if not cfg.FORCE_RECREATE else []:
                report.problem("checkpoints", text)
            if not issues:
                report.ok("checkpoints", f"resumes from {found[0]} (epoch {found[1].get('epoch')}, step "
                                         f"{found[1].get('step')}): it fits the network the parameters build")
        elif not explicit:
            report.ok("checkpoints", f"nothing to resume in {phase_dir}: Phase {cfg.PHASE} starts fresh")
    if cfg.PHASE != 2 or resumed is not None or cfg.INIT_FROM == "fresh":
        if cfg.PHASE == 2 and cfg.INIT_FROM == "fresh" and resumed is None:
            report.note("checkpoints", "INIT_FROM='fresh': Phase 2 starts without Phase 1's decoder weights")
        return
    p1 = cfg.checkpoint_dir(1)
    if cfg.INIT_FROM != "auto" and not Path(cfg.INIT_FROM).exists():
        report.problem("checkpoints", f"INIT_FROM={cfg.INIT_FROM!r}: no such file. Give an existing .pt file, 'auto' "
                                      f"(Phase 1's best.pt, else latest.pt in {p1}) or 'fresh'.")
        return
    explicit = cfg.INIT_FROM != "auto"
    found = _first_valid([Path(cfg.INIT_FROM)] if explicit else [p1 / BEST, p1 / LATEST], report, explicit=explicit)
    if found is None and explicit:
        return
    if found is None:
        report.problem("checkpoints", f"INIT_FROM={cfg.INIT_FROM!r} finds no valid Phase 1 checkpoint in {p1}: run "
                                      "Phase 1 first (PHASE=1), point INIT_FROM at a .pt file, or set "
                                      "INIT_FROM='fresh'.")
        return
    issues = _checkpoint_problems(found[0], found[1], model, cfg, resume=False)
    for text in issues:
        report.problem("checkpoints", f"Phase 2 would start from {found[0]}, which does not fit:\n{text}")
    if not issues:
        report.ok("checkpoints", f"Phase 2 starts from {found[0]}: it fits the network the parameters build")


# ----- 4. memory
def check_memory(cfg: Config, model: torch.nn.Module, num_classes: int, gpu_spec: str | None, world_size: int,
                 report: Report) -> None:
    from cellseg.config import replace
    from cellseg.memory import DoesNotFit, GiB, MemoryModel, parse_gpu, suggest_batch
    from cellseg.training.trainer import accumulation_steps

    gpu = parse_gpu(gpu_spec) if gpu_spec else None
    bf16 = gpu.bf16 if gpu else True
    if gpu is not None and cfg.PRECISION == "bf16" and not gpu.bf16:
        report.problem("memory", f"PRECISION='bf16' but the {gpu.name} has no bf16 support. Use PRECISION='fp16' "
                                 "(GradScaler) or 'fp32'.")
    mm = MemoryModel(cfg, num_classes=num_classes, bf16_supported=bf16, world_size=world_size, model=model)
    est = mm.estimate()
    if gpu is None:
        report.ok("memory", f"{est}\n(no --gpu given: nothing to compare with)")
        return
    accum = accumulation_steps(cfg, world_size)
    if est.total <= gpu.memory_bytes:
        report.ok("memory", f"{est.total / GiB:.2f} GiB of the {gpu.name}'s {gpu.memory_bytes / GiB:.1f} GiB at "
                            f"BATCH_SIZE={cfg.BATCH_SIZE} x accumulation {accum}\n{est}")
        return
    head = (f"BATCH_SIZE={cfg.BATCH_SIZE} needs {est.total / GiB:.2f} GiB, more than the {gpu.name}'s "
            f"{gpu.memory_bytes / GiB:.1f} GiB (out of memory).")
    try:
        b, acc = suggest_batch(cfg, gpu.memory_bytes, num_classes=num_classes, world_size=world_size, memory_model=mm)
        fix = (f"Fits: BATCH_SIZE={b} x accumulation {acc} (keeps the effective batch "
               f"{b * acc * world_size}): `-p BATCH_SIZE {b}`"
               + ("" if cfg.GRAD_ACCUM_TARGET else f" `-p GRAD_ACCUM_TARGET {b * acc * world_size}`") + ".")
    except DoesNotFit as e:
        fix = str(e)
        if not cfg.GRAD_CHECKPOINTING:
            ck = replace(cfg, GRAD_CHECKPOINTING=True)
            try:
                b, acc = suggest_batch(ck, gpu.memory_bytes, num_classes=num_classes, world_size=world_size,
                                       bf16_supported=bf16)
                fix += f" With GRAD_CHECKPOINTING=True: BATCH_SIZE={b} x accumulation {acc} fits."
            except DoesNotFit:
                pass
    report.problem("memory", f"{head} {fix}\n{est}")


# ----- 5. two training steps
def stand_in_encoder(encoder: str) -> str:
    """A tiny timm model of the encoder's family: ``test_vit`` for ViTs, a ``test_*`` CNN otherwise."""
    from cellseg.model.backbones import FOUNDATION_MODELS, _is_vit

    if encoder in FOUNDATION_MODELS or _is_vit(encoder):
        return "test_vit"
    for family in ("efficientnet", "convnext", "nfnet", "regnet", "byobnet"):
        if family in encoder:
            return "test_byobnet" if family == "regnet" else f"test_{family}"
    return "test_resnet"


class SyntheticDisks(torch.utils.data.Dataset):
    """Images with a few disks of each class (MONAI-style ``np.ogrid``), with the training targets."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int = 0, normalization: dict | None = None):
        from cellseg.imageops import normalize_image

        self.items = []
        yy, xx = np.ogrid[:size, :size]
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            img = np.full((size, size, 3), 225, np.uint8)
            inst = np.zeros((size, size), np.int64)
            types = np.zeros((size, size), np.int64)
            hv = np.zeros((2, size, size), np.float32)
            for k in range(1, 6):
                r = int(rng.integers(4, 9))
                cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
                disk = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)
                inst[disk], types[disk] = k, 1 + (k - 1) % num_classes
                img[disk] = (190 - 20 * (k % 3), 70, 90 + 30 * (k % 2))
                ys, xs = np.nonzero(disk)
                hv[0, ys, xs], hv[1, ys, xs] = (xs - cx) / r, (ys - cy) / r
            self.items.append({"image": normalize_image(img, normalization), "np": torch.from_numpy((inst > 0).astype(np.int64)),
                               "hv": torch.from_numpy(np.clip(hv, -1, 1)), "nc": torch.from_numpy(types),
                               "ignore": torch.zeros(size, size, dtype=torch.bool),
                               "inst_map": torch.from_numpy(inst), "index": torch.tensor(i)})

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def stand_in_config(cfg: Config, run_dir: Path) -> tuple[Config, list[str]]:
    """``cfg`` with a tiny encoder, 64 px crops, batch 2, two optimizer steps, on the CPU; and notes on what changed
    beyond that."""
    from cellseg.config import replace
    from cellseg.model.lora import select_blocks

    notes = []
    encoder = stand_in_encoder(cfg.ENCODER)
    changes: dict[str, Any] = dict(
        ENCODER=encoder, ENCODER_WEIGHTS="", ENCODER_INDICES=[], PATCH_SIZE=STEP_SIZE, BATCH_SIZE=STEP_BATCH,
        GRAD_ACCUM_TARGET=2 * STEP_BATCH if cfg.GRAD_ACCUM_TARGET else 0, MAX_STEPS_PER_EPOCH=STEP_COUNT,
        DEVICE="cpu", NUM_WORKERS=0, RUN_DIR=str(run_dir / "run"), CHECKPOINT_DIR=str(run_dir / "checkpoints"),
        DATA_CACHE="", USE_COMPILE=False, TENSORBOARD=False, SAVE_EVERY_STEPS=0, RESUME="never", INIT_FROM="fresh",
        LOG_EVERY=1000, OVERSAMPLE_RARE=False)
    if cfg.PRECISION in ("auto", "fp16"):
        changes["PRECISION"] = "fp32"
        notes.append(f"PRECISION={cfg.PRECISION!r} runs as fp32 on the CPU")
    if cfg.USE_COMPILE:
        notes.append("USE_COMPILE is not exercised on the CPU")
    if cfg.PHASE == 2 and encoder == "test_vit":
        try:
            select_blocks(cfg.LORA_BLOCKS, 6)  # test_vit has 6 blocks
        except ValueError:
            changes["LORA_BLOCKS"] = "last_half"
            notes.append(f"LORA_BLOCKS={cfg.LORA_BLOCKS!r} mapped to 'last_half' of the stand-in's 6 blocks")
    return replace(cfg, **changes), notes


def check_steps(cfg: Config, num_classes: int, report: Report) -> None:
    from cellseg.checkpoint import CheckpointManager
    from cellseg.distributed import DistEnv
    from cellseg.losses import loss_from_config
    from cellseg.model import build_model_from_config
    from cellseg.optim import configure_phase
    from cellseg.runtime import RunContext
    from cellseg.training.trainer import Trainer

    t0 = time.perf_counter()
    quiet = logging.getLogger("cellseg")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the stand-in's checkpoint and loop logs are not the user's run
    with tempfile.TemporaryDirectory(prefix="cellseg-preflight-") as tmp:
        try:
            tiny, notes = stand_in_config(cfg, Path(tmp))
            torch.manual_seed(tiny.SEED)
            model = build_model_from_config(tiny, num_classes=num_classes)
            n_lora = configure_phase(model, tiny)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            data = SyntheticDisks(STEP_COUNT * max(tiny.GRAD_ACCUM_TARGET, STEP_BATCH), STEP_SIZE, num_classes,
                                  normalization=model.arch["normalization"])
            ctx = RunContext(tiny, DistEnv(), torch.device("cpu"), Path(tiny.RUN_DIR))
            ckpt = CheckpointManager(tiny.checkpoint_dir(), phase=tiny.PHASE, keep_last=1, code_version="preflight")
            trainer = Trainer(ctx, model, loss_from_config(tiny, num_classes), data, validate_fn=None, ckpt=ckpt,
                              stop=None)
            stats = trainer.train_one_epoch(0)
            if trainer.scheduler.interval != "step":
                trainer.scheduler.step_on_epoch_end(0.5)
            trainer.progress["epoch"] = 1
            ckpt.save(trainer.collect(), epoch_end=True, is_best=False, reason="preflight")
        except Exception as e:  # noqa: BLE001 - any failure here is what the check exists to report
            report.problem("steps", f"two training steps on the CPU failed ({cfg.ENCODER!r} -> stand-in): "
                                    f"{type(e).__name__}: {e}")
            return
        finally:
            quiet.setLevel(level)
    params = dict(model.named_parameters())
    moved = [n for n, p in params.items() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    frozen_moved = [n for n, p in params.items() if not p.requires_grad and not torch.equal(p.detach(), before[n])]
    bad = [n for n, p in params.items() if not torch.isfinite(p.detach()).all()]
    if bad or not moved or frozen_moved:
        n_train = sum(p.requires_grad for p in params.values())
        report.problem("steps", f"after two steps: {len(bad)} non-finite parameter tensors {bad[:3]}, {len(moved)} of "
                                f"{n_train} trainable tensors changed, {len(frozen_moved)} frozen tensors changed "
                                f"{frozen_moved[:3]}. Check the learning rates, the loss and the phase set-up.")
        return
    report.ok("steps", f"{trainer.progress['step']} optimizer steps of stand-in '{tiny.ENCODER}' + {tiny.DECODER} "
                       f"(Phase {tiny.PHASE}{f', {n_lora} LoRA layers' if n_lora else ''}, {tiny.SCHEDULER}, "
                       f"accumulation {trainer.accum}), loss {stats['total']:.4f}, checkpoint saved "
                       f"({time.perf_counter() - t0:.1f} s)")
    for n in notes:
        report.note("steps", n)


# ----- the command
def preflight(values: dict[str, Any], *, gpu: str | None = None, world_size: int = 1,
              skip_steps: bool = False) -> Report:
    """Run every check on the parameter values (as read from -f / -p); returns the checklist."""
    from cellseg.memory import build_skeleton

    report = Report()
    cfg = check_parameters(values, report)
    class_names = check_data(cfg, report)
    num_classes = len(class_names) if class_names else _classes_from_checkpoints(cfg)
    if class_names is None:
        report.note("data", f"the other checks assume {num_classes} cell class(es)")
    try:
        model = build_skeleton(cfg, num_classes)
    except (ValueError, RuntimeError) as e:
        report.problem("model", f"the parameters do not build a network: {e}")
        model = None
    if model is not None:
        _guarded(report, "checkpoints", check_checkpoints, cfg, model, report)
        _guarded(report, "memory", check_memory, cfg, model, num_classes, gpu, world_size, report)
    _check_weights_file(cfg, report)
    if skip_steps:
        report.note("steps", "--skip-steps: the two CPU training steps were not run")
    else:
        check_steps(cfg, num_classes, report)
    return report


def _guarded(report: Report, check: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        report.problem(check, f"{type(e).__name__}: {e}")


def _check_weights_file(cfg: Config, report: Report) -> None:
    from cellseg.model.backbones import FOUNDATION_MODELS, UNI_WEIGHTS_HINT

    weights = "" if cfg.ENCODER_WEIGHTS in ("", "none", "None") else cfg.ENCODER_WEIGHTS
    if weights and not Path(weights).is_file():
        hint = UNI_WEIGHTS_HINT if cfg.ENCODER in FOUNDATION_MODELS else "Copy it there or set ENCODER_WEIGHTS=''."
        report.problem("model", f"ENCODER_WEIGHTS file {weights} does not exist. {hint}")
    elif not weights and cfg.ENCODER in FOUNDATION_MODELS:
        report.problem("model", f"ENCODER='{cfg.ENCODER}' needs its weights: set ENCODER_WEIGHTS. {UNI_WEIGHTS_HINT}")


def _classes_from_checkpoints(cfg: Config) -> int:
    from cellseg.checkpoint import CorruptCheckpoint, read_sidecar

    for path in (cfg.checkpoint_dir() / "latest.pt", cfg.checkpoint_dir(1) / "best.pt",
                 cfg.checkpoint_dir(1) / "latest.pt"):
        try:
            n = (read_sidecar(path).get("arch") or {}).get("num_classes")
        except CorruptCheckpoint:
            continue
        if n:
            return int(n)
    return 1


def run(args: argparse.Namespace) -> int:
    from cellseg.memory import parse_gpu

    if not args.files and not args.pairs:
        print("cellseg preflight: give the parameters with -f PARAMS.yaml and/or -p NAME VALUE.", file=sys.stderr)
        return EXIT_ARGS
    try:
        if args.gpu:
            parse_gpu(args.gpu)
        if args.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {args.world_size}.")
        values = _collect_values(args.files, args.pairs)
    except (ValueError, ConfigError) as e:
        print(f"cellseg preflight: {e}", file=sys.stderr)
        return EXIT_ARGS
    report = preflight(values, gpu=args.gpu, world_size=args.world_size, skip_steps=args.skip_steps)
    print(report.render())
    return EXIT_PROBLEMS if report.problems else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m cellseg.commands.preflight -f PARAMS.yaml ...`` is ``cellseg preflight
    -f PARAMS.yaml ...``."""
    parser = argparse.ArgumentParser(prog="cellseg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["preflight", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
