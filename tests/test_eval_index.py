"""One evaluation folder per (phase, checkpoint, split), index.jsonl, the ``latest`` pointer (cellseg.eval_index), and
``cellseg runs summarize`` (cellseg.runs_table), built through the library with timm's tiny ``test_vit``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cellseg.checkpoint.atomic import sha256_file
from cellseg.checkpoint.sidecar import build_sidecar, sidecar_path
from cellseg.cli import main as cli_main
from cellseg.eval_index import (
    checkpoint_label,
    checkpoint_record,
    eval_dir,
    eval_dir_name,
    latest_eval_dir,
    read_index,
    record_evaluation,
)
from cellseg.evaluation import evaluate_model
from cellseg.model import build_model
from test_evaluation import CLASSES, write_cache


def _save_checkpoint(model: torch.nn.Module, path: Path, phase: int, epoch: int) -> None:
    """The weights plus the sidecar the checkpoint manager writes (hash, size, phase, epoch, architecture)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    side = build_sidecar(payload={"phase": phase, "progress": {"epoch": epoch}, "arch": model.arch_info()},
                         manifest={}, sha256=sha256_file(path), size=path.stat().st_size, file_name=path.name,
                         parent=None, code_version=None, reason="epoch", time="2026-11-30T12:00:00Z")
    sidecar_path(path).write_text(json.dumps(side))


def _evaluate(run_dir: Path, cache: Path, model, ckpt: Path, phase: int) -> Path:
    params = {"RUN_DIR": str(run_dir), "EVAL_PHASE": phase, "EVAL_CHECKPOINT": "best", "EVAL_SPLIT": "test",
              "ENCODER": "test_vit", "DECODER": "hovernet"}
    cfg = SimpleNamespace(run_dir=run_dir, **params)
    out = eval_dir(cfg)
    record = checkpoint_record(ckpt)
    metrics = evaluate_model(model, cache, "test", out, class_names=CLASSES, device="cpu", tune_split=None,
                             pp_params={"object_diameter": 10}, max_images=2, progress=False, checkpoint=record,
                             n_overlays=1, max_error_crops=2)  # few figures: they dominate the time
    record_evaluation(out, metrics, checkpoint=record, parameters=params)
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs, each with Phase 1 and Phase 2 checkpoints (different weights) evaluated on the test split."""
    root = tmp_path_factory.mktemp("runs")
    cache = write_cache(root / "cache", {"val": 1, "test": 2})
    torch.manual_seed(0)
    runs = []
    for r in ("run_a", "run_b"):
        run_dir = root / r
        for phase in (1, 2):
            model = build_model("test_vit", num_classes=len(CLASSES), width=8, load_weights=False).eval()
            ckpt = run_dir / "checkpoints" / f"phase{phase}" / "best.pt"
            _save_checkpoint(model, ckpt, phase, epoch=2 * phase)
            _evaluate(run_dir, cache, model, ckpt, phase)
        runs.append(run_dir)
    return runs


def test_phase1_and_phase2_reports_side_by_side(two_runs):
    run = two_runs[0]
    folders = sorted(p.name for p in (run / "eval").iterdir() if p.is_dir())
    assert folders == ["phase1-best-test", "phase2-best-test"]
    hashes = set()
    for name in folders:
        out = run / "eval" / name
        for f in ("metrics.json", "report.md", "evaluation.json", "confusion.png"):
            assert (out / f).is_file(), f
        assert len(list((out / "predictions").glob("*.npy"))) == 2
        rec = json.loads((out / "evaluation.json").read_text())
        ckpt = run / "checkpoints" / f"phase{name[5]}" / "best.pt"
        assert rec["checkpoint_sha256"] == sha256_file(ckpt) and rec["parameters"]["EVAL_PHASE"] == int(name[5])
        assert json.loads((out / "metrics.json").read_text())["checkpoint"]["sha256"] == rec["checkpoint_sha256"]
        assert rec["checkpoint_sha256"][:12] in (out / "report.md").read_text()
        hashes.add(rec["checkpoint_sha256"])
    assert len(hashes) == 2
    index = read_index(run / "eval")
    assert [e["dir"] for e in index] == folders and [e["epoch"] for e in index] == [2, 4]
    assert (run / "eval" / "latest").read_text() == "phase2-best-test\n"
    assert latest_eval_dir(run) == run / "eval" / "phase2-best-test"


def test_runs_summarize_prints_four_rows(two_runs, tmp_path, capsys):
    assert cli_main(["runs", "summarize", *map(str, two_runs), "--out", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| run_")]
    assert len(table) == 4
    assert [line.split(" | ")[1:4] for line in table] == [
        ["1", "best", "test"], ["2", "best", "test"], ["1", "best", "test"], ["2", "best", "test"]]
    header = out.splitlines()[0]
    for col in ("encoder", "decoder", "epochs", "bpq", "mpq", "ap50", "pq:round", "f1:square", "date",
                "checkpoint_sha256"):
        assert f" {col} " in header, col
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert len(rows) == 4 and rows[0]["run"] == "run_a" and rows[3]["run"] == "run_b"
    assert rows[0]["encoder"] == "test_vit" and rows[1]["epochs"] == "4" and len(rows[0]["checkpoint_sha256"]) == 64
    assert cli_main(["runs", "summarize", str(two_runs[0]), "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().count("| run_a |") == 2


def test_reevaluation_replaces_its_row(two_runs, tmp_path):
    from cellseg.runs_table import summarize_runs

    run = tmp_path / "copy"
    (run / "eval" / "phase1-best-test").mkdir(parents=True)
    src = two_runs[0] / "eval"
    (run / "eval" / "phase1-best-test" / "metrics.json").write_bytes((src / "phase1-best-test" / "metrics.json")
                                                                       .read_bytes())
    line = (src / "index.jsonl").read_text().splitlines()[0]
    newer = json.loads(line) | {"time": "2099-01-01T00:00:00Z"}
    (run / "eval" / "index.jsonl").write_text(line + "\n" + json.dumps(newer) + "\n")
    _, rows = summarize_runs([run])
    assert len(rows) == 1 and rows[0]["date"] == "2099-01-01T00:00:00Z"


def test_eval_dir_names():
    assert eval_dir_name(2, "best", "test") == "phase2-best-test"
    assert checkpoint_label("/x/y/epoch_0005.pt") == "epoch_0005"
    assert checkpoint_label("my ckpt-v2.pt") == "my_ckpt_v2"
    assert eval_dir_name(1, "runs/a/phase1/latest.pt", "val") == "phase1-latest-val"


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing_run", "is not a folder"),
        ("no_index", "has no finished evaluation"),
        ("old_layout", "layout before per-checkpoint folders"),
        ("missing_folder", "is missing; re-run that evaluation"),
        ("bad_line", "line 1 is not JSON"),
    ],
)
def test_runs_summarize_errors(tmp_path, capsys, setup, match):
    run = tmp_path / "run"
    if setup != "missing_run":
        (run / "eval").mkdir(parents=True)
    if setup == "old_layout":
        (run / "eval" / "metrics.json").write_text("{}")
    if setup == "missing_folder":
        (run / "eval" / "index.jsonl").write_text(json.dumps({"dir": "phase2-best-test"}) + "\n")
    if setup == "bad_line":
        (run / "eval" / "index.jsonl").write_text("{not json\n")
    assert cli_main(["runs", "summarize", str(run)]) == 2
    assert match in capsys.readouterr().err


def test_runs_summarize_rejects_other_suffixes(tmp_path, capsys):
    assert cli_main(["runs", "summarize", str(tmp_path), "--out", str(tmp_path / "t.txt")]) == 2
    assert "must end in .md or .csv" in capsys.readouterr().err


def test_pointer_and_record_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluation of"):
        latest_eval_dir(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "latest").write_text("gone\n")
    with pytest.raises(FileNotFoundError, match="names 'gone', which is not a folder"):
        latest_eval_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist; cannot record"):
        checkpoint_record(tmp_path / "nope.pt")


def test_summarize_rejects_no_runs_and_broken_metrics(tmp_path):
    from cellseg.runs_table import RunsError, summarize_runs

    with pytest.raises(RunsError, match="give at least one RUN_DIR"):
        summarize_runs([])
    (tmp_path / "eval" / "phase2-best-test").mkdir(parents=True)
    (tmp_path / "eval" / "phase2-best-test" / "metrics.json").write_text("{broken")
    (tmp_path / "eval" / "index.jsonl").write_text(json.dumps({"dir": "phase2-best-test"}) + "\n")
    with pytest.raises(RunsError, match="metrics.json is not valid JSON"):
        summarize_runs([tmp_path])
