"""`cellseg train` (README's command list): one Phase 1 epoch on the tiny config, from a prepared synthetic cache."""

from __future__ import annotations

import json
from pathlib import Path

from cellseg.cli import main as cli_main
from cellseg.data.prepare import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def test_cellseg_train_runs_one_phase(tmp_path, capsys):
    run = tmp_path / "run"
    prepare_dataset("synthetic", None, run / "data", synth_num_images=8, synth_image_size=96, val_fraction=0.25,
                    test_fraction=0.25, progress=False, qa_overlays=0, seed=42)  # the run's SEED (checked)
    code = cli_main(["train", "-f", str(TINY), "-p", "RUN_DIR", str(run), "-p", "EPOCHS", "1",
                     "-p", "CHECKPOINT_DIR", str(run / "checkpoints")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary, summary
    history = (run / "phase1" / "history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["epoch"] in (0, 1)
    assert (run / "checkpoints" / "phase1" / "latest.pt").exists()
