"""The validated configuration: unknown names, wrong types and bad values are errors that name the parameter."""

from __future__ import annotations

import pytest

from cellseg.config import (
    NOTEBOOK_PARAMS,
    Config,
    ConfigError,
    config_from_cli,
    load_params_file,
    parameters_from_namespace,
    replace,
    resolve_config,
)


def test_defaults_are_the_cluster_run():
    cfg = resolve_config({})
    assert cfg.ENCODER == "uni" and cfg.DATASET == "bccd" and cfg.PHASE == 1
    assert cfg.data_cache == cfg.run_dir / "data"
    assert resolve_config({"DATA_CACHE": "/x/cache"}).data_cache.as_posix() == "/x/cache"
    assert cfg.checkpoint_dir(2).as_posix() == "runs/bccd_uni/checkpoints/phase2"  # inside RUN_DIR by default


def test_int_accepted_for_float_and_tuple_for_list():
    cfg = resolve_config({"LR_LORA": 1, "LORA_TARGETS": ("qkv", "proj")})
    assert isinstance(cfg.LR_LORA, float) and cfg.LORA_TARGETS == ["qkv", "proj"]


@pytest.mark.parametrize("values, name, allowed", [
    ({"PHASE": 3}, "PHASE", "[1, 2]"),
    ({"DATASET": "imagenet"}, "DATASET", "synthetic"),
    ({"DECODER": "fpn"}, "DECODER", "hovernet"),
    ({"SCHEDULER": "linear"}, "SCHEDULER", "cosine_warmup"),
    ({"PRECISION": "fp8"}, "PRECISION", "bf16"),
    ({"EPOCHS": 0}, "EPOCHS", "> 0"),
    ({"NUM_WORKERS": -1}, "NUM_WORKERS", ">= 0"),
    ({"VAL_FRACTION": 1.5}, "VAL_FRACTION", "[0, 1]"),
    ({"TTA": 1}, "TTA", "bool"),
    ({"EPOCHS": 2.5}, "EPOCHS", "int"),
    ({"EPOCHS": True}, "EPOCHS", "int"),
    ({"ENCODER": 5}, "ENCODER", "str"),
    ({"STOP_SIGNALS": ["SIGKILL"]}, "STOP_SIGNALS", "SIGTERM"),
    ({"ENCODER_INDICES": [1.5]}, "ENCODER_INDICES", "ints"),
    ({"CLASS_WEIGHTS": [1, -2]}, "CLASS_WEIGHTS", "non-negative"),
    ({"FOCAL_ALPHA": ["a"]}, "FOCAL_ALPHA", "non-negative"),
    ({"LORA_TARGETS": []}, "LORA_TARGETS", "non-empty"),
    ({"LORA_BLOCKS": "first"}, "LORA_BLOCKS", "last_half"),
    ({"DUPLICATES": "remove"}, "DUPLICATES", "drop"),
    ({"GROUP_KEY": "slide"}, "GROUP_KEY", "prefix:SEP"),
    ({"RESUME": "yes"}, "RESUME", "auto"),
    ({"INIT_FROM": "phase1"}, "INIT_FROM", "fresh"),
    ({"EVAL_CHECKPOINT": "final"}, "EVAL_CHECKPOINT", "best"),
    ({"EVAL_SPLIT": "holdout"}, "EVAL_SPLIT", "test"),
    ({"DEVICE": "gpu"}, "DEVICE", "cuda"),
    ({"RUN_DIR": ""}, "RUN_DIR", "empty"),
    ({"FOCAL_ALPHA": [1.0]}, "FOCAL_ALPHA", "2 numbers"),
    ({"MONITOR_METRIC": "val_loss", "MONITOR_MODE": "max"}, "MONITOR_MODE", "min"),
    ({"GRAD_ACCUM_TARGET": 4, "BATCH_SIZE": 8}, "GRAD_ACCUM_TARGET", ">= BATCH_SIZE"),
])
def test_bad_values_name_the_parameter(values, name, allowed):
    with pytest.raises(ConfigError) as e:
        resolve_config(values)
    assert name in str(e.value) and allowed in str(e.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        resolve_config({"LEARNIN_RATE": 0.001}, notebook="01_train")
    msg = str(e.value)
    assert "LEARNIN_RATE" in msg and "LR_DECODER_P1" in msg and "PHASE" in msg


def test_names_of_other_notebooks_are_accepted():
    cfg = resolve_config({"EPOCHS": 3, "TTA": False}, notebook="00_prepare_data")
    assert cfg.EPOCHS == 3
    with pytest.raises(ConfigError, match="notebook must be one of"):
        resolve_config({}, notebook="03_extra")


def test_parameters_from_namespace_keeps_literals_only():
    import os

    ns = {"PHASE": 2, "RUN_DIR": "r", "In": [], "_i1": "x", "os": os, "resolve_config": resolve_config, "phase": 2}
    assert parameters_from_namespace(ns) == {"PHASE": 2, "RUN_DIR": "r", "phase": 2}
    with pytest.raises(ConfigError, match="phase"):  # a lower-case typo is caught too
        resolve_config(parameters_from_namespace(ns))


def test_params_file_and_cli_pairs(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("PHASE: 2\nEPOCHS: 4\n")
    cfg = config_from_cli([str(f)], [["EPOCHS", "7"], ["ENCODER", "test_vit"]])
    assert (cfg.PHASE, cfg.EPOCHS, cfg.ENCODER) == (2, 7, "test_vit")
    with pytest.raises(ConfigError, match="does not exist"):
        load_params_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("PHASE: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params_file(tmp_path / "list.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config({"PHASE": 2, "LORA_TARGETS": ["qkv"]})
    cfg.save(tmp_path / "c.json")
    import json

    assert resolve_config(json.loads((tmp_path / "c.json").read_text())) == cfg
    assert replace(cfg, EPOCHS=3).EPOCHS == 3


def test_notebook_sections_cover_every_field():
    from dataclasses import fields

    covered = set().union(*NOTEBOOK_PARAMS.values())
    assert covered == {f.name for f in fields(Config)}


@pytest.mark.parametrize("name, value, match", [
    ("INPUT_SCALE", 0.0, "INPUT_SCALE must be > 0"),
    ("INPUT_SCALE", 8.0, r"INPUT_SCALE resizes images .* \(0, 4\]"),
    ("LR_ENCODER_P1", -1e-3, "LR_ENCODER_P1 must be >= 0"),
    ("TRAIN_ENCODER_P1", 1, "TRAIN_ENCODER_P1 must be of type bool"),
])
def test_issue16_parameters_are_validated(name, value, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config({name: value})
