"""benchmarks/train_throughput.py: the ``--tiny`` preset runs end to end on the CPU (training and inference) and
appends its row with the exact command to the results file, inside its own section; the MFU table lookup; the
memory-model rows; and the script's refusals."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_training_run_end_to_end(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Someone else's section\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--results", str(results)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Results\n\n## Someone else's section\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    lines = text.splitlines()
    section = lines.index("## Training and inference throughput (`benchmarks/train_throughput.py`)")
    row = lines[-1]
    assert lines.index("| 1 | 2 |") < section
    assert row.startswith("| test_vit+hovernet P1 64px b2 fp32 |")
    assert f"`python benchmarks/train_throughput.py --tiny --results {results}`" in row
    cells = [c.strip() for c in row.strip("|").split("|")]
    images_per_s, step_ms = float(cells[1]), float(cells[2])
    assert images_per_s > 0 and step_ms > 0
    assert abs(sum(float(c) for c in cells[3:7]) - step_ms) < 0.05 * step_ms + 0.2  # the split adds up
    measured, predicted = cells[7].split(), cells[8].split()  # "<peak> MiB peak (<saved> MiB saved)"
    assert measured[1:3] == predicted[1:3] == ["MiB", "peak"] and measured[-1] == predicted[-1] == "saved)"
    assert float(measured[0]) == pytest.approx(float(predicted[0]), rel=0.05)  # the CPU allocator's peak
    assert float(measured[3].strip("(")) == pytest.approx(float(predicted[3].strip("(")), rel=0.02)
    assert float(cells[9]) > 0 and cells[10] == "n/a (no peak rate)"  # GFLOP/step counted, no CPU peak rate
    assert row in proc.stdout


def test_tiny_phase2_bf16_checkpointing_and_inference_in_process(bench, tmp_path, capsys):
    results = tmp_path / "R.md"
    assert bench.main(["--tiny", "--phase", "2", "--precision", "bf16", "--grad-checkpointing",
                       "--steps", "2", "--results", str(results)]) == 0
    assert bench.main(["--tiny", "--mode", "inference", "--pp-workers", "1", "--steps", "2",
                       "--results", str(results)]) == 0
    text = results.read_text()
    assert text.count("## Training and inference throughput") == 1
    assert ": training\n" in text and ": inference\n" in text
    train_row = next(line for line in text.splitlines() if "P2 64px b2 bf16, ckpt" in line)
    assert "--grad-checkpointing" in train_row
    infer_row = next(line for line in text.splitlines() if "--mode inference" in line)
    network, post, both = (float(c.split()[0]) for c in infer_row.strip("|").split("|")[1:4])
    assert network > 0 and post > 0 and both > 0


def test_append_row_keeps_one_table_per_device_and_kind(bench, tmp_path):
    path = tmp_path / "R.md"
    for i in range(2):
        bench.append_row(path, "GPU X", bench.TRAIN_HEADER, f"| train {i} |")
    bench.append_row(path, "GPU Y", bench.TRAIN_HEADER, "| other device |")
    path.write_text(path.read_text() + "\n## Later section\n\ntext\n")
    bench.append_row(path, "GPU X", bench.TRAIN_HEADER, "| train 2 |")
    lines = path.read_text().splitlines()
    assert lines.count("### GPU X: training") == 1 and lines.count(bench.TRAIN_HEADER) == 2
    x = lines.index("### GPU X: training")
    assert lines[x + 4:x + 7] == ["| train 0 |", "| train 1 |", "| train 2 |"]
    assert lines.index("| other device |") < lines.index("## Later section") == len(lines) - 3


def test_peak_rates_by_device_name(bench):
    assert bench.peak_flops_for("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert bench.peak_flops_for("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert bench.peak_flops_for("NVIDIA A100-SXM4-40GB") == pytest.approx(312e12)
    assert bench.peak_flops_for("NVIDIA A10") == pytest.approx(125e12)
    assert bench.peak_flops_for("Some Future GPU") is None
    assert bench.peak_flops(torch.device("cpu")) is None


def test_memory_rows_compare_prediction_and_measurement(bench, monkeypatch):
    monkeypatch.setattr(bench, "MEMORY_CASES", [dict(PHASE=2), dict(PHASE=2, ENCODER="test_resnet")])
    rows = bench.memory_table(torch.device("cpu"))
    assert len(rows) == 4
    for row in rows[2:]:
        cells = [c.strip() for c in row.split("|")]
        peak_error, saved_error = float(cells[4].rstrip("%")), float(cells[7].rstrip("%"))
        assert abs(peak_error) < 5.0 and abs(saved_error) < 1.0
    assert "shared outputs counted in the decoder" in rows[3]


def test_refusals(bench, monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="--memory-cap-gb needs a CUDA device"):
        bench.main(["--tiny", "--memory-cap-gb", "12", "--no-append"])
    monkeypatch.setitem(sys.modules, "cellseg.data", None)  # as if the data package were missing
    with pytest.raises(SystemExit, match="--data cache needs cellseg.data"):
        bench.main(["--tiny", "--data", "cache", "--no-append", "--results", str(tmp_path / "R.md")])


def test_cuda_rules_rows_compare_prediction_and_fake_cuda(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "CUDA_RULES_CASES", [dict(phase=2, image_size=64, encoder="test_vit"),
                                                    dict(phase=1, image_size=64, encoder="test_vit",
                                                         precision="fp32")])
    assert bench.main(["--cuda-rules-table"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| test_vit")]
    assert len(rows) == 2 and "| bf16 | flash |" in rows[0] and "| fp32 | memory-efficient |" in rows[1]
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        assert abs(float(cells[6].rstrip("%"))) < 0.01 and abs(float(cells[9].rstrip("%"))) < 0.5
