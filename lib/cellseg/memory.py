"""The memory model: peak GPU memory of one training step, predicted before a job is queued.

Peak training memory is parameters + gradients + AdamW states (trainable parameters only) + the tensors autograd keeps
for the backward pass + a transient working set at the start of the backward pass + framework overhead. The tensors
kept for backward are not a rule of thumb here: the network the parameters describe is built on the meta device (no
memory, any timm ViT / CNN, LoRA applied by the same :func:`cellseg.optim.configure_phase` as training) and its
forward pass is replayed *symbolically*, op by op, following what autograd saves for each op (``Linear`` keeps its
input only when its weight trains and its weight only when its input needs a gradient, ``Conv`` keeps both, norms
keep their input and two statistics, fused SDPA keeps q, k, v, the output and a log-sum-exp, i.e. O(N) not O(N^2)),
which dtype autocast gives each tensor on the target device (CUDA runs LayerNorm / GroupNorm / softmax in fp32, the CPU
in the input dtype; frozen weights are cast per use and their low-precision copy is kept for backward, trainable
ones are cached), and which storages are shared (views, in-place ReLU). So:

- Phase 1 (frozen encoder under ``no_grad``): nothing of the encoder is kept, only the decoder's tensors.
- Phase 2 with LoRA: every block after the first adapted one keeps its activations; with gradient checkpointing
  only each block's input is kept and one block is recomputed at a time during backward (a transient).
- CNN encoders trained in Phase 2 have no common closed form: their saved bytes are counted once on the CPU on a
  small reference input and scaled with batch x pixels (exact for convolutional networks).
- The loss keeps per-pixel tensors (one-hot maps, softmax outputs, Sobel gradients); they are counted once on a
  32x32 batch and scaled with batch x pixels.

Validated against :func:`measure_saved_bytes` (``torch.autograd.graph.saved_tensors_hooks``, unique storages) on the
CPU for tiny models (``tests/test_memory.py``, ``benchmarks/RESULTS.md``). Not yet checked on a GPU: the CUDA autocast
rules (from PyTorch's autocast op lists), the CUDA context size and the allocator slack below, and the backward
transient (twice the largest activation plus the skips' gradients); ``benchmarks/train_throughput.py`` prints the
prediction next to ``torch.cuda.max_memory_allocated`` and ``--memory-table --device cuda`` checks the saved tensors.
The estimate is for eager execution: ``torch.compile`` usually keeps less (AOTAutograd recomputes cheap pointwise
ops), so it is conservative there.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

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

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "bool": 1}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


# ----------------------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GPU:
    """A GPU's memory as the driver reports it and whether it runs bf16 (Ampere or newer)."""

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
    """Predicted peak memory of one training step on one device, in bytes, per component."""

    parameters: int  # every parameter, fp32 (autocast keeps fp32 master weights)
    gradients: int  # trainable parameters' gradients (fp32), plus DDP's bucket copy with several devices
    optimizer: int  # AdamW exp_avg + exp_avg_sq (fp32) and step counters
    activations: int  # tensors kept for backward at the end of the forward pass (input batch included)
    weight_casts: int  # low-precision weight copies kept for backward (bf16/fp16 only)
    transient: int  # working set at the start of backward: gradient buffers, one recomputed block
    overhead: int  # CUDA context + allocator slack (0 on the CPU)
    activations_by_part: dict[str, int] = field(default_factory=dict)  # encoder / decoder / loss
    saved_by_part: dict[str, int] = field(default_factory=dict)  # activations + weight copies per part
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def allocated(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should read."""
        return (self.parameters + self.gradients + self.optimizer + self.activations + self.weight_casts
                + self.transient)

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
                ("gradients", self.gradients, f"{s.get('params_trainable', 0):,} trainable values"),
                ("optimizer (AdamW)", self.optimizer, "2 fp32 states per trainable value"),
                ("activations", self.activations, ", ".join(f"{k} {_fmt(v)}" for k, v in
                                                             self.activations_by_part.items())),
                ("weight copies", self.weight_casts, "low-precision casts kept for backward"),
                ("backward transient", self.transient, "gradient buffers, recomputed block"),
                ("overhead", self.overhead, "CUDA context + allocator slack" if self.overhead else "none on CPU")]
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
        self.largest = 0  # largest grad-requiring tensor created (bytes)
        self.recompute = 0  # saves of the largest gradient-checkpointed block (recomputed during backward)

    # --- tensors
    def new(self, shape: tuple[int, ...], dtype: str, grad: bool, kind: str = "act") -> _Sym:
        self._next += 1
        grad = grad and self.grad_enabled
        t = _Sym(tuple(int(s) for s in shape), dtype, grad, self._next, 0, kind)
        t.storage = t.nbytes
        if grad and kind == "act":
            self.largest = max(self.largest, t.nbytes)
        return t

    def view(self, t: _Sym, shape: tuple[int, ...]) -> _Sym:
        return _Sym(tuple(shape), t.dtype, t.grad, t.key, t.storage, t.kind)

    def param(self, p: torch.Tensor | None) -> _Sym | None:
        if p is None:
            return None
        return _Sym(tuple(p.shape), "f32", bool(p.requires_grad), -id(p), 0, "param")

    def save(self, *ts: _Sym | None) -> None:
        for t in ts:
            if t is not None and t.kind != "param" and t.key not in self.saved and t.storage:
                self.saved[t.key] = (t.storage, t.kind, self.part)

    def cast(self, t: _Sym, dtype: str | None) -> _Sym:
        if dtype is None or t.dtype == dtype:
            return t
        if t.kind == "param" and t.grad and self.grad_enabled:  # autocast caches casts of trainable leaves
            if t.key not in self._cache:
                self._cache[t.key] = self.new(t.shape, dtype, True, "wcast")
            return self._cache[t.key]
        return self.new(t.shape, dtype, t.grad, "wcast" if t.kind == "param" else "act")

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
        return out

    def _lora_linear(self, x: _Sym, mod: nn.Module) -> _Sym:
        result = self.linear(x, mod.get_base_layer())
        for name in mod.active_adapters:
            if name not in mod.lora_A:
                continue
            a_mod, b_mod = mod.lora_A[name], mod.lora_B[name]
            xa = x if x.dtype == "f32" else self.new(x.shape, "f32", x.grad)  # peft casts to lora_A's dtype
            drop = mod.lora_dropout[name]
            d = self.dropout(xa, drop.p if isinstance(drop, nn.Dropout) else 0.0)
            lora = self.linear(self.linear(d, a_mod), b_mod)
            scaled = self.new(lora.shape, lora.dtype, lora.grad)  # * scaling: nothing saved
            result = self.new(result.shape, _promote(result.dtype, scaled.dtype), result.grad or scaled.grad)
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
        return out

    def norm(self, x: _Sym, mod: nn.Module, stats_shape: tuple[int, ...]) -> _Sym:
        xi = self.cast(x, "f32") if self.low and self.device == "cuda" else x  # fp32 op on CUDA autocast
        w, b = self.param(getattr(mod, "weight", None)), self.param(getattr(mod, "bias", None))
        out = self.new(x.shape, xi.dtype, self.needs(xi, w, b))
        if out.grad:
            self.save(xi, self.new(stats_shape, "f32", True), self.new(stats_shape, "f32", True))
        return out

    def relu(self, x: _Sym, inplace: bool) -> _Sym:
        out = x if inplace else self.new(x.shape, x.dtype, x.grad)
        if self.needs(out):
            self.save(out)
        return out

    def act(self, x: _Sym) -> _Sym:
        """GELU / SiLU: keep the input."""
        out = self.new(x.shape, x.dtype, x.grad)
        if self.needs(x):
            self.save(x)
        return out

    def sigmoid(self, x: _Sym) -> _Sym:
        out = self.new(x.shape, x.dtype, x.grad)
        if self.needs(out):
            self.save(out)
        return out

    def dropout(self, x: _Sym, p: float) -> _Sym:
        if p == 0:
            return x
        out = self.new(x.shape, x.dtype, x.grad)
        if self.needs(x):  # CUDA keeps a bool mask, the CPU a scaled mask in the input's dtype
            self.save(self.new(x.shape, "bool" if self.device == "cuda" else x.dtype, True))
        return out

    def mul(self, a: _Sym, b: _Sym) -> _Sym:
        out = self.new(_broadcast(a.shape, b.shape), _promote(a.dtype, b.dtype), a.grad or b.grad)
        if self.needs(a):
            self.save(b)
        if self.needs(b):
            self.save(a)
        return out

    def add(self, a: _Sym, b: _Sym) -> _Sym:
        return self.new(_broadcast(a.shape, b.shape), _promote(a.dtype, b.dtype), a.grad or b.grad)

    def cat(self, ts: list[_Sym], dim: int) -> _Sym:
        shape = list(ts[0].shape)
        shape[dim] = sum(t.shape[dim] for t in ts)
        return self.new(tuple(shape), _promote(*(t.dtype for t in ts)), any(t.grad for t in ts))

    def resize(self, x: _Sym, hw: tuple[int, int]) -> _Sym:
        """Bilinear ``upsample_to``: nothing kept (its backward needs only sizes)."""
        return x if tuple(x.shape[-2:]) == tuple(hw) else self.new(x.shape[:2] + tuple(hw), x.dtype, x.grad)

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
            return out
        hd = d // heads  # timm's explicit path: q * scale, q @ k^T, softmax, @ v (k, v are copied to fold batches)
        q = self.new((b * heads, n, hd), qkv.dtype, qkv.grad)
        kt, v = self.new((b * heads, hd, n), qkv.dtype, qkv.grad), self.new((b * heads, n, hd), qkv.dtype, qkv.grad)
        scores = self.new((b * heads, n, n), qkv.dtype, qkv.grad)
        if self.needs(qkv):
            self.save(q, kt)
        s_in = self.cast(scores, "f32") if self.low and self.device == "cuda" else scores  # softmax: fp32 on CUDA
        probs = self.sigmoid(s_in)  # softmax keeps its result, as sigmoid does
        probs = self.cast(probs, self.low)
        out = self.new((b * heads, n, hd), probs.dtype, qkv.grad)
        if self.needs(qkv):
            self.save(probs, v)
        return self.new((b, n, d), out.dtype, out.grad)  # transpose + reshape copies

    def sub(self) -> _SubTracer:
        return _SubTracer(self)


class _SubTracer:
    """Records the saves of one gradient-checkpointed block separately (they are recomputed, not kept)."""

    def __init__(self, parent: _Tracer):
        self.parent = parent

    def __enter__(self) -> _SubTracer:
        self.kept, self.parent.saved = self.parent.saved, {}
        self.cache, self.parent._cache = self.parent._cache, dict(self.parent._cache)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bytes = sum(v[0] for v in self.parent.saved.values())
        self.parent.saved, self.parent._cache = self.kept, self.cache


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
    tokens = t.new((b, n, d), "f32" if fp32_stream else h.dtype, h.grad)
    tokens = t.dropout(tokens, getattr(core.pos_drop, "p", 0.0))
    feats = []
    ckpt = bool(getattr(core, "grad_checkpointing", False)) and t.grad_enabled
    for i, blk in enumerate(core.blocks):
        if ckpt:
            t.save(tokens)  # non-reentrant checkpoint keeps each block's inputs ...
            with t.sub() as sub:  # ... and recomputes the block's saves during backward, one block at a time
                tokens = _vit_block(t, blk, tokens)
            t.recompute = max(t.recompute, sub.bytes)
        else:
            tokens = _vit_block(t, blk, tokens)
        if i in backbone.indices:  # drop prefix tokens, NCHW, .contiguous(): a copy
            feats.append(t.new((b, d, gh, gw), tokens.dtype, tokens.grad))
    return feats


def _feature_shapes(backbone: nn.Module, b: int, hw: tuple[int, int]) -> list[tuple[int, ...]]:
    return [(b, c, -(-hw[0] // s), -(-hw[1] // s)) for c, s in zip(backbone.out_channels, backbone.strides)]


def _trace_neck(t: _Tracer, neck: nn.Module, image: _Sym, feats: list[_Sym]) -> list[_Sym]:
    return [_trace_module(t, neck.stem, image)] + [_trace_module(t, lift, f) for lift, f in zip(neck.lifts, feats)]


def _trace_decoder(t: _Tracer, dec: nn.Module, image: _Sym, feats: list[_Sym]) -> tuple[dict[str, _Sym], int]:
    """Returns the three outputs and the bytes of the skips (their gradients accumulate over the branches)."""
    skips = _trace_neck(t, dec.neck, image, feats)
    skip_bytes = sum(s.nbytes for s in skips)
    kind = type(dec).__name__
    if kind == "HoVerNetDecoder":
        outs = {}
        for br in Branch:
            x = skips[-1]
            for block, skip in zip(dec.paths[br.value].blocks, reversed(skips[:-1])):
                x = _trace_module(t, block, t.cat([t.resize(x, skip.shape[-2:]), skip], 1))
            outs[br.value] = t.conv(x, dec.heads[br.value])
        return outs, skip_bytes
    if kind == "UNetResAttnDecoder":
        x = skips[-1]
        for gate, block, skip in zip(dec.gates, dec.blocks, reversed(skips[:-1])):
            x = t.resize(x, skip.shape[-2:])
            g = t.relu(t.add(t.conv(skip, gate.wx), t.conv(x, gate.wg)), inplace=True)
            g = t.mul(skip, t.sigmoid(t.conv(g, gate.psi[1])))
            x = _res_se(t, block, t.cat([x, g], 1))
        return {br.value: _trace_module(t, dec.heads[br.value], x) for br in Branch}, skip_bytes
    raise ValueError(f"the memory model knows the decoders HoVerNetDecoder and UNetResAttnDecoder, not {kind}.")


def _res_se(t: _Tracer, block: nn.Module, x: _Sym) -> _Sym:
    body = _trace_module(t, block.body, x)
    short = _trace_module(t, block.shortcut, x)
    y = t.relu(t.add(body, short), inplace=False)
    fc = block.se.fc  # Linear, ReLU, Linear, Sigmoid on the channel means
    w = t.new(y.shape[:2], y.dtype, y.grad)
    w = t.linear(w, fc[0])
    w = t.relu(w, fc[1].inplace)
    w = t.sigmoid(t.linear(w, fc[2]))
    return t.mul(y, t.view(w, w.shape + (1, 1)))


# ------------------------------------------------------------------------------- measured per-pixel constants
def _saved_storages(fn: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> tuple[Any, dict[int, int]]:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, torch.UntypedStorage] = {}  # holding the storages stops an address being reused mid-count

    def pack(x: torch.Tensor) -> torch.Tensor:
        st = x.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and st.nbytes() and ptr not in kept:
            kept[ptr] = st
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        result = fn()
    return result, {ptr: st.nbytes() for ptr, st in kept.items()}


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


def _autocast(low: str | None, device_type: str = "cpu"):
    import contextlib

    return torch.autocast(device_type, dtype=_TORCH_DTYPES[low]) if low else contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _loss_bytes_per_pixel(loss_key: tuple, num_classes: int, low: str | None) -> float:
    """Saved bytes of the loss per image pixel, counted on a 2 x 32 x 32 batch on the CPU."""
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
    with _autocast(low):
        _, n = measure_saved_bytes(lambda: loss_fn(outs, batch))
    return n / (b * s * s)


def _loss_key(cfg: Config) -> tuple:
    """The loss settings as a hashable key: (LossWeights field, value) pairs, as cellseg.losses.loss_from_config."""
    return (("np", cfg.LOSS_WEIGHT_NP), ("hv", cfg.LOSS_WEIGHT_HV), ("nc", cfg.LOSS_WEIGHT_NC),
            ("msge", cfg.HV_MSGE_WEIGHT), ("np_loss", cfg.NP_LOSS), ("focal_gamma", cfg.FOCAL_GAMMA),
            ("focal_alpha", tuple(cfg.FOCAL_ALPHA)), ("class_weights", tuple(cfg.CLASS_WEIGHTS)))


@functools.lru_cache(maxsize=16)
def _cnn_saved_bytes(encoder: str, low: str | None, grad_checkpointing: bool) -> tuple[float, int, float]:
    """A trained CNN encoder's saved bytes as ``per_pixel * pixels + fixed`` (``fixed``: its cached low-precision
    weight copies), fitted on the CPU on 2 images of 2 and of 4 x its size multiple, and its largest output per
    pixel. Its outputs and (in fp32) its input are left to the decoder, which keeps them too, so that nothing is
    counted twice."""
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
        shared = sum(saved.get(f.untyped_storage().data_ptr(), 0) for f in feats)
        points.append((2 * side * side, sum(saved.values()) - shared))
        largest = max(f.numel() * f.element_size() for f in feats) / (2 * side * side)
    (p1, s1), (p2, s2) = points
    per_pixel = (s2 - s1) / (p2 - p1)
    return per_pixel, max(0, round(s1 - per_pixel * p1)), largest


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

    def estimate(self, batch_size: int | None = None) -> MemoryEstimate:
        """The estimate at ``batch_size`` images per device per step (default BATCH_SIZE)."""
        cfg, b = self.cfg, batch_size or self.cfg.BATCH_SIZE
        model, t = self.model, _Tracer(self.device, self.low)
        pixels = b * math.prod(self.image_hw)
        image = t.new((b, 3, *self.image_hw), "f32", False)  # the batch, reflect-padded to the encoder's multiple
        frozen = not any(p.requires_grad for p in model.encoder.parameters())
        cnn_saved = cnn_fixed = cnn_largest = 0
        if model.encoder.family == "vit":
            t.grad_enabled = not frozen  # Phase 1: the encoder runs under no_grad
            feats = _trace_vit(t, model.encoder, image)
        else:
            shapes = _feature_shapes(model.encoder, b, self.image_hw)
            feats = [t.new(s, self.low or "f32", not frozen) for s in shapes]
            if not frozen:
                per_px, cnn_fixed, largest_px = _cnn_saved_bytes(cfg.ENCODER, self.low, bool(cfg.GRAD_CHECKPOINTING))
                cnn_saved, cnn_largest = int(per_px * pixels), int(largest_px * pixels)
        t.grad_enabled, t.part = True, "decoder"
        _, skip_bytes = _trace_decoder(t, model.decoder, image, feats)
        parts = {"encoder": cnn_saved, "decoder": 0}
        casts = {"encoder": cnn_fixed, "decoder": 0}  # the CNN's cached weight casts (a few bytes of stats in fp32)
        for nbytes, kind, part in t.saved.values():
            (casts if kind == "wcast" else parts)[part] += nbytes
        parts["loss"] = int(_loss_bytes_per_pixel(_loss_key(cfg), self.num_classes, self.low) * b
                            * self.image_size ** 2)
        saved_by_part = {k: v + casts.get(k, 0) for k, v in parts.items()}
        casts = sum(casts.values())
        params = 4 * self.n_total
        grads = 4 * self.n_trainable * (2 if self.world_size > 1 else 1)
        optimizer = 8 * self.n_trainable + 4 * self.n_tensors
        # at the start of backward: the gradients of an op's output and input (twice the largest tensor), the
        # skips' gradients accumulating over the branch paths, and one recomputed block under checkpointing
        transient = 2 * max(t.largest, cnn_largest) + skip_bytes + t.recompute
        allocated = params + grads + optimizer + sum(parts.values()) + casts + transient
        overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * allocated) if self.device == "cuda" else 0
        settings = {"encoder": cfg.ENCODER, "decoder": f"{cfg.DECODER} (width {cfg.DECODER_WIDTH})",
                    "phase": cfg.PHASE, "batch_size": b, "image_size": self.image_size, "precision": self.precision,
                    "grad_checkpointing": bool(cfg.GRAD_CHECKPOINTING), "device": self.device,
                    "params_total": self.n_total, "params_trainable": self.n_trainable,
                    "world_size": self.world_size}
        return MemoryEstimate(params, grads, optimizer, sum(parts.values()), casts, transient, overhead,
                              parts, saved_by_part, settings)


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
        if mm.estimate(b).total <= gpu_bytes:
            return b, per_device // b
    need = mm.estimate(1).total
    raise DoesNotFit(
        f"ENCODER='{cfg.ENCODER}' Phase {cfg.PHASE} at PATCH_SIZE={cfg.PATCH_SIZE} ({mm.precision}, "
        f"GRAD_CHECKPOINTING={cfg.GRAD_CHECKPOINTING}) needs {need / GiB:.2f} GiB with one image per step, more than "
        f"the {gpu_bytes / GiB:.2f} GiB available. Set GRAD_CHECKPOINTING=True, PRECISION='bf16', a smaller "
        "PATCH_SIZE or LORA_BLOCKS='last_half', or use a larger GPU.")


__all__ = ["GPU", "GPUS", "parse_gpu", "MemoryEstimate", "MemoryModel", "DoesNotFit", "estimate_memory",
           "suggest_batch", "effective_batch", "build_skeleton", "measure_saved_bytes", "model_tensors",
           "resolve_estimate_precision", "CUDA_CONTEXT_BYTES", "ALLOCATOR_SLACK"]
