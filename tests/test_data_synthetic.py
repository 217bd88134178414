"""The synthetic blood-smear generator: determinism, class presence, connectivity, scaling with the image size."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellseg.data.synthetic import CLASS_NAMES, generate_synthetic_sample


def test_same_seed_same_bytes_other_seed_other_image() -> None:
    a = generate_synthetic_sample(3, 1, 96)
    b = generate_synthetic_sample(3, 1, 96)
    for key in ("image", "inst_map", "type_map"):
        assert a[key].tobytes() == b[key].tobytes()
    assert a["image"].tobytes() != generate_synthetic_sample(4, 1, 96)["image"].tobytes()
    assert a["image"].tobytes() != generate_synthetic_sample(3, 2, 96)["image"].tobytes()


def test_format_and_class_order() -> None:
    s = generate_synthetic_sample(0, 0, 128)
    assert CLASS_NAMES == ["RBC", "WBC", "Platelet"]
    assert s["image"].shape == (128, 128, 3) and s["image"].dtype == np.uint8
    assert s["inst_map"].dtype == np.int32 and s["type_map"].dtype == np.int32
    ids = np.unique(s["inst_map"])
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # 0 and 1..N consecutive
    assert np.array_equal(s["type_map"] > 0, s["inst_map"] > 0)
    assert s["meta"]["name"] == "synth_0000"


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("seed", [0, 7])
def test_every_image_has_every_class_as_single_pieces(size: int, seed: int) -> None:
    for index in range(3):
        s = generate_synthetic_sample(seed, index, size)
        inst, types = s["inst_map"], s["type_map"]
        per_class = {c: len(np.unique(inst[types == c])) for c in (1, 2, 3)}
        assert per_class[1] >= 5 and per_class[2] >= 1 and per_class[3] >= 2, per_class
        for i in range(1, int(inst.max()) + 1):
            _, pieces = ndi.label(inst == i)  # 4-connected: one piece each
            assert pieces == 1, f"instance {i} of seed {seed} index {index} size {size} is in {pieces} pieces"
            assert len(np.unique(types[inst == i])) == 1


def test_cell_sizes_scale_with_image_size() -> None:
    def median_rbc_area(size: int) -> float:
        areas = []
        for index in range(2):
            s = generate_synthetic_sample(1, index, size)
            ids = np.unique(s["inst_map"][s["type_map"] == 1])
            areas += [int((s["inst_map"] == i).sum()) for i in ids]
        return float(np.median(areas))

    a64, a256 = median_rbc_area(64), median_rbc_area(256)
    assert 8 < a256 / a64 < 24  # ~16x the area for 4x the side (occlusion and rasterising blur it)
    # RBC discs of ~20-35 px across at 256 px: median visible area between discs of 15 and 35 px
    assert np.pi * 7.5**2 < a256 < np.pi * 17.5**2


def test_colours_look_like_a_smear() -> None:
    s = generate_synthetic_sample(0, 0, 256)
    image, types = s["image"].astype(float), s["type_map"]
    background = image[types == 0].mean(axis=0)
    rbc = image[types == 1].mean(axis=0)
    assert background.min() > 180  # bright background
    assert rbc[0] > rbc[1] and rbc[0] > rbc[2]  # pinkish red cells
    wbc_dark = np.percentile(image[types == 2].sum(axis=1), 10)
    assert wbc_dark < rbc.sum() - 150  # the WBC nucleus is much darker than RBCs


@pytest.mark.parametrize("kwargs, match", [({"image_size": 16}, "synth_image_size"), ({"seed": -1}, "seed")])
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"seed": 0, "index": 0, "image_size": 64} | kwargs
    with pytest.raises(ValueError, match=match):
        generate_synthetic_sample(**args)


@pytest.mark.parametrize("size", [64, 256])
def test_the_default_demo_dataset_has_every_class_in_every_image(size: int) -> None:
    for index in range(48):  # prepare_dataset's default synth_num_images
        types = generate_synthetic_sample(0, index, size)["type_map"]
        assert set(np.unique(types)) == {0, 1, 2, 3}, f"image {index} at {size} px"
