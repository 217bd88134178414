"""INPUT_SCALE: resizing helpers, and predictions at a reduced scale mapped back onto the full-resolution grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg.inference import predict_image, predict_instances
from cellseg.metrics import pair_table, panoptic_counts
from cellseg.scaling import check_scale, maps_to_full_resolution, resize_image, resize_labels, scaled_shape
from test_inference import OracleModel, PointwiseModel, asymmetric_image


def _big_asymmetric(factor: int = 2):
    """The asymmetric test image enlarged by ``factor`` (objects ~40 px), with its exact labels."""
    image, inst, types = asymmetric_image()
    big = lambda a: np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)  # noqa: E731
    return big(image), big(inst), big(types)


def test_prediction_at_half_scale_maps_back_onto_the_full_grid():
    image, inst, types = _big_asymmetric()
    out = predict_instances(OracleModel(), image, pp_params={"object_diameter": 40}, scale=0.5)
    h, w = image.shape[:2]
    assert out["inst_map"].shape == (h, w) and out["type_map"].shape == (h, w)
    assert out["fg_prob"].shape == (h, w) and out["hv"].shape == (2, h, w) and out["nc_prob"].shape[1:] == (h, w)
    # the same objects, in full-resolution pixels: matched at IoU > 0.5 with high quality
    counts, _ = panoptic_counts(pair_table(inst, out["inst_map"]))
    q = counts.quality()
    assert float(q["pq"]) > 0.9 and int(counts.tp) == 3
    assert ((out["type_map"] == types) | (inst == 0)).mean() > 0.98
    # class probabilities stay probabilities after resampling
    np.testing.assert_allclose(out["nc_prob"].sum(0), 1.0, atol=1e-5)


def test_scale_one_is_the_identity_and_a_pointwise_model_agrees_at_half_scale():
    image, _, _ = _big_asymmetric()
    model = PointwiseModel()
    full = predict_image(model, image)
    same = predict_image(model, image, scale=1.0)
    for k in full:
        np.testing.assert_array_equal(full[k], same[k])
    half = predict_image(model, image, scale=0.5)
    assert all(half[k].shape == full[k].shape for k in full)
    # inside flat regions (away from edges) the resampled maps equal the full-resolution ones
    interior = np.zeros(image.shape[:2], bool)
    flat = (np.abs(np.diff(image.astype(int), axis=0, prepend=0)).sum(-1) == 0) & \
           (np.abs(np.diff(image.astype(int), axis=1, prepend=0)).sum(-1) == 0)
    interior[2:-2, 2:-2] = True
    sel = interior & flat
    assert sel.sum() > 100
    assert np.abs(half["fg_prob"][sel] - full["fg_prob"][sel]).max() < 0.05


def test_maps_to_full_resolution_aligns_pixel_centres():
    # a 2x2 block image shrunk by 0.5 and brought back stays aligned: no half-pixel shift
    small = torch.arange(12.0).reshape(1, 1, 3, 4)
    up = maps_to_full_resolution({"x": small}, 6, 8)["x"]
    assert up.shape == (1, 1, 6, 8)
    blocks = up[0, 0].reshape(3, 2, 4, 2).mean(dim=(1, 3))
    # each 2x2 block averages back to its small pixel (exactly away from the clamped border): centres are aligned
    np.testing.assert_allclose(blocks[1:-1, 1:-1].numpy(), small[0, 0, 1:-1, 1:-1].numpy(), atol=1e-6)
    assert maps_to_full_resolution({"x": small}, 3, 4)["x"] is small


def test_resize_labels_keeps_ids_and_dtypes():
    labels = np.zeros((40, 60), np.int64)
    labels[4:20, 6:30] = 3
    labels[22:38, 30:58] = 7
    for dtype in (np.int64, np.int32, np.uint8, bool):
        small = resize_labels(labels.astype(dtype), 0.5)
        assert small.shape == (20, 30) and small.dtype == np.dtype(dtype)
        assert set(np.unique(small)) == set(np.unique(labels.astype(dtype)))
    assert resize_image(np.zeros((41, 61, 3), np.uint8), 0.5).shape == (20, 30, 3)
    assert scaled_shape(1, 1, 0.1) == (1, 1)


@pytest.mark.parametrize("bad", [0, -0.5, 5.0, float("nan"), True, "0.5"])
def test_bad_scale_is_refused(bad):
    with pytest.raises(ValueError, match="INPUT_SCALE"):
        check_scale(bad)
    with pytest.raises(ValueError, match="INPUT_SCALE"):
        predict_image(PointwiseModel(), np.zeros((16, 16, 3), np.uint8), scale=bad)
