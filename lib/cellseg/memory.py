"""The memory model: peak GPU memory of one training step, predicted before a job is queued.

Peak training memory is parameters + AdamW states (trainable parameters only) + the batch and the network's outputs
+ the tensors autograd keeps for the backward pass + the backward pass's largest excess over them + framework
overhead. None of it is a rule of thumb: the network the parameters describe is built on the meta device (no
memory, any timm ViT / CNN, LoRA applied by the same :func:`cellseg.optim.configure_phase` as training) and its
forward pass is replayed *symbolically*, op by op, following what autograd saves for each op (``Linear`` keeps its
input only when its weight trains and its weight only when its input needs a gradient, ``Conv`` keeps both, norms
keep their input and two statistics, fused SDPA keeps q, k, v, the output and a log-sum-exp, i.e. O(N) not O(N^2)),
which dtype autocast gives each tensor on the target device (CUDA runs LayerNorm / GroupNorm / softmax in fp32, the CPU
in the input dtype; frozen weights are cast per use and their low-precision copy is kept for backward, trainable
ones are cached), and which storages are shared (views, in-place ReLU). Every op is logged, so the backward pass
is replayed too, in reverse: each op allocates its inputs' gradients while its output's is alive (plus its kernel's
working copies for convolutions), a saved storage is freed after the backward of the first op that kept it, an
activation's gradient after its producer's backward, parameters' gradients stay. So:

- Phase 1 (frozen encoder under ``no_grad``): nothing of the encoder is kept, only the decoder's tensors.
- Phase 2 with LoRA: every block after the first adapted one keeps its activations; with gradient checkpointing
  only each block's input is kept and a block's saves come back while the backward pass goes through it.
- CNN encoders trained in Phase 2 have no common closed form: their saved bytes are counted once on the CPU on a
  small reference input and scaled with batch x pixels (exact for convolutional networks); the replay treats the
  CNN as one op.
- The loss keeps per-pixel tensors (one-hot maps, softmax outputs, Sobel gradients); they, and its backward pass's
  peak, are counted once on a 32x32 batch and scaled with batch x pixels.

Validated (``tests/test_memory.py``, ``benchmarks/RESULTS.md``) on the CPU for tiny models: the saved tensors
against :func:`measure_saved_bytes` (``torch.autograd.graph.saved_tensors_hooks``, unique storages), and the whole
step's peak against the CPU allocator's, every allocation and free of a step recorded by ``torch.profiler``
(:func:`measure_step_peak`). On the CUDA rules without a GPU: the saved tensors of the real network, UNI-sized
included, run on fake CUDA tensors with CUDA autocast (:func:`measure_cuda_saved`), byte-exact. Not yet checked on a
GPU: the backward pass's working set there, cuDNN's workspaces (taken as the CPU kernels' working copies), the CUDA
context size and the allocator slack below; ``benchmarks/train_throughput.py`` prints the prediction next to
``torch.cuda.max_memory_allocated``. The estimate
is for eager execution. Under ``torch.compile`` the peak differs: AOTAutograd recomputes cheap pointwise ops, but
Inductor lays out its own buffers. For the tiny CPU model the compiled step peaked 7 % above the eager prediction
(``benchmarks/RESULTS.md``); this has not been measured on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cellseg.branches import Branch
from cellseg.config import Config

GiB = 1 << 30
MiB = 1 << 20

# CUDA context + kernels loaded lazily by a PyTorch training process: reserved by the driver, outside
# max_memory_allocated, inside the card's memory (typically 0.3-0.6 GiB with CUDA 12 lazy loading).
CUDA_CONTEXT_BYTES = 512 * MiB
# The caching allocator rounds and splits blocks: reserved memory exceeds the allocated peak by a few to ~15 %;
# cuBLAS / cuDNN workspaces come out of the same pool.
ALLOCATOR_SLACK = 0.10

# What a training batch carries per pixel besides the image (cellseg.data.dataset.CellDataset): np, nc and
# inst_map as int64, hv as 2 x float32, ignore as bool.
TARGET_BYTES_PER_PIXEL = 8 + 8 + 8 + 2 * 4 + 1

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "bool": 1, "i64": 8}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


# ----------------------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GPU:
    """A GPU's memory as the driver reports it and whether it runs bf16 natively (compute capability >= 8.0, the rule
    of :func:`cellseg.devices.native_bf16` that ``PRECISION='auto'`` follows; T4/V100 only emulate it)."""

    name: str
    memory_bytes: int
    bf16: bool


GPUS: dict[str, GPU] = {
    "v100-16gb": GPU("NVIDIA V100 16GB", 16 * GiB, False),
    "v100-32gb": GPU("NVIDIA V100 32GB", 32 * GiB, False),
    "t4-16gb": GPU("NVIDIA T4 16GB", 15 * GiB, False),
    "titan-12gb": GPU("NVIDIA TITAN V / Xp 12GB", 12 * GiB, False),
    "rtx3060-12gb": GPU("NVIDIA RTX 3060 12GB", 12 * GiB, True),
    "rtx3090-24gb": GPU("NVIDIA RTX 3090 24GB", 24 * GiB, True),
    "rtx4090-24gb": GPU("NVIDIA RTX 4090 24GB", 24 * GiB, True),
    "a10-24gb": GPU("NVIDIA A10 24GB", 24 * GiB, True),
    "a40-48gb": GPU("NVIDIA A40 48GB", 48 * GiB, True),
    "a6000-48gb": GPU("NVIDIA RTX A6000 48GB", 48 * GiB, True),
    "l40s-48gb": GPU("NVIDIA L40S 48GB", 48 * GiB, True),
    "a100-40gb": GPU("NVIDIA A100 40GB", 40 * GiB, True),
    "a100-80gb": GPU("NVIDIA A100 80GB", 80 * GiB, True),
    "h100-80gb": GPU("NVIDIA H100 80GB", 80 * GiB, True),
    "h100-94gb": GPU("NVIDIA H100 NVL 94GB", 94 * GiB, True),
    "h200-141gb": GPU("NVIDIA H200 141GB", 141 * GiB, True),
}


def parse_gpu(spec: str) -> GPU:
    """A GPU by name (``a100-40gb``, ``h100-80gb``, ...) or by size in GB (``12gb``, ``12``, ``10.5``; bf16 assumed).

    Raises:
        ValueError: neither a known name nor a positive size.
    """
    key = str(spec).strip().lower()
    if key in GPUS:
        return GPUS[key]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gb|gib|g)?", key)
    if m and float(m.group(1)) > 0:
        return GPU(f"{m.group(1)} GB GPU (bf16 assumed)", int(float(m.group(1)) * GiB), True)
    raise ValueError(f"--gpu must be one of {sorted(GPUS)} or a memory size in GB such as '12gb' or '10.5', "
                     f"got {spec!r}.")


# ----------------------------------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training step on one device, in bytes, per component.

    The peak falls in the backward pass: ``allocated`` = what lives through the whole step (parameters, optimizer
    states, DDP buckets, the batch) + what autograd keeps at the end of the forward pass (``activations`` and
    ``weight_casts``) + ``transient``, the backward pass's largest excess over that."""

    parameters: int  # every parameter, fp32 (autocast keeps fp32 master weights)
    gradients: int  # trainable parameters' gradients (fp32), all alive from the end of backward to the next step
    held_gradients: int  # with accumulation: the gradients of the earlier micro-batches, alive all through, else 0
    buckets: int  # DDP's gradient buckets (a copy of the gradients) with several devices, else 0
    optimizer: int  # AdamW exp_avg + exp_avg_sq (fp32) and step counters
    batch: int  # the batch's targets and image, and the network's outputs, held by the training loop
    activations: int  # tensors kept for backward at the end of the forward pass (input batch included)
    weight_casts: int  # low-precision weight copies kept for backward (bf16/fp16 only)
    transient: int  # backward's peak over the forward's end: gradients in flight and so far, recomputed blocks
    overhead: int  # CUDA context + allocator slack (0 on the CPU)
    activations_by_part: dict[str, int] = field(default_factory=dict)  # encoder / decoder / loss
    saved_by_part: dict[str, int] = field(default_factory=dict)  # activations + weight copies per part
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def allocated(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should read."""
        return (self.parameters + self.held_gradients + self.buckets + self.optimizer + self.batch + self.activations
                + self.weight_casts + self.transient)

    @property
    def total(self) -> int:
        """What the card must hold."""
        return self.allocated + self.overhead

    @property
    def saved(self) -> int:
        """Everything autograd keeps for backward (compare with :func:`measure_saved_bytes`)."""
        return self.activations + self.weight_casts

    def __str__(self) -> str:
        s = self.settings
        head = (f"memory estimate: {s.get('encoder')} + {s.get('decoder')}, Phase {s.get('phase')}, batch "
                f"{s.get('batch_size')} x {s.get('image_size')} px, {s.get('precision')}, gradient checkpointing "
                f"{'on' if s.get('grad_checkpointing') else 'off'}, {s.get('device')}")
        rows = [("parameters", self.parameters, f"{s.get('params_total', 0):,} values, fp32"),
                ("optimizer (AdamW)", self.optimizer, f"2 fp32 states per trainable value "
                                                      f"({s.get('params_trainable', 0):,})"),
                ("batch + outputs", self.batch, "targets, image, network outputs"),
                ("activations", self.activations, ", ".join(f"{k} {_fmt(v)}" for k, v in
                                                             self.activations_by_part.items())),
                ("weight copies", self.weight_casts, "low-precision casts kept for backward"),
                ("backward", self.transient, f"peak over the forward's end: gradients in flight and so far "
                                             f"(parameters' in all: {_fmt(self.gradients)})")]
        if self.held_gradients:
            rows.append(("gradients held", self.held_gradients, f"accumulated over {s.get('accumulation')} "
                                                                 "micro-batches"))
        if self.buckets:
            rows.append(("DDP buckets", self.buckets, "a copy of the gradients"))
        rows.append(("overhead", self.overhead, "CUDA context + allocator slack" if self.overhead else "none on CPU"))
        lines = [head] + [f"  {name:<20} {_fmt(v):>10}  {note}" for name, v, note in rows]
        lines.append(f"  {'allocated peak':<20} {_fmt(self.allocated):>10}  (torch.cuda.max_memory_allocated)")
        lines.append(f"  {'total':<20} {_fmt(self.total):>10}")
        return "\n".join(lines)


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


class DoesNotFit(ValueError):
    """Not even one image per step fits the given memory."""


# -------------------------------------------------------------------------------------------- the symbolic replay
@dataclass
class _Sym:
    """A symbolic tensor: shape, dtype, whether it requires grad, and the storage it lives in."""

    shape: tuple[int, ...]
    dtype: str
    grad: bool
    key: int  # storage identity (views share it)
    storage: int  # bytes of the storage
    kind: str = "act"  # 'act' | 'param' | 'wcast'

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _BYTES[self.dtype]


def _promote(*dtypes: str) -> str:
    floats = {d for d in dtypes if d != "bool"}
    if "f32" in floats or {"bf16", "f16"} <= floats:
        return "f32"
    return floats.pop() if floats else "f32"


class _Tracer:
    """Replays a forward pass on symbolic tensors and records what autograd would keep (unique storages).

    ``device`` selects the autocast rules ('cuda' or 'cpu'), ``low`` the autocast dtype (None = fp32).
    """

    def __init__(self, device: str, low: str | None):
        self.device, self.low = device, low
        self.saved: dict[int, tuple[int, str, str]] = {}  # key -> (bytes, kind, part)
        self.part = "encoder"
        self.grad_enabled = True
        self._next = 0
        self._cache: dict[int, _Sym] = {}  # autocast's cache of trainable weights' casts
        # the ops autograd records, in forward order, for the backward replay: (outputs, inputs that receive a
        # gradient, checkpointed block id, working buffer of its backward), each tensor as (storage key, bytes)
        self.ops: list[tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...], int, int]] = []
        self.block = 0  # the gradient-checkpointed block being traced (0: none)
        self.block_saved: dict[int, dict[int, tuple[int, str, str, int]]] = {}  # its saves, recomputed in backward

    # --- tensors
    def new(self, shape: tuple[int, ...], dtype: str, grad: bool, kind: str = "act") -> _Sym:
        self._next += 1
        grad = grad and self.grad_enabled
        t = _Sym(tuple(int(s) for s in shape), dtype, grad, self._next, 0, kind)
        t.storage = t.nbytes
        return t

    def view(self, t: _Sym, shape: tuple[int, ...]) -> _Sym:
        return _Sym(tuple(shape), t.dtype, t.grad, t.key, t.storage, t.kind)

    def param(self, p: torch.Tensor | None) -> _Sym | None:
        if p is None:
            return None
        return _Sym(tuple(p.shape), "f32", bool(p.requires_grad), -id(p), 0, "param")

    def save(self, *ts: _Sym | None) -> None:
        """Keep ``ts`` for the backward of the op being traced (the next one :meth:`record` logs): the storage lives
        until the backward of the first op that saved it has run."""
        for t in ts:
            if t is not None and t.kind != "param" and t.key not in self.saved and t.storage:
                self.saved[t.key] = (t.storage, t.kind, self.part, len(self.ops))

    def record(self, out: _Sym | list[_Sym], *ins: _Sym | None, work: int = 0) -> Any:
        """Log an op whose output(s) ``out`` autograd will send a gradient through to ``ins``; ``work``: bytes its
        backward kernel allocates for itself (freed when it returns)."""
        outs = out if isinstance(out, list) else [out]
        if self.grad_enabled and any(o.grad for o in outs):
            sends = tuple((t.key, _grad_bytes(t)) for t in ins if t is not None and t.grad)
            self.ops.append((tuple((o.key, _grad_bytes(o)) for o in outs), sends, self.block, work))
        return out

    def cast(self, t: _Sym, dtype: str | None) -> _Sym:
        if dtype is None or t.dtype == dtype:
            return t
        if t.kind == "param" and t.grad and self.grad_enabled:  # autocast caches casts of trainable leaves
            if t.key not in self._cache:
                self._cache[t.key] = self.record(self.new(t.shape, dtype, True, "wcast"), t)
            return self._cache[t.key]
        return self.record(self.new(t.shape, dtype, t.grad, "wcast" if t.kind == "param" else "act"), t)

    def needs(self, *ts: _Sym | None) -> bool:
        return self.grad_enabled and any(t is not None and t.grad for t in ts)

    # --- ops (autograd's saving rules, checked in tests/test_memory.py)
    def linear(self, x: _Sym, mod: nn.Module) -> _Sym:
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            return self._lora_linear(x, mod)
        w, b = self.param(mod.weight), self.param(mod.bias)
        xi, wi = self.cast(x, self.low), self.cast(w, self.low)
        out = self.new(x.shape[:-1] + (mod.out_features,), xi.dtype, self.needs(xi, w, b))
        if out.grad:
            if w.grad:
                self.save(xi)
            if xi.grad:
                self.save(wi)
        return self.record(out, xi, wi, b)

    def _lora_linear(self, x: _Sym, mod: nn.Module) -> _Sym:
        result = self.linear(x, mod.get_base_layer())
        for name in mod.active_adapters:
            if name not in mod.lora_A:
                continue
            a_mod, b_mod = mod.lora_A[name], mod.lora_B[name]
            xa = x if x.dtype == "f32" else self.record(self.new(x.shape, "f32", x.grad), x)  # peft: lora_A's dtype
            drop = mod.lora_dropout[name]
            d = self.dropout(xa, drop.p if isinstance(drop, nn.Dropout) else 0.0)
            lora = self.linear(self.linear(d, a_mod), b_mod)
            scaled = self.record(self.new(lora.shape, lora.dtype, lora.grad), lora)  # * scaling: nothing saved
            result = self.record(self.new(result.shape, _promote(result.dtype, scaled.dtype),
                                          result.grad or scaled.grad), result, scaled)
        return result

    def conv(self, x: _Sym, mod: nn.Module) -> _Sym:
        w, b = self.param(mod.weight), self.param(mod.bias)
        xi, wi = self.cast(x, self.low), self.cast(w, self.low)
        h, wd = x.shape[-2:]
        k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
        if isinstance(mod, nn.ConvTranspose2d):
            op = mod.output_padding
            hw = [(n - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + op[i] + 1 for i, n in enumerate((h, wd))]
        else:
            hw = [(n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate((h, wd))]
        out = self.new((x.shape[0], mod.out_channels, *hw), xi.dtype, self.needs(xi, w, b))
        if out.grad:
            self.save(xi, wi)  # convolution_backward is one formula: input and weight are kept together
        # its backward works on copies of its input and output gradient in the kernel's layout (oneDNN, measured
        # on the CPU); on GPUs cuDNN's workspace takes their place: assumed of the same size, to be measured
        return self.record(out, xi, wi, b, work=xi.nbytes + out.nbytes)

    def norm(self, x: _Sym, mod: nn.Module, stats_shape: tuple[int, ...]) -> _Sym:
        xi = self.cast(x, "f32") if self.low and self.device == "cuda" else x  # fp32 op on CUDA autocast
        w, b = self.param(getattr(mod, "weight", None)), self.param(getattr(mod, "bias", None))
        out = self.new(x.shape, xi.dtype, self.needs(xi, w, b))
        if out.grad:
            self.save(xi, self.new(stats_shape, "f32", True), self.new(stats_shape, "f32", True))
        return self.record(out, xi, w, b)

    def relu(self, x: _Sym, inplace: bool) -> _Sym:
        out = x if inplace else self.new(x.shape, x.dtype, x.grad)
        if self.needs(out):
            self.save(out)
        return self.record(out, x)  # in place: the input's gradient is a new buffer, the output's is then freed

    def act(self, x: _Sym) -> _Sym:
        """GELU / SiLU: keep the input."""
        out = self.new(x.shape, x.dtype, x.grad)
        if self.needs(x):
            self.save(x)
        return self.record(out, x)

    def sigmoid(self, x: _Sym) -> _Sym:
        out = self.new(x.shape, x.dtype, x.grad)
        if self.needs(out):
            self.save(out)
        return self.record(out, x)

    def dropout(self, x: _Sym, p: float) -> _Sym:
        if p == 0:
            return x
        out = self.new(x.shape, x.dtype, x.grad)
        if self.needs(x):  # CUDA keeps a bool mask, the CPU a scaled mask in the input's dtype
            self.save(self.new(x.shape, "bool" if self.device == "cuda" else x.dtype, True))
        return self.record(out, x)

    def mul(self, a: _Sym, b: _Sym) -> _Sym:
        out = self.new(_broadcast(a.shape, b.shape), _promote(a.dtype, b.dtype), a.grad or b.grad)
        if self.needs(a):
            self.save(b)
        if self.needs(b):
            self.save(a)
        return self.record(out, a, b)

    def add(self, a: _Sym, b: _Sym) -> _Sym:
        return self.record(self.new(_broadcast(a.shape, b.shape), _promote(a.dtype, b.dtype), a.grad or b.grad), a, b)

    def cat(self, ts: list[_Sym], dim: int) -> _Sym:
        shape = list(ts[0].shape)
        shape[dim] = sum(t.shape[dim] for t in ts)
        return self.record(self.new(tuple(shape), _promote(*(t.dtype for t in ts)), any(t.grad for t in ts)), *ts)

    def resize(self, x: _Sym, hw: tuple[int, int]) -> _Sym:
        """Bilinear ``upsample_to``: nothing kept (its backward needs only sizes)."""
        if tuple(x.shape[-2:]) == tuple(hw):
            return x
        return self.record(self.new(x.shape[:2] + tuple(hw), x.dtype, x.grad), x)

    def sdpa(self, qkv: _Sym, heads: int, fused: bool) -> _Sym:
        """Self-attention on a packed (B, N, 3 * D) qkv tensor. Shape: -> (B, N, D)."""
        b, n, d3 = qkv.shape
        d = d3 // 3
        qkv = self.cast(qkv, self.low)
        if fused:  # flash / memory-efficient kernels: q, k, v (views of qkv), output, log-sum-exp
            out = self.new((b, n, d), qkv.dtype, qkv.grad)
            if self.needs(qkv):
                pad = 32 if self.device == "cuda" and self.low is None else 1  # mem-efficient pads lse to 32
                self.save(qkv, out, self.new((b, heads, -(-n // pad) * pad), "f32", True))
                if self.device == "cuda":  # the dropout RNG state: flash a (2,) seed + an offset, mem-efficient 2 x ()
                    seed = (2,) if self.low else ()
                    self.save(self.new(seed, "i64", True), self.new((), "i64", True))
            return self.record(out, qkv)
        hd = d // heads  # timm's explicit path: q * scale, q @ k^T, softmax, @ v (k, v are copied to fold batches)
        q = self.record(self.new((b * heads, n, hd), qkv.dtype, qkv.grad), qkv)
        kt = self.record(self.new((b * heads, hd, n), qkv.dtype, qkv.grad), qkv)
        v = self.record(self.new((b * heads, n, hd), qkv.dtype, qkv.grad), qkv)
        scores = self.new((b * heads, n, n), qkv.dtype, qkv.grad)
        if self.needs(qkv):
            self.save(q, kt)
        self.record(scores, q, kt)
        s_in = self.cast(scores, "f32") if self.low and self.device == "cuda" else scores  # softmax: fp32 on CUDA
        probs = self.sigmoid(s_in)  # softmax keeps its result, as sigmoid does
        probs = self.cast(probs, self.low)
        out = self.new((b * heads, n, hd), probs.dtype, qkv.grad)
        if self.needs(qkv):
            self.save(probs, v)
        self.record(out, probs, v)
        return self.record(self.new((b, n, d), out.dtype, out.grad), out)  # transpose + reshape copies

    def sub(self) -> _SubTracer:
        return _SubTracer(self)

    def replay_backward(self, outputs: list[_Sym], loss_peak: int, loss_after: int, *,
                        grads_exist: bool = False) -> int:
        """The largest increase of live memory over the end of the forward pass while the backward pass runs.

        Ops run in reverse order (autograd's order on one device: the latest-recorded ready node first). At each
        op the gradients it produces for its inputs are allocated while its output's gradient is still alive (a
        parameter's gradient stays; an activation's is freed after its producer's backward), then the storages
        whose first saver it is are freed. A checkpointed block's saves come back when the backward reaches the
        block. The loss goes first: ``loss_peak`` is its own backward's peak over the end of the forward pass,
        ``loss_after`` what remains when it is done (the outputs' gradients less its freed saves).
        ``grads_exist``: the parameters' gradients are there from the start (accumulation after the first
        micro-batch): new ones are added into them, nothing more stays."""
        free_at: dict[int, int] = {}
        for nbytes, _, _, idx in self.saved.values():
            free_at[idx] = free_at.get(idx, 0) + nbytes
        grads = {o.key: _grad_bytes(o) for o in outputs if o.grad}
        if grads_exist:
            grads.update((k, n) for _, ins, _, _ in self.ops for k, n in ins if k < 0)  # parameters' keys
        live, peak, entered = loss_after, max(0, loss_peak, loss_after), set()
        for i in range(len(self.ops) - 1, -1, -1):
            outs, ins, block, work = self.ops[i]
            if block and block not in entered:  # the checkpointed block is recomputed, its saves come back
                entered.add(block)
                for key, (nbytes, _, _, idx) in self.block_saved[block].items():
                    if key not in self.saved:  # its input is kept by the checkpoint already
                        live += nbytes
                        free_at[idx] = free_at.get(idx, 0) + nbytes
            out_keys, sends = {k for k, _ in outs}, dict(ins)
            new = {k: n for k, n in sends.items() if k not in grads or k in out_keys}
            peak = max(peak, live + sum(sends.values()) + work)  # a new gradient is added into an existing one
            for k, _ in outs:
                live -= grads.pop(k, 0)
            grads.update(new)
            live += sum(new.values()) - free_at.pop(i, 0)
        return peak


class _SubTracer:
    """Records the saves of one gradient-checkpointed block separately (they are recomputed, not kept)."""

    def __init__(self, parent: _Tracer):
        self.parent = parent

    def __enter__(self) -> _SubTracer:
        self.kept, self.parent.saved = self.parent.saved, {}
        self.cache, self.parent._cache = self.parent._cache, dict(self.parent._cache)
        self.parent.block = len(self.parent.block_saved) + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self.parent.block_saved[self.parent.block] = self.parent.saved
        self.parent.saved, self.parent._cache, self.parent.block = self.kept, self.cache, 0


def _grad_bytes(t: _Sym) -> int:
    """Bytes of ``t``'s gradient: a parameter's is fp32 (``.grad``), an activation's has its storage's size."""
    return 4 * math.prod(t.shape) if t.kind == "param" else t.storage


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(a, b))


# -------------------------------------------------------------------------------------- walking the real modules
def _trace_module(t: _Tracer, mod: nn.Module, x: _Sym) -> _Sym:
    """Sequential stacks of the decoders' building blocks."""
    if isinstance(mod, nn.Sequential):
        for child in mod:
            x = _trace_module(t, child, x)
        return x
    if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
        return t.conv(x, mod)
    if isinstance(mod, nn.GroupNorm):
        return t.norm(x, mod, (x.shape[0], mod.num_groups))
    if isinstance(mod, nn.ReLU):
        return t.relu(x, mod.inplace)
    if isinstance(mod, nn.Identity):
        return x
    raise ValueError(f"the memory model cannot replay a {type(mod).__name__} ({type(mod).__module__}); it knows the "
                     "cellseg decoders' Conv2d / ConvTranspose2d / GroupNorm / ReLU stacks.")


def _vit_block(t: _Tracer, blk: nn.Module, x: _Sym) -> _Sym:
    attn, mlp = blk.attn, blk.mlp
    b, n, d = x.shape
    h = t.norm(x, blk.norm1, (b, n, 1))
    qkv = t.linear(h, attn.qkv)
    o = t.sdpa(qkv, attn.num_heads, bool(attn.fused_attn))
    o = t.linear(o, attn.proj)
    x = t.add(x, _layer_scale(t, blk.ls1, o))
    h = t.norm(x, blk.norm2, (b, n, 1))
    if hasattr(mlp, "fc1_g"):  # SwiGLU: act(fc1_g(x)) * fc1_x(x)
        g, v = t.linear(h, mlp.fc1_g), t.linear(h, mlp.fc1_x)
        a = t.mul(t.act(g), v)
    elif type(mlp).__name__ == "GluMlp":  # SwiGLUPacked (UNI2-h): fc1 -> chunk -> act(x1) * x2
        f = t.linear(h, mlp.fc1)
        half = f.shape[:-1] + (f.shape[-1] // 2,)
        a = t.mul(t.act(t.view(f, half)), t.view(f, half))
    else:
        a = t.act(t.linear(h, mlp.fc1))
    a = t.dropout(a, getattr(mlp.drop1, "p", 0.0) if hasattr(mlp, "drop1") else 0.0)
    o = t.linear(a, mlp.fc2)
    return t.add(x, _layer_scale(t, blk.ls2, o))


def _layer_scale(t: _Tracer, ls: nn.Module, x: _Sym) -> _Sym:
    return t.mul(x, t.param(ls.gamma)) if hasattr(ls, "gamma") else x


def _check_vit(core: nn.Module) -> None:
    for i, blk in enumerate(core.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        problems = [name for name in ("q_norm", "k_norm", "norm") if attn is not None and
                    not isinstance(getattr(attn, name, nn.Identity()), nn.Identity)]
        problems += ["mlp.norm"] if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity) else []
        if type(blk).__name__ != "Block" or attn is None or not hasattr(attn, "qkv") or problems \
                or not isinstance(blk.norm1, nn.LayerNorm):
            raise ValueError(f"the memory model replays timm's plain ViT Block (LayerNorm, packed qkv, no q/k norm); "
                             f"block {i} of this encoder is a {type(blk).__name__} ({problems or 'other layout'}).")
    if not isinstance(core.patch_embed.norm, nn.Identity):
        raise ValueError("the memory model replays ViTs without a patch-embedding norm.")


def _trace_vit(t: _Tracer, backbone: nn.Module, x: _Sym) -> list[_Sym]:
    core = backbone.core
    _check_vit(core)
    b = x.shape[0]
    h = t.conv(x, core.patch_embed.proj)  # (B, D, h, w)
    d, (gh, gw) = h.shape[1], h.shape[-2:]
    n = gh * gw + core.num_prefix_tokens
    # prefix tokens are concatenated and the resampled pos_embed added (fp32 parameters promote the stream to fp32);
    # interpolation, cat and add keep nothing
    fp32_stream = core.num_prefix_tokens > 0 or core.pos_embed is not None
    tokens = t.record(t.new((b, n, d), "f32" if fp32_stream else h.dtype, h.grad), h, t.param(core.pos_embed),
                      t.param(getattr(core, "cls_token", None)), t.param(getattr(core, "reg_token", None)))
    tokens = t.dropout(tokens, getattr(core.pos_drop, "p", 0.0))
    feats = []
    ckpt = bool(getattr(core, "grad_checkpointing", False)) and t.grad_enabled
    for i, blk in enumerate(core.blocks):
        if ckpt:
            t.save(tokens)  # non-reentrant checkpoint keeps each block's inputs ...
            with t.sub():  # ... and recomputes the block's saves during backward, one block at a time
                tokens = _vit_block(t, blk, tokens)
        else:
            tokens = _vit_block(t, blk, tokens)
        if i in backbone.indices:  # drop prefix tokens, NCHW, .contiguous(): a copy
            feats.append(t.record(t.new((b, d, gh, gw), tokens.dtype, tokens.grad), tokens))
    return feats


def _feature_shapes(backbone: nn.Module, b: int, hw: tuple[int, int]) -> list[tuple[int, ...]]:
    return [(b, c, -(-hw[0] // s), -(-hw[1] // s)) for c, s in zip(backbone.out_channels, backbone.strides)]


def _trace_neck(t: _Tracer, neck: nn.Module, image: _Sym, feats: list[_Sym]) -> list[_Sym]:
    return [_trace_module(t, neck.stem, image)] + [_trace_module(t, lift, f) for lift, f in zip(neck.lifts, feats)]


def _trace_decoder(t: _Tracer, dec: nn.Module, image: _Sym, feats: list[_Sym]) -> dict[str, _Sym]:
    """The three outputs."""
    skips = _trace_neck(t, dec.neck, image, feats)
    kind = type(dec).__name__
    if kind == "HoVerNetDecoder":
        outs = {}
        for br in Branch:
            x = skips[-1]
            for block, skip in zip(dec.paths[br.value].blocks, reversed(skips[:-1])):
                x = _trace_module(t, block, t.cat([t.resize(x, skip.shape[-2:]), skip], 1))
            outs[br.value] = t.conv(x, dec.heads[br.value])
        return outs
    if kind == "UNetResAttnDecoder":
        x = skips[-1]
        for gate, block, skip in zip(dec.gates, dec.blocks, reversed(skips[:-1])):
            x = t.resize(x, skip.shape[-2:])
            g = t.relu(t.add(t.conv(skip, gate.wx), t.conv(x, gate.wg)), inplace=True)
            g = t.mul(skip, t.sigmoid(t.conv(g, gate.psi[1])))
            x = _res_se(t, block, t.cat([x, g], 1))
        return {br.value: _trace_module(t, dec.heads[br.value], x) for br in Branch}
    raise ValueError(f"the memory model knows the decoders HoVerNetDecoder and UNetResAttnDecoder, not {kind}.")


def _res_se(t: _Tracer, block: nn.Module, x: _Sym) -> _Sym:
    body = _trace_module(t, block.body, x)
    short = _trace_module(t, block.shortcut, x)
    y = t.relu(t.add(body, short), inplace=False)
    fc = block.se.fc  # Linear, ReLU, Linear, Sigmoid on the channel means
    w = t.record(t.new(y.shape[:2], y.dtype, y.grad), y)  # channel means
    w = t.linear(w, fc[0])
    w = t.relu(w, fc[1].inplace)
    w = t.sigmoid(t.linear(w, fc[2]))
    return t.mul(y, t.view(w, w.shape + (1, 1)))


# ------------------------------------------------------------------------------- measured per-pixel constants
def _storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage, shared by its views (fake tensors have no data pointer, so not that)."""
    return t.untyped_storage()._cdata


def _saved_storages(fn: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> tuple[Any, dict[int, int]]:
    """Run ``fn``; the storages autograd saved meanwhile, ``{storage key: bytes}``, leaving out ``exclude``'s."""
    skip = {_storage_key(t) for t in exclude}
    kept: dict[int, torch.UntypedStorage] = {}  # holding the storages stops an identity being reused mid-count

    def pack(x: torch.Tensor) -> torch.Tensor:
        st = x.untyped_storage()
        if st._cdata not in skip and st.nbytes():
            kept.setdefault(st._cdata, st)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        result = fn()
    return result, {key: st.nbytes() for key, st in kept.items()}


def measure_saved_bytes(fn: Callable[[], Any], *, exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run ``fn`` and count the bytes autograd saves for backward meanwhile: the sum over unique storages (views
    and repeated saves count once), leaving out the storages of ``exclude`` (parameters and buffers).

    Returns ``(fn's result, bytes)``; keep the result alive as long as the graph must live.
    """
    result, storages = _saved_storages(fn, exclude)
    return result, sum(storages.values())


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: storages that exist anyway (the ``exclude`` of :func:`measure_saved_bytes`)."""
    return [*model.parameters(), *model.buffers()]


def measure_step_saved(model: nn.Module, loss_fn: nn.Module, batch: dict[str, torch.Tensor], *,
                       precision: str = "fp32") -> dict[str, int]:
    """Bytes autograd keeps after the forward pass of one training step, as the Trainer runs it (autocast around
    network and loss, on the batch's device): ``{'model': network only, 'total': network + loss}``, unique storages,
    parameters and buffers left out.

    Shape: batch['image'] (B, 3, H, W) and the targets of :class:`cellseg.losses.HoVerLoss`.
    """
    low = {"bf16": "bf16", "fp16": "f16"}.get(precision)
    skip = model_tensors(model)
    with _autocast(low, batch["image"].device.type):
        outputs, net = _saved_storages(lambda: model(batch["image"]), skip)
        _, in_loss = _saved_storages(lambda: loss_fn(outputs, batch)["total"], skip)
    return {"model": sum(net.values()), "total": sum({**net, **in_loss}.values())}


def measure_step_peak(model: nn.Module, loss_fn: nn.Module, batch: dict[str, torch.Tensor],
                      optimizer: torch.optim.Optimizer, *, precision: str = "fp32", clip: float = 1.0,
                      accumulation: int = 1) -> dict[str, int]:
    """The CPU allocator's peak over one training step as the Trainer runs it (zero_grad, ``accumulation`` x
    forward + loss under autocast + backward on ``batch``, clipping, optimizer step), in bytes: what
    ``torch.cuda.max_memory_allocated`` reads on a GPU, to compare with :attr:`MemoryEstimate.allocated`.

    One step runs first so that the optimizer's states exist, as they do from the second step of a training on;
    the second is recorded with ``torch.profiler`` (``profile_memory=True``: every allocation and free of the
    CPU allocator, kernels' own buffers included). Returns ``{'peak': baseline + largest excess, 'baseline':
    parameters + buffers + optimizer states + batch, 'end_of_forward': excess when the first micro-batch's loss is
    computed}``.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    if any(t.device.type != "cpu" for t in [*model_tensors(model), *batch.values()]):
        raise ValueError("measure_step_peak measures the CPU allocator; on a GPU read "
                         "torch.cuda.max_memory_allocated() (benchmarks/train_throughput.py does).")
    low = {"bf16": "bf16", "fp16": "f16"}.get(precision)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for k in range(accumulation):
            with record_function(f"cellseg.forward.{k}"), _autocast(low):
                out = model(batch["image"])  # held until the next one replaces it, as the Trainer holds it
                loss = loss_fn(out, batch)["total"]
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        del out

    model.train()
    step()
    optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    forward_end = max(e.end_ns() for e in events if e.name() == "cellseg.forward.0")
    live = peak = at_forward_end = 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
        if t <= forward_end:
            at_forward_end = live
    states = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    storages = {_storage_key(t): t.untyped_storage().nbytes()
                for t in [*model_tensors(model), *states, *batch.values()]}
    baseline = sum(storages.values())
    return {"peak": baseline + peak, "baseline": baseline, "end_of_forward": at_forward_end}


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, **_: Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as a bf16-capable GPU runs it: flash attention for bf16 / fp16, the
    memory-efficient kernel for fp32 (a fake device cannot choose: it would fall back to the O(N^2) math path)."""
    if attn_mask is not None:
        raise ValueError("the fake-CUDA measurement replays attention without a mask only.")
    if q.dtype in (torch.bfloat16, torch.float16):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
                                                                  return_debug_mask=False, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, dropout_p, is_causal,
                                                                  scale=scale)[0]


def measure_cuda_saved(cfg: Config, num_classes: int, *, batch_size: int | None = None,
                       model: nn.Module | None = None, fused_attention: bool = True) -> dict[str, int]:
    """What autograd keeps on a CUDA device after the forward pass of one training step (network + loss under
    CUDA autocast with ``cfg.PRECISION``), measured without a GPU: ``{'model': network only, 'total': network +
    loss}``, unique storages, parameters and buffers left out; compare with :attr:`MemoryEstimate.saved` for
    ``device='cuda'``.

    The network (``model``, default :func:`build_skeleton`, on the meta device) is moved to fake CUDA tensors
    (``torch._subclasses.FakeTensorMode``: shapes, dtypes and autograd's records, no memory, no computation), CUDA
    autocast is switched on below ``torch.autocast`` (which refuses without a device), and with ``fused_attention``
    SDPA runs the fused kernel a bf16-capable GPU picks (:func:`_fused_sdpa`). So the CUDA autocast rules and what
    each op keeps come from PyTorch itself; the kernel choice of attention is the one assumption.
    """
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    from cellseg.losses import loss_from_config

    b, size = batch_size or cfg.BATCH_SIZE, cfg.PATCH_SIZE
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_estimate_precision(cfg.PRECISION, "cuda"))
    meta = copy.deepcopy(model) if model is not None else build_skeleton(cfg, num_classes)  # to_empty moves it
    sdpa = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa) if fused_attention \
        else contextlib.nullcontext()
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True), sdpa:
        net = meta.to_empty(device="cuda").train()
        loss_fn = loss_from_config(cfg, num_classes).to("cuda")
        with torch.device("cuda"):
            labels = torch.zeros(b, size, size, dtype=torch.long)
            batch = {"image": torch.empty(b, 3, size, size), Branch.NP.value: labels,
                     Branch.HV.value: torch.empty(b, 2, size, size), Branch.NC.value: labels,
                     "ignore": torch.zeros(b, size, size, dtype=torch.bool)}
        skip = model_tensors(net)
        torch.set_autocast_enabled("cuda", low is not None)
        try:
            if low is not None:
                torch.set_autocast_dtype("cuda", low)
            outputs, in_net = _saved_storages(lambda: net(batch["image"]), skip)
            _, in_loss = _saved_storages(lambda: loss_fn(outputs, batch)["total"], skip)
        finally:
            torch.set_autocast_enabled("cuda", enabled)
            torch.set_autocast_dtype("cuda", dtype)
    return {"model": sum(in_net.values()), "total": sum({**in_net, **in_loss}.values())}


def _autocast(low: str | None, device_type: str = "cpu"):
    import contextlib

    return torch.autocast(device_type, dtype=_TORCH_DTYPES[low]) if low else contextlib.nullcontext()


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while the mode is active and that are still alive, with their
    peak (``live`` and ``peak``; storages that existed before, and views of them, are not counted). Forward and
    backward ops on the calling thread are seen; allocations inside a kernel are not."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._ptrs: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
                if nbytes and ptr not in self._ptrs and ptr not in inputs:  # views / in-place: not a new storage
                    self._ptrs.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, ptr, nbytes)
        return out


@dataclass(frozen=True)
class _LossBytes:
    """The loss per image pixel, counted on a 2 x 32 x 32 batch on the CPU: bytes it saves for backward, the
    network outputs among them, and its backward's peak and end over the end of the forward pass."""

    saved: float
    outputs_saved: float
    backward_peak: float
    backward_after: float


@functools.lru_cache(maxsize=64)
def _loss_bytes_per_pixel(loss_key: tuple, num_classes: int, low: str | None) -> _LossBytes:
    """:class:`_LossBytes` of the loss with these settings (``_loss_key``), autocast to ``low`` on the CPU."""
    from cellseg.losses import HoVerLoss, LossWeights

    b, s = 2, 32
    loss_fn = HoVerLoss(LossWeights(**dict(loss_key)), num_classes)
    gen = torch.Generator().manual_seed(0)
    dtype = _TORCH_DTYPES[low] if low else torch.float32
    outs = {Branch.NP: torch.randn(b, 2, s, s, generator=gen), Branch.HV: torch.randn(b, 2, s, s, generator=gen),
            Branch.NC: torch.randn(b, num_classes + 1, s, s, generator=gen)}
    outs = {k: v.to(dtype).requires_grad_(True) for k, v in outs.items()}
    fg = torch.rand(b, s, s, generator=gen) > 0.5
    batch = {Branch.NP.value: fg.long(), Branch.HV.value: torch.rand(b, 2, s, s, generator=gen) * 2 - 1,
             Branch.NC.value: fg.long() * torch.randint(1, num_classes + 1, (b, s, s), generator=gen),
             "ignore": torch.zeros(b, s, s, dtype=torch.bool)}
    live = LiveBytes()
    with live:
        with _autocast(low):
            losses, saved = _saved_storages(lambda: loss_fn(outs, batch), ())
        end = live.live
        losses["total"].backward()
        peak, after = live.peak, live.live
    del losses
    out_keys = {_storage_key(o) for o in outs.values()}
    px = b * s * s
    return _LossBytes(sum(saved.values()) / px, sum(n for k, n in saved.items() if k in out_keys) / px,
                      (peak - end) / px, (after - end) / px)


def _loss_key(cfg: Config) -> tuple:
    """The loss settings as a hashable key: (LossWeights field, value) pairs, as cellseg.losses.loss_from_config."""
    return (("np", cfg.LOSS_WEIGHT_NP), ("hv", cfg.LOSS_WEIGHT_HV), ("nc", cfg.LOSS_WEIGHT_NC),
            ("msge", cfg.HV_MSGE_WEIGHT), ("np_loss", cfg.NP_LOSS), ("focal_gamma", cfg.FOCAL_GAMMA),
            ("focal_alpha", tuple(cfg.FOCAL_ALPHA)), ("class_weights", tuple(cfg.CLASS_WEIGHTS)))


@functools.lru_cache(maxsize=16)
def _cnn_saved_bytes(encoder: str, low: str | None, grad_checkpointing: bool) -> tuple[float, int]:
    """A trained CNN encoder's saved bytes as ``per_pixel * pixels + fixed`` (``fixed``: its cached low-precision
    weight copies), fitted on the CPU on 2 images of 2 and of 4 x its size multiple. Its outputs and (in fp32) its
    input are left to the decoder, which keeps them too, so that nothing is counted twice."""
    from cellseg.model.backbones import build_backbone

    torch.manual_seed(0)
    bb = build_backbone(encoder, "")
    bb.set_grad_checkpointing(grad_checkpointing)
    bb.train()
    points = []
    for side in (2 * bb.size_multiple, 4 * bb.size_multiple):
        x = torch.randn(2, 3, side, side)
        with _autocast(low):
            feats, saved = _saved_storages(lambda x=x: bb(x), model_tensors(bb) + ([x] if low is None else []))
        shared = sum(saved.get(_storage_key(f), 0) for f in feats)
        points.append((2 * side * side, sum(saved.values()) - shared))
    (p1, s1), (p2, s2) = points
    per_pixel = (s2 - s1) / (p2 - p1)
    return per_pixel, max(0, round(s1 - per_pixel * p1))


# ------------------------------------------------------------------------------------------------ the model
def resolve_estimate_precision(precision: str, device: str, bf16_supported: bool = True) -> str:
    """``PRECISION`` as training would resolve it on ``device`` ('cuda' or 'cpu').

    Raises:
        ValueError: fp16 on the CPU (training refuses it there too).
    """
    if precision == "auto":
        return "bf16" if device == "cuda" and bf16_supported else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ValueError("PRECISION='fp16' needs a CUDA device (GradScaler); the CPU trains in 'fp32' or 'bf16'.")
    return precision


def build_skeleton(cfg: Config, num_classes: int, device: str | torch.device = "meta") -> nn.Module:
    """The network the parameters describe, set up for ``cfg.PHASE`` (frozen / LoRA / unfrozen, gradient
    checkpointing), with random weights and built on ``device`` ('meta': shapes only, no memory). UNI / UNI2-h get
    their architecture without their weights file, so the estimate and the benchmark run anywhere."""
    from cellseg.model.network import build_model
    from cellseg.optim import configure_phase

    with torch.device(device):
        model = build_model(cfg.ENCODER, num_classes=num_classes, decoder=cfg.DECODER, weights=cfg.ENCODER_WEIGHTS,
                            indices=list(cfg.ENCODER_INDICES), width=cfg.DECODER_WIDTH, load_weights=False)
        configure_phase(model, cfg)
    return model


class MemoryModel:
    """The estimate for one parameter set, at any batch size (the skeleton is built once).

    Args:
        cfg: the parameters (ENCODER, DECODER, DECODER_WIDTH, PATCH_SIZE, PHASE, LORA_*, PRECISION,
            GRAD_CHECKPOINTING, loss weights).
        num_classes: cell classes without background.
        device: 'cuda' (the target; CUDA autocast rules and overhead) or 'cpu' (CPU autocast rules, no overhead).
        bf16_supported: whether PRECISION='auto' becomes bf16 on the target GPU.
        world_size: devices in DDP (adds the gradient buckets' copy).
        image_size: square training crop; default PATCH_SIZE.
    """

    def __init__(self, cfg: Config, *, num_classes: int, device: str = "cuda", bf16_supported: bool = True,
                 world_size: int = 1, image_size: int | None = None, model: nn.Module | None = None):
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}.")
        self.cfg, self.num_classes, self.device, self.world_size = cfg, num_classes, device, world_size
        self.precision = resolve_estimate_precision(cfg.PRECISION, device, bf16_supported)
        self.low = {"bf16": "bf16", "fp16": "f16"}.get(self.precision)
        self.model = model if model is not None else build_skeleton(cfg, num_classes)
        size = image_size or cfg.PATCH_SIZE
        m = self.model.encoder.size_multiple
        self.image_hw = (-(-size // m) * m, -(-size // m) * m)  # the network pads to the encoder's multiple
        self.image_size = size
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_total = sum(p.numel() for p in self.model.parameters())
        self.n_trainable = sum(p.numel() for p in trainable)
        self.n_tensors = len(trainable)

    def estimate(self, batch_size: int | None = None, accumulation: int | None = None) -> MemoryEstimate:
        """The estimate at ``batch_size`` images per device per micro-batch (default BATCH_SIZE) and
        ``accumulation`` micro-batches per optimizer step (default: what GRAD_ACCUM_TARGET asks at that batch)."""
        cfg, b = self.cfg, batch_size or self.cfg.BATCH_SIZE
        if accumulation is None:
            target = cfg.GRAD_ACCUM_TARGET
            accumulation = max(1, math.ceil(target / (b * self.world_size))) if target else 1
        model, t = self.model, _Tracer(self.device, self.low)
        px = b * self.image_size ** 2
        image = t.new((b, 3, *self.image_hw), "f32", False)  # the batch, reflect-padded to the encoder's multiple
        frozen = not any(p.requires_grad for p in model.encoder.parameters())
        if model.encoder.family == "vit":
            t.grad_enabled = not frozen  # Phase 1: the encoder runs under no_grad
            feats = _trace_vit(t, model.encoder, image)
        else:
            shapes = _feature_shapes(model.encoder, b, self.image_hw)
            feats = [t.new(s, self.low or "f32", not frozen) for s in shapes]
            if not frozen:  # one op in the replay: its saves are freed and its gradients made at its backward
                per_px, fixed = _cnn_saved_bytes(cfg.ENCODER, self.low, bool(cfg.GRAD_CHECKPOINTING))
                for nbytes, kind in ((int(per_px * b * math.prod(self.image_hw)), "act"), (fixed, "wcast")):
                    if nbytes:
                        t.saved[t.new((1,), "f32", False).key] = (nbytes, kind, "encoder", len(t.ops))
                weights = [p for p in model.encoder.parameters() if p.requires_grad]
                t.record(feats, _Sym((sum(p.numel() for p in weights),), "f32", True, -1, 0, "param"))
        t.grad_enabled, t.part = True, "decoder"
        outs = list(_trace_decoder(t, model.decoder, image, feats).values())
        parts, casts = {"encoder": 0, "decoder": 0}, {"encoder": 0, "decoder": 0}
        for nbytes, kind, part, _ in t.saved.values():
            (casts if kind == "wcast" else parts)[part] += nbytes
        loss = _loss_bytes_per_pixel(_loss_key(cfg), self.num_classes, self.low)
        parts["loss"] = int(loss.saved * px)
        saved_by_part = {k: v + casts.get(k, 0) for k, v in parts.items()}
        casts = sum(casts.values())
        image_held = 0 if image.key in t.saved and self.image_hw == (self.image_size,) * 2 else 12 * px
        batch = TARGET_BYTES_PER_PIXEL * px + image_held + sum(o.storage for o in outs) - int(loss.outputs_saved * px)
        transient = t.replay_backward(outs, int(loss.backward_peak * px), int(loss.backward_after * px),
                                      grads_exist=accumulation > 1)
        params = 4 * self.n_total
        grads = 4 * self.n_trainable
        held = grads if accumulation > 1 else 0
        buckets = grads if self.world_size > 1 else 0
        optimizer = 8 * self.n_trainable + 4 * self.n_tensors
        allocated = params + held + buckets + optimizer + batch + sum(parts.values()) + casts + transient
        overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * allocated) if self.device == "cuda" else 0
        settings = {"encoder": cfg.ENCODER, "decoder": f"{cfg.DECODER} (width {cfg.DECODER_WIDTH})",
                    "phase": cfg.PHASE, "batch_size": b, "image_size": self.image_size, "precision": self.precision,
                    "grad_checkpointing": bool(cfg.GRAD_CHECKPOINTING), "device": self.device,
                    "params_total": self.n_total, "params_trainable": self.n_trainable,
                    "world_size": self.world_size, "accumulation": accumulation}
        return MemoryEstimate(parameters=params, gradients=grads, held_gradients=held, buckets=buckets,
                              optimizer=optimizer, batch=batch,
                              activations=sum(parts.values()), weight_casts=casts, transient=transient,
                              overhead=overhead, activations_by_part=parts, saved_by_part=saved_by_part,
                              settings=settings)


def estimate_memory(cfg: Config, *, num_classes: int, device: str = "cuda", bf16_supported: bool = True,
                    world_size: int = 1) -> MemoryEstimate:
    """Predicted peak memory of one training step with these parameters (BATCH_SIZE images per device).

    Raises:
        ValueError: PRECISION='fp16' on the CPU, or an encoder / decoder the model cannot replay.
    """
    return MemoryModel(cfg, num_classes=num_classes, device=device, bf16_supported=bf16_supported,
                       world_size=world_size).estimate()


def effective_batch(cfg: Config) -> int:
    """Images per optimizer step over devices and accumulation: GRAD_ACCUM_TARGET, or BATCH_SIZE without it."""
    return cfg.GRAD_ACCUM_TARGET or cfg.BATCH_SIZE


def suggest_batch(cfg: Config, gpu_bytes: int, *, num_classes: int, bf16_supported: bool = True,
                  world_size: int = 1, memory_model: MemoryModel | None = None) -> tuple[int, int]:
    """The largest per-device batch that fits ``gpu_bytes`` and divides the effective batch, with the accumulation
    that keeps the effective batch: ``(batch_size, accumulation)``, ``batch_size x accumulation x world_size ==``
    GRAD_ACCUM_TARGET (or BATCH_SIZE when GRAD_ACCUM_TARGET is 0).

    Raises:
        DoesNotFit: not even batch 1 fits (the message gives the memory it needs).
    """
    mm = memory_model or MemoryModel(cfg, num_classes=num_classes, bf16_supported=bf16_supported,
                                     world_size=world_size)
    per_device = max(1, math.ceil(effective_batch(cfg) / world_size))
    for b in sorted((d for d in range(1, per_device + 1) if per_device % d == 0), reverse=True):
        if mm.estimate(b, per_device // b).total <= gpu_bytes:
            return b, per_device // b
    need = mm.estimate(1, per_device).total
    raise DoesNotFit(
        f"ENCODER='{cfg.ENCODER}' Phase {cfg.PHASE} at PATCH_SIZE={cfg.PATCH_SIZE} ({mm.precision}, "
        f"GRAD_CHECKPOINTING={cfg.GRAD_CHECKPOINTING}) needs {need / GiB:.2f} GiB with one image per step, more than "
        f"the {gpu_bytes / GiB:.2f} GiB available. Set GRAD_CHECKPOINTING=True, PRECISION='bf16', a smaller "
        "PATCH_SIZE or LORA_BLOCKS='last_half', or use a larger GPU.")


__all__ = ["GPU", "GPUS", "parse_gpu", "MemoryEstimate", "MemoryModel", "DoesNotFit", "estimate_memory",
           "suggest_batch", "effective_batch", "build_skeleton", "measure_saved_bytes", "measure_step_peak",
           "measure_cuda_saved",
           "model_tensors", "LiveBytes", "TARGET_BYTES_PER_PIXEL",
           "resolve_estimate_precision", "CUDA_CONTEXT_BYTES", "ALLOCATOR_SLACK"]
