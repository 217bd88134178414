"""A short CPU training on the synthetic smears learns: every branch's loss falls and every class is found.

Two 192 px synthetic images (all three classes in each), whole-image batches, 150 optimizer steps of Phase 1 on the
tiny ViT; then the standard validation path (post-processing, instance classification, metrics) over the training
images. Guards against a loss that does not train a branch and against class collapse ("background everywhere" or
"majority class everywhere").
"""

from __future__ import annotations

import numpy as np
import torch

from cellseg.config import resolve_config
from cellseg.data import CellDataset, prepare_dataset
from cellseg.distributed import DistEnv
from cellseg.losses import loss_from_config
from cellseg.model import build_model_from_config
from cellseg.optim import configure_phase
from cellseg.runtime import RunContext, seed_everything
from cellseg.training.trainer import Trainer
from cellseg.training.validation import run_validation
from toydata import FakeCheckpoints

CLASSES = ["RBC", "WBC", "Platelet"]


def test_short_training_lowers_every_branch_loss_and_finds_every_class(tmp_path):
    cache = tmp_path / "data"
    manifest = prepare_dataset("synthetic", None, cache, seed=0, synth_num_images=2, synth_image_size=192,
                               val_fraction=0.0, test_fraction=0.0, progress=False)
    assert manifest["class_names"] == CLASSES
    cfg = resolve_config(dict(
        DATASET="synthetic", DEVICE="cpu", NUM_WORKERS=0, ENCODER="test_vit", ENCODER_WEIGHTS="", DECODER_WIDTH=16,
        PATCH_SIZE=192, OBJECT_DIAMETER=18.0, PRECISION="fp32", EPOCHS=150, BATCH_SIZE=2, GRAD_ACCUM_TARGET=0,
        LR_DECODER_P1=3e-3, SCHEDULER="constant", PATIENCE_P1=0, LOG_EVERY=10_000, RUN_DIR=str(tmp_path / "run"),
        CLASS_WEIGHTS=[1.0, 1.0, 3.0, 5.0], AUGMENT=False, SEED=0))
    seed_everything(0)
    model = build_model_from_config(cfg, num_classes=3)
    configure_phase(model, cfg)
    loss_fn = loss_from_config(cfg, 3)
    train = CellDataset(cache, "train", patch_size=cfg.PATCH_SIZE, augment=False, seed=0)
    trainer = Trainer(RunContext(cfg, DistEnv(), torch.device("cpu"), tmp_path), model, loss_fn, train,
                      validate_fn=lambda m, e: {"pq": 0.0}, ckpt=FakeCheckpoints(), stop=None)
    trainer.collect = lambda: {}
    trainer.fit()

    history = trainer.progress["history"]
    for branch in ("np", "hv", "nc", "total"):
        first = np.mean([h["train_loss"][branch] for h in history[:10]])
        last = np.mean([h["train_loss"][branch] for h in history[-10:]])
        assert last < 0.5 * first, (branch, first, last)

    model.eval()
    whole = CellDataset(cache, "train", patch_size=None, augment=False, seed=0)
    val = run_validation(model, whole, loss_fn, class_names=CLASSES, device="cpu", object_diameter=cfg.OBJECT_DIAMETER)
    assert val["class_collapse"] == []
    for name in CLASSES:
        assert val["per_class"][name]["pq"] > 0.0, (name, val["per_class"][name])
    assert val["pq"] > 0.5
