"""Checkpoint size and save time, full vs compact (issue 15), for a UNI-sized encoder.

A randomly initialised ViT-L/16 is built exactly as UNI is (``vit_large_patch16_224`` with ``init_values=1e-5``,
``num_classes=0``) and saved in UNI's file layout (a plain state dict, ``pytorch_model.bin``), so no gated file is
needed. Phase 1 (frozen encoder, AdamW on the decoder, one step so that the optimizer state exists) and Phase 2 (LoRA
r=8 on every block's ``qkv``) checkpoints are written by ``CheckpointManager`` twice: full (``compact=False``, the
base encoder stored) and compact (the base weights left out, their SHA-256 stored). For each: the size of
``latest.pt`` and of an epoch file (full payloads: exact resume needs AdamW's moments), of ``best.pt`` (weights only),
the phase's disk total (latest + best + ``KEEP_LAST=3`` epoch files) and the save times. Run on the CPU::

    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/lib .venv/bin/python \
        benchmarks/bench_checkpoint_size.py --dir /tmp/ckbench-size

and copy the printed markdown table to benchmarks/RESULTS.md under "## Checkpoint size: full vs compact".
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

KEEP_LAST = 3  # the default KEEP_LAST: epoch files kept besides latest.pt and best.pt

def _timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="", help="where to write (default: a temp dir, removed afterwards)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--width", type=int, default=64, help="DECODER_WIDTH (the default run's 64)")
    args = ap.parse_args()

    import timm

    from cellseg.checkpoint import CheckpointManager, collect_state
    from cellseg.checkpoint.fingerprint import file_sha256
    from cellseg.model.backbones import UNI_KWARGS
    from cellseg.model.lora import apply_lora
    from cellseg.model.network import build_model

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckbench-size-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CELLSEG_CACHE_DIR", str(root / "hash-cache"))
    weights = root / "uni" / "pytorch_model.bin"
    weights.parent.mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_large_patch16_224", pretrained=False, **UNI_KWARGS).state_dict(), weights)
    t0 = time.perf_counter()
    file_sha256(weights)
    t_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    file_sha256(weights)
    t_hash_cached = time.perf_counter() - t0

    model = build_model("uni", num_classes=3, width=args.width, weights=str(weights))
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    progress = {"epoch": 1, "step": 1, "batch_in_epoch": 0, "best_metric": 0.5, "best_epoch": 1,
                "patience_counter": 0, "history": [], "monitor": {"metric": "pq", "mode": "max"}}
    rows = []

    def one(phase: int, label: str, opt, compact: bool) -> None:
        def collect():
            return collect_state(model=model, optimizer=opt, scheduler=None, scaler=None, progress=progress,
                                 config={"PHASE": phase}, compact=compact)

        t_collect, state = _timed(collect, args.repeats)
        directory = root / f"phase{phase}-{'compact' if compact else 'full'}"
        mgr = CheckpointManager(directory, phase=phase, keep_last=KEEP_LAST)
        t_latest, _ = _timed(lambda: mgr.save(state, epoch_end=False, is_best=False, reason="bench"), args.repeats)
        t_epoch, _ = _timed(lambda: mgr.save(state, epoch_end=True, is_best=False, reason="bench"), args.repeats)
        t_all, _ = _timed(lambda: mgr.save(state, epoch_end=True, is_best=True, reason="bench"), args.repeats)
        sizes = {name: (directory / name).stat().st_size for name in ("latest.pt", "best.pt", "epoch_0001.pt")}
        total = sizes["latest.pt"] + sizes["best.pt"] + KEEP_LAST * sizes["epoch_0001.pt"]
        t_resume, _ = _timed(lambda: CheckpointManager(directory, phase=phase).resume(
            "auto", model=model, optimizer=opt, scheduler=None, scaler=None), args.repeats)
        rows.append({"label": label, "form": "compact" if compact else "full", "tensors": len(state["model"]),
                     **sizes, "total": total, "collect": t_collect, "save_latest": t_latest, "save_epoch": t_epoch,
                     "save_all": t_all, "resume": t_resume})
        shutil.rmtree(directory)

    def measure(phase: int, label: str) -> None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        out = model(torch.randn(1, 3, 224, 224))
        sum(v.float().mean() for v in out.values()).backward()
        opt.step()  # optimizer state exists
        opt.zero_grad()
        for compact in (False, True):
            one(phase, label, opt, compact)

    measure(1, f"Phase 1: UNI-sized ViT-L/16 frozen + hovernet w{args.width}")
    apply_lora(model, r=8, alpha=16, dropout=0.0, targets=["qkv"], blocks="all")
    measure(2, "Phase 2: + LoRA r=8 on qkv, 24 blocks")

    decoder_mb = sum(t.numel() * t.element_size() for t in model.decoder.state_dict().values()) / 1e6
    print(f"base weights file {weights.stat().st_size / 1e6:.0f} MB; SHA-256 first {t_hash:.2f} s, cached "
          f"{t_hash_cached * 1e3:.1f} ms; decoder tensors {decoder_mb:.1f} MB; torch {torch.__version__}")
    mb = 1e6
    print("| checkpoint | form | tensors | latest.pt | epoch file | best.pt (weights only) | phase total "
          f"(latest + best + {KEEP_LAST} epoch) | collect_state | save latest | save latest + epoch | save latest + "
          "epoch + best | resume |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['form']} | {r['tensors']} | {r['latest.pt'] / mb:.1f} MB | "
              f"{r['epoch_0001.pt'] / mb:.1f} MB | {r['best.pt'] / mb:.1f} MB | {r['total'] / mb:.0f} MB | "
              f"{r['collect']:.2f} | {r['save_latest']:.2f} | {r['save_epoch']:.2f} | {r['save_all']:.2f} | "
              f"{r['resume']:.2f} |")
    full = {r["label"]: r for r in rows if r["form"] == "full"}
    for r in rows:
        if r["form"] == "compact":
            f = full[r["label"]]
            print(f"{r['label']}: compact / full: latest.pt {r['latest.pt'] / f['latest.pt']:.4f}, best.pt "
                  f"{r['best.pt'] / f['best.pt']:.4f} (vs the full latest.pt, which best.pt used to copy: "
                  f"{r['best.pt'] / f['latest.pt']:.4f}), phase total {r['total'] / f['total']:.4f}")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
