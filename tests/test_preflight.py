"""``cellseg preflight``: a clean pass, and each kind of problem (wrong parameters, missing data, an incompatible or
unusable checkpoint, an over-budget memory estimate, a broken loss) reported with its message and exit code 1;
unusable arguments exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cellseg.checkpoint import CheckpointManager, collect_state
from cellseg.checkpoint.sidecar import sidecar_path
from cellseg.cli import main as cli_main
from cellseg.commands.preflight import EXIT_ARGS, EXIT_OK, EXIT_PROBLEMS, main, stand_in_encoder
from cellseg.config import resolve_config
from cellseg.memory import GiB, MemoryModel
from cellseg.model import build_model_from_config
from cellseg.optim import build_optimizer, configure_phase
from cellseg.schedulers import build_scheduler

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
CLASSES = ["cell_a", "cell_b"]


def prepare_data(cache: Path) -> None:
    """A prepared cache: the data package's synthetic set when it is there, else the manifest it writes."""
    try:
        from cellseg.data import prepare_dataset
    except ImportError:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "manifest.json").write_text(json.dumps({"class_names": CLASSES, "splits": {
            "train": ["s0", "s1", "s2"], "val": ["s3"], "test": ["s4"]}}))
        return
    prepare_dataset("synthetic", None, cache, synth_num_images=8, synth_image_size=64)


@pytest.fixture
def setup(tmp_path):
    """A tiny parameter file with RUN_DIR / CHECKPOINT_DIR under tmp_path and its prepared data."""
    values = yaml.safe_load(TINY.read_text())
    values.update(RUN_DIR=str(tmp_path / "run"), CHECKPOINT_DIR=str(tmp_path / "ck"))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    prepare_data(tmp_path / "run" / "data")
    return path, values


def num_classes(values: dict) -> int:
    try:
        from cellseg.data import load_manifest
    except ImportError:
        return len(CLASSES)
    return len(load_manifest(Path(values["RUN_DIR"]) / "data")["class_names"])


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def save_checkpoint(values: dict, phase: int, **overrides) -> Path:
    """A real checkpoint (best.pt, latest.pt, epoch file and sidecars) of the network ``values`` describe."""
    cfg = resolve_config({**values, "PHASE": phase, **overrides})
    model = build_model_from_config(cfg, num_classes=num_classes(values))
    configure_phase(model, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=2)
    progress = {"epoch": 1, "step": 2, "batch_in_epoch": 0, "best_metric": 0.5, "best_epoch": 0,
                "patience_counter": 0, "history": [], "monitor": {"metric": "pq", "mode": "max"}}
    state = collect_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, progress=progress,
                          config=cfg.to_dict())
    CheckpointManager(cfg.checkpoint_dir(), phase=phase, code_version="test").save(state, epoch_end=True, is_best=True)
    return cfg.checkpoint_dir() / "best.pt"


def test_clean_pass(setup, capsys):
    path, values = setup
    code, out = run(capsys, "-f", str(path), "--gpu", "12gb")
    assert code == EXIT_OK, out
    for check in ("parameters", "data", "checkpoints", "memory", "steps"):
        assert any(line.startswith("OK") and check in line for line in out.splitlines()), (check, out)
    assert "no problems found." in out and "PROBLEM" not in out
    assert "2 optimizer steps of stand-in 'test_vit'" in out


def test_clean_pass_phase2_from_a_compatible_phase1_checkpoint_through_the_cli(setup, capsys):
    path, values = setup
    best = save_checkpoint(values, 1)
    code = cli_main(["preflight", "-f", str(path), "-p", "PHASE", "2", "--skip-steps"])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert f"Phase 2 starts from {best}" in out


def test_every_wrong_parameter_is_listed(setup, capsys):
    path, _ = setup
    code, out = run(capsys, "-f", str(path), "-p", "BATCH_SIZE", "0", "-p", "PATCH_SIZ", "96", "-p", "PRECISION",
                    "bf32", "--skip-steps")
    assert code == EXIT_PROBLEMS
    assert "unknown parameter(s) ['PATCH_SIZ']" in out
    assert "BATCH_SIZE must be > 0, got 0" in out
    assert "PRECISION must be one of" in out and "'bf32'" in out
    assert "3 problem(s) found." in out


def test_a_rule_between_two_parameters_names_the_given_one(setup, capsys):
    path, _ = setup
    code, out = run(capsys, "-f", str(path), "-p", "BATCH_SIZE", "32", "--skip-steps")  # GRAD_ACCUM_TARGET is 8
    assert code == EXIT_PROBLEMS
    assert "GRAD_ACCUM_TARGET (effective batch, 8) must be 0 (no accumulation) or >= BATCH_SIZE (32)" in out
    assert "defaults in place of ['BATCH_SIZE', 'GRAD_ACCUM_TARGET']" in out and "1 problem(s) found." in out


def test_missing_data_says_to_prepare_it(setup, capsys, tmp_path):
    path, _ = setup
    code, out = run(capsys, "-f", str(path), "-p", "DATA_CACHE", str(tmp_path / "nowhere"), "--skip-steps")
    assert code == EXIT_PROBLEMS
    assert f"no usable prepared data at {tmp_path / 'nowhere'}" in out and "00_prepare_data" in out


def test_an_empty_split_is_a_problem(setup, capsys, tmp_path):
    path, _ = setup
    cache = tmp_path / "half"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"class_names": CLASSES, "splits": {"train": ["a"], "val": []}}))
    code, out = run(capsys, "-f", str(path), "-p", "DATA_CACHE", str(cache), "--skip-steps")
    assert code == EXIT_PROBLEMS and "no images in split(s) ['val']" in out


def test_incompatible_checkpoint_is_explained(setup, capsys):
    path, values = setup
    save_checkpoint(values, 1, ENCODER="test_resnet")
    code, out = run(capsys, "-f", str(path), "--skip-steps")
    assert code == EXIT_PROBLEMS
    assert "PROBLEM  checkpoints" in out
    assert "checkpoint encoder is 'test_resnet'" in out and "the parameters ask for 'test_vit'" in out
    assert "FORCE_RECREATE=True" in out
    code, out = run(capsys, "-f", str(path), "-p", "FORCE_RECREATE", "True", "--skip-steps")
    assert code == EXIT_OK and "FORCE_RECREATE=True moves the phase's checkpoints aside" in out


def test_changed_scheduler_and_corrupt_sidecar(setup, capsys):
    path, values = setup
    best = save_checkpoint(values, 1)
    code, out = run(capsys, "-f", str(path), "-p", "SCHEDULER", "step", "--skip-steps")
    assert code == EXIT_PROBLEMS
    assert "its scheduler is 'cosine_warmup', the parameters ask for SCHEDULER='step'" in out
    latest = best.with_name("latest.pt")
    sidecar_path(latest).write_text("{ not json")
    code, out = run(capsys, "-f", str(path), "--skip-steps")
    assert code == EXIT_OK, out
    assert f"{latest} would be skipped: sidecar unreadable" in out
    assert "resumes from" in out and "epoch_0001.pt" in out


def test_auto_resume_landing_on_weights_only_best_is_a_problem(setup, capsys):
    path, values = setup
    best = save_checkpoint(values, 1)
    for name in ("latest.pt", "epoch_0001.pt"):
        sidecar_path(best.with_name(name)).unlink()
    code, out = run(capsys, "-f", str(path), "--skip-steps")
    assert code == EXIT_PROBLEMS, out
    assert f"RESUME='auto' stops: {best} is the only checkpoint left and it holds weights only" in out
    code, out = run(capsys, "-f", str(path), "-p", "RESUME", str(best), "--skip-steps")
    assert code == EXIT_OK and f"resumes from {best}" in out


def test_explicitly_named_checkpoints(setup, capsys):
    path, values = setup
    best = save_checkpoint(values, 1)
    code, out = run(capsys, "-f", str(path), "-p", "PHASE", "2", "-p", "INIT_FROM", str(best), "--skip-steps")
    assert code == EXIT_OK and f"Phase 2 starts from {best}" in out
    with open(best, "ab") as f:  # the file no longer matches its sidecar
        f.write(b"junk")
    code, out = run(capsys, "-f", str(path), "-p", "PHASE", "2", "-p", "INIT_FROM", str(best), "--skip-steps")
    assert code == EXIT_PROBLEMS and "(truncated); loading it fails" in out
    sidecar_path(best).unlink()
    code, out = run(capsys, "-f", str(path), "-p", "RESUME", str(best), "--skip-steps")
    assert code == EXIT_OK and "sidecar missing; it is loaded unverified" in out


def test_force_recreate_in_phase2_still_checks_init_from(setup, capsys):
    path, values = setup
    save_checkpoint(values, 2, ENCODER="test_resnet")
    code, out = run(capsys, "-f", str(path), "-p", "PHASE", "2", "-p", "FORCE_RECREATE", "True", "--skip-steps")
    assert code == EXIT_PROBLEMS
    assert "FORCE_RECREATE=True moves the phase's checkpoints aside" in out and "run Phase 1 first" in out


def test_phase2_without_phase1_checkpoint(setup, capsys):
    path, _ = setup
    code, out = run(capsys, "-f", str(path), "-p", "PHASE", "2", "--skip-steps")
    assert code == EXIT_PROBLEMS
    assert "finds no valid Phase 1 checkpoint" in out and "run Phase 1 first" in out
    code, out = run(capsys, "-f", str(path), "-p", "PHASE", "2", "-p", "INIT_FROM", "missing.pt", "--skip-steps")
    assert code == EXIT_PROBLEMS and "INIT_FROM='missing.pt': no such file" in out
    code, out = run(capsys, "-f", str(path), "-p", "PHASE", "2", "-p", "RESUME", "gone.pt", "--skip-steps")
    assert code == EXIT_PROBLEMS and "RESUME='gone.pt': no such file" in out


def test_over_budget_memory_suggests_a_batch_that_fits(setup, capsys):
    path, values = setup
    cfg = resolve_config(values)
    mm = MemoryModel(cfg, num_classes=num_classes(values))
    budget = (mm.estimate(2).total + mm.estimate(4).total) / 2 / GiB  # BATCH_SIZE is 4
    code, out = run(capsys, "-f", str(path), "--gpu", f"{budget:.6f}", "--skip-steps")
    assert code == EXIT_PROBLEMS
    assert "BATCH_SIZE=4 needs" in out and "(out of memory)" in out
    assert "Fits: BATCH_SIZE=2 x accumulation 4 (keeps the effective batch 8)" in out
    tiny = mm.estimate(1).total / 2 / GiB
    code, out = run(capsys, "-f", str(path), "--gpu", f"{tiny:.6f}", "--skip-steps")
    assert code == EXIT_PROBLEMS and "with one image per step" in out


def test_bf16_on_a_gpu_without_it(setup, capsys):
    path, _ = setup
    code, out = run(capsys, "-f", str(path), "-p", "PRECISION", "bf16", "--gpu", "v100-16gb", "--skip-steps")
    assert code == EXIT_PROBLEMS and "has no bf16 support" in out


def test_broken_loss_is_caught_by_the_training_steps(setup, capsys):
    path, values = setup
    code, out = run(capsys, "-f", str(path), "-p", "CLASS_WEIGHTS", "[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]")
    assert code == EXIT_PROBLEMS
    assert "PROBLEM  steps" in out and f"CLASS_WEIGHTS needs {num_classes(values) + 1} numbers" in out


def test_phase2_steps_run_lora_on_the_stand_in(setup, capsys):
    path, values = setup
    save_checkpoint(values, 1)
    code, out = run(capsys, "-f", str(path), "-p", "PHASE", "2", "-p", "PRECISION", "auto")
    assert code == EXIT_OK, out
    assert "6 LoRA layers" in out and "PRECISION='auto' runs as fp32 on the CPU" in out


def test_network_and_weights_problems(setup, capsys):
    path, _ = setup
    code, out = run(capsys, "-f", str(path), "-p", "PHASE", "2", "-p", "LORA_BLOCKS", "3-9", "-p", "INIT_FROM",
                    "fresh", "--skip-steps")
    assert code == EXIT_PROBLEMS and "the parameters do not build a network: LORA_BLOCKS='3-9'" in out
    code, out = run(capsys, "-f", str(path), "-p", "ENCODER", "uni", "-p", "ENCODER_WEIGHTS", "weights/none.bin",
                    "--gpu", "a100-80gb", "--skip-steps")
    assert code == EXIT_PROBLEMS
    assert "ENCODER_WEIGHTS file weights/none.bin does not exist" in out and "huggingface" in out
    assert "OK       memory" in out and "uni + hovernet" in out  # UNI's architecture is estimated without weights


def test_unusable_arguments_exit_2(setup, capsys, tmp_path):
    path, _ = setup
    assert run(capsys)[0] == EXIT_ARGS
    code, out = run(capsys, "-f", str(path), "--gpu", "k80")
    assert code == EXIT_ARGS and "--gpu must be one of" in out
    code, out = run(capsys, "-f", str(tmp_path / "absent.yaml"))
    assert code == EXIT_ARGS and "does not exist" in out
    code, out = run(capsys, "-f", str(path), "--world-size", "0")
    assert code == EXIT_ARGS and "--world-size must be >= 1" in out


def test_stand_in_encoders():
    assert stand_in_encoder("uni") == stand_in_encoder("vit_base_patch16_224") == "test_vit"
    assert stand_in_encoder("efficientnet_b4") == "test_efficientnet"
    assert stand_in_encoder("convnext_tiny") == "test_convnext"
    assert stand_in_encoder("resnet50") == "test_resnet"


def test_another_runs_checkpoint_is_a_problem_before_queueing(setup, capsys):
    """Issue 12: preflight said 'resumes from' a checkpoint that RESUME would refuse for its other settings."""
    import json

    from cellseg.checkpoint.identity import run_identity

    path, values = setup
    best = save_checkpoint(values, 1)
    ident = run_identity(resolve_config({**values, "PHASE": 1}), world_size=1, train_images=4)
    for side in best.parent.glob("*.pt.json"):
        side.write_text(json.dumps({**json.loads(side.read_text()), "identity": ident}))
    code, out = run(capsys, "-f", str(path), "-p", "LR_DECODER_P1", "0.0005", "--skip-steps")
    assert code == EXIT_PROBLEMS and "belongs to a run with other settings" in out
    assert "LR_DECODER_P1" in out and "ALLOW_CHANGES=['LR_DECODER_P1']" in out
    code, out = run(capsys, "-f", str(path), "-p", "LR_DECODER_P1", "0.0005", "-p", "ALLOW_CHANGES",
                    "['LR_DECODER_P1']", "--skip-steps")
    assert code == EXIT_OK and "resumes from" in out, out
