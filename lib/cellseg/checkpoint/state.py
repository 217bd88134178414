"""The checkpoint payload: network (canonical keys), optimizer, scheduler, GradScaler, progress counters, resolved
parameters, RNG states and the architecture fingerprint, in plain types only.

:func:`collect_state` returns a ``contents='full'`` payload (everything an exact resume needs); ``best.pt`` and
exported files are weights-only (:mod:`cellseg.checkpoint.contents`).

``torch.load`` defaults to ``weights_only=True`` since torch 2.6, which refuses dataclasses, Namespaces and NumPy
objects; NumPy's RNG state is therefore stored as lists, and NumPy scalars in metrics are turned into Python numbers.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from cellseg.checkpoint.base import split_base
from cellseg.checkpoint.contents import FULL
from cellseg.checkpoint.keys import canonical_param_names, canonical_state_dict, unwrap_model
from cellseg.checkpoint.sidecar import FORMAT_VERSION

log = logging.getLogger(__name__)

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def to_plain(obj: Any, where: str = "state") -> Any:
    """``obj`` with NumPy scalars/arrays turned into Python numbers/tensors (so ``weights_only`` loading accepts it)
    and every tensor copied to the CPU (a snapshot that later training steps cannot change).

    Raises:
        TypeError: an object that ``torch.load(weights_only=True)`` would refuse, naming where it sits.
    """
    if isinstance(obj, np.generic):  # before the scalars: np.float64 is a float subclass, refused by weights_only
        return obj.item()
    if isinstance(obj, torch.Tensor):
        # a CPU snapshot: the live tensors keep changing after collect_state returns; a GPU tensor is copied to the
        # CPU here (never a second copy on the GPU)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, _PLAIN_SCALARS) or isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, to_plain(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which torch.load(weights_only=True) "
                    "refuses. Store plain types (numbers, strings, lists, dicts, tensors) in checkpoint state.")


# ----- RNG -----
def collect_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, NumPy (global), torch CPU, CUDA (every device, when initialised) and named generators' states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": str(name), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() and
        torch.cuda.is_initialized() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return out


def restore_rng(rng: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back the states of :func:`collect_rng` (CUDA: as many devices as both sides have)."""
    version, internal, gauss = rng["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = rng["numpy"]
    np.random.set_state((n["bit_generator"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        if count != len(cuda):
            log.warning("checkpoint has CUDA RNG states of %d device(s), this process sees %d: restored %d",
                        len(cuda), torch.cuda.device_count(), count)
        for i in range(count):
            torch.cuda.set_rng_state(cuda[i], i)
    saved = rng.get("generators") or {}
    for k, g in (generators or {}).items():
        if k in saved:
            g.set_state(saved[k])
        else:
            log.warning("the checkpoint has no state for generator '%s': it keeps its current state", k)


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collect_rng_all_ranks(generators: dict[str, torch.Generator] | None = None) -> list[dict]:
    """Every rank's :func:`collect_rng`, gathered to all ranks (a collective: every rank must call it)."""
    import torch.distributed as dist

    mine = collect_rng(generators)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


# ----- optimizer description -----
def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """Canonical parameter names per optimizer group: optimizer state is matched to parameters by position,
    unchecked, so the names are stored to check that a resumed optimizer sees the same parameters."""
    names = canonical_param_names(model)
    return [[names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in g["params"]] for g in optimizer.param_groups]


# ----- the payload -----
def collect_state(*, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any,
                  progress: dict, config: dict | Any, generators: dict[str, torch.Generator] | None = None,
                  all_ranks_rng: bool = False, rng_ranks: list[dict] | None = None, compact: bool = True) -> dict:
    """The full training state as a ``weights_only``-loadable dict: a CPU snapshot (network in the canonical key
    space, optimizer state included) that later steps do not change; GPU tensors are copied straight to the CPU.

    Args:
        model: the network (wrappers are removed by type; weights go into the canonical key space).
        optimizer, scheduler, scaler: their ``state_dict()`` is stored (None where absent); the scheduler's
            ``interval`` ('step' | 'epoch' | 'metric') and kind are stored too.
        progress: plain dict from the loop (epoch, step, batch_in_epoch, best_metric, best_epoch, patience_counter,
            history, monitor {metric, mode}); NumPy numbers are converted.
        config: the resolved parameters (``cfg.to_dict()``, or the Config itself).
        generators: named ``torch.Generator`` objects whose states travel with the RNG states.
        all_ranks_rng: gather every rank's RNG states (a collective: every rank must call this then).
        rng_ranks: every rank's RNG states gathered beforehand with :func:`collect_rng_all_ranks` (called on all
            ranks), for a loop that builds the payload on rank 0 only; on resume each rank restores its own.
        compact: leave out the frozen encoder tensors that still hold the values of the model's weights file and
            store that file's identity instead (``base_weights``, see :mod:`cellseg.checkpoint.base`); False stores
            the whole network, as checkpoints before compact ones did.

    Raises:
        TypeError: something in ``progress``, ``config`` or a state dict is not a plain type (says where).
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    inner = unwrap_model(model)
    lora = getattr(inner, "lora_config", None)
    rng = collect_rng(generators)
    network = canonical_state_dict(inner)
    base = None
    if compact:
        network, base = split_base(inner, network)
    payload = {
        "format_version": FORMAT_VERSION,
        "contents": FULL,
        "phase": config.get("PHASE") if isinstance(config, dict) else None,
        "model": network,
        "base_weights": base,
        "arch": inner.arch_info() if hasattr(inner, "arch_info") else None,
        "lora": dict(lora) if lora else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "optimizer_params": optimizer_param_names(optimizer, inner) if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scheduler_interval": getattr(scheduler, "interval", None),
        "scheduler_kind": getattr(scheduler, "kind", type(scheduler).__name__ if scheduler is not None else None),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": progress,
        "config": config,
        "rng": rng,
        "rng_ranks": rng_ranks if rng_ranks is not None else (collect_rng_all_ranks(generators) if all_ranks_rng
                                                              else None),
    }
    return to_plain(payload, "checkpoint")


def restore_training_state(payload: dict, *, optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any,
                           restore_optimizer: bool = True,
                           generators: dict[str, torch.Generator] | None = None) -> list[str]:
    """Load optimizer (first), scheduler (second, so the loaded learning rates survive), scaler and RNG states.
    Returns notes about what was skipped."""
    notes = []
    if restore_optimizer and optimizer is not None:
        if payload.get("optimizer") is not None:
            optimizer.load_state_dict(payload["optimizer"])
        else:
            notes.append("the checkpoint has no optimizer state: the optimizer starts fresh")
    if scheduler is not None:
        if payload.get("scheduler") is not None:
            scheduler.load_state_dict(payload["scheduler"])
        else:
            notes.append("the checkpoint has no scheduler state: the schedule restarts")
    if scaler is not None:
        if payload.get("scaler") is not None:
            scaler.load_state_dict(payload["scaler"])
        else:
            notes.append("the checkpoint has no GradScaler state (saved without fp16): the scaler starts fresh")
    elif payload.get("scaler") is not None:
        notes.append("the checkpoint has a GradScaler state but this run uses none (PRECISION changed?): ignored")
    rank, world = rank_and_world()
    ranks = payload.get("rng_ranks")
    if ranks and rank < len(ranks):
        if len(ranks) != world:
            notes.append(f"RNG states were saved by {len(ranks)} ranks, this run has {world}")
        restore_rng(ranks[rank], generators)
    elif rank == 0 and payload.get("rng") is not None:
        restore_rng(payload["rng"], generators)
    elif rank == 0:
        notes.append("the checkpoint has no RNG states (weights only): the random streams keep their seeded state")
    else:
        notes.append(f"rank {rank}: no saved RNG state for this rank; it keeps its seeded state")
    for n in notes:
        log.warning("%s", n)
    return notes
