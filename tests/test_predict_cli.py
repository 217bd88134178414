"""``cellseg predict`` with a real tiny checkpoint: everything from the checkpoint, the tuned-parameters sidecar and
its staleness check, a checkpoint that does not fit explained before any image is read, bad inputs reported by name
while the others are predicted; readers (pyramidal TIFF levels and resolution, OpenSlide absent), tissue detection
and the parameter errors."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cellseg.checkpoint import CheckpointManager, collect_state
from cellseg.cli import main
from cellseg.config import Config, ConfigError, resolve_config
from cellseg.model.network import build_model
from cellseg.predict import (
    InputError,
    PredictSettings,
    load_predictor,
    open_reader,
    plan_windows,
    predict_inputs,
    write_postprocess_sidecar,
)
from predict_helpers import CLASS_NAMES, disk_mosaic, oracle_predictor


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "phase1")


def save_tiny_checkpoint(d, **overrides):
    """A Phase 1 checkpoint of test_vit (random weights) with class names and a resolution, as training writes it."""
    torch.manual_seed(0)
    model = build_model("test_vit", num_classes=2, width=8, load_weights=False)
    cfg = Config(ENCODER="test_vit", ENCODER_WEIGHTS="", DECODER_WIDTH=8, OBJECT_DIAMETER=13.0, PHASE=1,
                 **overrides)
    progress = {"epoch": 1, "step": 1, "batch_in_epoch": 0, "best_metric": 0.1, "best_epoch": 1,
                "patience_counter": 0, "history": [], "monitor": {"metric": "pq", "mode": "max"}}
    state = collect_state(model=model, optimizer=None, scheduler=None, scaler=None, progress=progress,
                          config=cfg.to_dict())
    state["data"] = {"class_names": list(CLASS_NAMES), "mpp": 0.5}
    CheckpointManager(d, phase=1).save(state, epoch_end=True, is_best=True)
    return d / "latest.pt"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    img, _, _ = disk_mosaic(size=128)
    Image.fromarray(img).save(d / "mosaic.png")
    Image.fromarray(img[..., 0]).save(d / "gray.png")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    return d


def test_real_tiny_model_end_to_end_with_bad_inputs(ckpt, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", str(images / "mosaic.png"), str(images / "gray.png"),
               str(images / "broken.jpg"), str(images / "missing.png"), "--out", str(out), "-p", "DEVICE", "cpu",
               "-p", "PREDICT_WINDOW", "96", "-p", "TTA", "false", "-p", "PRECISION", "fp32"])
    err = capsys.readouterr().err
    assert rc == 1
    for name, why in (("gray.png", "channel"), ("broken.jpg", "cannot read"), ("missing.png", "no such file")):
        assert name in err and why in err
    rows = {r["input"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows[str(images / "mosaic.png")]["status"] == "finished"
    assert rows[str(images / "gray.png")]["status"] == "failed"
    inst = tifffile.imread(out / "mosaic" / "instances.tif")
    n = int(inst.max())
    assert np.array_equal(np.unique(inst[inst > 0]), np.arange(1, n + 1))  # globally unique, consecutive ids
    cells = list(csv.DictReader(open(out / "mosaic" / "cells.csv")))
    geo = json.loads((out / "mosaic" / "cells.geojson").read_text())
    assert len(cells) == len(geo["features"]) == n
    assert n > 0 and {"prob_RBC", "prob_WBC"} <= set(cells[0])
    assert "centroid_x_um" not in cells[0]  # a PNG states no resolution: no µm columns rather than guessed ones
    summary = json.loads((out / "mosaic" / "summary.json").read_text())
    assert summary["model"]["class_names"] == CLASS_NAMES and summary["model"]["train_mpp"] == 0.5
    assert summary["model"]["postprocess_source"].startswith("defaults")
    assert summary["model"]["postprocess"]["object_diameter"] == 13.0
    assert (out / "mosaic" / "overlay.png").stat().st_size > 0
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    # the random network's windows overlap each other's cells: every cell is still painted whole and once, so the
    # table's areas are the pixel counts of instances.tif
    areas = np.bincount(inst.ravel(), minlength=n + 1)[1:]
    assert [float(c["area"]) for c in cells] == [float(a) for a in areas]


def test_checkpoint_that_does_not_fit_is_explained_before_reading(ckpt, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(ckpt), "--input", str(images / "mosaic.png"), "--out", str(out),
               "-p", "ENCODER", "resnet18", "-p", "DEVICE", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "ENCODER" in err and "'test_vit'" in err and "'resnet18'" in err
    assert not out.exists()
    assert main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tuned_sidecar_is_used_and_a_stale_one_detected(ckpt, tmp_path):
    tuned = {"object_diameter": 13.0, "fg_threshold": 0.6, "marker_threshold": 0.35, "sigma_frac": 0.07}
    assert write_postprocess_sidecar(ckpt, {"postprocess_tuned_on": None, "postprocess": tuned}) is None
    side = write_postprocess_sidecar(ckpt, {"postprocess_tuned_on": "val", "postprocess": tuned, "split": "test"})
    try:
        pred = load_predictor(ckpt, device=torch.device("cpu"))
        assert pred.pp_params["fg_threshold"] == 0.6 and "tuned by 02_evaluate" in pred.pp_source
        record = json.loads(side.read_text())
        side.write_text(json.dumps({**record, "sha256": "f" * 64}))
        pred = load_predictor(ckpt, device=torch.device("cpu"))
        assert pred.pp_params["fg_threshold"] == 0.5 and "stale" in pred.pp_source
        side.write_text(json.dumps({**record, "params": {"fg_treshold": 0.5}}))
        with pytest.raises(ValueError, match="postprocess.json is not a valid"):
            load_predictor(ckpt, device=torch.device("cpu"))
    finally:
        side.unlink()


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a cellseg training checkpoint"):
        load_predictor(bad, device=torch.device("cpu"))
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        load_predictor(bad, device=torch.device("cpu"))


def _pyramid(path, img, mpp=0.5):
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(64, 64), compression="zlib", subifds=1, photometric="rgb",
                 resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        tw.write(img[::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1, photometric="rgb")


def test_pyramidal_tiff_levels_resolution_and_regions(tmp_path):
    img, _, _ = disk_mosaic(size=200)
    _pyramid(tmp_path / "p.tif", img)
    r = open_reader(tmp_path / "p.tif")
    assert r.kind == "tiff" and len(r.levels) == 2 and r.is_slide
    assert r.select_level(-1, 0.5) is None and r.level == 0 and r.mpp == pytest.approx(0.5)
    assert np.array_equal(r.read(37, 51, 90, 130), img[37:127, 51:181])
    assert r.select_level(-1, 1.0) is None and r.level == 1 and r.downsample == 2.0
    note = r.select_level(0, 0.25)
    assert "0.5 µm/px" in note and "0.25" in note
    with pytest.raises(InputError, match="PREDICT_LEVEL=5"):
        r.select_level(5)
    r.close()


def test_slide_tissue_detection_and_empty_slide(tmp_path):
    img, _, _ = disk_mosaic(size=256)
    img[:, 128:] = 235  # the right half is bare glass
    _pyramid(tmp_path / "half.tif", img)
    _pyramid(tmp_path / "empty.tif", np.full((256, 256, 3), 235, np.uint8))
    s = PredictSettings(out_dir=tmp_path / "out", window=96)
    report = predict_inputs(oracle_predictor(mpp=0.5), [str(tmp_path / "half.tif"), str(tmp_path / "empty.tif")], s)
    assert report["finished"] == [str(tmp_path / "half.tif")]
    assert [p for p, _ in report["failed"]] == [str(tmp_path / "empty.tif")]
    assert "no tissue" in report["failed"][0][1]
    summary = json.loads((tmp_path / "out" / "half" / "summary.json").read_text())
    assert summary["tissue_detection"] and summary["windows_predicted"] < summary["windows"]
    assert summary["density_per_mm2"] > 0 and summary["analysed_area_mm2"] < 256 * 256 * (0.5e-3) ** 2
    assert tifffile.TiffFile(tmp_path / "out" / "half" / "instances.tif").pages[0].tags["XResolution"].value[0] > 0


def test_vendor_slide_without_openslide_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "s.svs").write_bytes(b"II*\x00")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(InputError, match=r"needs OpenSlide.*pip install -e '\.\[slides\]'"):
        open_reader(tmp_path / "s.svs")


def test_same_stem_twice_is_reported(tmp_path):
    img, _, _ = disk_mosaic(size=64)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(img).save(tmp_path / "a" / "x.png")
    Image.fromarray(img).save(tmp_path / "b" / "x.png")
    report = predict_inputs(oracle_predictor(), [str(tmp_path / "a"), str(tmp_path / "b")],
                            PredictSettings(out_dir=tmp_path / "out"))
    assert len(report["finished"]) == 1 and "same name" in report["failed"][0][1]


def test_window_too_small_for_the_margin():
    with pytest.raises(ValueError, match="PREDICT_WINDOW=64"):
        plan_windows(500, 500, 64, 30)


@pytest.mark.parametrize("name, value, expected", [
    ("PREDICT_CHECKPOINT", "final", "PREDICT_CHECKPOINT must be"),
    ("PREDICT_LEVEL", -2, "PREDICT_LEVEL must be"),
    ("PREDICT_WINDOW", 32, "PREDICT_WINDOW must be"),
    ("PREDICT_INPUT", ["a", ""], "PREDICT_INPUT must be"),
    ("PREDICT_MPP", -1.0, "PREDICT_MPP must be"),
    ("PREDICT_BATCH", 0, "PREDICT_BATCH must be"),
])
def test_parameter_errors_name_the_parameter(name, value, expected):
    with pytest.raises(ConfigError, match=expected):
        resolve_config({name: value}, notebook="03_predict")


def test_openslide_reader_matches_tifffile(tmp_path):
    from cellseg.predict.readers import OpenSlideReader

    img, _, _ = disk_mosaic(size=200)
    _pyramid(tmp_path / "p.tif", img)
    r = OpenSlideReader(tmp_path / "p.tif")  # OpenSlide's generic tiled TIFF driver
    assert r.levels[0].height == 200 and r.levels[0].mpp == pytest.approx(0.5)
    assert np.array_equal(r.read(37, 51, 90, 130), img[37:127, 51:181])
    r.close()


def test_plain_tiff_planar_and_16_bit(tmp_path):
    img, _, _ = disk_mosaic(size=64)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "deep.tif", img.astype(np.uint16) << 8, photometric="rgb")
    for name in ("planar.tif", "deep.tif"):
        r = open_reader(tmp_path / name)
        assert r.kind == "image" and not r.is_slide and np.array_equal(r.read(0, 0, 64, 64), img)
    tifffile.imwrite(tmp_path / "float.tif", img.astype(np.float32), photometric="rgb")
    with pytest.raises(InputError, match="float32 pixels"):
        open_reader(tmp_path / "float.tif")


def test_corrupt_tile_is_reported_and_the_next_input_still_predicted(tmp_path):
    img, _, _ = disk_mosaic(size=200)
    _pyramid(tmp_path / "bad.tif", img)
    with tifffile.TiffFile(tmp_path / "bad.tif") as tif:
        page = tif.pages[0]
        offset, size = page.dataoffsets[3], page.databytecounts[3]
    with open(tmp_path / "bad.tif", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)  # a tile that zlib cannot inflate
    Image.fromarray(img).save(tmp_path / "good.png")
    report = predict_inputs(oracle_predictor(), [str(tmp_path / "bad.tif"), str(tmp_path / "good.png")],
                            PredictSettings(out_dir=tmp_path / "out", window=96, tissue=False))
    assert report["finished"] == [str(tmp_path / "good.png")]
    assert report["failed"][0][0] == str(tmp_path / "bad.tif")
    rows = {r["input"]: r["status"] for r in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert rows == {str(tmp_path / "bad.tif"): "failed", str(tmp_path / "good.png"): "finished"}


def test_checkpoints_record_class_names_and_resolution(tmp_path):
    from types import SimpleNamespace

    from cellseg.predict.settings import training_data_info
    from cellseg.training.trainer import Trainer
    from test_training import make_trainer

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({"class_names": ["a", "b"], "mpp": 0.25}))
    ds = SimpleNamespace(class_names=["a", "b"], cache_dir=tmp_path / "cache")
    assert training_data_info(ds) == {"class_names": ["a", "b"], "mpp": 0.25}
    t = make_trainer(tmp_path)
    t.data_info = training_data_info(ds)
    payload = Trainer.collect(t)  # the real collect (make_trainer stubs it)
    assert payload["data"] == {"class_names": ["a", "b"], "mpp": 0.25}


def test_prediction_runs_at_the_checkpoints_input_scale(tmp_path, images, capsys, monkeypatch):
    """A model trained at INPUT_SCALE 0.5 predicts at 0.5 (maps back at full size); another scale is refused."""
    import cellseg.predict.run as run

    d = save_tiny_checkpoint(tmp_path / "ck" / "phase1", INPUT_SCALE=0.5).parent
    pred = load_predictor(d / "latest.pt", device=torch.device("cpu"))
    assert pred.input_scale == 0.5 and pred.describe()["input_scale"] == 0.5
    seen = []
    real = run.predict_instances
    monkeypatch.setattr(run, "predict_instances", lambda *a, **k: seen.append(k["scale"]) or real(*a, **k))
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(d / "latest.pt"), "--input", str(images / "mosaic.png"),
                 "--out", str(out), "-p", "DEVICE", "cpu"]) == 0
    assert seen and set(seen) == {0.5}
    assert tifffile.imread(out / "mosaic" / "instances.tif").shape == (128, 128)  # full resolution
    assert main(["predict", "--checkpoint", str(d / "latest.pt"), "--input", str(images / "mosaic.png"),
                 "--out", str(tmp_path / "o2"), "-p", "INPUT_SCALE", "1.0", "-p", "DEVICE", "cpu"]) == 2
    assert "INPUT_SCALE" in capsys.readouterr().err
