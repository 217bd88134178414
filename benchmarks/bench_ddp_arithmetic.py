"""DDP speed-up arithmetic for HPC_SETUP_GUIDE.md: trainable gradient bytes per phase vs. compute per step.

Counts the trainable parameters of each phase with cellseg's own model builder and phase set-up, measures the forward
FLOPs per image with ``torch.utils.flop_counter``, and prints the all-reduce time ``2 (N-1)/N x S / B`` next to the
compute time per step for a few interconnects. Runs on CPU (random weights: UNI's architecture is timm's
``vit_large_patch16_224``; no weights needed).

    .venv/bin/python benchmarks/bench_ddp_arithmetic.py                       # UNI-sized, 256 px, batch 8
    .venv/bin/python benchmarks/bench_ddp_arithmetic.py --encoder test_vit --patch 96 --markdown
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cellseg.config import resolve_config
from cellseg.model import build_model_from_config
from cellseg.optim import configure_phase, count_params

INTERCONNECTS = (("NVLink", 200e9, 4), ("PCIe 4", 20e9, 4), ("IB HDR, 2 nodes", 20e9, 8), ("25 GbE, 2 nodes", 2.5e9, 8))


def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass (multiply-add = 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="vit_large_patch16_224", help="timm name (UNI = vit_large_patch16_224)")
    ap.add_argument("--patch", type=int, default=256, help="training crop side in pixels")
    ap.add_argument("--batch", type=int, default=8, help="images per GPU per step")
    ap.add_argument("--tflops", type=float, default=100.0, help="sustained TFLOP/s assumed per GPU")
    ap.add_argument("--markdown", action="store_true", help="print a RESULTS.md table row per phase")
    args = ap.parse_args()
    x = torch.randn(1, 3, args.patch, args.patch)
    rows = []
    for phase in (1, 2):
        cfg = resolve_config({"ENCODER": args.encoder, "ENCODER_WEIGHTS": "", "PHASE": phase, "DEVICE": "cpu",
                              "PATCH_SIZE": args.patch})
        t0 = time.perf_counter()
        model = build_model_from_config(cfg, num_classes=4)
        configure_phase(model, cfg)
        counts = count_params(model)
        model.eval()
        f_enc = forward_flops(model.encoder, x)
        f_all = forward_flops(model, x)
        f_dec = f_all - f_enc
        grad_bytes = counts["trainable"] * 4
        # backward: 2x forward for trained layers (input + weight gradients), 1x for frozen layers passed through
        back = 2 * f_dec + (f_enc if phase == 2 else 0.0)
        step_flops = args.batch * (f_all + back)
        step_s = step_flops / (args.tflops * 1e12)
        rows.append((phase, counts, f_enc, f_dec, grad_bytes, step_flops, step_s, time.perf_counter() - t0))
    for phase, counts, f_enc, f_dec, grad_bytes, step_flops, step_s, secs in rows:
        print(f"Phase {phase}: trainable {counts['trainable'] / 1e6:.2f} M (lora {counts['lora'] / 1e6:.2f} M), "
              f"gradients {grad_bytes / 1e6:.1f} MB fp32; forward {(f_enc + f_dec) / 1e9:.1f} GFLOP/img "
              f"(encoder {f_enc / 1e9:.1f}, decoder {f_dec / 1e9:.1f}); step {step_flops / 1e12:.2f} TFLOP "
              f"= {step_s * 1e3:.0f} ms at {args.tflops:g} TFLOP/s  [{secs:.0f} s to build and count]")
        for name, bw, n in INTERCONNECTS:
            t_ar = 2 * (n - 1) / n * grad_bytes / bw
            print(f"    {name:<16} N={n}: all-reduce {t_ar * 1e3:5.1f} ms = {100 * t_ar / step_s:5.1f} % of the step "
                  f"-> speed-up without overlap {n * step_s / (step_s + t_ar):.1f}x")
        if args.markdown:
            print(f"| `bench_ddp_arithmetic.py --encoder {args.encoder} --patch {args.patch} --batch {args.batch}` "
                  f"| Phase {phase} | {counts['trainable'] / 1e6:.2f} M | {grad_bytes / 1e6:.1f} MB | "
                  f"{(f_enc + f_dec) / 1e9:.1f} | {step_flops / 1e12:.2f} |")


if __name__ == "__main__":
    main()
