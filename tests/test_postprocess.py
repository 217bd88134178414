"""Post-processing: instances from NP/HV maps (real DSB2018 tile and synthetic disks), classification, tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from cellseg.data.targets import hv_maps
from cellseg.metrics import pair_table, panoptic_counts
from cellseg.postprocess import (
    DEFAULT_PARAMS,
    classify_instances,
    hv_slopes,
    hv_to_instances,
    instance_objectness,
    instances_to_type_map,
    resolve_params,
    tune_postprocess,
)


def disks(shape, centres, radii) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        out[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (out == 0)] = k
    return out


def pq(gt: np.ndarray, pred: np.ndarray) -> float:
    counts, _ = panoptic_counts(pair_table(gt, pred))
    return float(counts.quality()["pq"])


@pytest.fixture(scope="module")
def dsb_mask(dsb2018_root) -> np.ndarray:
    return tifffile.imread(dsb2018_root / "mask2d.tif").astype(np.int32)


def test_hv_convention_matches_the_targets():
    """Post-processing reads channel 0 as the x offset (left negative), channel 1 as y (top negative)."""
    inst = np.zeros((5, 7), np.int32)
    inst[1:4, 1:6] = 1
    hv = hv_maps(inst)
    assert hv[0, 2].tolist() == pytest.approx([0, -1, -0.5, 0, 0.5, 1, 0])  # x offset, left negative
    assert hv[1, :, 3].tolist() == pytest.approx([0, -1, 0, 1, 0])  # y offset, top negative


def test_perfect_maps_recover_dsb2018_nuclei(dsb_mask):
    """The project goal: from perfect maps (ground-truth foreground, cellseg.data.targets.hv_maps of the ground
    truth) the default parameters give PQ >= 0.98 (HoVer-Net's algorithm: ~0.97, benchmarks/RESULTS.md)."""
    fg = (dsb_mask > 0).astype(np.float32)
    inst = hv_to_instances(fg, hv_maps(dsb_mask))
    assert inst.dtype == np.int32
    assert np.unique(inst).tolist() == list(range(int(inst.max()) + 1))  # consecutive ids
    assert pq(dsb_mask, inst) >= 0.98


def test_blurred_noisy_maps_still_segment_well(dsb_mask):
    """A network's maps are smooth, not exact: blur 1 px and add noise; PQ stays high."""
    rng = np.random.default_rng(0)
    fg = np.clip(ndi.gaussian_filter((dsb_mask > 0).astype(np.float32), 1.0) + rng.normal(0, 0.05, dsb_mask.shape), 0, 1)
    hv = np.stack([ndi.gaussian_filter(c, 1.0) for c in hv_maps(dsb_mask)]) + rng.normal(0, 0.05, (2, *dsb_mask.shape))
    assert pq(dsb_mask, hv_to_instances(fg.astype(np.float32), hv.astype(np.float32))) >= 0.95


@pytest.mark.parametrize(
    "diameter, shape, centres, radius",
    [
        (20.0, (64, 64), [(20, 20), (20, 37), (37, 28), (50, 50)], 9),  # touching nuclei
        (100.0, (256, 256), [(70, 70), (70, 165), (170, 118)], 48),  # touching blood cells (BCCD scale)
    ],
)
def test_touching_disks_are_separated(diameter, shape, centres, radius):
    gt = disks(shape, centres, [radius] * len(centres))
    fg = (gt > 0).astype(np.float32)
    inst = hv_to_instances(fg, hv_maps(gt), object_diameter=diameter)
    assert inst.max() == len(centres)
    assert pq(gt, inst) >= 0.95


def test_sizes_scale_with_the_diameter():
    """A 15x15 speck (225 px) is a nucleus at diameter 20 but debris at diameter 100 (min 0.025 * 100^2 px)."""
    gt = np.zeros((64, 64), np.int32)
    gt[20:35, 20:35] = 1
    fg = (gt > 0).astype(np.float32)
    assert hv_to_instances(fg, hv_maps(gt)).max() == 1
    assert hv_to_instances(fg, hv_maps(gt), object_diameter=100).max() == 0


def test_unmarked_components_kept_small_ones_removed():
    fg = np.zeros((64, 64), np.float32)
    fg[10:40, 10:40] = 1.0  # an object with flat HV (no slope, so no marker)
    fg[50:52, 50:52] = 1.0  # 4 px: below min_object_frac * 20^2 = 10 px
    inst = hv_to_instances(fg, np.zeros((2, 64, 64), np.float32))
    assert inst.max() == 1 and (inst == 1).sum() == 900 and inst[50, 50] == 0
    assert hv_to_instances(np.zeros((8, 8), np.float32), np.zeros((2, 8, 8), np.float32)).max() == 0


def test_hv_slopes_are_normalised_to_the_diameter():
    """HV runs from -1 to 1 across an object of diameter d, i.e. slope 2 / d per pixel: normalised slope 1."""
    d = 20.0
    x = np.arange(61, dtype=np.float32)
    h = np.clip((x - 30) * 2 / d, -1, 1)
    hv = np.stack([np.tile(h, (40, 1)), np.tile(h[:40, None], (1, 61))])
    inside = np.abs(h) < 0.35  # farther than the kernel radius (6 px) from the clipped ends
    for sigma_frac in (0.1, 0.0):  # derivative of Gaussian, and plain central differences
        gh, gv = hv_slopes(hv, d, sigma_frac)
        assert gh[20, inside] == pytest.approx(1.0, abs=1e-4)
        assert gv[inside[:40], 50] == pytest.approx(1.0, abs=1e-4)
        assert np.all(gh[20, ~inside] <= 1.0 + 1e-4)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"object_size": 20}, "unknown post-processing parameter 'object_size'"),
        ({"fg_threshold": 1.5}, r"'fg_threshold' must lie in \[0.0, 1.0\]"),
        ({"object_diameter": "big"}, "'object_diameter' must be a number"),
        ({"sigma_frac": True}, "'sigma_frac' must be a number"),
        ({"marker_threshold": float("nan")}, "'marker_threshold' must lie"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        hv_to_instances(np.zeros((8, 8), np.float32), np.zeros((2, 8, 8), np.float32), **params)


def test_bad_shapes():
    with pytest.raises(ValueError, match="fg_prob must be"):
        hv_to_instances(np.zeros((1, 8, 8)), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="hv must be"):
        hv_to_instances(np.zeros((8, 8)), np.zeros((2, 8, 9)))


def test_resolve_params_defaults():
    assert resolve_params(None) == DEFAULT_PARAMS
    assert resolve_params({"object_diameter": 100})["object_diameter"] == 100.0


# ----------------------------------------------------------------------------- classification
def _loop_classify(inst, nc_prob, fg_prob):
    types, confs, probs = [], [], []
    for k in range(1, int(inst.max()) + 1):
        sel = inst == k
        mean = nc_prob[:, sel].mean(axis=1)[1:]
        p = mean / mean.sum()
        t = int(p.argmax())
        types.append(t + 1)
        probs.append(p)
        confs.append(fg_prob[sel].mean() * p[t])
    return np.array(types), np.array(confs), np.array(probs)


def test_classify_instances_equals_per_instance_loop():
    rng = np.random.default_rng(0)
    inst = disks((64, 64), [(10, 10), (10, 40), (40, 20), (45, 50)], [6, 8, 5, 9])
    logits = rng.normal(size=(4, 64, 64))
    nc_prob = np.exp(logits) / np.exp(logits).sum(axis=0)
    fg_prob = rng.random((64, 64))
    types, conf, probs = classify_instances(inst, nc_prob.astype(np.float32), fg_prob.astype(np.float32))
    ref = _loop_classify(inst, nc_prob, fg_prob)
    assert types.dtype == np.int32 and conf.dtype == np.float32 and probs.shape == (4, 3)
    np.testing.assert_array_equal(types, ref[0])
    np.testing.assert_allclose(conf, ref[1], rtol=1e-5)
    np.testing.assert_allclose(probs, ref[2], rtol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_classify_edge_cases():
    inst = np.array([[1, 1, 0, 3]])  # id 2 missing
    nc_prob = np.zeros((3, 1, 4), np.float32)
    nc_prob[0] = 1.0  # all mass on background: uniform over the classes, but no class votes (class 0)
    fg = np.full((1, 4), 0.8, np.float32)
    types, conf, probs = classify_instances(inst, nc_prob, fg)
    assert types.tolist() == [0, 0, 0] and probs[0].tolist() == [0.5, 0.5] and probs[1].tolist() == [0, 0]
    assert conf.tolist() == pytest.approx([0.4, 0.0, 0.4])
    t, c, p = classify_instances(np.zeros((4, 4), np.int32), np.ones((3, 4, 4)), np.ones((4, 4)))
    assert t.shape == (0,) and p.shape == (0, 2)
    with pytest.raises(ValueError, match=r"nc_prob must be \(C\+1, H, W\)"):
        classify_instances(inst, np.ones((1, 1, 4)), fg)
    with pytest.raises(ValueError, match="must share"):
        classify_instances(inst, np.ones((3, 1, 5)), fg)


def test_instance_objectness_is_the_class_free_mean_foreground_probability():
    rng = np.random.default_rng(3)
    inst = disks((32, 32), [(8, 8), (20, 22)], [4, 6])
    inst[inst == 1] = 3  # id 1 unused: objectness 0
    fg = rng.random((32, 32)).astype(np.float32)
    obj = instance_objectness(inst, fg)
    assert obj.dtype == np.float32 and obj.shape == (3,)
    assert obj[0] == 0.0
    for k in (2, 3):
        assert obj[k - 1] == pytest.approx(fg[inst == k].mean(), rel=1e-6)
    assert instance_objectness(np.zeros((4, 4), np.int32), np.ones((4, 4))).shape == (0,)
    with pytest.raises(ValueError, match="must have the same shape"):
        instance_objectness(inst, fg[:5])


def test_instances_to_type_map():
    inst = np.array([[0, 1, 2], [2, 2, 0]])
    assert instances_to_type_map(inst, np.array([3, 1])).tolist() == [[0, 3, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="ids up to 2"):
        instances_to_type_map(inst, np.array([1]))
    with pytest.raises(ValueError, match=">= 0"):
        instances_to_type_map(-inst, np.array([1, 2]))


# ----------------------------------------------------------------------------- tuning
def test_tune_postprocess_picks_the_best_and_is_json_ready():
    rng = np.random.default_rng(1)
    samples = []
    for seed in range(2):
        r = np.random.default_rng(seed)
        gt = disks((64, 64), r.integers(10, 54, size=(6, 2)), r.integers(6, 10, size=6))
        fg = np.clip(ndi.gaussian_filter((gt > 0).astype(np.float32), 1.0) + rng.normal(0, 0.05, gt.shape), 0, 1)
        samples.append((fg.astype(np.float32), hv_maps(gt), gt))
    grid = {"fg_threshold": [0.05, 0.5, 0.95], "marker_threshold": [0.2]}
    best, table = tune_postprocess(samples, grid)
    assert len(table) == 3 and best["fg_threshold"] == 0.5
    assert max(row["pq"] for row in table) == table[1]["pq"]
    assert set(best) == set(DEFAULT_PARAMS)
    json.dumps({"best": best, "table": table}, allow_nan=False)
    best_d, _ = tune_postprocess(samples, {"sigma_frac": [0.1]}, base_params={"object_diameter": 16})
    assert best_d["object_diameter"] == 16.0


def test_tune_postprocess_honours_ignore_masks():
    """A spurious blob inside the ignore region costs PQ without the mask and nothing with it."""
    gt = disks((64, 64), [(20, 20), (40, 44)], [7, 7])
    fg = (gt > 0).astype(np.float32)
    fg[50:60, 5:15] = 1.0  # a false positive ...
    ignore = np.zeros((64, 64), bool)
    ignore[48:62, 3:17] = True  # ... inside the ignored region
    hv = hv_maps(gt)
    _, plain = tune_postprocess([(fg, hv, gt)], {"sigma_frac": [0.1]})
    _, masked = tune_postprocess([(fg, hv, gt, ignore)], {"sigma_frac": [0.1]})
    assert plain[0]["rq"] == pytest.approx(2 / 2.5) and masked[0]["rq"] == 1.0


@pytest.mark.parametrize(
    "samples, grid, match",
    [
        ([], None, "at least one"),
        ([(np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((8, 8), np.int32))], {"fg_threshold": []}, "is empty"),
        ([(np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((8, 8), np.int32))], {"bogus": [1]}, "unknown"),
    ],
)
def test_tune_postprocess_errors(samples, grid, match):
    with pytest.raises(ValueError, match=match):
        tune_postprocess(samples, grid)
