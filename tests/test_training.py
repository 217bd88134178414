"""The training loop's own guarantees: frozen means frozen, LoRA trains only adapters and decoder, schedulers step
when they declare (closed forms, with accumulation), best/patience bookkeeping, accumulation and 2-process DDP equal
one large batch."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cellseg.config import resolve_config
from cellseg.distributed import DistEnv
from cellseg.losses import loss_from_config
from cellseg.model import build_model_from_config
from cellseg.optim import build_optimizer, configure_phase, count_params, param_groups
from cellseg.runtime import RunContext
from cellseg.training.plan import build_plan, split_block
from cellseg.training.trainer import Trainer, accumulation_steps
from toydata import FakeCheckpoints, ToyDataset

BASE = dict(ENCODER="test_vit", ENCODER_WEIGHTS="", DECODER_WIDTH=8, PATCH_SIZE=32, DEVICE="cpu", NUM_WORKERS=0,
            BATCH_SIZE=2, GRAD_ACCUM_TARGET=0, EPOCHS=1, PRECISION="fp32", LOG_EVERY=1000, SCHEDULER="constant",
            LORA_R=2, LORA_ALPHA=4, LORA_DROPOUT=0.0, PATIENCE_P1=0, PATIENCE_P2=0, GRAD_CLIP=0.0, SEED=3)


def make_trainer(tmp_path, *, metrics=None, n=6, env=DistEnv(), **overrides):
    cfg = resolve_config({**BASE, "RUN_DIR": str(tmp_path / "run"), "CHECKPOINT_DIR": str(tmp_path / "ck"), **overrides})
    torch.manual_seed(0)
    model = build_model_from_config(cfg, num_classes=2)
    configure_phase(model, cfg)
    seq = list(metrics or [])

    def validate(model, epoch):
        return {"pq": seq[epoch] if seq else 0.0, "val_loss": 1.0}

    ctx = RunContext(cfg, env, torch.device("cpu"), tmp_path / "run")
    trainer = Trainer(ctx, model, loss_from_config(cfg, 2), ToyDataset(n=n, size=32), validate_fn=validate,
                      ckpt=FakeCheckpoints(), stop=None)
    trainer.collect = lambda: {}
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("encoder", ["test_vit", "test_resnet"])
def test_phase1_backbone_is_frozen_and_unchanged(tmp_path, encoder):
    t = make_trainer(tmp_path, ENCODER=encoder, EPOCHS=2)
    counts = count_params(t.model)
    assert counts["backbone"] == 0 and counts["lora"] == 0 and counts["decoder"] > 0
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    enc_before, dec_before = snapshot(t.model.encoder), snapshot(t.model.decoder)
    t.fit()
    for k, v in snapshot(t.model.encoder).items():  # weights and BN running statistics, bit for bit
        assert torch.equal(v, enc_before[k]), k
    assert any(not torch.equal(v, dec_before[k]) for k, v in snapshot(t.model.decoder).items())
    assert not t.model.encoder.training


def test_phase1_refuses_a_trainable_backbone(tmp_path):
    cfg = resolve_config({**BASE, "RUN_DIR": str(tmp_path)})
    model = build_model_from_config(cfg, num_classes=2)
    configure_phase(model, cfg)
    next(model.encoder.parameters()).requires_grad_(True)
    from cellseg.optim import check_phase

    with pytest.raises(RuntimeError, match="Phase 1 must train the decoder only"):
        check_phase(model, 1, 0)


def test_phase2_lora_trains_adapters_and_decoder_only(tmp_path):
    t = make_trainer(tmp_path, PHASE=2, EPOCHS=2, LORA_BLOCKS="last_half")
    from cellseg.model.lora import lora_modules

    assert len(lora_modules(t.model)) == 3  # test_vit has 6 blocks; last half = 3 qkv layers
    groups = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    assert set(groups) == {"decoder", "decoder_no_decay", "lora"}
    assert groups["lora"] == BASE.get("LR_LORA", 2e-4) and groups["decoder"] == 2e-4
    before = snapshot(t.model)
    t.fit()
    after = snapshot(t.model)
    base_keys = [k for k in before if k.startswith("encoder.") and "lora_" not in k]
    assert base_keys and all(torch.equal(before[k], after[k]) for k in base_keys)
    lora_keys = [k for k in before if "lora_" in k]
    assert len(lora_keys) == 6 and all(not torch.equal(before[k], after[k]) for k in lora_keys)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_phase2_cnn_fine_tunes_encoder_at_its_own_rate(tmp_path):
    t = make_trainer(tmp_path, ENCODER="test_resnet", PHASE=2, LR_ENCODER_P2=1e-5, LR_DECODER_P2=3e-4)
    groups = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    assert groups["backbone"] == 1e-5 and groups["decoder"] == 3e-4 and "lora" not in groups


def test_no_weight_decay_on_norms_and_biases(tmp_path):
    cfg = resolve_config({**BASE, "RUN_DIR": str(tmp_path), "WEIGHT_DECAY": 0.05})
    model = build_model_from_config(cfg, num_classes=2)
    configure_phase(model, cfg)
    for g in param_groups(model, cfg):
        assert all((p.ndim <= 1) == g["name"].endswith("no_decay") for p in g["params"])
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)
    assert sum(p.numel() for g in build_optimizer(model, cfg).param_groups for p in g["params"]) == \
        count_params(model)["trainable"]


def test_epoch_plan_and_accumulation():
    import numpy as np

    assert build_plan(5, effective_batch=4, max_steps=0, seed=0).steps_per_epoch == 2
    assert build_plan(10, effective_batch=4, max_steps=2, seed=0).steps_per_epoch == 2
    block = np.arange(10, 15)  # a short last block of 5 images over 2 ranks, micro-batches of 2
    assert split_block(block, 0, 2, 2) == [[10, 11], [12]] and split_block(block, 1, 2, 2) == [[13, 14]]
    assert split_block(np.arange(1), 1, 2, 2) == [[]]  # an empty share: one weight-0 micro-batch
    with pytest.raises(ValueError, match="training split is empty"):
        build_plan(0, effective_batch=4, max_steps=0, seed=0)
    with pytest.raises(ValueError, match="effective batch"):
        build_plan(3, effective_batch=0, max_steps=0, seed=0)
    cfg = resolve_config({**BASE, "BATCH_SIZE": 2, "GRAD_ACCUM_TARGET": 8})
    assert accumulation_steps(cfg, 1) == 4 and accumulation_steps(cfg, 2) == 2
    assert accumulation_steps(resolve_config({**BASE}), 1) == 1


# ---------------------------------------------------------------- schedulers: logged lr == closed form
def _cos(p, m):
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))


def _expected_factor(kind, *, step, epoch, total, warmup=3, m=0.1, gamma=0.5, step_size=2, epochs=4, period=6):
    if kind == "cosine_warmup":
        return (step + 1) / warmup if step < warmup else _cos(min(1.0, (step - warmup) / (total - warmup)), m)
    if kind == "cosine_restarts":
        return _cos((step % period) / period, m)
    if kind == "exponential":
        return gamma ** epoch
    if kind == "step":
        return gamma ** (epoch // step_size)
    if kind == "cosine":
        return _cos(epoch / epochs, m)
    if kind == "constant":
        return 1.0
    if kind == "onecycle":  # torch's cosine one-cycle, written out
        big_t = total + 1
        e1 = float(warmup / total * big_t) - 1
        lo, hi = 1 / 25, 1.0
        if step <= e1:
            return hi + (lo - hi) / 2 * (1 + math.cos(math.pi * step / e1))
        return lo / 1e4 + (hi - lo / 1e4) / 2 * (1 + math.cos(math.pi * (step - e1) / (big_t - 1 - e1)))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["cosine_warmup", "onecycle", "cosine_restarts", "exponential", "step", "cosine",
                                  "constant"])
def test_logged_learning_rates_follow_the_closed_form(tmp_path, kind):
    # 5 images, batch 1, accumulation to 2 -> groups [2, 2, 1] = 3 optimizer steps per epoch
    t = make_trainer(tmp_path, n=5, SCHEDULER=kind, EPOCHS=4, BATCH_SIZE=1, GRAD_ACCUM_TARGET=2, WARMUP_STEPS=3,
                     MIN_LR_RATIO=0.1, GAMMA=0.5, STEP_SIZE=2, RESTART_EPOCHS=2, LR_DECODER_P1=1e-3, PATCH_SIZE=32)
    assert t.steps_per_epoch == 3 and t.scheduler.interval == ("step" if kind in ("cosine_warmup", "onecycle",
                                                                                   "cosine_restarts") else "epoch")
    t.fit()
    lrs = [h["lr"]["decoder"] for h in t.progress["history"]]
    assert len(lrs) == 4
    for e, lr in enumerate(lrs):
        f = _expected_factor(kind, step=3 * (e + 1), epoch=e + 1, total=12)
        assert lr == pytest.approx(1e-3 * f, rel=1e-9), (e, lr, f)
    assert t.progress["history"][-1]["lr"]["decoder_no_decay"] == pytest.approx(lrs[-1])


def test_plateau_reacts_to_a_scripted_metric(tmp_path):
    seq = [0.1, 0.2, 0.2, 0.2, 0.2, 0.2]
    t = make_trainer(tmp_path, metrics=seq, SCHEDULER="plateau", EPOCHS=6, PLATEAU_PATIENCE=1, PLATEAU_FACTOR=0.5,
                     LR_DECODER_P1=1e-3, n=2)
    t.fit()
    assert [h["lr"]["decoder"] for h in t.progress["history"]] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


def test_scheduler_does_not_step_when_amp_skipped_the_step(tmp_path):
    t = make_trainer(tmp_path, SCHEDULER="cosine_warmup", WARMUP_STEPS=10)

    class SkippingScaler:  # GradScaler that found inf gradients: lowers the scale, skips the step
        def __init__(self):
            self.s = 1024.0

        def scale(self, loss):
            return loss

        def unscale_(self, opt):
            pass

        def get_scale(self):
            return self.s

        def step(self, opt):
            pass

        def update(self):
            self.s /= 2

    t.scaler = SkippingScaler()
    before = t.optimizer.param_groups[0]["lr"]
    t.train_one_epoch(0)
    assert t.optimizer.param_groups[0]["lr"] == before and t.progress["step"] == 3


# ---------------------------------------------------------------- best / patience
def test_best_only_on_improvement_and_patience(tmp_path):
    t = make_trainer(tmp_path, metrics=[0.1, 0.3, 0.2, 0.4, 0.4, 0.35, 0.1], EPOCHS=7, PATIENCE_P1=3, n=2)
    summary = t.fit()
    saves = [s for s in t.ckpt.saves if s["epoch_end"]]
    assert [s["is_best"] for s in saves] == [True, True, False, True, False, False, False]
    assert t.early_stopped and summary["epochs_done"] == 7 and t.progress["best_metric"] == 0.4
    assert [h["patience_counter"] for h in t.progress["history"]] == [0, 0, 1, 0, 1, 2, 3]


def test_patience_stops_early_in_min_mode(tmp_path):
    t = make_trainer(tmp_path, metrics=[1.0, 0.5, 0.6, 0.7, 0.1], EPOCHS=5, PATIENCE_P1=2, MONITOR_METRIC="val_loss",
                     MONITOR_MODE="min", n=2)
    t.validate_fn = lambda model, e: {"val_loss": [1.0, 0.5, 0.6, 0.7, 0.1][e]}
    t.fit()
    assert t.early_stopped and len(t.progress["history"]) == 4 and t.progress["best_metric"] == 0.5


def test_unknown_monitor_metric_is_explained(tmp_path):
    t = make_trainer(tmp_path, MONITOR_METRIC="mpq", n=2)
    with pytest.raises(KeyError, match="MONITOR_METRIC='mpq'"):
        t.fit()


# ---------------------------------------------------------------- accumulation and DDP == one large batch
def _final_weights(t) -> dict[str, torch.Tensor]:
    # plain SGD: Adam's normalisation would magnify float noise in near-zero gradients into visible weight differences
    from cellseg.schedulers import build_scheduler

    t.optimizer = torch.optim.SGD([q for g in t.optimizer.param_groups for q in g["params"]], lr=0.05)
    t.scheduler = build_scheduler(t.optimizer, t.cfg, steps_per_epoch=t.steps_per_epoch)
    t.fit()
    return {k: v for k, v in snapshot(t.model).items() if k.startswith("decoder.")}


def test_accumulation_equals_one_large_batch(tmp_path):
    # one optimizer step of 4 images: one batch of 4 vs 2 micro-batches of 2 (the gradients agree to float noise,
    # ~1e-5 relative, which later steps amplify)
    a = _final_weights(make_trainer(tmp_path / "a", n=8, BATCH_SIZE=4, EPOCHS=1, MAX_STEPS_PER_EPOCH=1))
    b = _final_weights(make_trainer(tmp_path / "b", n=8, BATCH_SIZE=2, GRAD_ACCUM_TARGET=4, EPOCHS=1, MAX_STEPS_PER_EPOCH=1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        t = make_trainer(Path(out_dir) / f"r{rank}", n=8, BATCH_SIZE=2, EPOCHS=1, MAX_STEPS_PER_EPOCH=1, env=DistEnv(rank, world, rank, "test"))
        torch.save(_final_weights(t), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical on both ranks
    single = _final_weights(make_trainer(tmp_path / "single", n=8, BATCH_SIZE=2, GRAD_ACCUM_TARGET=4, EPOCHS=1, MAX_STEPS_PER_EPOCH=1))
    for k in single:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_with_advice(tmp_path):
    t = make_trainer(tmp_path)
    real = t.loss_fn

    def nan_loss(out, batch):
        losses = real(out, batch)
        return {**losses, "total": losses["total"] * float("nan")}

    t.loss_fn = nan_loss
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 0"):
        t.train_one_epoch(0)


def test_channels_last_trains_and_compile_wraps_only_the_forward(tmp_path):
    t = make_trainer(tmp_path / "cl", CHANNELS_LAST=True)
    stats = t.train_one_epoch(0)
    assert stats is not None and math.isfinite(stats["total"])
    c = make_trainer(tmp_path / "compiled", USE_COMPILE=True)
    assert isinstance(c.net, torch._dynamo.eval_frame.OptimizedModule)
    assert c.net._orig_mod is c.model  # checkpoints are taken from the plain model: no '_orig_mod.' keys
    assert not any(k.startswith("_orig_mod") for k in c.model.state_dict())


def test_validation_instances_carry_objectness_for_class_agnostic_ap():
    """Validation ranks class-agnostic AP by objectness (mean foreground probability), as the evaluation does."""
    from cellseg.branches import Branch
    from cellseg.training.validation import outputs_to_instances

    yy, xx = np.ogrid[:32, :32]
    disk = torch.from_numpy(((yy - 16) ** 2 + (xx - 16) ** 2 <= 36).astype(np.float32))
    out = {Branch.NP: torch.stack([2 - 4 * disk, 4 * disk - 2])[None], Branch.HV: torch.zeros(1, 2, 32, 32),
           Branch.NC: torch.stack([-disk, disk, torch.zeros_like(disk)])[None]}
    pred = outputs_to_instances(out, object_diameter=12)
    assert pred["inst_map"].max() == 1
    fg = torch.sigmoid(torch.tensor(4.0)).item()  # softmax of (-2, 2)
    assert pred["objectness"].tolist() == pytest.approx([fg], rel=1e-5)
    assert pred["scores"][0] < pred["objectness"][0]  # the class-aware confidence also weighs the class
