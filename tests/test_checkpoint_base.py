"""Compact checkpoints (issue 15): the frozen base encoder weights stay in ENCODER_WEIGHTS, named by SHA-256; loading
completes them bit-exactly from that file and refuses a missing or different one; old full checkpoints still load;
``cellseg ckpt export --merge`` writes a self-contained file that evaluation loads without the base file."""

from __future__ import annotations

import pytest
import timm
import torch

from cellseg.checkpoint import CheckpointManager, IncompatibleCheckpoint, collect_state, load_weights
from cellseg.checkpoint.fingerprint import file_sha256
from cellseg.checkpoint.sidecar import read_payload, read_sidecar
from cellseg.cli import main as cli_main
from cellseg.config import resolve_config
from cellseg.loading import load_checkpoint_model
from cellseg.model.lora import apply_lora
from cellseg.model.network import build_model


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLSEG_CACHE_DIR", str(tmp_path / "hash-cache"))


def _weights_file(path, seed: int):
    torch.manual_seed(seed)
    torch.save(timm.create_model("test_vit", num_classes=0, dynamic_img_size=True).state_dict(), path)
    return path


@pytest.fixture
def base(tmp_path):
    return _weights_file(tmp_path / "base.bin", 0)


def _model(weights, seed: int = 1, *, freeze: bool = True):
    torch.manual_seed(seed)
    model = build_model("test_vit", num_classes=3, width=8, weights=str(weights) if weights else "")
    if freeze:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    return model


def _train_step(model, optimizer):
    torch.manual_seed(5)
    out = model.train()(torch.randn(2, 3, 32, 32))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    optimizer.step()
    optimizer.zero_grad()


def _opt(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _save(model, optimizer, directory, *, compact: bool = True, phase: int = 1):
    state = collect_state(model=model, optimizer=optimizer, scheduler=None, scaler=None,
                          progress={"epoch": 1, "step": 1, "batch_in_epoch": 0, "history": []},
                          config={"PHASE": phase}, compact=compact)
    CheckpointManager(directory, phase=phase).save(state, epoch_end=True, is_best=False)
    return directory / "latest.pt", state


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_compact_checkpoint_leaves_out_the_frozen_base_and_resumes_bit_exactly(tmp_path, base):
    model = _model(base)
    opt = _opt(model)
    _train_step(model, opt)
    path, state = _save(model, opt, tmp_path / "phase1")
    stored = state["model"]
    assert not any(k.startswith("encoder.") for k in stored) and any(k.startswith("decoder.") for k in stored)
    entry = read_sidecar(path)["base_weights"]
    assert entry["sha256"] == file_sha256(base) and entry["file"] == "base.bin"
    assert entry["size"] == base.stat().st_size and len(entry["manifest"]) == len(model.base_keys)

    again = _model(base, seed=7)
    opt2 = _opt(again)
    CheckpointManager(tmp_path / "phase1", phase=1).resume("auto", model=again, optimizer=opt2, scheduler=None,
                                                           scaler=None)
    _assert_same(model, again)
    assert str(opt.state_dict()) == str(opt2.state_dict())
    # the same file given explicitly to a randomly initialised model: read, verified, loaded
    fresh = _model("", seed=9)
    load_weights(fresh, path, base_weights=base)
    _assert_same(model, fresh)


def test_compact_checkpoint_refuses_a_different_or_missing_base_file(tmp_path, base):
    model = _model(base)
    path, _ = _save(model, _opt(model), tmp_path / "phase1")
    expected = file_sha256(base)
    other = _weights_file(tmp_path / "other.bin", 3)
    with pytest.raises(IncompatibleCheckpoint, match=f"(?s){expected}.*different file.*cellseg ckpt export"):
        load_weights(_model(other), path)
    with pytest.raises(IncompatibleCheckpoint, match=f"(?s){expected}.*different file"):
        load_weights(_model(""), path, base_weights=other)
    base.rename(tmp_path / "moved.bin")
    with pytest.raises(IncompatibleCheckpoint, match=f"(?s){expected}.*does not exist.*ENCODER_WEIGHTS to the file"):
        load_weights(_model(""), path)


def test_random_init_encoder_is_stored_whole_and_round_trips(tmp_path):
    model = _model("")
    opt = _opt(model)
    _train_step(model, opt)
    path, state = _save(model, opt, tmp_path / "phase1")
    assert state["base_weights"] is None and any(k.startswith("encoder.") for k in state["model"])
    again = _model("", seed=4)
    load_weights(again, path)
    _assert_same(model, again)


def test_full_checkpoint_written_the_old_way_still_loads(tmp_path, base):
    model = _model(base)
    opt = _opt(model)
    _train_step(model, opt)
    state = collect_state(model=model, optimizer=opt, scheduler=None, scaler=None,
                          progress={"epoch": 1, "step": 1, "batch_in_epoch": 0, "history": []},
                          config={"PHASE": 1}, compact=False)
    del state["base_weights"]  # what checkpoints before compact ones held: no such entry, no normalisation
    del state["arch"]["normalization"]
    CheckpointManager(tmp_path / "old", phase=1).save(state, epoch_end=False, is_best=False)
    assert "base_weights" not in read_payload(tmp_path / "old" / "latest.pt")
    again = _model(base, seed=8)
    load_weights(again, tmp_path / "old" / "latest.pt")
    _assert_same(model, again)
    compact, _ = _save(model, opt, tmp_path / "new")
    assert compact.stat().st_size < (tmp_path / "old" / "latest.pt").stat().st_size


def test_compact_is_the_size_of_what_training_changed(tmp_path, base):
    """Relative sizes: the compact file drops at least the encoder's bytes of the full one (UNI-sized numbers in
    benchmarks/bench_checkpoint_size.py)."""
    model = _model(base)
    full, _ = _save(model, None, tmp_path / "full", compact=False)
    compact, _ = _save(model, None, tmp_path / "compact")
    encoder_bytes = sum(t.numel() * t.element_size() for t in model.encoder.state_dict().values())
    assert full.stat().st_size - compact.stat().st_size >= 0.95 * encoder_bytes


def test_trained_or_overwritten_encoder_tensors_are_stored(tmp_path, base):
    model = _model(base)
    trained = "encoder.core.blocks.0.norm1.weight"
    dict(model.named_parameters())[trained].requires_grad_(True)
    _, state = _save(model, _opt(model), tmp_path / "a")
    assert trained in state["model"] and "encoder.core.blocks.0.norm2.weight" not in state["model"]
    # a full checkpoint with other encoder values loaded into a base-built model: those keys no longer hold the file's
    # values, so the next compact save must store them
    other = _model(_weights_file(tmp_path / "other.bin", 3))
    full, _ = _save(other, None, tmp_path / "b", compact=False)
    target = _model(base)
    load_weights(target, full)
    qkv = "encoder.core.blocks.0.attn.qkv.weight"
    assert qkv not in target.base_keys and "encoder.core.blocks.0.norm1.bias" in target.base_keys  # timm inits to 0
    _, state = _save(target, None, tmp_path / "c")
    assert qkv in state["model"] and "encoder.core.blocks.0.norm1.bias" not in state["model"]
    _assert_same(target, other)


def _lora_model(weights, seed: int):
    model = _model(weights, seed)
    apply_lora(model, r=2, alpha=4, dropout=0.0, targets=["qkv"], blocks="all")
    return model


def test_lora_phase2_compact_and_export_merge_loads_without_the_base_file(tmp_path, base, capsys):
    model = _lora_model(base, 1)
    opt = _opt(model)
    _train_step(model, opt)
    path, state = _save(model, opt, tmp_path / "phase2", phase=2)
    assert "encoder.core.blocks.0.attn.qkv.lora_A.weight" in state["model"]
    assert "encoder.core.blocks.0.attn.qkv.weight" not in state["model"]
    again = _lora_model(base, 6)
    CheckpointManager(tmp_path / "phase2", phase=2).resume("auto", model=again, optimizer=_opt(again), scheduler=None,
                                                           scaler=None)
    _assert_same(model, again)

    out = tmp_path / "shared" / "model.pt"
    assert cli_main(["ckpt", "export", str(path), str(out), "--merge"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA layers merged" in printed and " 0 LoRA layers merged" not in printed
    side = read_sidecar(out)
    assert side["base_weights"] is None and side["arch"]["lora"] is None
    base.rename(tmp_path / "gone.bin")  # the gated file is not on this machine
    cfg = resolve_config({"ENCODER": "test_vit", "ENCODER_WEIGHTS": str(base), "DECODER_WIDTH": 8,
                          "EVAL_CHECKPOINT": str(out)}, "02_evaluate")
    plain = load_checkpoint_model(out, cfg, num_classes=3, device="cpu")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref, got = model.eval()(x), plain(x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    # the compact one needs the base file, and says which
    with pytest.raises(IncompatibleCheckpoint, match=file_sha256(tmp_path / "gone.bin")):
        load_checkpoint_model(path, cfg, num_classes=3, device="cpu")
    assert cli_main(["ckpt", "export", str(path), str(tmp_path / "x.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_export_refuses_to_overwrite_its_source(tmp_path, base, capsys):
    model = _model(base)
    path, _ = _save(model, None, tmp_path / "p")
    assert cli_main(["ckpt", "export", str(path), str(path)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err


def test_file_sha256_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import cellseg.checkpoint.fingerprint as fp

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    first = fp.file_sha256(f)
    calls = []
    monkeypatch.setattr(fp, "sha256_file", lambda p: calls.append(p) or "x")
    fp._MEMORY.clear()
    assert fp.file_sha256(f) == first and not calls  # from the disk cache
    f.write_bytes(b"abcd")  # new size: hashed again
    assert fp.file_sha256(f) == "x" and calls


def test_inspect_shows_the_base_file_and_odd_payloads_are_explained(tmp_path, base, capsys):
    model = _model(base)
    path, _ = _save(model, None, tmp_path / "p")
    assert cli_main(["ckpt", "inspect", str(path)]) == 0
    assert f"base weights: {len(model.base_keys)} frozen encoder tensors not stored" in capsys.readouterr().out
    payload = read_payload(path)
    payload["arch"] = None  # a compact payload without a fingerprint cannot be completed
    with pytest.raises(IncompatibleCheckpoint, match="no architecture fingerprint"):
        load_weights(_model(""), payload)
    payload = read_payload(path)
    payload["base_weights"]["manifest"]["encoder.core.not_there"] = [2]
    with pytest.raises(IncompatibleCheckpoint, match="lacks or reshapes 1 of the left-out tensors"):
        load_weights(_model(""), payload, strict=False, base_weights=base)


def test_export_merge_needs_the_lora_settings(tmp_path, base, capsys):
    model = _lora_model(base, 1)
    state = collect_state(model=model, optimizer=None, scheduler=None, scaler=None,
                          progress={"epoch": 1, "step": 1, "batch_in_epoch": 0, "history": []}, config={"PHASE": 2})
    state["lora"] = None
    CheckpointManager(tmp_path / "p2", phase=2).save(state, epoch_end=False, is_best=False)
    assert cli_main(["ckpt", "export", str(tmp_path / "p2" / "latest.pt"), str(tmp_path / "o.pt"), "--merge"]) == 2
    assert "no LoRA settings" in capsys.readouterr().err


def test_merged_lora_weights_are_stored(tmp_path, base):
    from cellseg.model.lora import merge_lora

    model = _lora_model(base, 1)
    _train_step(model, _opt(model))
    merge_lora(model)
    _, state = _save(model, None, tmp_path / "m")
    assert "encoder.core.blocks.0.attn.qkv.weight" in state["model"]
    again = _model(base, seed=3)
    load_weights(again, tmp_path / "m" / "latest.pt")
    _assert_same(model, again)
