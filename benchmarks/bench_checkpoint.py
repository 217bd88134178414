"""Checkpoint I/O cost: CheckpointManager.save / resume (atomic temp + fsync + rename, SHA-256, sidecar, extra copies
for epoch/best files, hash verification before loading) against a bare ``torch.save`` / ``torch.load``.

Run by hand (CPU), e.g.::

    .venv/bin/python benchmarks/bench_checkpoint.py --encoder vit_large_patch16_224 --dir /tmp/ckbench

and append the printed markdown row to benchmarks/RESULTS.md under "## Checkpoints".
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="vit_base_patch16_224", help="timm name (random init; no download)")
    ap.add_argument("--dir", default="", help="where to write (default: a temp dir, removed afterwards)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from cellseg.checkpoint import CheckpointManager, collect_state
    from cellseg.model.network import build_model

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckbench-"))
    root.mkdir(parents=True, exist_ok=True)
    model = build_model(args.encoder, num_classes=3, width=64)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(torch.randn(1, 3, 224, 224))
    sum(v.mean() for v in out.values()).backward()
    opt.step()  # optimizer state exists
    progress = {"epoch": 1, "step": 1, "batch_in_epoch": 0, "best_metric": 0.5, "best_epoch": 1,
                "patience_counter": 0, "history": [], "monitor": {"metric": "pq", "mode": "max"}}

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    state = collect_state(model=model, optimizer=opt, scheduler=None, scaler=None, progress=progress,
                          config={"PHASE": 1})
    t_collect = timed(lambda: collect_state(model=model, optimizer=opt, scheduler=None, scaler=None,
                                            progress=progress, config={"PHASE": 1}))
    bare = root / "bare.pt"
    t_bare_save = timed(lambda: torch.save(state, bare))
    t_bare_load = timed(lambda: torch.load(bare, map_location="cpu", weights_only=True))
    mgr = CheckpointManager(root / "phase1", phase=1, keep_last=2)
    t_latest = timed(lambda: mgr.save(state, epoch_end=False, is_best=False, reason="bench"))
    t_all = timed(lambda: mgr.save(state, epoch_end=True, is_best=True, reason="bench"))

    def resume():
        CheckpointManager(root / "phase1", phase=1).resume("auto", model=model, optimizer=opt, scheduler=None,
                                                           scaler=None)

    t_resume = timed(resume)
    size = (root / "phase1" / "latest.pt").stat().st_size / 1e6
    n = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"| {args.encoder} | {n:.0f} M | {size:.0f} MB | {t_collect:.2f} | {t_bare_save:.2f} | {t_latest:.2f} | "
          f"{t_all:.2f} | {t_bare_load:.2f} | {t_resume:.2f} |")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
