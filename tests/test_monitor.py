"""MONITOR_METRIC is checked when the configuration is built, against what validation really returns, and the mode
must agree with the metric (a loss is minimised)."""

from __future__ import annotations

import pytest
import torch

from cellseg.config import ConfigError, resolve_config
from cellseg.losses import loss_from_config
from cellseg.model import build_model_from_config
from cellseg.monitor import MONITOR_MODES, NOT_MONITORABLE
from cellseg.training.validation import run_validation
from toydata import ToyDataset


@pytest.mark.parametrize("metric, mode, words", [
    ("val_loss_nc", "max", ["MONITOR_METRIC='val_loss_nc'", "a loss", "MONITOR_MODE='min'"]),
    ("val_loss_np", "max", ["MONITOR_MODE='min'"]),
    ("pq", "min", ["higher is better", "MONITOR_MODE='max'"]),
    ("pqq", "max", ["MONITOR_METRIC must be one of", "'pq'", "val_loss_nc"]),
    ("det_fp", "min", ["MONITOR_METRIC must be one of"]),
])
def test_monitor_metric_and_mode_are_checked_at_configuration(metric, mode, words):
    with pytest.raises(ConfigError) as e:
        resolve_config({"MONITOR_METRIC": metric, "MONITOR_MODE": mode})
    for w in words:
        assert w in str(e.value), w


@pytest.mark.parametrize("metric", sorted(MONITOR_MODES))
def test_every_listed_metric_is_accepted_in_its_mode(metric):
    assert resolve_config({"MONITOR_METRIC": metric, "MONITOR_MODE": MONITOR_MODES[metric]}).MONITOR_METRIC == metric


def test_the_table_is_what_validation_returns():
    cfg = resolve_config({"ENCODER": "test_vit", "ENCODER_WEIGHTS": "", "DECODER_WIDTH": 8, "PATCH_SIZE": 32,
                          "DEVICE": "cpu", "PRECISION": "fp32"})
    torch.manual_seed(0)
    model = build_model_from_config(cfg, num_classes=2).eval()
    val = run_validation(model, ToyDataset(n=2, size=32), loss_from_config(cfg, 2), class_names=["a", "b"],
                         device="cpu", object_diameter=8.0)
    numeric = {k for k, v in val.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(MONITOR_MODES) | set(NOT_MONITORABLE)
