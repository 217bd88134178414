"""The validated configuration behind the notebooks' ``parameters`` cells.

Papermill injects overrides as plain assignments and only *warns* about names the notebook does not know, and its
``-p`` parser guesses types. This module turns the parameters into a typed, frozen :class:`Config`: an unknown name
is an error listing the valid ones, a wrong type or an out-of-range value names the parameter and what is allowed.
The defaults here are the real cluster run (UNI ViT-L on BCCD) and must equal the literals in the notebooks'
``parameters`` cells (a test checks it); small runs come from override files such as ``configs/tiny_cpu.yaml``.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("synthetic", "bccd", "folder", "pannuke", "consep")
DECODERS = ("hovernet", "unet_resattn")
SCHEDULERS = ("cosine_warmup", "onecycle", "cosine_restarts", "exponential", "step", "cosine", "plateau", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PHASES = (1, 2)
NP_LOSSES = ("ce_dice", "dice_focal")
MODES = ("min", "max")
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


@dataclass(frozen=True)
class Config:
    """Every knob of the workflow. Field names are the notebook parameter names."""

    # --- run and data (all notebooks) ---
    RUN_DIR: str = "runs/bccd_uni"
    DATA_CACHE: str = ""
    DATASET: str = "bccd"
    DATA_ROOT: str = "data/BCCD"
    SEED: int = 42
    DEVICE: str = "auto"
    NUM_WORKERS: int = 8
    # --- data preparation (00) ---
    SYNTH_NUM_IMAGES: int = 48
    SYNTH_IMAGE_SIZE: int = 256
    VAL_FRACTION: float = 0.2
    TEST_FRACTION: float = 0.1
    CONSEP_MERGE_CLASSES: bool = True
    QA_OVERLAYS: int = 6
    DUPLICATES: str = "keep"
    GROUP_KEY: str = ""
    # --- model (01, 02) ---
    ENCODER: str = "uni"
    ENCODER_WEIGHTS: str = "weights/uni/pytorch_model.bin"
    ENCODER_INDICES: list = field(default_factory=list)
    DECODER: str = "hovernet"
    DECODER_WIDTH: int = 64
    PATCH_SIZE: int = 256
    LORA_R: int = 8
    LORA_ALPHA: int = 16
    LORA_DROPOUT: float = 0.1
    LORA_TARGETS: list = field(default_factory=lambda: ["qkv"])
    LORA_BLOCKS: str = "all"
    CHECKPOINT_DIR: str = ""
    PRECISION: str = "auto"
    OBJECT_DIAMETER: float = 100.0
    NORM_MEAN: list = field(default_factory=list)
    NORM_STD: list = field(default_factory=list)
    INPUT_SCALE: float = 1.0
    # --- training (01) ---
    PHASE: int = 1
    EPOCHS: int = 50
    BATCH_SIZE: int = 8
    GRAD_ACCUM_TARGET: int = 16
    MAX_STEPS_PER_EPOCH: int = 0
    LR_DECODER_P1: float = 1e-3
    LR_DECODER_P2: float = 2e-4
    LR_ENCODER_P2: float = 1e-5
    LR_LORA: float = 2e-4
    WEIGHT_DECAY: float = 1e-4
    SCHEDULER: str = "cosine_warmup"
    WARMUP_STEPS: int = 50
    MIN_LR_RATIO: float = 0.01
    STEP_SIZE: int = 10
    GAMMA: float = 0.5
    RESTART_EPOCHS: int = 10
    PLATEAU_FACTOR: float = 0.5
    PLATEAU_PATIENCE: int = 3
    MONITOR_METRIC: str = "pq"
    MONITOR_MODE: str = "max"
    PATIENCE_P1: int = 10
    PATIENCE_P2: int = 10
    NP_LOSS: str = "ce_dice"
    FOCAL_GAMMA: float = 2.0
    FOCAL_ALPHA: list = field(default_factory=list)
    LOSS_WEIGHT_NP: float = 1.0
    LOSS_WEIGHT_HV: float = 1.0
    LOSS_WEIGHT_NC: float = 1.0
    HV_MSGE_WEIGHT: float = 2.0
    CLASS_WEIGHTS: list = field(default_factory=list)
    GRAD_CLIP: float = 1.0
    USE_COMPILE: bool = False
    CHANNELS_LAST: bool = False
    GRAD_CHECKPOINTING: bool = False
    AUGMENT: bool = True
    OVERSAMPLE_RARE: bool = False
    IGNORE_UNLABELLED: bool = True
    VAL_MAX_IMAGES: int = 0
    RESUME: str = "auto"
    INIT_FROM: str = "auto"
    SAVE_EVERY_STEPS: int = 0
    KEEP_LAST: int = 3
    FORCE_RECREATE: bool = False
    STRICT_LOAD: bool = True
    IGNORE_RESUME_NETWORK: bool = False
    MERGE_LORA: bool = False
    STOP_SIGNALS: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    STOP_AT: str = ""
    LOG_EVERY: int = 20
    TENSORBOARD: bool = False
    DETERMINISTIC: bool = False
    ALLOW_CHANGES: list = field(default_factory=list)
    TRAIN_ENCODER_P1: bool = False
    LR_ENCODER_P1: float = 1e-4
    # --- evaluation (02) ---
    EVAL_PHASE: int = 2
    EVAL_CHECKPOINT: str = "best"
    EVAL_SPLIT: str = "test"
    TILE_SIZE: int = 0
    TILE_OVERLAP: float = 0.25
    TTA: bool = True
    TUNE_POSTPROCESS: bool = True
    EVAL_MAX_IMAGES: int = 0
    # --- prediction (03) ---
    PREDICT_CHECKPOINT: str = "best"
    PREDICT_INPUT: list = field(default_factory=list)
    PREDICT_OUT: str = ""
    PREDICT_LEVEL: int = -1
    PREDICT_MPP: float = 0.0
    PREDICT_TISSUE: bool = True
    PREDICT_WINDOW: int = 1024
    PREDICT_BATCH: int = 4

    # ----- derived locations (never parameters, so papermill cannot leave them stale) -----
    @property
    def run_dir(self) -> Path:
        return Path(self.RUN_DIR)

    @property
    def data_cache(self) -> Path:
        return Path(self.DATA_CACHE) if self.DATA_CACHE else self.run_dir / "data"

    def phase_dir(self, phase: int | None = None) -> Path:
        """Run outputs of a phase: history, curves, params.json."""
        return self.run_dir / f"phase{phase or self.PHASE}"

    @property
    def checkpoint_root(self) -> Path:
        """``CHECKPOINT_DIR``, or ``RUN_DIR/checkpoints`` when empty: two runs never share checkpoints by accident."""
        return Path(self.CHECKPOINT_DIR) if self.CHECKPOINT_DIR else self.run_dir / "checkpoints"

    def checkpoint_dir(self, phase: int | None = None) -> Path:
        return self.checkpoint_root / f"phase{phase or self.PHASE}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Which parameters each notebook's ``parameters`` cell declares. A name of another notebook's section is accepted
# (so one override file serves every notebook) and ignored there; a name in none is an error.
_COMMON = ("RUN_DIR", "DATA_CACHE", "DATASET", "DATA_ROOT", "SEED", "DEVICE", "NUM_WORKERS")
_PREPARE = ("SYNTH_NUM_IMAGES", "SYNTH_IMAGE_SIZE", "VAL_FRACTION", "TEST_FRACTION", "CONSEP_MERGE_CLASSES", "QA_OVERLAYS",
            "DUPLICATES", "GROUP_KEY")
_MODEL = (
    "ENCODER", "ENCODER_WEIGHTS", "ENCODER_INDICES", "DECODER", "DECODER_WIDTH", "PATCH_SIZE", "LORA_R", "LORA_ALPHA",
    "LORA_DROPOUT", "LORA_TARGETS", "LORA_BLOCKS", "CHECKPOINT_DIR", "PRECISION", "OBJECT_DIAMETER",
    "NORM_MEAN", "NORM_STD", "INPUT_SCALE",
)
_TRAIN_ONLY = tuple(
    f.name for f in fields(Config) if f.name not in _COMMON + _PREPARE + _MODEL and not f.name.startswith(("EVAL_", "TILE_"))
    and f.name not in ("TTA", "TUNE_POSTPROCESS") and not f.name.startswith("PREDICT_")
)
_EVAL_ONLY = ("EVAL_PHASE", "EVAL_CHECKPOINT", "EVAL_SPLIT", "TILE_SIZE", "TILE_OVERLAP", "TTA", "TUNE_POSTPROCESS",
              "EVAL_MAX_IMAGES")
_PREDICT_ONLY = ("CHECKPOINT_DIR", "EVAL_PHASE", "PREDICT_CHECKPOINT", "EVAL_SPLIT", "PREDICT_INPUT", "PREDICT_OUT", "PREDICT_LEVEL",
                 "PREDICT_MPP", "PREDICT_TISSUE", "PREDICT_WINDOW", "PREDICT_BATCH", "TILE_SIZE", "TILE_OVERLAP", "TTA",
                 "PRECISION", "STOP_SIGNALS", "STOP_AT")
NOTEBOOK_PARAMS: dict[str, tuple[str, ...]] = {
    "00_prepare_data": _COMMON + _PREPARE,
    "01_train": _COMMON + _MODEL + _TRAIN_ONLY,
    "02_evaluate": _COMMON + _MODEL + _EVAL_ONLY,
    "03_predict": _COMMON + _PREDICT_ONLY,
}

_CHOICES: dict[str, tuple] = {
    "DATASET": DATASETS, "DECODER": DECODERS, "SCHEDULER": SCHEDULERS, "PRECISION": PRECISIONS, "PHASE": PHASES,
    "NP_LOSS": NP_LOSSES, "MONITOR_MODE": MODES, "EVAL_PHASE": PHASES, "DUPLICATES": ("keep", "drop"),
}
_POSITIVE = ("EPOCHS", "BATCH_SIZE", "PATCH_SIZE", "LORA_R", "LORA_ALPHA", "SYNTH_NUM_IMAGES", "SYNTH_IMAGE_SIZE",
             "DECODER_WIDTH", "LOG_EVERY", "KEEP_LAST", "RESTART_EPOCHS", "STEP_SIZE", "OBJECT_DIAMETER",
             "INPUT_SCALE", "PREDICT_BATCH")
_NON_NEGATIVE = ("NUM_WORKERS", "GRAD_ACCUM_TARGET", "MAX_STEPS_PER_EPOCH", "LR_DECODER_P1", "LR_DECODER_P2",
                 "LR_ENCODER_P2", "LR_LORA", "WEIGHT_DECAY", "WARMUP_STEPS", "PATIENCE_P1", "PATIENCE_P2", "FOCAL_GAMMA",
                 "LOSS_WEIGHT_NP", "LOSS_WEIGHT_HV", "LOSS_WEIGHT_NC", "HV_MSGE_WEIGHT", "GRAD_CLIP", "VAL_MAX_IMAGES",
                 "SAVE_EVERY_STEPS", "QA_OVERLAYS", "TILE_SIZE", "EVAL_MAX_IMAGES", "PLATEAU_PATIENCE", "SEED",
                 "LR_ENCODER_P1", "PREDICT_MPP")
_UNIT_INTERVAL = ("VAL_FRACTION", "TEST_FRACTION", "LORA_DROPOUT", "MIN_LR_RATIO", "TILE_OVERLAP", "GAMMA",
                  "PLATEAU_FACTOR")
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type or out of range; the message says which and how to fix it."""


def _fix_hint(name: str) -> str:
    return f"Set it in the notebook's parameters cell, in the -f YAML file, or with `-p {name} ...`."


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    expected = annotation if isinstance(annotation, type) else typing.get_origin(annotation) or annotation
    wrong = ConfigError(f"{name} must be of type {expected.__name__}, got {value!r} ({type(value).__name__}). "
                        f"{_fix_hint(name)}")
    if expected is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if isinstance(value, bool):
        raise wrong
    if expected is float and isinstance(value, int):
        return float(value)
    if expected is str and value is None:
        return ""
    if expected is list and isinstance(value, tuple):
        return list(value)
    if not isinstance(value, expected):
        raise wrong
    return value


def _check_value(name: str, value: Any) -> None:
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{name} must be one of {list(_CHOICES[name])}, got {value!r}. {_fix_hint(name)}")
    if name in _POSITIVE and not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}. {_fix_hint(name)}")
    if name in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}. {_fix_hint(name)}")
    if name in _UNIT_INTERVAL and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value!r}. {_fix_hint(name)}")
    if name == "STOP_SIGNALS":
        bad = [s for s in value if s not in SIGNALS]
        if bad:
            raise ConfigError(f"STOP_SIGNALS entries must be among {list(SIGNALS)}, got {bad}. {_fix_hint(name)}")
    if name in ("ENCODER_INDICES",) and not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ConfigError(f"ENCODER_INDICES must be a list of block indices (ints), got {value!r}. {_fix_hint(name)}")
    if name in ("NORM_MEAN", "NORM_STD") and value:
        from cellseg.model.normalization import check_normalization

        try:
            check_normalization(value, value if name == "NORM_STD" else [1.0, 1.0, 1.0], where=name)
        except ValueError as e:
            raise ConfigError(f"{name} must be empty (the encoder's own normalisation) or 3 finite numbers (RGB in "
                              f"[0, 1]{', each > 0' if name == 'NORM_STD' else ''}), got {value!r}. "
                              f"{_fix_hint(name)}") from e
    if name in ("CLASS_WEIGHTS", "FOCAL_ALPHA") and not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in value):
        raise ConfigError(f"{name} must be a list of non-negative numbers, got {value!r}. {_fix_hint(name)}")
    if name == "LORA_TARGETS" and (not value or not all(isinstance(t, str) and t for t in value)):
        raise ConfigError(f"LORA_TARGETS must be a non-empty list of module names such as ['qkv'], got {value!r}.")
    if name == "LORA_BLOCKS" and not re.fullmatch(r"all|last_half|\d+-\d+|\d+(,\d+)*", value):
        raise ConfigError(f"LORA_BLOCKS must be 'all', 'last_half', a range 'A-B' or a list '0,5,11', got {value!r}. "
                          f"{_fix_hint(name)}")
    if name == "RESUME" and value not in ("auto", "never") and not value.endswith(".pt"):
        raise ConfigError(f"RESUME must be 'auto', 'never' or a path to a .pt checkpoint, got {value!r}. {_fix_hint(name)}")
    if name == "INIT_FROM" and value not in ("auto", "fresh") and not value.endswith(".pt"):
        raise ConfigError(f"INIT_FROM must be 'auto' (Phase 1's best, else latest), 'fresh' or a path to a .pt file, "
                          f"got {value!r}. {_fix_hint(name)}")
    if name == "EVAL_CHECKPOINT" and value not in ("best", "latest") and not value.endswith(".pt"):
        raise ConfigError(f"EVAL_CHECKPOINT must be 'best', 'latest' or a path to a .pt file, got {value!r}.")
    if name == "EVAL_SPLIT" and value not in ("train", "val", "test"):
        raise ConfigError(f"EVAL_SPLIT must be one of ['train', 'val', 'test'], got {value!r}. {_fix_hint(name)}")
    if name == "DEVICE" and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
        raise ConfigError(f"DEVICE must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}. {_fix_hint(name)}")
    if name == "ALLOW_CHANGES" and value:
        from cellseg.checkpoint.identity import allowed_change_names

        allowed = allowed_change_names()
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ConfigError(f"ALLOW_CHANGES names differences from a checkpoint's run that RESUME may accept; "
                              f"{bad} are not among them. Allowed: {allowed}. (Parameters not listed may change "
                              f"freely.) {_fix_hint(name)}")
    if name == "GROUP_KEY" and value and value != "groups.csv" and not re.fullmatch(r"prefix:.+", value):
        raise ConfigError(f"GROUP_KEY must be '' (no groups), 'prefix:SEP' (e.g. 'prefix:_') or 'groups.csv', got "
                          f"{value!r}. {_fix_hint(name)}")
    if name == "INPUT_SCALE" and value > 4.0:
        raise ConfigError(f"INPUT_SCALE resizes images before the network (0.5 halves each side); it must lie in (0, 4], "
                          f"got {value!r}. {_fix_hint(name)}")
    if name == "PREDICT_CHECKPOINT" and value not in ("best", "latest") and not value.endswith(".pt"):
        raise ConfigError(f"PREDICT_CHECKPOINT must be 'best', 'latest' (of EVAL_PHASE) or a path to a .pt file, got "
                          f"{value!r}. {_fix_hint(name)}")
    if name == "PREDICT_INPUT" and not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"PREDICT_INPUT must be a list of files, folders or globs (strings), got {value!r}. "
                          f"{_fix_hint(name)}")
    if name == "PREDICT_LEVEL" and value < -1:
        raise ConfigError(f"PREDICT_LEVEL must be -1 (pick by PREDICT_MPP) or a pyramid level >= 0, got {value!r}. "
                          f"{_fix_hint(name)}")
    if name == "PREDICT_WINDOW" and value < 64:
        raise ConfigError(f"PREDICT_WINDOW must be >= 64 pixels (window read per step), got {value!r}. "
                          f"{_fix_hint(name)}")
    if name == "RUN_DIR" and not value:
        raise ConfigError("RUN_DIR must not be empty: every output of a run goes under it.")


def parameters_from_namespace(namespace: dict[str, Any]) -> dict[str, Any]:
    """Pick the parameters out of a notebook's ``globals()``.

    In an IPython kernel, only the names the latest run of the parameters cell (and papermill's injected cell) set:
    the kernel also holds every variable of the cells that ran since, and those are not parameters ("Run All" twice).
    Elsewhere: public names bound to literal values.
    """
    from cellseg.notebook_params import parameter_cell_names

    history = namespace.get("In")
    names = parameter_cell_names(history, (f.name for f in fields(Config))) if isinstance(history, list) else None
    if names is not None:
        return {k: namespace[k] for k in names if k in namespace}
    literal = (int, float, str, bool, list, tuple, dict, type(None))
    return {
        k: v for k, v in namespace.items()
        if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, literal)
        and not isinstance(v, types.ModuleType) and _IDENT.match(k)
    }


def resolve_config(values: dict[str, Any], notebook: str = "01_train") -> Config:
    """Validate parameter values into a :class:`Config`.

    Args:
        values: parameter name -> value, e.g. ``parameters_from_namespace(globals())`` or a YAML file's mapping.
        notebook: which notebook's parameters are expected; names of the other notebooks are accepted and ignored.

    Raises:
        ConfigError: unknown names (listing the valid ones), wrong types or values out of range.
    """
    if notebook not in NOTEBOOK_PARAMS:
        raise ConfigError(f"notebook must be one of {list(NOTEBOOK_PARAMS)}, got {notebook!r}")
    known = {f.name: f for f in fields(Config)}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        valid = ", ".join(NOTEBOOK_PARAMS[notebook])
        raise ConfigError(
            f"unknown parameter(s) {unknown} for notebooks/{notebook}.ipynb (papermill only warns about these; a typo "
            f"would silently keep the default). Valid names: {valid}. Others accepted from shared override files: "
            f"{', '.join(sorted(set(known) - set(NOTEBOOK_PARAMS[notebook])))}."
        )
    hints = typing.get_type_hints(Config)
    clean: dict[str, Any] = {}
    for name, value in values.items():
        value = _check_type(name, value, hints[name])
        _check_value(name, value)
        clean[name] = value
    cfg = Config(**clean)
    _check_cross(cfg, notebook)
    return cfg


def _check_cross(cfg: Config, notebook: str) -> None:
    if cfg.FOCAL_ALPHA and len(cfg.FOCAL_ALPHA) != 2:
        raise ConfigError(f"FOCAL_ALPHA weighs the NP branch's two classes (background, foreground): give 2 numbers or "
                          f"an empty list, got {cfg.FOCAL_ALPHA}.")
    from cellseg.monitor import check_monitor

    monitor_problem = check_monitor(cfg.MONITOR_METRIC, cfg.MONITOR_MODE)
    if monitor_problem:
        raise ConfigError(monitor_problem)
    if notebook == "01_train" and cfg.GRAD_ACCUM_TARGET and cfg.GRAD_ACCUM_TARGET < cfg.BATCH_SIZE:
        raise ConfigError(f"GRAD_ACCUM_TARGET (effective batch, {cfg.GRAD_ACCUM_TARGET}) must be 0 (no accumulation) or "
                          f">= BATCH_SIZE ({cfg.BATCH_SIZE}).")
    if bool(cfg.NORM_MEAN) != bool(cfg.NORM_STD):
        raise ConfigError(f"NORM_MEAN and NORM_STD go together: got NORM_MEAN={cfg.NORM_MEAN} and NORM_STD={cfg.NORM_STD}. "
                          "Set both (3 numbers each) or leave both empty ([]) for the encoder's own normalisation.")


def load_params_file(path: str | Path) -> dict[str, Any]:
    """Read a papermill-style YAML parameter file (safe loader)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} does not exist. Pass an existing YAML file with -f.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"parameter file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"parameter file {path} must hold a mapping NAME: value, got {type(data).__name__}.")
    return data


def parse_cli_value(raw: str) -> Any:
    """Parse a ``-p NAME VALUE`` value the way papermill does (YAML scalars), for the ``cellseg`` command."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def config_from_cli(files: list[str] | None, pairs: list[list[str]] | None, notebook: str = "01_train") -> Config:
    """Build a Config from ``-f FILE`` and ``-p NAME VALUE`` arguments (later ones win, as in papermill)."""
    values: dict[str, Any] = {}
    for f in files or []:
        values.update(load_params_file(f))
    for name, raw in pairs or []:
        values[name] = parse_cli_value(raw)
    return resolve_config(values, notebook)


def replace(cfg: Config, **changes: Any) -> Config:
    """A validated copy of ``cfg`` with some parameters changed."""
    values = cfg.to_dict()
    values.update(changes)
    return resolve_config(values)


__all__ = ["Config", "ConfigError", "NOTEBOOK_PARAMS", "resolve_config", "parameters_from_namespace",
           "load_params_file", "config_from_cli", "parse_cli_value", "replace"]


# One line per parameter: the trailing comment in the notebooks' parameters cells and the `cellseg` help.
PARAM_HELP: dict[str, str] = {
    "RUN_DIR": "every output of this run goes under this folder (phase1/, phase2/, eval/, data/)",
    "DATA_CACHE": "prepared dataset folder; empty means RUN_DIR/data",
    "DATASET": "synthetic | bccd | folder | pannuke | consep",
    "DATA_ROOT": "raw dataset folder (BCCD: Annotations/, JPEGImages/, ImageSets/); unused for synthetic",
    "SEED": "seed of data order, augmentation, initialisation",
    "DEVICE": "auto (CUDA when present) | cpu | cuda | cuda:N",
    "NUM_WORKERS": "DataLoader worker processes (forkserver; 0 loads in the main process)",
    "SYNTH_NUM_IMAGES": "synthetic dataset: number of images",
    "SYNTH_IMAGE_SIZE": "synthetic dataset: image side in pixels",
    "VAL_FRACTION": "validation share for datasets without an official split",
    "TEST_FRACTION": "test share for datasets without an official split",
    "CONSEP_MERGE_CLASSES": "CoNSeP: merge 7 classes into HoVer-Net's 4",
    "QA_OVERLAYS": "number of overlay figures in the data QA report",
    "DUPLICATES": "keep | drop: images identical or nearly identical to one of another split (listed in the QA report)",
    "GROUP_KEY": "folder: keep one slide's tiles in one split: '' | prefix:SEP (name up to SEP) | groups.csv",
    "ENCODER": "uni | uni2 | any timm ViT (test_vit, vit_base_patch16_224) | timm CNN (resnet50, efficientnet_b4)",
    "ENCODER_WEIGHTS": "local state-dict file of the encoder; empty for random init (never downloaded)",
    "ENCODER_INDICES": "ViT blocks feeding the decoder; empty for four evenly spaced (UNI: 5, 11, 17, 23)",
    "DECODER": "hovernet (UNETR-style, one path per branch) | unet_resattn",
    "DECODER_WIDTH": "decoder base channel width",
    "PATCH_SIZE": "training crop side in pixels",
    "LORA_R": "Phase 2: LoRA rank",
    "LORA_ALPHA": "Phase 2: LoRA scaling alpha (update scaled by alpha / r)",
    "LORA_DROPOUT": "Phase 2: dropout on the LoRA path",
    "LORA_TARGETS": "Phase 2: names of the encoder's Linear layers to adapt",
    "LORA_BLOCKS": "Phase 2: all | last_half | A-B | i,j,k (encoder blocks that get LoRA)",
    "CHECKPOINT_DIR": "checkpoints go to CHECKPOINT_DIR/phase{N}/; empty means RUN_DIR/checkpoints",
    "PRECISION": "auto (bf16 on capable GPUs, else fp32) | fp32 | bf16 | fp16 (GradScaler)",
    "OBJECT_DIAMETER": "typical cell diameter in pixels; scales the post-processing (BCCD ~100, nuclei at 40x ~20)",
    "NORM_MEAN": "input mean per RGB channel in [0, 1]; empty for the encoder's own (weights config, timm, UNI card)",
    "NORM_STD": "input std per RGB channel; empty for the encoder's own (set together with NORM_MEAN)",
    "INPUT_SCALE": "resize images by this factor for the network (0.5: BCCD at half size); predictions map back to full size",
    "PHASE": "1: frozen encoder, decoder trains | 2: LoRA on the encoder (starts from Phase 1)",
    "EPOCHS": "epochs of this phase",
    "BATCH_SIZE": "images per device per forward pass",
    "GRAD_ACCUM_TARGET": "effective batch over devices and accumulation; 0 for no accumulation",
    "MAX_STEPS_PER_EPOCH": "cap on optimizer steps per epoch; 0 for the whole training split",
    "LR_DECODER_P1": "Phase 1 decoder learning rate",
    "LR_DECODER_P2": "Phase 2 decoder learning rate",
    "LR_ENCODER_P2": "Phase 2 learning rate of a CNN encoder (ViT encoders get LoRA instead)",
    "LR_LORA": "Phase 2 LoRA learning rate",
    "WEIGHT_DECAY": "AdamW weight decay (never on norms and biases)",
    "SCHEDULER": "cosine_warmup | onecycle | cosine_restarts (per step) | exponential | step | cosine | constant (per epoch) | plateau",
    "WARMUP_STEPS": "optimizer steps of linear warm-up (cosine_warmup; onecycle's rising part)",
    "MIN_LR_RATIO": "cosine schedules end at this fraction of each group's rate",
    "STEP_SIZE": "step schedule: epochs between decays",
    "GAMMA": "step / exponential schedules: decay factor",
    "RESTART_EPOCHS": "cosine_restarts: epochs per cycle",
    "PLATEAU_FACTOR": "plateau: factor applied when the metric stalls",
    "PLATEAU_PATIENCE": "plateau: epochs without improvement before a decay",
    "MONITOR_METRIC": "validation metric for best.pt, early stopping and plateau (pq, mpq, det_f1, dice, val_loss, ...)",
    "MONITOR_MODE": "max | min",
    "PATIENCE_P1": "Phase 1 early-stopping patience in epochs (0 turns it off)",
    "PATIENCE_P2": "Phase 2 early-stopping patience in epochs (0 turns it off)",
    "NP_LOSS": "ce_dice | dice_focal",
    "FOCAL_GAMMA": "dice_focal: focusing parameter",
    "FOCAL_ALPHA": "dice_focal: [background, foreground] weights; empty for none",
    "LOSS_WEIGHT_NP": "weight of the NP branch loss",
    "LOSS_WEIGHT_HV": "weight of the HV branch loss",
    "LOSS_WEIGHT_NC": "weight of the NC branch loss (default equal to HV)",
    "HV_MSGE_WEIGHT": "weight of the HV gradient term (MSGE) inside the HV loss",
    "CLASS_WEIGHTS": "NC cross-entropy weights [background, class 1, ...]; empty: from the training pixels (sqrt, cap 10)",
    "GRAD_CLIP": "max gradient norm; 0 for no clipping",
    "USE_COMPILE": "torch.compile the network",
    "CHANNELS_LAST": "channels_last memory format for the convolutional parts",
    "GRAD_CHECKPOINTING": "recompute encoder blocks in the backward pass (less memory, Phase 2)",
    "AUGMENT": "geometric + colour augmentation of training crops",
    "OVERSAMPLE_RARE": "sample images with rare classes more often; centre half the crops on a rare-class cell",
    "IGNORE_UNLABELLED": "unlabelled foreground (e.g. BCCD's unboxed cells) is ignored; False: trained as background",
    "VAL_MAX_IMAGES": "cap on validation images per epoch; 0 for all",
    "RESUME": "auto (newest valid checkpoint of this phase) | never | path/to/file.pt",
    "INIT_FROM": "Phase 2 start: auto (Phase 1 best, else latest) | fresh | path/to/file.pt",
    "SAVE_EVERY_STEPS": "also save latest.pt every N optimizer steps; 0 for epoch ends only",
    "KEEP_LAST": "number of epoch_XXXX.pt files kept",
    "FORCE_RECREATE": "start from scratch even if incompatible checkpoints exist (they are moved aside, not deleted)",
    "STRICT_LOAD": "False loads every tensor whose name and shape match and reports the rest",
    "IGNORE_RESUME_NETWORK": "resume counters, history and RNG but not the network and optimizer",
    "MERGE_LORA": "allow merging LoRA adapters into the base weights when a LoRA checkpoint meets a plain model",
    "STOP_SIGNALS": "signals that request a checkpoint-and-exit at the next step",
    "STOP_AT": "wall-clock deadline (ISO time or epoch seconds) for a checkpoint-and-exit; empty for none",
    "LOG_EVERY": "one log line every N optimizer steps",
    "TENSORBOARD": "also write TensorBoard event files under RUN_DIR/phase{N}/tensorboard",
    "DETERMINISTIC": "deterministic algorithms (bit-exact resumes on CPU; slower on GPU)",
    "ALLOW_CHANGES": "names of run settings RESUME may accept as changed from the checkpoint's run; empty accepts none",
    "TRAIN_ENCODER_P1": "Phase 1 trains the whole network, encoder included (needed without ENCODER_WEIGHTS)",
    "LR_ENCODER_P1": "Phase 1 encoder learning rate when TRAIN_ENCODER_P1 is True",
    "EVAL_PHASE": "phase whose checkpoint is evaluated",
    "EVAL_CHECKPOINT": "best | latest | path/to/file.pt",
    "EVAL_SPLIT": "train | val | test",
    "TILE_SIZE": "sliding-window tile side for inference; 0 for the whole image at once",
    "TILE_OVERLAP": "overlap fraction between inference tiles",
    "TTA": "test-time augmentation (flips, rot90) with correct HV handling",
    "TUNE_POSTPROCESS": "grid-search post-processing parameters on the validation split first",
    "EVAL_MAX_IMAGES": "cap on evaluated images; 0 for all",
    "PREDICT_CHECKPOINT": "best | latest (of EVAL_PHASE) | path/to/file.pt",
    "PREDICT_INPUT": "images, folders, globs, pyramidal TIFFs, slides; empty for the EVAL_SPLIT images of the cache",
    "PREDICT_OUT": "output folder (one subfolder per input); empty means RUN_DIR/predict",
    "PREDICT_LEVEL": "pyramid level to read; -1 picks the level closest to PREDICT_MPP",
    "PREDICT_MPP": "target resolution in µm/px; 0 for the training resolution stored in the checkpoint (else level 0)",
    "PREDICT_TISSUE": "skip windows without tissue on slides (thumbnail tissue detection)",
    "PREDICT_WINDOW": "side of the window read and post-processed per step (core + margins of OBJECT_DIAMETER)",
    "PREDICT_BATCH": "tiles per forward pass",
}
assert set(PARAM_HELP) == {f.name for f in fields(Config)}, "every parameter needs a help line"
