"""The whole workflow through the real notebooks with papermill on the tiny CPU config: 00 -> 01 (PHASE 1) ->
01 (PHASE 2) -> 02, from fresh kernels, handing off through files; plus the parameter errors a user meets first."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import papermill as pm
import pytest
import yaml

from cellseg.workflow import project_root, run_notebook, run_workflow

ROOT = project_root()
TINY = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())

pytestmark = pytest.mark.slow


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


STREAMED = _Lines()  # what the notebooks printed while they ran (papermill's log_output, as `make demo` shows it)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("workflow") / "run"
    logger = logging.getLogger("papermill")
    level = logger.level
    logger.addHandler(STREAMED)
    logger.setLevel(logging.INFO)  # log_output writes at INFO
    try:
        run_workflow(run_dir, TINY, log_output=True)
    finally:
        logger.removeHandler(STREAMED)
        logger.setLevel(level)
    return run_dir


def test_progress_streams_while_the_notebooks_run(demo_run):
    """One progress line per LOG_EVERY steps with epoch, step, loss, best metric and time left (issue 15)."""
    progress = [ln for ln in STREAMED.lines if re.search(r"epoch \d+/2 step \d+/\d+ loss [0-9.]+ best pq ", ln)]
    assert progress, STREAMED.lines[-40:]
    assert all(re.search(r"time left ~\S+", ln) for ln in progress)


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_executed_notebooks_and_artifacts(demo_run):
    nbs = sorted(p.name for p in (demo_run / "notebooks").glob("*.ipynb"))
    assert nbs == ["00_prepare_data.ipynb", "01_train_phase1.ipynb", "01_train_phase2.ipynb", "02_evaluate.ipynb",
                   "03_predict.ipynb"]
    assert (demo_run / "data" / "manifest.json").exists()
    for phase in (1, 2):
        hist = _history(demo_run / f"phase{phase}" / "history.jsonl")
        assert len(hist) == TINY["EPOCHS"]
        for rec in hist:
            assert {"epoch", "step", "lr", "train_loss", "val"} <= set(rec)
            assert isinstance(rec["lr"], dict) and "decoder" in rec["lr"]
            assert {"total", "np", "hv", "nc"} <= set(rec["train_loss"])
            assert "pq" in rec["val"]
        ck = demo_run / "checkpoints" / f"phase{phase}"
        assert (ck / "latest.pt").exists() and (ck / "best.pt").exists() and (ck / "ledger.jsonl").exists()
        status = json.loads((demo_run / f"phase{phase}" / "status.json").read_text())
        assert status["status"] == "finished"
        for png in ("loss_curves.png", "lr_curves.png", "val_curves.png"):
            assert (demo_run / f"phase{phase}" / png).stat().st_size > 0


def test_params_json_per_phase(demo_run):
    p1 = json.loads((demo_run / "phase1" / "params.json").read_text())
    p2 = json.loads((demo_run / "phase2" / "params.json").read_text())
    for p in (p1, p2):
        assert {"total", "trainable", "backbone", "lora", "decoder"} <= set(p)
    # the tiny config trains test_vit from random weights, so Phase 1 trains the whole network (TRAIN_ENCODER_P1)
    assert p1["train_encoder_p1"] is True and "full network" in p1["mode"]
    assert p1["backbone"] > 0 and p1["lora"] == 0 and p1["decoder"] > 0
    assert p1["trainable"] == p1["backbone"] + p1["decoder"] == p1["total"]
    assert p2["backbone"] == 0 and p2["lora"] > 0 and p2["trainable"] == p2["lora"] + p2["decoder"]
    assert "lora" in _history(demo_run / "phase2" / "history.jsonl")[0]["lr"]


def test_phase2_started_from_phase1(demo_run):
    ledger = [json.loads(x) for x in (demo_run / "checkpoints" / "phase2" / "ledger.jsonl").read_text().splitlines()]
    text = json.dumps(ledger)
    assert "phase1" in text and "best.pt" in text


def test_eval_metrics_and_report(demo_run):
    # 02_evaluate's defaults: Phase 2's best checkpoint on the test split, in its own folder
    out = demo_run / "eval" / "phase2-best-test"
    assert (demo_run / "eval" / "latest").read_text().strip() == out.name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("pq", "sq", "rq", "bpq", "mpq", "mpq_plus", "aji", "aji_plus", "dice", "det_precision", "det_recall",
                "det_f1", "ap50", "map", "ap50_agnostic", "per_class", "conventions", "checkpoint"):
        assert key in metrics, key
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["dice"] > 0.0  # computed from real predictions
    assert set(metrics["per_class"]) == {"RBC", "WBC", "Platelet"}
    assert len(metrics["checkpoint"]["sha256"]) == 64 and metrics["checkpoint"]["phase"] == 2
    assert (out / "report.md").read_text().strip()
    assert list(out.glob("*.png")) and list((out / "predictions").glob("*.npy"))
    index = [json.loads(x) for x in (demo_run / "eval" / "index.jsonl").read_text().splitlines()]
    assert index[-1]["dir"] == out.name and index[-1]["checkpoint_sha256"] == metrics["checkpoint"]["sha256"]


def test_predict_notebook_outputs(demo_run):
    import csv

    rows = list(csv.DictReader(open(demo_run / "predict" / "summary.csv")))
    manifest = json.loads((demo_run / "data" / "manifest.json").read_text())
    assert len(rows) == len(manifest["splits"]["test"]) > 0 and {r["status"] for r in rows} == {"finished"}
    out = demo_run / "predict" / Path(rows[0]["input"]).stem
    for name in ("instances.tif", "cells.geojson", "cells.csv", "overlay.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["class_names"] == ["RBC", "WBC", "Platelet"]
    assert summary["model"]["class_names_source"] == "checkpoint"
    assert summary["model"]["postprocess_source"].startswith("defaults")  # TUNE_POSTPROCESS is off in tiny_cpu
    assert summary["model"]["postprocess"]["object_diameter"] == TINY["OBJECT_DIAMETER"]


def test_rerun_of_a_finished_phase_resumes_instead_of_retraining(demo_run, tmp_path):
    before = _history(demo_run / "phase1" / "history.jsonl")
    run_notebook("01_train", tmp_path / "again.ipynb",
                 {**TINY, "RUN_DIR": str(demo_run), "CHECKPOINT_DIR": str(demo_run / "checkpoints"), "PHASE": 1})
    assert _history(demo_run / "phase1" / "history.jsonl") == before
    assert "resumed Phase 1" in (tmp_path / "again.ipynb").read_text()


def test_dataloader_workers_inside_a_papermill_kernel(demo_run, tmp_path):
    params = {**TINY, "RUN_DIR": str(tmp_path / "w"), "DATA_CACHE": str(demo_run / "data"),
              "CHECKPOINT_DIR": str(tmp_path / "ck"), "NUM_WORKERS": 2, "EPOCHS": 1, "PHASE": 1}
    run_notebook("01_train", tmp_path / "workers.ipynb", params)
    assert len(_history(tmp_path / "w" / "phase1" / "history.jsonl")) == 1


@pytest.mark.parametrize("name, value, expected", [
    ("PHASE", 3, ["PHASE must be one of [1, 2], got 3"]),
    ("LEARNIN_RATE", 0.001, ["LEARNIN_RATE", "Valid names", "LR_DECODER_P1"]),
])
def test_parameter_errors_stop_the_notebook(tmp_path, name, value, expected):
    with pytest.raises(pm.PapermillExecutionError) as e:
        run_notebook("01_train", tmp_path / "bad.ipynb", {**TINY, "RUN_DIR": str(tmp_path / "r"), name: value})
    for text in expected:
        assert text in str(e.value)
    assert not (tmp_path / "r" / "phase1").exists()  # nothing ran past the validation cell


def test_each_phase_keeps_its_own_resolved_config_and_log(demo_run):
    import json as _json

    for phase in (1, 2):
        cfg = _json.loads((demo_run / f"config_01_train_phase{phase}.json").read_text())
        assert cfg["PHASE"] == phase
        assert (demo_run / "logs" / f"01_train_phase{phase}.log").stat().st_size > 0
