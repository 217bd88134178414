"""Training and inference throughput of encoder + decoder, with the step time split, peak memory against the memory
model, and model FLOPs utilisation (MFU), one switch at a time.

Usage (see benchmarks/README.md and the commands in benchmarks/RESULTS.md):
    python benchmarks/train_throughput.py --tiny                                  # CPU smoke run (test_vit, 64 px)
    python benchmarks/train_throughput.py --phase 2 --image-size 256 --batch-size 8 --precision bf16 --compile
    python benchmarks/train_throughput.py --phase 2 --memory-cap-gb 11.5 --batch-size 16   # the 12 GB check
    python benchmarks/train_throughput.py --mode inference --image-size 256 --batch-size 16 --pp-workers 8
    python benchmarks/train_throughput.py --memory-table                           # memory model vs measured (CPU)
    python benchmarks/train_throughput.py --cuda-rules-table                       # ... vs UNI on fake CUDA tensors

The encoder defaults to UNI's architecture (ViT-L/16, ``init_values=1e-5``) with random weights, built by
:func:`cellseg.memory.build_skeleton` on the target device, so no weights file is needed. Each timed step is split
into data / forward (network + loss) / backward / optimizer (clipping, AdamW, zero_grad), with
``torch.cuda.synchronize()`` around each part on a GPU. FLOPs of forward + backward are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (on the CPU its registry lacks the CPU flash-attention kernel, so
attention FLOPs are left out there); MFU = FLOPs / mean step time / the device's dense bf16 peak (fp16 on GPUs
without bf16; none on CPUs). The peak is ``torch.cuda.max_memory_allocated`` on a GPU and the CPU allocator's
peak over one more step on the CPU (every allocation recorded by ``torch.profiler``), next to the memory model's
prediction, with the bytes kept for backward (``saved_tensors_hooks``) against the predicted ones.
Each run appends one markdown row, with the exact command, to ``--results`` (default benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import multiprocessing as mp
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg.config import Config, resolve_config
from cellseg.memory import GiB, MemoryModel, MiB, build_skeleton, measure_step_peak, measure_step_saved

SECTION = "## Training and inference throughput (`benchmarks/train_throughput.py`)"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Dense (not 2:4 sparse) tensor-core peaks from NVIDIA's datasheets, TFLOP/s, bf16 with fp32 accumulation (fp16 on
# V100, which has no bf16). Matched in order against torch.cuda.get_device_name().
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("A10", 125.0), ("L40S", 362.0), ("L4", 121.0), ("V100", 125.0),
]

TRAIN_HEADER = ("| configuration | images/s | step ms | data | forward | backward | optimizer | memory measured | "
                "memory predicted | GFLOP/step | MFU | command |")
INFER_HEADER = ("| configuration | network tiles/s | post-processing tiles/s | overlapped tiles/s | batch ms | "
                "memory measured | command |")


def peak_flops_for(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its ``torch.cuda.get_device_name``, else None."""
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def peak_flops(device: torch.device) -> float | None:
    return peak_flops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(args: argparse.Namespace, device: torch.device) -> Config:
    return resolve_config(dict(
        ENCODER=args.encoder, ENCODER_WEIGHTS="", DECODER=args.decoder, DECODER_WIDTH=args.width,
        PATCH_SIZE=args.image_size, BATCH_SIZE=args.batch_size, GRAD_ACCUM_TARGET=0, PHASE=args.phase,
        PRECISION=args.precision or ("bf16" if device.type == "cuda" else "fp32"), DEVICE=device.type,
        GRAD_CHECKPOINTING=args.grad_checkpointing, CHANNELS_LAST=args.channels_last, USE_COMPILE=args.compile,
        NUM_WORKERS=args.num_workers, LORA_R=args.lora_r, LORA_ALPHA=2 * args.lora_r))


def build(cfg: Config, args: argparse.Namespace, device: torch.device, num_classes: int) -> torch.nn.Module:
    """The network for ``cfg.PHASE`` with random weights on ``device``, with the attention switch applied."""
    torch.manual_seed(0)
    model = build_skeleton(cfg, num_classes, device=device)
    if model.encoder.family == "vit":
        for blk in model.encoder.core.blocks:
            blk.attn.fused_attn = args.fused_attn
    return model


def random_batch(b: int, size: int, num_classes: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch of random images and targets (the loss's cost does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    fg = torch.rand(b, size, size, generator=g) > 0.6
    batch = {"image": torch.randn(b, 3, size, size, generator=g), "np": fg.long(),
             "hv": torch.rand(b, 2, size, size, generator=g) * 2 - 1,
             "nc": fg.long() * torch.randint(1, num_classes + 1, (b, size, size), generator=g),
             "ignore": torch.zeros(b, size, size, dtype=torch.bool), "inst_map": fg.long()}
    return {k: v.to(device) for k, v in batch.items()}


def batches(args: argparse.Namespace, cfg: Config, device: torch.device, num_classes: int):
    """Endless batches: one random batch already on the device, or the real CellDataset over a synthetic cache."""
    if args.data == "random":
        batch = random_batch(args.batch_size, args.image_size, num_classes, device)
        while True:
            yield batch
    try:
        from cellseg.data import CellDataset, load_manifest, prepare_dataset
    except ImportError as e:
        raise SystemExit(f"--data cache needs cellseg.data's CellDataset, load_manifest and prepare_dataset ({e}); "
                         "use --data random.") from e
    from torch.utils.data import DataLoader

    from cellseg.training.sampler import EpochIndexed, EpochSampler

    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="cellseg-bench-")) / "data"
    if not (cache / "manifest.json").exists():
        prepare_dataset("synthetic", None, cache, synth_num_images=max(16, 4 * args.batch_size),
                        synth_image_size=max(args.image_size, 256), progress=False)
    names = list(load_manifest(cache)["class_names"])
    ds = CellDataset(cache, "train", patch_size=args.image_size, augment=True, seed=0, class_names=names)
    kw = dict(multiprocessing_context="forkserver", persistent_workers=True, prefetch_factor=2) \
        if args.num_workers else {}
    loader = DataLoader(EpochIndexed(ds), batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_memory and device.type == "cuda", drop_last=True,
                        sampler=EpochSampler(len(ds), seed=0), **kw)
    while True:
        for batch in loader:
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Warm-up, then timed optimizer steps; returns the measurements."""
    from torch.utils.flop_counter import FlopCounterMode

    from cellseg.losses import loss_from_config
    from cellseg.optim import build_optimizer
    from cellseg.training.trainer import autocast_context, resolve_precision

    num_classes = args.num_classes
    cfg = bench_config(args, device)
    model = build(cfg, args, device, num_classes)
    loss_fn = loss_from_config(cfg, num_classes).to(device)
    optimizer = build_optimizer(model, cfg, fused=args.fused_adamw)
    if not args.no_grad_encoder:  # the classic half-freeze: weights not optimised but still recorded by autograd
        for p in model.encoder.parameters():
            p.requires_grad_(True)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    precision = resolve_precision(cfg.PRECISION, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    net = torch.compile(model, backend=args.compile_backend) if args.compile else model
    params = [p for g in optimizer.param_groups for p in g["params"]]
    data = batches(args, cfg, device, num_classes)
    times: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        batch = next(data)
        x = batch["image"].contiguous(memory_format=torch.channels_last) if args.channels_last else batch["image"]
        _sync(device)
        t1 = time.perf_counter()
        with autocast_context(precision, device):
            out = net(x)  # held to the end of the step, as the Trainer holds it
            loss = loss_fn(out, batch)["total"]
        _sync(device)
        t2 = time.perf_counter()
        (scaler.scale(loss) if scaler else loss).backward()
        _sync(device)
        t3 = time.perf_counter()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.GRAD_CLIP)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out
        _sync(device)
        t4 = time.perf_counter()
        if record:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k].append(dt)

    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        step(False)
    warmup_s = time.perf_counter() - t_warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        step(True)
    measured_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    step_s = statistics.fmean(sum(parts) for parts in zip(*times.values()))
    batch = random_batch(args.batch_size, args.image_size, num_classes, device, seed=1)
    with FlopCounterMode(display=False) as counter:  # eager model: the same FLOPs whatever compile fuses
        with autocast_context(precision, device):
            loss = loss_fn(model(batch["image"]), batch)["total"]
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    saved = measure_step_saved(model, loss_fn, batch, precision=precision)["total"]
    if device.type == "cpu" and getattr(args, "cpu_peak", True):  # the CPU allocator's peak (torch.profiler)
        measured_peak = measure_step_peak(net, loss_fn, batch, optimizer, precision=precision,
                                          clip=cfg.GRAD_CLIP)["peak"]
    predicted = None
    if args.no_grad_encoder:  # the memory model describes the training set-up, not the half-freeze
        meta = build(cfg, args, torch.device("meta"), num_classes)
        predicted = MemoryModel(cfg, num_classes=num_classes, device=device.type, model=meta).estimate()
    peak = peak_flops(device)
    return {"kind": "train", "cfg": cfg, "precision": precision, "images_per_s": args.batch_size / step_s,
            "step_ms": 1e3 * step_s, "split_ms": {k: 1e3 * statistics.fmean(v) for k, v in times.items()},
            "warmup_s": warmup_s, "measured_peak": measured_peak, "saved": saved, "predicted": predicted,
            "flops": flops, "mfu": flops / step_s / peak if peak else None}


def _synthetic_maps(n: int, size: int, diameter: float, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Foreground probability and HV maps of random disks, as a trained network outputs them (smooth, not noise)."""
    out = []
    yy, xx = np.ogrid[:size, :size]
    r = diameter / 2
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        fg = np.zeros((size, size), np.float32)
        hv = np.zeros((2, size, size), np.float32)
        for _ in range(int(0.35 * size * size / (np.pi * r * r))):
            cy, cx = rng.uniform(r, size - r, 2)
            disk = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (fg == 0)
            ys, xs = np.nonzero(disk)
            fg[ys, xs] = 0.95
            hv[0, ys, xs], hv[1, ys, xs] = (xs - cx) / r, (ys - cy) / r
        out.append((fg, np.clip(hv, -1, 1)))
    return out


def infer(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Network tiles/s, post-processing tiles/s on CPU workers, and both overlapped."""
    from cellseg.postprocess import hv_to_instances
    from cellseg.training.trainer import autocast_context, resolve_precision

    cfg = bench_config(args, device)
    model = build(cfg, args, device, args.num_classes).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model, backend=args.compile_backend) if args.compile else model
    precision = resolve_precision(cfg.PRECISION, device)
    x = random_batch(args.batch_size, args.image_size, args.num_classes, device)["image"]
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), autocast_context(precision, device):
            out = net(x)
            _ = (out["np"].float().softmax(1)[:, 1].cpu(), out["hv"].float().cpu())  # what post-processing reads

    for _ in range(args.warmup):
        forward()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        forward()
    _sync(device)
    net_s = (time.perf_counter() - t0) / args.steps
    maps = _synthetic_maps(args.batch_size, args.image_size, args.diameter)
    fgs, hvs = [m[0] for m in maps], [m[1] for m in maps]
    post_one = functools.partial(hv_to_instances, object_diameter=args.diameter)  # picklable: a library function
    ctx = mp.get_context("forkserver")
    with cf.ProcessPoolExecutor(max_workers=args.pp_workers, mp_context=ctx) if args.pp_workers else nullcontext() \
            as pool:
        def post_all() -> list:
            return list(pool.map(post_one, fgs, hvs) if pool else map(post_one, fgs, hvs))

        post_all()  # start the workers
        t0 = time.perf_counter()
        for _ in range(args.steps):
            post_all()
        pp_s = (time.perf_counter() - t0) / args.steps
        t0 = time.perf_counter()
        pending: list = []
        for _ in range(args.steps):  # the device computes batch i+1 while the workers post-process batch i
            futures = [pool.submit(post_one, fg, hv) for fg, hv in maps] if pool else []
            forward()
            for f in pending:
                f.result()
            if pool is None:
                post_all()
            pending = futures
        for f in pending:
            f.result()
        both_s = (time.perf_counter() - t0) / args.steps
    return {"kind": "inference", "cfg": cfg, "precision": precision, "net_tiles_s": args.batch_size / net_s,
            "pp_tiles_s": args.batch_size / pp_s, "overlap_tiles_s": args.batch_size / both_s,
            "batch_ms": 1e3 * net_s,
            "measured_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def _mem(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def label(args: argparse.Namespace, r: dict) -> str:
    cfg = r["cfg"]
    sw = [("compile" if args.compile else None), ("ckpt" if args.grad_checkpointing else None),
          ("channels_last" if args.channels_last else None), (None if args.fused_attn else "no-SDPA"),
          (None if args.fused_adamw else "unfused-AdamW"), (None if args.no_grad_encoder else "encoder-grad"),
          (f"data {args.data} w{args.num_workers}{' pin' if args.pin_memory and cfg.DEVICE == 'cuda' else ''}"
           if args.data != "random" else None), (f"cap {args.memory_cap_gb:g} GB" if args.memory_cap_gb else None)]
    return (f"{cfg.ENCODER}+{cfg.DECODER} P{cfg.PHASE} {cfg.PATCH_SIZE}px b{cfg.BATCH_SIZE} {r['precision']}"
            + "".join(f", {s}" for s in sw if s))


def row(args: argparse.Namespace, r: dict, command: str) -> str:
    if r["kind"] == "inference":
        return (f"| {label(args, r)} | {r['net_tiles_s']:.1f} | {r['pp_tiles_s']:.1f} ({args.pp_workers} workers) | "
                f"{r['overlap_tiles_s']:.1f} | {r['batch_ms']:.1f} | {_mem(r['measured_peak'])} | `{command}` |")
    s, pred = r["split_ms"], r["predicted"]
    measured = f"{_mem(r['measured_peak'])} peak ({_mem(r['saved'])} saved)"
    predicted = f"{_mem(pred.allocated)} peak ({_mem(pred.saved)} saved)" if pred else "n/a"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak rate)"
    return (f"| {label(args, r)} | {r['images_per_s']:.2f} | {r['step_ms']:.1f} | {s['data']:.1f} | "
            f"{s['forward']:.1f} | {s['backward']:.1f} | {s['optimizer']:.1f} | {measured} | {predicted} | "
            f"{r['flops'] / 1e9:.2f} | {mfu} | `{command}` |")


def append_row(path: Path, device: str, header: str, line: str) -> None:
    """Append ``line`` to the table under ``### <device>`` (``header``'s kind) in this script's section of
    ``path``, creating the section, the device heading or the table when missing."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    if SECTION not in lines:
        lines += ["", SECTION]
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    kind = "training" if header == TRAIN_HEADER else "inference"
    heading = f"### {device}: {kind}"
    if heading not in lines[start:end]:
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        lines[end:end] = ["", heading, "", header, "|" + "---|" * (header.count("|") - 1)]
        end += 5
    h = lines.index(heading, start)
    t = h + 1
    while t < len(lines) and not lines[t].startswith("|"):
        t += 1
    while t < len(lines) and lines[t].startswith("|"):
        t += 1
    lines.insert(t, line)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


# ----- the memory model against measured saved bytes
MEMORY_CASES: list[dict[str, Any]] = [
    dict(PHASE=1), dict(PHASE=2), dict(PHASE=2, GRAD_CHECKPOINTING=True), dict(PHASE=1, PRECISION="bf16"),
    dict(PHASE=2, PRECISION="bf16"), dict(PHASE=2, PATCH_SIZE=96, BATCH_SIZE=3), dict(PHASE=2, PATCH_SIZE=72),
    dict(PHASE=1, DECODER="unet_resattn"), dict(PHASE=2, DECODER="unet_resattn", PRECISION="bf16"),
    dict(PHASE=2, LORA_BLOCKS="last_half"), dict(PHASE=2, LORA_TARGETS=["qkv", "fc2"]),
    dict(PHASE=2, PRECISION="bf16", GRAD_CHECKPOINTING=True), dict(PHASE=1, ENCODER="test_resnet"),
    dict(PHASE=2, ENCODER="test_resnet"), dict(PHASE=2, ENCODER="test_resnet", PRECISION="bf16"),
    dict(PHASE=2, ENCODER="test_resnet", GRAD_ACCUM_TARGET=4), dict(PHASE=2, PRECISION="bf16", GRAD_ACCUM_TARGET=6),
    dict(PHASE=2, ENCODER="vit_small_patch16_224", PATCH_SIZE=160),
    dict(PHASE=2, ENCODER="vit_small_patch16_224", PATCH_SIZE=160, PRECISION="bf16"),
    dict(PHASE=2, ENCODER="vit_small_patch16_224", PATCH_SIZE=160, PRECISION="bf16", GRAD_CHECKPOINTING=True),
    dict(PHASE=2, ENCODER="vit_small_patch16_224", PATCH_SIZE=160, attention="explicit"),
    dict(PHASE=2, ENCODER="vit_small_patch16_224", PATCH_SIZE=160, PRECISION="bf16", attention="explicit"),
]


def step_peak(model: torch.nn.Module, loss_fn: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: Config,
              device: torch.device) -> int:
    """Allocated bytes at the peak of a training step (GRAD_ACCUM_TARGET's micro-batches), the second of two (the
    optimizer's states exist)."""
    from cellseg.optim import build_optimizer
    from cellseg.training.trainer import accumulation_steps, autocast_context

    optimizer = build_optimizer(model, cfg)
    accumulation = accumulation_steps(cfg, world_size=1)
    if device.type == "cpu":
        return measure_step_peak(model, loss_fn, batch, optimizer, precision=cfg.PRECISION, clip=cfg.GRAD_CLIP,
                                 accumulation=accumulation)["peak"]
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(2):
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if i:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(accumulation):
            with autocast_context(cfg.PRECISION, device):
                out = model(batch["image"])
                loss = loss_fn(out, batch)["total"]
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.GRAD_CLIP)
        optimizer.step()
        del out, loss
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def memory_table(device: torch.device) -> list[str]:
    """Predicted vs measured bytes of one training step on small models in several configurations: the allocated
    peak of the whole step, and the bytes autograd keeps (``saved_tensors_hooks``, unique storages) for the step
    and for the encoder alone."""
    from cellseg.losses import loss_from_config
    from cellseg.memory import measure_saved_bytes, model_tensors
    from cellseg.training.trainer import autocast_context

    rows = ["| configuration | peak: measured | peak: predicted | error | saved: measured | saved: predicted | "
            "error | encoder saved: measured | encoder saved: predicted | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = dict(ENCODER="test_vit", ENCODER_WEIGHTS="", DECODER_WIDTH=16, PATCH_SIZE=64, BATCH_SIZE=2,
                GRAD_ACCUM_TARGET=0, PRECISION="fp32", LORA_R=4, LORA_ALPHA=8, DEVICE=device.type)
    for case in MEMORY_CASES:
        case = dict(case)
        explicit = case.pop("attention", None) == "explicit"
        cfg = resolve_config({**base, **case})
        args = argparse.Namespace(fused_attn=not explicit)
        model = build(cfg, args, device, 2)
        batch = random_batch(cfg.BATCH_SIZE, cfg.PATCH_SIZE, 2, device)
        measured = measure_step_saved(model, loss_from_config(cfg, 2).to(device), batch,
                                      precision=cfg.PRECISION)["total"]
        frozen = not any(p.requires_grad for p in model.encoder.parameters())
        x = batch["image"]
        pad = (-x.shape[-1]) % model.encoder.size_multiple  # as the network pads (square crops)
        x = torch.nn.functional.pad(x, (0, pad, 0, pad), mode="reflect") if pad else x
        with autocast_context(cfg.PRECISION, device), torch.no_grad() if frozen else nullcontext():
            _, encoder = measure_saved_bytes(lambda m=model, x=x: m.encoder(x), exclude=model_tensors(model))
        est = MemoryModel(cfg, num_classes=2, device=device.type,
                          model=build(cfg, args, torch.device("meta"), 2)).estimate()
        pred_enc = est.saved_by_part["encoder"]
        name = ", ".join(f"{k}={v}" for k, v in {**{"ENCODER": cfg.ENCODER}, **case}.items())
        name += ", explicit attention" if explicit else ""
        if model.encoder.family == "cnn" and not frozen:  # its outputs are the decoder's inputs, counted there
            enc = f"{encoder:,} | {pred_enc:,} | n/a (shared outputs counted in the decoder)"
        else:
            err = f"{100 * (pred_enc / encoder - 1):+.2f}%" if encoder else ("exact" if not pred_enc else "n/a")
            enc = f"{encoder:,} | {pred_enc:,} | {err}"
        peak = step_peak(model, loss_from_config(cfg, 2).to(device), batch, cfg, device)
        rows.append(f"| {name}, {cfg.PATCH_SIZE} px, batch {cfg.BATCH_SIZE} | {peak:,} | {est.allocated:,} | "
                    f"{100 * (est.allocated / peak - 1):+.2f}% | {measured:,} | {est.saved:,} | "
                    f"{100 * (est.saved / measured - 1):+.2f}% | {enc} |")
    return rows


CUDA_RULES_CASES: list[dict[str, Any]] = [
    dict(phase=1, image_size=256), dict(phase=1, image_size=512), dict(phase=2, image_size=256),
    dict(phase=2, image_size=256, grad_checkpointing=True), dict(phase=2, image_size=256, fused_attn=False),
    dict(phase=2, image_size=256, precision="fp32"), dict(phase=2, image_size=512),
    dict(phase=2, image_size=512, grad_checkpointing=True), dict(phase=2, image_size=224, encoder="uni2"),
]


def cuda_rules_table() -> list[str]:
    """The saved tensors the memory model predicts on a GPU (CUDA autocast rules) against the real network run on
    fake CUDA tensors (``cellseg.memory.measure_cuda_saved``): UNI-sized configurations, batch 8, no GPU needed."""
    from cellseg.memory import measure_cuda_saved

    rows = ["| configuration | precision | attention | network saved: fake CUDA | network saved: predicted | error | "
            "step saved: fake CUDA | step saved: predicted | error |", "|---|---|---|---|---|---|---|---|---|"]
    for case in CUDA_RULES_CASES:
        args = parse_args(["--batch-size", "8", "--precision", case.get("precision", "bf16"),
                           "--phase", str(case["phase"]), "--image-size", str(case["image_size"]),
                           "--encoder", case.get("encoder", "uni")]
                          + (["--grad-checkpointing"] if case.get("grad_checkpointing") else [])
                          + ([] if case.get("fused_attn", True) else ["--no-fused-attn"]))
        cfg = bench_config(args, torch.device("cuda"))
        meta = build(cfg, args, torch.device("meta"), args.num_classes)
        measured = measure_cuda_saved(cfg, args.num_classes, model=meta, fused_attention=args.fused_attn)
        est = MemoryModel(cfg, num_classes=args.num_classes, device="cuda", model=meta).estimate()
        network = est.saved - est.saved_by_part["loss"]
        kernel = ("flash" if cfg.PRECISION != "fp32" else "memory-efficient") if args.fused_attn else "explicit"
        name = (f"{cfg.ENCODER}+{cfg.DECODER} P{cfg.PHASE} {cfg.PATCH_SIZE}px b8"
                + (", ckpt" if cfg.GRAD_CHECKPOINTING else ""))
        rows.append(f"| {name} | {cfg.PRECISION} | {kernel} | {measured['model']:,} | {network:,} | "
                    f"{100 * (network / measured['model'] - 1):+.3f}% | {measured['total']:,} | {est.saved:,} | "
                    f"{100 * (est.saved / measured['total'] - 1):+.3f}% |")
    return rows


def predict_rows(args: argparse.Namespace, gpus: list[str]) -> list[str]:
    """The memory model's prediction for the configuration on CUDA, and the batch x accumulation it suggests on
    each GPU for the effective batch ``--grad-accum-target`` (PRECISION 'auto' unless --precision is given)."""
    from cellseg.config import replace
    from cellseg.memory import DoesNotFit, parse_gpu, suggest_batch

    cfg = replace(bench_config(args, torch.device("cuda")), PRECISION=args.precision or "auto",
                  GRAD_ACCUM_TARGET=max(args.grad_accum_target, args.batch_size))
    specs = [parse_gpu(g) for g in gpus]
    rows = ["| configuration | precision | activations | weight copies | allocated peak | total | "
            + " | ".join(f"{g.name} ({g.memory_bytes / GiB:g} GiB)" for g in specs) + " |",
            "|" + "---|" * (6 + len(specs))]
    skeleton = build(cfg, args, torch.device("meta"), args.num_classes)
    cells = []
    for g in specs:
        mm = MemoryModel(cfg, num_classes=args.num_classes, bf16_supported=g.bf16, model=skeleton)
        try:
            b, acc = suggest_batch(cfg, g.memory_bytes, num_classes=args.num_classes, memory_model=mm)
            fits = "fits" if mm.estimate().total <= g.memory_bytes else "OOM"
            cells.append(f"b{args.batch_size}: {fits}; suggests {b} x {acc} ({mm.precision})")
        except DoesNotFit:
            cells.append(f"does not fit at batch 1 ({mm.precision})")
    est = MemoryModel(cfg, num_classes=args.num_classes, model=skeleton).estimate()
    name = (f"{cfg.ENCODER}+{cfg.DECODER} P{cfg.PHASE} {cfg.PATCH_SIZE}px b{cfg.BATCH_SIZE}"
            + (", ckpt" if cfg.GRAD_CHECKPOINTING else "") + ("" if args.fused_attn else ", no-SDPA"))
    rows.append(f"| {name} | {est.settings['precision']} | {_mem(est.activations)} | {_mem(est.weight_casts)} | "
                f"{_mem(est.allocated)} | {_mem(est.total)} | " + " | ".join(cells) + " |")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_off = argparse.BooleanOptionalAction
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("train", "inference"), default="train")
    p.add_argument("--tiny", action="store_true", help="CPU smoke preset: test_vit + hovernet (width 16), 64 px, "
                                                       "batch 2, 3 timed steps after 1 warm-up, fp32")
    p.add_argument("--memory-table", action="store_true", help="memory model vs measured saved bytes (tiny models)")
    p.add_argument("--cuda-rules-table", action="store_true",
                   help="memory model vs UNI's network on fake CUDA tensors (saved bytes, no GPU needed)")
    p.add_argument("--predict", default="", metavar="GPU[,GPU...]",
                   help="print the memory model's prediction (no run) and its batch suggestion on these GPUs")
    p.add_argument("--grad-accum-target", type=int, default=16, help="effective batch for --predict's suggestion")
    p.add_argument("--encoder", default="uni", help="uni | uni2 | any timm ViT/CNN name (random weights)")
    p.add_argument("--decoder", default="hovernet", choices=("hovernet", "unet_resattn"))
    p.add_argument("--width", type=int, default=64, help="DECODER_WIDTH")
    p.add_argument("--phase", type=int, choices=(1, 2), default=1)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--fused-adamw", action=on_off, default=True, help="fused AdamW kernels")
    p.add_argument("--channels-last", action=on_off, default=False, help="channels_last memory format")
    p.add_argument("--fused-attn", action=on_off, default=True, help="timm's fused attention (SDPA)")
    p.add_argument("--compile", action=on_off, default=False, help="torch.compile the network")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend ('aot_eager' checks the compile path without a C++ toolchain)")
    p.add_argument("--grad-checkpointing", action=on_off, default=False, help="recompute encoder blocks (Phase 2)")
    p.add_argument("--no-grad-encoder", action=on_off, default=True,
                   help="Phase 1's frozen encoder under no_grad; --no-no-grad-encoder records it (weights keep "
                        "requires_grad but are not optimised)")
    p.add_argument("--data", choices=("random", "cache"), default="random",
                   help="random: one batch already on the device; cache: CellDataset over a synthetic cache")
    p.add_argument("--cache", default="", help="prepared cache for --data cache (default: a synthetic one)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers for --data cache")
    p.add_argument("--pin-memory", action=on_off, default=True, help="pinned host memory for --data cache")
    p.add_argument("--pp-workers", type=int, default=4, help="post-processing processes (--mode inference)")
    p.add_argument("--diameter", type=float, default=20.0, help="object diameter for post-processing, px")
    p.add_argument("--memory-cap-gb", type=float, default=0.0,
                   help="cap this process's CUDA memory (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="markdown file the row is appended to")
    p.add_argument("--no-append", action="store_true", help="print the row only")
    args = p.parse_args(argv)
    if args.tiny:
        args.encoder, args.width, args.image_size, args.batch_size = "test_vit", 16, 64, 2
        args.device, args.pp_workers = "cpu", min(args.pp_workers, 1)
        args.precision = args.precision or "fp32"
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.data == "random":
        args.num_workers = 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    command = "python benchmarks/train_throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.memory_table or args.cuda_rules_table or args.predict:
        rows = (memory_table(device) if args.memory_table else cuda_rules_table() if args.cuda_rules_table
                else predict_rows(args, args.predict.split(",")))
        print("\n".join(rows))
        return 0
    if args.memory_cap_gb:
        if device.type != "cuda":
            raise SystemExit("--memory-cap-gb needs a CUDA device.")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * GiB / total), device)
    try:
        result = train(args, device) if args.mode == "train" else infer(args, device)
    except torch.OutOfMemoryError as e:
        print(f"OUT OF MEMORY: {e}", file=sys.stderr)
        return 3
    line = row(args, result, command)
    print(line)
    if not args.no_append:
        append_row(Path(args.results), device_label(device), TRAIN_HEADER if result["kind"] == "train"
                   else INFER_HEADER, line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
