"""Every GPU measurement of the project in one prepared, time-boxed run (issue 17): training step time and MFU per
switch, the memory model against ``torch.cuda.max_memory_allocated``, capped runs that emulate 12/16/24 GB cards,
sliding-window inference and whether the DataLoader keeps the GPU fed.

Usage (``benchmarks/gpu_suite.sh`` wraps this with ``PYTHONPATH=lib``)::

    benchmarks/gpu_suite.sh                    # on a GPU: UNI-sized ViT-L/16 (random init), 7-minute budget
    benchmarks/gpu_suite.sh --dry-run          # the same code paths on the CPU with timm's test_vit (< 2 min)
    OUT=/tmp/x benchmarks/gpu_suite.sh --budget-s 300 --only peak,memory

GPU time comes in short slots, so the suite is a list of measurements in priority order, each with a cost estimate.
Before each one it checks the time left; a measurement that would not fit is recorded as "not run: budget", and a
SIGALRM at the deadline stops the one in flight ("stopped: budget"). Results are rewritten to ``$OUT/gpu_suite.json``
and ``$OUT/gpu_suite.md`` after every measurement, so a killed run still leaves everything measured so far.

The import path is torch, timm, peft, numpy/scipy/scikit-image, tifffile, opencv and matplotlib (what a GPU node
without a package index has). The data-loading measurement uses ``cellseg.data``, which needs albumentations: where
it is missing that measurement is recorded as not run, with the way to carry the wheels.

Conventions:
- MFU = model FLOPs of forward + backward (``torch.utils.flop_counter.FlopCounterMode`` on the eager network) per
  second, divided by the bf16 matmul rate measured in the same run (8192^3 ``torch.matmul``), not a datasheet figure.
- Memory rows compare ``max_memory_allocated`` of a whole step (batch 8 x accumulation 2, the prediction table of
  ``benchmarks/RESULTS.md``) with ``MemoryModel.estimate().allocated``; error = predicted / measured - 1.
- A capped run limits this process's caching allocator to the emulated card's memory minus the CUDA context the
  memory model assumes (``torch.cuda.set_per_process_memory_fraction``), at the batch ``suggest_batch`` picks.
- Inference: one 1024x1024 image through ``cellseg.inference.predict_image`` with 256 px sliding-window tiles
  (overlap 0.25, 16 tiles per forward), tiles/s counted as network tiles (x8 forward passes with TTA).
- GPU idle fraction: the share of wall time the training loop spends waiting for ``next(loader)`` while the device
  has finished the previous step (the loop synchronises after each step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"
GiB = 1024**3


def _load_throughput():
    """``benchmarks/train_throughput.py`` as a module (the suite reuses its step, FLOP and memory code)."""
    spec = importlib.util.spec_from_file_location("train_throughput", HERE / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


tp = _load_throughput()


class BudgetExceeded(Exception):
    """The suite's deadline passed while a measurement was running."""


@dataclass
class Budget:
    """Wall-clock deadline of the whole suite."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


@contextmanager
def deadline(seconds: float):
    """Raise :class:`BudgetExceeded` in the main thread once ``seconds`` have passed (SIGALRM)."""

    def on_alarm(signum, frame):
        raise BudgetExceeded()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass(frozen=True)
class Preset:
    """What the suite runs: the GPU preset (UNI-sized) or the CPU dry run (test_vit)."""

    encoder: str
    width: int
    image_size: int
    batch_size: int
    steps: int
    warmup: int
    precision: str
    batch_limit: int  # largest batch tried when searching the largest that fits
    infer_image: int
    infer_tile: int
    infer_batch: int
    data_steps: int
    data_workers: tuple[int, ...]
    memory_sizes: tuple[int, ...]  # image sizes of the memory-model rows
    caps_gb: tuple[float, ...]
    matmul_n: int
    compile_backend: str


GPU_PRESET = Preset(encoder="uni", width=64, image_size=256, batch_size=8, steps=10, warmup=3, precision="bf16",
                    batch_limit=256, infer_image=1024, infer_tile=256, infer_batch=16, data_steps=50,
                    data_workers=(0, 4, 8), memory_sizes=(256, 512), caps_gb=(12, 16, 24), matmul_n=8192,
                    compile_backend="inductor")
# The dry run keeps every code path (capped runs included: suggest_batch, the cap arithmetic, the OOM handling) but
# the CPU has no allocator cap, and compile uses the aot_eager backend (no C++ toolchain needed, seconds not minutes).
DRY_PRESET = Preset(encoder="test_vit", width=16, image_size=64, batch_size=2, steps=1, warmup=0, precision="fp32",
                    batch_limit=4, infer_image=128, infer_tile=64, infer_batch=4, data_steps=3, data_workers=(0, 2),
                    memory_sizes=(64,), caps_gb=(12,), matmul_n=512, compile_backend="aot_eager")


class Suite:
    """Runs the measurements in order within the budget and keeps the results on disk after each one."""

    def __init__(self, preset: Preset, device: torch.device, out: Path, budget: Budget, dry_run: bool):
        self.p, self.device, self.out, self.budget, self.dry_run = preset, device, out, budget, dry_run
        self.results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": dry_run,
                                        "environment": environment(device), "measurements": []}
        self.matmul_peak: float | None = None

    # ----------------------------------------------------------------------------------------------- the runner
    def run(self, name: str, estimate_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """``fn``'s row, or a row saying why it did not run; written to disk either way."""
        entry: dict[str, Any] = {"name": name, "estimate_s": estimate_s}
        left = self.budget.left()
        if left < estimate_s:
            entry.update(status="not run: budget", detail=f"{left:.0f} s left, about {estimate_s:.0f} s needed")
            return self._record(entry)
        t0 = time.monotonic()
        try:
            with deadline(left):
                entry.update(status="ok", **fn())
        except BudgetExceeded:
            entry.update(status="stopped: budget", detail="the suite's time budget ran out during this measurement")
        except torch.OutOfMemoryError as e:
            entry.update(status="out of memory", detail=str(e).splitlines()[0])
        except Exception as e:  # one broken measurement must not cost the others
            entry.update(status="error", detail=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
        finally:
            self._release()
        entry["wall_s"] = round(time.monotonic() - t0, 2)
        return self._record(entry)

    def _record(self, entry: dict[str, Any]) -> dict[str, Any]:
        self.results["measurements"].append(entry)
        status = entry["status"] + (f" ({entry['detail']})" if entry["status"] != "ok" and "detail" in entry else "")
        print(f"[{self.budget.seconds - self.budget.left():6.1f} s] {entry['name']}: {status}", flush=True)
        self.write()
        return entry

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["elapsed_s"] = round(self.budget.seconds - self.budget.left(), 1)
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "gpu_suite.md").write_text(markdown(self.results))

    # ------------------------------------------------------------------------------------------- measurements
    def args(self, **kw: Any) -> argparse.Namespace:
        """train_throughput's arguments for this preset, with overrides."""
        p = self.p
        argv = ["--encoder", p.encoder, "--width", str(kw.pop("width", p.width)),
                "--image-size", str(kw.pop("image_size", p.image_size)),
                "--batch-size", str(kw.pop("batch_size", p.batch_size)), "--phase", str(kw.pop("phase", 1)),
                "--precision", p.precision, "--steps", str(kw.pop("steps", p.steps)),
                "--warmup", str(kw.pop("warmup", p.warmup)), "--device", str(self.device), "--no-append",
                "--compile-backend", p.compile_backend]
        for flag in ("compile", "grad_checkpointing", "fused_attn"):
            if flag in kw:
                argv.append(("--" if kw.pop(flag) else "--no-") + flag.replace("_", "-"))
        args = tp.parse_args(argv)
        args.cpu_peak = False  # the memory rows measure the CPU allocator's peak; the speed rows need not repeat it
        for k, v in kw.items():
            setattr(args, k, v)
        return args

    def matmul(self) -> dict[str, Any]:
        """The chip's bf16 matmul rate (fp32 on the CPU dry run), measured: the MFU denominator."""
        n = self.p.matmul_n
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        for _ in range(3):
            a @ b
        tp._sync(self.device)
        reps, t0 = 20, time.perf_counter()
        for _ in range(reps):
            a @ b
        tp._sync(self.device)
        dt = (time.perf_counter() - t0) / reps
        self.matmul_peak = 2 * n**3 / dt
        return {"matmul": f"{n}^3 {str(dtype).removeprefix('torch.')}", "tflops": round(self.matmul_peak / 1e12, 2)}

    def train_row(self, **kw: Any) -> dict[str, Any]:
        """Images/s, step split, peak memory and MFU of one training configuration."""
        args = self.args(**kw)
        r = tp.train(args, self.device)
        step_s = r["step_ms"] / 1e3
        mfu = r["flops"] / step_s / self.matmul_peak if self.matmul_peak else None
        pred = r["predicted"]
        return {"configuration": tp.label(args, r), "images_per_s": round(r["images_per_s"], 2),
                "step_ms": round(r["step_ms"], 2), "split_ms": {k: round(v, 2) for k, v in r["split_ms"].items()},
                "warmup_s": round(r["warmup_s"], 1), "gflop_per_step": round(r["flops"] / 1e9, 2),
                "mfu": round(mfu, 4) if mfu is not None else None,
                "memory_measured_bytes": r["measured_peak"],
                "memory_predicted_bytes": pred.allocated if pred else None,
                "memory_error": (round(pred.allocated / r["measured_peak"] - 1, 4)
                                 if pred and r["measured_peak"] else None)}

    def largest_batch(self, phase: int) -> dict[str, Any]:
        """Doubles the batch from the preset's until a step runs out of memory (or the preset's limit); the row is
        the throughput at the largest batch that fitted."""
        b, best, tried = self.p.batch_size, None, []
        while b <= self.p.batch_limit:
            try:
                row = self.train_row(phase=phase, batch_size=b, steps=max(1, self.p.steps // 2),
                                     warmup=min(1, self.p.warmup))
                best = row
                tried.append(f"b{b}: fits")
            except torch.OutOfMemoryError:
                tried.append(f"b{b}: out of memory")
                break
            finally:
                self._release()
            b *= 2
        if best is None:
            raise torch.OutOfMemoryError(f"batch {self.p.batch_size} does not fit")
        return {**best, "search": ", ".join(tried)}

    def memory_row(self, phase: int, image_size: int, grad_checkpointing: bool = False,
                   fused_attn: bool = True) -> dict[str, Any]:
        """A whole step's allocated peak at batch 8 x accumulation 2 against the memory model (RESULTS.md's
        prediction table)."""
        from cellseg.config import replace
        from cellseg.losses import loss_from_config
        from cellseg.memory import MemoryModel

        args = self.args(phase=phase, image_size=image_size, grad_checkpointing=grad_checkpointing,
                         fused_attn=fused_attn)
        cfg = replace(tp.bench_config(args, self.device), GRAD_ACCUM_TARGET=2 * args.batch_size)
        model = tp.build(cfg, args, self.device, args.num_classes)
        batch = tp.random_batch(cfg.BATCH_SIZE, cfg.PATCH_SIZE, args.num_classes, self.device)
        measured = tp.step_peak(model, loss_from_config(cfg, args.num_classes).to(self.device), batch, cfg,
                                self.device)
        meta = tp.build(cfg, args, torch.device("meta"), args.num_classes)
        est = MemoryModel(cfg, num_classes=args.num_classes, device=self.device.type, model=meta).estimate()
        del model, batch
        name = (f"{cfg.ENCODER}+{cfg.DECODER} P{phase} {image_size}px b{cfg.BATCH_SIZE}x2"
                + (", ckpt" if grad_checkpointing else "") + ("" if fused_attn else ", no-SDPA"))
        return {"configuration": name, "measured_bytes": measured, "predicted_bytes": est.allocated,
                "error": round(est.allocated / measured - 1, 4), "within_10pct": abs(est.allocated / measured - 1) <= 0.10}

    def capped_row(self, card_gb: float) -> dict[str, Any]:
        """Phase 2 at ``suggest_batch``'s batch for a ``card_gb`` card, with this process capped to what such a card
        leaves the allocator; fits or runs out of memory."""
        from cellseg.config import replace
        from cellseg.losses import loss_from_config
        from cellseg.memory import CUDA_CONTEXT_BYTES, MemoryModel, parse_gpu, suggest_batch

        gpu = parse_gpu(f"{card_gb:g}gb")
        args = self.args(phase=2)
        cfg = replace(tp.bench_config(args, self.device), GRAD_ACCUM_TARGET=16, PRECISION="auto")
        meta = tp.build(cfg, args, torch.device("meta"), args.num_classes)
        mm = MemoryModel(cfg, num_classes=args.num_classes, bf16_supported=gpu.bf16, model=meta)
        b, acc = suggest_batch(cfg, gpu.memory_bytes, num_classes=args.num_classes, memory_model=mm)
        cfg = replace(cfg, BATCH_SIZE=b, PRECISION=self.p.precision)
        allowed = gpu.memory_bytes - CUDA_CONTEXT_BYTES
        row: dict[str, Any] = {"card": gpu.name, "suggested": f"{b} x {acc}",
                               "predicted_total_bytes": mm.estimate(b, acc).total, "cap_bytes": allowed}
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), self.device)
        else:
            row["note"] = "no allocator cap on the CPU (dry run): the step runs uncapped"
        model = tp.build(cfg, args, self.device, args.num_classes)
        batch = tp.random_batch(b, cfg.PATCH_SIZE, args.num_classes, self.device)
        try:
            row["measured_bytes"] = tp.step_peak(model, loss_from_config(cfg, args.num_classes).to(self.device),
                                                 batch, cfg, self.device)
            row["fits"] = True
        except torch.OutOfMemoryError as e:
            row.update(fits=False, detail=str(e).splitlines()[0])
        return row

    def inference_row(self, tta: bool) -> dict[str, Any]:
        """Sliding-window tiles/s over one ``infer_image``-square image."""
        import numpy as np

        from cellseg.inference import predict_image, tile_starts

        p = self.p
        args = self.args()
        cfg = tp.bench_config(args, self.device)
        model = tp.build(cfg, args, self.device, args.num_classes).eval()
        image = np.random.default_rng(0).integers(0, 255, (p.infer_image, p.infer_image, 3), dtype=np.uint8)
        amp = "bf16" if p.precision == "bf16" else "none"
        kw = dict(tile_size=p.infer_tile, overlap=0.25, tta=tta, amp=amp, device=self.device,
                  batch_size=p.infer_batch)
        predict_image(model, image, **kw)  # warm-up (kernels, allocator)
        tp._sync(self.device)
        reps = 1 if self.dry_run else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            predict_image(model, image, **kw)
        tp._sync(self.device)
        dt = (time.perf_counter() - t0) / reps
        tiles = len(tile_starts(p.infer_image, p.infer_tile, 0.25)) ** 2
        return {"configuration": f"{p.infer_image}^2 image, {p.infer_tile} px tiles, TTA {'on' if tta else 'off'}",
                "tiles": tiles, "seconds_per_image": round(dt, 3), "tiles_per_s": round(tiles / dt, 1),
                "forward_passes_per_tile": 8 if tta else 1}

    def data_row(self, workers: int) -> dict[str, Any]:
        """GPU idle fraction over ``data_steps`` Phase 1 steps fed by CellDataset with ``workers`` workers."""
        try:
            import cellseg.data  # noqa: F401  (albumentations)
        except ImportError as e:
            raise RuntimeError(f"cellseg.data cannot be imported here ({e}): carry albumentations and its "
                               "dependencies as wheels (see benchmarks/gpu_suite.sh) to measure data loading") from e
        from cellseg.losses import loss_from_config
        from cellseg.optim import build_optimizer
        from cellseg.training.trainer import autocast_context

        args = self.args(phase=1, data="cache", num_workers=workers, cache=str(self._cache()))
        cfg = tp.bench_config(args, self.device)
        model = tp.build(cfg, args, self.device, args.num_classes)
        loss_fn = loss_from_config(cfg, args.num_classes).to(self.device)
        optimizer = build_optimizer(model, cfg)
        data = tp.batches(args, cfg, self.device, args.num_classes)
        waits, steps = [], []
        for i in range(self.p.data_steps + 1):  # the first step starts the workers: not counted
            t0 = time.perf_counter()
            batch = next(data)
            t1 = time.perf_counter()
            with autocast_context(self.p.precision, self.device):
                loss = loss_fn(model(batch["image"]), batch)["total"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tp._sync(self.device)
            if i:
                waits.append(t1 - t0)
                steps.append(time.perf_counter() - t0)
        return {"configuration": f"P1 {self.p.image_size}px b{self.p.batch_size}, CellDataset, {workers} workers",
                "steps": len(steps), "gpu_idle_fraction": round(sum(waits) / sum(steps), 4),
                "mean_wait_ms": round(1e3 * statistics.fmean(waits), 2),
                "mean_step_ms": round(1e3 * statistics.fmean(steps), 2)}

    def _cache(self) -> Path:
        if not hasattr(self, "_cache_dir"):
            self._cache_dir = Path(tempfile.mkdtemp(prefix="cellseg-gpu-suite-")) / "data"
        return self._cache_dir


def environment(device: torch.device) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device), "host": platform.node()}
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GiB, 1),
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu=None, cpu_threads=torch.get_num_threads())
    return env


def plan(s: Suite) -> list[tuple[str, str, float, Callable[[], dict[str, Any]]]]:
    """(group, name, estimated seconds on an H100/H200, measurement) in priority order: the matmul peak first (MFU
    needs it), the memory model next (the promise ``cellseg preflight`` makes), eager throughput, capped runs,
    inference, data loading, and the torch.compile rows last (their compile time is the least predictable)."""
    p = s.p
    rows: list[tuple[str, str, float, Callable[[], dict[str, Any]]]] = [("peak", "bf16 matmul peak", 5, s.matmul)]
    memory_cases = [(1, size, False, True) for size in p.memory_sizes]
    memory_cases += [(2, size, ckpt, True) for size in p.memory_sizes for ckpt in (False, True)]
    memory_cases.insert(3, (2, p.memory_sizes[0], False, False))  # RESULTS.md's no-SDPA row
    for phase, size, ckpt, fused in memory_cases:
        rows.append(("memory", f"memory P{phase} {size}px{' ckpt' if ckpt else ''}{'' if fused else ' no-SDPA'}",
                     8 if size <= 256 else 15,
                     lambda a=(phase, size, ckpt, fused): s.memory_row(*a)))
    for phase in (1, 2):
        rows.append(("train", f"train P{phase} eager", 10, lambda ph=phase: s.train_row(phase=ph)))
        rows.append(("train", f"train P{phase} explicit attention", 10,
                     lambda ph=phase: s.train_row(phase=ph, fused_attn=False)))
    rows.append(("train", "train P2 gradient checkpointing", 10, lambda: s.train_row(phase=2, grad_checkpointing=True)))
    rows.append(("train", "train P2 largest batch", 40, lambda: s.largest_batch(2)))
    rows.append(("train", "train P1 largest batch", 30, lambda: s.largest_batch(1)))
    for gb in p.caps_gb:
        rows.append(("capped", f"capped {gb:g} GB", 10, lambda g=gb: s.capped_row(g)))
    for tta in (False, True):
        rows.append(("inference", f"inference TTA {'on' if tta else 'off'}", 15 if tta else 8,
                     lambda t=tta: s.inference_row(t)))
    for w in p.data_workers:
        rows.append(("data", f"data loading {w} workers", 25, lambda n=w: s.data_row(n)))
    rows.append(("compile", "train P2 compile", 90, lambda: s.train_row(phase=2, compile=True)))
    rows.append(("compile", "train P1 compile", 60, lambda: s.train_row(phase=1, compile=True)))
    rows.append(("compile", "train P2 compile + checkpointing", 90,
                 lambda: s.train_row(phase=2, compile=True, grad_checkpointing=True)))
    return rows


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


def markdown(results: dict[str, Any]) -> str:
    """The results as the tables that go into benchmarks/RESULTS.md."""
    env = results["environment"]
    lines = [f"# GPU suite{' (CPU dry run)' if results['dry_run'] else ''}: {env.get('gpu') or 'CPU'}", "",
             f"Started {results['started']}, {results.get('elapsed_s', 0)} s; torch {env['torch']} (CUDA "
             f"{env['cuda']}), timm {env['timm']}.", ""]
    ms = results["measurements"]
    ok = [m for m in ms if m["status"] == "ok"]
    peak = next((m for m in ok if m["name"] == "bf16 matmul peak"), None)
    if peak:
        lines += [f"Measured matmul peak: {peak['tflops']} TFLOP/s ({peak['matmul']}).", ""]
    def pct(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(100 * v, fmt) + "%"

    tables = [
        (["configuration", "images/s", "step ms", "forward", "backward", "optimizer", "GFLOP/step", "MFU",
          "memory measured", "memory predicted", "error"],
         [m for m in ok if "images_per_s" in m],
         lambda m: [m["configuration"] + (f" ({m['search']})" if "search" in m else ""), m["images_per_s"],
                    m["step_ms"], m["split_ms"]["forward"], m["split_ms"]["backward"], m["split_ms"]["optimizer"],
                    m["gflop_per_step"], pct(m["mfu"], ".1f"), _gib(m["memory_measured_bytes"]),
                    _gib(m["memory_predicted_bytes"]), pct(m["memory_error"], "+.1f")]),
        (["memory configuration", "measured peak", "predicted", "error", "within 10 %"],
         [m for m in ok if "within_10pct" in m],
         lambda m: [m["configuration"], _gib(m["measured_bytes"]), _gib(m["predicted_bytes"]),
                    pct(m["error"], "+.1f"), "yes" if m["within_10pct"] else "NO"]),
        (["emulated card", "suggested batch x accumulation", "predicted total", "cap", "measured peak", "result"],
         [m for m in ok if "card" in m],
         lambda m: [m["card"], m["suggested"], _gib(m["predicted_total_bytes"]), _gib(m["cap_bytes"]),
                    _gib(m.get("measured_bytes")),
                    ("fits" if m["fits"] else "OUT OF MEMORY") + (f" ({m['note']})" if "note" in m else "")]),
        (["inference", "tiles", "s/image", "tiles/s"],
         [m for m in ok if "tiles_per_s" in m],
         lambda m: [m["configuration"], m["tiles"], m["seconds_per_image"], m["tiles_per_s"]]),
        (["data loading", "steps", "GPU idle", "mean wait ms", "mean step ms"],
         [m for m in ok if "gpu_idle_fraction" in m],
         lambda m: [m["configuration"], m["steps"], pct(m["gpu_idle_fraction"], ".1f"), m["mean_wait_ms"],
                    m["mean_step_ms"]]),
        (["not measured", "why"],
         [m for m in ms if m["status"] != "ok"],
         lambda m: [m["name"], m["status"] + (f": {m['detail']}" if "detail" in m else "")]),
    ]
    for header, items, cells in tables:
        if items:  # a table only for what was measured
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in cells(m)) + " |" for m in items]
            lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU with test_vit")
    p.add_argument("--budget-s", type=float, default=None, help="time budget (default 420; dry run 110)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(DEFAULT_OUT),
                   help="folder for gpu_suite.json and gpu_suite.md (default $OUT, else benchmarks/out)")
    p.add_argument("--only", default="", help="comma-separated groups: peak, memory, train, capped, inference, "
                                              "data, compile (default all)")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s if args.budget_s is not None else (110.0 if args.dry_run else 420.0)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    groups = {"peak", "memory", "train", "capped", "inference", "data", "compile"}
    args.only = {g.strip() for g in args.only.split(",") if g.strip()}
    if args.only - groups:
        p.error(f"--only takes groups from {sorted(groups)}, got {sorted(args.only - groups)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.dry_run:
        device, preset = torch.device("cpu"), DRY_PRESET
    elif torch.cuda.is_available():
        device, preset = torch.device("cuda"), GPU_PRESET
    else:
        print("No CUDA device: the GPU suite measures a GPU. Run it on a GPU node, or use --dry-run to check the "
              "code paths on the CPU.", file=sys.stderr)
        return 2
    suite = Suite(preset, device, Path(args.out), budget, args.dry_run)
    print(f"GPU suite{' (dry run)' if args.dry_run else ''} on {suite.results['environment'].get('gpu') or 'CPU'}, "
          f"budget {args.budget_s:.0f} s, results in {args.out}", flush=True)
    for group, name, estimate, fn in plan(suite):
        if args.only and group not in args.only:
            continue
        if args.dry_run:
            estimate = min(estimate, 5.0)
        suite.run(name, estimate, fn)
    suite.write()
    counts: dict[str, int] = {}
    for m in suite.results["measurements"]:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    print("\n" + markdown(suite.results))
    print("summary: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"; {args.out}/gpu_suite.md")
    return 0 if "error" not in counts else 1


if __name__ == "__main__":
    sys.exit(main())
