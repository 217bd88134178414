"""HV targets (cellseg.data.targets.hv_maps): HoVer-Net's convention, checked against a per-instance reference loop."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.data.targets import hv_maps


def reference_hv(inst_map: np.ndarray) -> np.ndarray:
    """Straightforward full-image loop: per instance, offsets from the centre of mass, each side scaled to [-1, 1]."""
    out = np.zeros((2,) + inst_map.shape, dtype=np.float64)
    yy, xx = np.mgrid[0 : inst_map.shape[0], 0 : inst_map.shape[1]]
    for inst_id in np.unique(inst_map):
        if inst_id == 0:
            continue
        mask = inst_map == inst_id
        for channel, grid in ((0, xx), (1, yy)):
            d = grid[mask] - grid[mask].mean()
            if (d < 0).any():
                d[d < 0] /= -d[d < 0].min()
            if (d > 0).any():
                d[d > 0] /= d[d > 0].max()
            out[channel][mask] = d
    return out


def disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_range_dtype_shape_and_zero_background() -> None:
    inst = np.zeros((40, 50), dtype=np.int32)
    inst[disk(inst.shape, 12, 14, 8)] = 1
    inst[disk(inst.shape, 28, 35, 10)] = 2
    hv = hv_maps(inst)
    assert hv.shape == (2, 40, 50) and hv.dtype == np.float32
    assert hv.min() == -1.0 and hv.max() == 1.0
    assert np.all(hv[:, inst == 0] == 0)
    for i in (1, 2):  # both sides of both axes reach exactly -1 and +1 per instance
        for c in (0, 1):
            assert hv[c][inst == i].min() == -1.0 and hv[c][inst == i].max() == 1.0


def test_signs_left_right_above_below_centre() -> None:
    inst = np.zeros((31, 31), dtype=np.int32)
    inst[disk(inst.shape, 15, 15, 9)] = 3
    hv = hv_maps(inst)
    assert hv[0, 15, 10] < 0 < hv[0, 15, 20]  # left negative, right positive
    assert hv[1, 10, 15] < 0 < hv[1, 20, 15]  # above negative, below positive
    assert hv[0, 15, 15] == 0 and hv[1, 15, 15] == 0  # the centre of a symmetric disk
    np.testing.assert_array_equal(hv[0], -hv[0][:, ::-1])  # symmetric disk, antisymmetric map


def test_non_square_image_uses_each_axis_extent() -> None:
    # a wide image and a 3x21 bar: x must reach +-1 at the bar's ends, y at its top and bottom rows
    inst = np.zeros((9, 64), dtype=np.int32)
    inst[3:6, 40:61] = 1
    hv = hv_maps(inst)
    np.testing.assert_allclose(hv[0, 4, 40:61], np.linspace(-1, 1, 21), atol=1e-6)
    np.testing.assert_array_equal(hv[1, 3:6, 50], [-1, 0, 1])
    np.testing.assert_allclose(hv_maps(inst.T)[1], hv[0].T)  # transposing the image swaps the channels


def test_single_pixel_and_thin_instances() -> None:
    inst = np.zeros((5, 7), dtype=np.int64)
    inst[2, 3] = 9  # a single pixel: no offset in either direction
    inst[0, 0:4] = 4  # a one-row instance: y offset 0 everywhere
    hv = hv_maps(inst)
    assert hv[0, 2, 3] == 0 and hv[1, 2, 3] == 0
    np.testing.assert_allclose(hv[0, 0, 0:4], [-1, -1 / 3, 1 / 3, 1], atol=1e-6)
    assert np.all(hv[1, 0, 0:4] == 0)


@pytest.mark.parametrize("seed", range(6))
def test_equals_reference_loop_on_random_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(16, 90, 2))
    inst = np.zeros((h, w), dtype=np.int32)
    for k in range(int(rng.integers(1, 25))):  # overlapping disks, some cut into pieces by later ones
        inst[disk((h, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 12))] = (
            int(rng.integers(1, 1000)) + k
        )
    np.testing.assert_allclose(hv_maps(inst), reference_hv(inst), rtol=0, atol=1e-6)


def test_ids_need_not_be_consecutive_or_small() -> None:
    inst = np.zeros((20, 20), dtype=np.int64)
    inst[2:8, 2:9] = 10**12
    inst[10:18, 5:15] = 7
    compact = np.where(inst == 10**12, 1, np.where(inst == 7, 2, 0))
    np.testing.assert_array_equal(hv_maps(inst), hv_maps(compact))


def test_translation_invariance_is_exact() -> None:
    inst = np.zeros((60, 60), dtype=np.int32)
    inst[disk(inst.shape, 20, 22, 7.5)] = 1
    shifted = np.roll(inst, (17, 23), axis=(0, 1))
    np.testing.assert_array_equal(hv_maps(inst)[:, 10:31, 12:33], hv_maps(shifted)[:, 27:48, 35:56])


def test_empty_map() -> None:
    assert not hv_maps(np.zeros((4, 6), dtype=np.int32)).any()


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 3, 4), dtype=np.int32), "2-D"),
        (np.zeros((3, 3), dtype=np.float32), "integer"),
        (np.array([[0, -2], [1, 1]]), "non-negative"),
    ],
)
def test_bad_inputs_raise(bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hv_maps(bad)


def test_whole_cell_targets_crop_after_computing_and_drop_slivers() -> None:
    from cellseg.data.dataset import context_margin
    from cellseg.data.targets import whole_cell_targets

    yy, xx = np.mgrid[0:40, 0:72]
    inst = np.zeros((40, 72), np.int32)
    inst[(yy - 20) ** 2 + (xx - 20) ** 2 <= 100] = 1  # a disc cut in half by the crop's left edge (x = 20)
    inst[(yy - 20) ** 2 + (xx - 63) ** 2 <= 64] = 2  # a disc of which the crop (x < 56) shows a sliver
    types = np.where(inst > 0, inst + 1, 0)
    crop = (slice(0, 40), slice(20, 56))
    out_inst, out_types, hv = whole_cell_targets(inst, types, crop)
    np.testing.assert_array_equal(out_inst, inst[crop])
    half = out_inst == 1
    np.testing.assert_array_equal(hv[:, half], hv_maps(inst)[:, crop[0], crop[1]][:, half])
    assert (hv[0, half] >= 0).all()  # the whole cell's centre lies left of the crop: no negative x offsets
    sliver = out_inst == 2
    assert sliver.sum() < 0.1 * (inst == 2).sum() and (hv[:, sliver] == 0).all() and (out_types[sliver] == 0).all()
    kept = whole_cell_targets(inst, types, crop, min_fragment_fraction=0.0)
    assert (kept[1][sliver] == 3).all() and (kept[2][:, sliver] != 0).any()
    with pytest.raises(ValueError, match="min_fragment_fraction must lie in"):
        whole_cell_targets(inst, types, crop, min_fragment_fraction=1.0)
    # the window's margin reaches the far side of every cell touching the (context-grown) patch
    assert context_margin(inst, 10, 22, 20, 0) == 12  # disc 1 spans x 10..30: 12 px left of x = 22
    assert context_margin(np.zeros_like(inst), 10, 22, 20, 5) == 5
