"""One canonical key space for model weights, whatever wraps the model.

- Wrappers are removed *by type* from model objects (``DistributedDataParallel`` / ``DataParallel`` -> ``.module``,
  ``torch.compile``'s ``OptimizedModule`` -> ``._orig_mod``), never by attribute name: timm's ``unwrap_model`` tests
  ``hasattr(model, "module")``, which misfires on a model with a child called ``module``.
- In key strings, leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) segments are stripped in any order and
  repetition (timm's ``clean_state_dict`` strips each once, so ``_orig_mod.module.x`` comes back as ``module.x``), and
  inner ``_orig_mod.`` segments (a compiled submodule) are dropped.
- LoRA layers (peft, Hu et al. 2021) are written as the plain layer's keys (``...qkv.weight``, ``...qkv.bias``) plus
  adapter keys without the adapter name (``...qkv.lora_A.weight``, ``...qkv.lora_B.weight``), so that a LoRA
  checkpoint's base weights load directly into a plain model and a plain checkpoint into a wrapped one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

WRAPPER_SEGMENTS = ("module", "_orig_mod")
COMPILE_SEGMENT = "_orig_mod"
LORA_BASE = "base_layer"
LORA_ADAPTERS = ("lora_A", "lora_B")


def _wrapper_types() -> tuple[type, ...]:
    types: list[type] = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    try:
        from torch._dynamo.eval_frame import OptimizedModule

        types.append(OptimizedModule)
    except ImportError:  # pragma: no cover - torch builds without dynamo
        pass
    return tuple(types)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside any nesting of DDP / DataParallel / torch.compile wrappers (checked by type)."""
    types = _wrapper_types()
    seen = 0
    while isinstance(model, types):
        model = model._orig_mod if type(model).__name__ == "OptimizedModule" else model.module
        seen += 1
        if seen > 32:  # a wrapper whose .module was set to itself (or a longer cycle)
            raise RuntimeError("more than 32 nested model wrappers: is a wrapper wrapping itself?")
    return model


def strip_wrappers(key: str) -> str:
    """Remove leading ``module.`` / ``_orig_mod.`` segments (any order and repetition) and inner ``_orig_mod.``."""
    parts = key.split(".")
    i = 0
    while i < len(parts) - 1 and parts[i] in WRAPPER_SEGMENTS:
        i += 1
    return ".".join(p for p in parts[i:] if p != COMPILE_SEGMENT)


def lora_prefixes_from_keys(keys: Iterable[str]) -> set[str]:
    """Layer names (wrapper-stripped) that carry LoRA adapters, recognised by their ``lora_A`` / ``lora_B`` keys."""
    out = set()
    for key in keys:
        parts = strip_wrappers(key).split(".")
        for j, part in enumerate(parts):
            if part in LORA_ADAPTERS and j > 0:
                out.add(".".join(parts[:j]))
                break
    return out


def lora_prefixes_from_model(model: nn.Module) -> set[str]:
    """Names (wrapper-stripped) of the model's peft LoRA layers, found by type."""
    lora_mod = sys.modules.get("peft.tuners.lora")
    if lora_mod is None:  # peft never imported: no LoRA layer can exist
        return set()
    layer_type = lora_mod.LoraLayer
    return {strip_wrappers(name) for name, m in unwrap_model(model).named_modules() if isinstance(m, layer_type)}


def canonical_key(key: str, lora_prefixes: set[str] | frozenset[str] = frozenset()) -> str:
    """The canonical name of one key, given the LoRA layer names (wrapper-stripped) of its state dict."""
    parts = strip_wrappers(key).split(".")
    if lora_prefixes:
        for j in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:j]) in lora_prefixes:
                head, rest = parts[:j], parts[j:]
                if rest[0] == LORA_BASE:
                    rest = rest[1:]
                elif rest[0] in LORA_ADAPTERS and len(rest) == 3:
                    rest = [rest[0], rest[2]]  # drop the adapter name ('default')
                return ".".join(head + rest)
    return ".".join(parts)


def canonical_names(keys: Iterable[str], lora_prefixes: set[str] | None = None) -> dict[str, str]:
    """original key -> canonical key for a whole state dict.

    Raises:
        ValueError: two keys collapse onto one canonical name (e.g. two LoRA adapters on one layer, or the same
            weight stored with and without a ``module.`` prefix).
    """
    keys = list(keys)
    prefixes = lora_prefixes_from_keys(keys) if lora_prefixes is None else lora_prefixes
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for k in keys:
        c = canonical_key(k, prefixes)
        if c in seen:
            raise ValueError(f"state dict keys '{seen[c]}' and '{k}' both map to '{c}': more than one LoRA adapter on "
                             "a layer, or the same weight saved twice under different wrapper prefixes. cellseg "
                             "stores one adapter per layer; merge or delete the extra one before saving.")
        seen[c] = k
        out[k] = c
    return out


def model_key_map(model: nn.Module) -> dict[str, str]:
    """canonical key -> the key of the (unwrapped) model's own ``state_dict``."""
    inner = unwrap_model(model)
    names = canonical_names(inner.state_dict().keys(), lora_prefixes_from_model(inner))
    return {c: k for k, c in names.items()}


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the canonical key space, detached (still on their device and shared with the model:
    :func:`cellseg.checkpoint.collect_state` copies them to the CPU)."""
    inner = unwrap_model(model)
    sd = inner.state_dict()
    names = canonical_names(sd.keys(), lora_prefixes_from_model(inner))
    return {names[k]: v.detach() for k, v in sd.items()}


def canonicalize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A foreign state dict (any wrapper prefixes, raw peft keys) rewritten into the canonical key space."""
    names = canonical_names(state.keys())
    return {names[k]: v for k, v in state.items()}


def canonical_param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> canonical name, for describing an optimizer's parameter groups."""
    inner = unwrap_model(model)
    prefixes = lora_prefixes_from_model(inner)
    return {id(p): canonical_key(n, prefixes) for n, p in inner.named_parameters()}


def manifest(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """key -> shape (as a list) of a state dict: what the sidecar stores for the compatibility check."""
    return {k: list(v.shape) for k, v in state.items()}
