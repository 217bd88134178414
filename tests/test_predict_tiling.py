"""The seam rule: a mosaic whose cells straddle the window borders, predicted window by window, equals the one-pass
prediction (PQ >= 0.99) with no instance duplicated or cut; the GeoJSON polygons rasterise back to ``instances.tif``;
a prediction stopped by SIGTERM and restarted writes the same outputs as an uninterrupted one."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest
import tifffile
from PIL import Image
from shapely.geometry import Polygon
from skimage.draw import polygon as draw_polygon

from cellseg.inference import predict_instances
from cellseg.metrics.pairwise import pair_table
from cellseg.metrics.panoptic import panoptic_counts
from cellseg.predict import PredictSettings, plan_windows, predict_inputs
from cellseg.predict.tiling import window_margin
from cellseg.stopping import StopRequest
from predict_helpers import DIAMETER, OracleNet, disk_mosaic, oracle_predictor

WINDOW = 96


def _pq(gt: np.ndarray, pred: np.ndarray) -> float:
    counts, _ = panoptic_counts(pair_table(gt.astype(np.int32), pred.astype(np.int32)))
    return float(counts.quality()["pq"])


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    d = tmp_path_factory.mktemp("mosaic")
    img, inst, cls = disk_mosaic()
    Image.fromarray(img).save(d / "mosaic.png")
    out = d / "out"
    report = predict_inputs(oracle_predictor(), [str(d / "mosaic.png")], PredictSettings(out_dir=out, window=WINDOW))
    assert report["finished"] == [str(d / "mosaic.png")] and not report["failed"]
    return img, inst, cls, out / "mosaic"


def test_cells_lie_on_the_seams(mosaic):
    img, inst, _, _ = mosaic
    wins = plan_windows(*inst.shape, WINDOW, window_margin(DIAMETER))
    assert len(wins) > 4
    seams = sorted({w.core[1] for w in wins} - {0})
    straddling = {int(v) for s in seams for v in np.unique(inst[:, s - 1]) if v and (inst[:, s] == v).any()}
    assert len(straddling) >= 10  # the test means something only when many cells cross a core border


def test_tiled_equals_one_pass_without_duplicates_or_cuts(mosaic):
    img, inst, cls, out = mosaic
    tiled = tifffile.imread(out / "instances.tif")
    assert tiled.dtype == np.uint32 and tiled.shape == inst.shape
    one_pass = predict_instances(OracleNet(), img, pp_params={"object_diameter": DIAMETER})["inst_map"]
    assert _pq(one_pass, tiled) >= 0.99
    ids = np.unique(tiled[tiled > 0])
    assert np.array_equal(ids, np.arange(1, inst.max() + 1))  # ids 1..N, one per cell: none duplicated or lost
    for k in ids:  # every output instance is exactly one whole cell
        gt_ids = np.unique(inst[tiled == k])
        assert len(gt_ids) == 1 and gt_ids[0] > 0
        assert np.array_equal(tiled == k, inst == gt_ids[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cells"] == inst.max() and summary["cut_at_window_edge"] == 0
    assert summary["per_class"] == {"RBC": int((cls == 1).sum()), "WBC": int((cls == 2).sum())}


def test_geojson_round_trip_matches_instances_tif(mosaic):
    _, _, _, out = mosaic
    tiled = tifffile.imread(out / "instances.tif")
    geo = json.loads((out / "cells.geojson").read_text())
    rows = list(csv.DictReader(open(out / "cells.csv")))
    n = int(tiled.max())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == n == len(rows)
    ious = []
    for feat, row in zip(geo["features"], rows):
        props = feat["properties"]
        assert props["objectType"] == "detection" and uuid.UUID(feat["id"])
        assert props["classification"]["name"] == row["class"] and len(props["classification"]["color"]) == 3
        assert {"area_px", "confidence", "prob RBC", "prob WBC"} <= set(props["measurements"])
        ring = np.asarray(feat["geometry"]["coordinates"][0])
        assert Polygon(ring).is_valid
        k = int(row["id"])
        rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, tiled.shape)  # pixel centres inside
        raster = np.zeros(tiled.shape, bool)
        raster[rr, cc] = True
        truth = tiled == k
        ious.append((raster & truth).sum() / (raster | truth).sum())
        cy, cx = np.argwhere(truth).mean(axis=0) + 0.5
        assert abs(float(row["centroid_x"]) - cx) < 1e-3 and abs(float(row["centroid_y"]) - cy) < 1e-3
        assert float(row["area"]) == truth.sum()
    assert np.mean(ious) >= 0.95 and min(ious) > 0.9


def test_sigterm_then_restart_equals_uninterrupted(tmp_path, mosaic):
    img, _, _, full = mosaic
    src = tmp_path / "mosaic.png"
    Image.fromarray(img).save(src)
    out = tmp_path / "out"
    stop = StopRequest(["SIGTERM"]).install()
    try:
        first = predict_inputs(oracle_predictor(OracleNet(kill_at=3)), [str(src)],
                               PredictSettings(out_dir=out, window=WINDOW), stop)
    finally:
        stop.uninstall()
    assert first["stopped"] == str(src) and not first["finished"]
    progress = json.loads((out / "mosaic" / "progress.json").read_text())
    assert progress["done"] == 3 and not (out / "mosaic" / "instances.tif").exists()
    net = OracleNet()
    second = predict_inputs(oracle_predictor(net), [str(src)], PredictSettings(out_dir=out, window=WINDOW))
    assert second["finished"] == [str(src)]
    assert net.calls == len(progress["todo"]) - 3  # continued where it stopped, nothing predicted twice
    assert np.array_equal(tifffile.imread(out / "mosaic" / "instances.tif"), tifffile.imread(full / "instances.tif"))
    for name in ("cells.csv", "cells.geojson"):
        assert (out / "mosaic" / name).read_text() == (full / name).read_text()


def test_stop_file_stops_before_the_next_input_and_is_consumed(tmp_path, mosaic):
    img, _, _, full = mosaic
    Image.fromarray(img).save(tmp_path / "mosaic.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "STOP").write_text("")
    stop = StopRequest([], stop_file=out / "STOP", file_check_interval=0)
    first = predict_inputs(oracle_predictor(), [str(tmp_path / "mosaic.png")], PredictSettings(out_dir=out,
                           window=WINDOW), stop)
    assert first["stopped"] == str(tmp_path / "mosaic.png") and not (out / "mosaic").exists()
    assert not (out / "STOP").exists() and list(out.glob("STOP.handled-*"))
    stop = StopRequest([], stop_file=out / "STOP", file_check_interval=0)
    second = predict_inputs(oracle_predictor(), [str(tmp_path / "mosaic.png")], PredictSettings(out_dir=out,
                            window=WINDOW), stop)
    assert second["finished"] and (out / "mosaic" / "cells.csv").read_text() == (full / "cells.csv").read_text()
