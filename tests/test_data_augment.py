"""Joint augmentation: labels move with the image, instance ids survive, borders become ignored, seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.data.augment import AugmentConfig, HEDJitter, augment_arrays, build_augmentation
from cellseg.data.synthetic import generate_synthetic_sample

OFF = dict(flip=0.0, rot90=0.0, affine=0.0, elastic=0.0, colour=0.0, hed=0.0, blur=0.0, noise=0.0)


def _sample(size: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    s = generate_synthetic_sample(2, 0, size)
    return s["image"], s["inst_map"], s["type_map"], np.zeros(s["inst_map"].shape, bool)


def test_flips_and_rot90_keep_every_instance_exactly() -> None:
    image, inst, types, ignore = _sample()
    pipeline = build_augmentation(AugmentConfig(**(OFF | {"flip": 1.0, "rot90": 1.0})))
    img2, inst2, types2, ignore2 = augment_arrays(pipeline, image, inst, types, ignore, seed=5)
    assert sorted(np.bincount(inst2.ravel())[1:]) == sorted(np.bincount(inst.ravel())[1:])
    np.testing.assert_array_equal(np.unique(inst2), np.arange(inst.max() + 1))
    assert not ignore2.any()
    # the image moved exactly like the labels: the pixels of each class have the same colours as before
    for c in (1, 2, 3):
        assert np.array_equal(np.sort(img2[types2 == c], axis=0), np.sort(image[types == c], axis=0))


def test_affine_and_elastic_keep_ids_consistent_and_ignore_borders() -> None:
    image, inst, types, ignore = _sample()
    config = AugmentConfig(**(OFF | {"affine": 1.0, "elastic": 1.0}), rotate=(40.0, 40.0), scale=(0.9, 0.9))
    img2, inst2, types2, ignore2 = augment_arrays(
        build_augmentation(config), image, inst, types, ignore, seed=1
    )
    assert img2.shape == image.shape and inst2.dtype == np.int32 and ignore2.dtype == bool
    ids = np.unique(inst2)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # consecutive, cropped-away instances dropped
    for i in ids[1:]:
        assert len(np.unique(types2[inst2 == i])) == 1  # nearest interpolation: no mixed labels
    assert ignore2[0, 0] and ignore2[-1, -1]  # rotated corners come from outside the image
    assert not ignore2[48, 48]
    assert np.all(inst2[ignore2 & (inst2 > 0)] >= 0)
    assert (types2[inst2 == 0] == 0).all()


def test_ignore_mask_moves_with_the_image() -> None:
    image, inst, types, ignore = _sample()
    ignore = ignore.copy()
    ignore[:, :10] = True
    pipeline = build_augmentation(AugmentConfig(**(OFF | {"flip": 1.0})))  # both flips: a 180 degree turn
    img2, inst2, types2, ignore2 = augment_arrays(pipeline, image, inst, types, ignore, seed=0)
    np.testing.assert_array_equal(ignore2, ignore[::-1, ::-1])
    np.testing.assert_array_equal(img2, image[::-1, ::-1])
    np.testing.assert_array_equal(types2, types[::-1, ::-1])
    np.testing.assert_array_equal(inst2 > 0, inst[::-1, ::-1] > 0)


def test_same_seed_same_output_other_seed_other_output() -> None:
    image, inst, types, ignore = _sample()
    pipeline = build_augmentation()
    a = augment_arrays(pipeline, image, inst, types, ignore, seed=11)
    augment_arrays(pipeline, image, inst, types, ignore, seed=3)  # state in between must not matter
    b = augment_arrays(build_augmentation(), image, inst, types, ignore, seed=11)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = augment_arrays(pipeline, image, inst, types, ignore, seed=12)
    assert not np.array_equal(a[0], c[0])


def test_photometric_transforms_leave_labels_alone() -> None:
    image, inst, types, ignore = _sample()
    config = AugmentConfig(**(OFF | {"colour": 1.0, "hed": 1.0, "blur": 1.0, "noise": 1.0}))
    img2, inst2, types2, ignore2 = augment_arrays(
        build_augmentation(config), image, inst, types, ignore, seed=2
    )
    np.testing.assert_array_equal(inst2, inst)
    np.testing.assert_array_equal(types2, types)
    assert not np.array_equal(img2, image) and img2.dtype == np.uint8


def test_hed_jitter_is_a_moderate_colour_change() -> None:
    image = _sample()[0]
    out = HEDJitter(scale=0.05, shift=0.01, p=1.0).apply(
        image, alpha=np.array([1.05, 0.95, 1.0]), beta=np.array([0.01, -0.01, 0.0])
    )
    diff = np.abs(out.astype(int) - image.astype(int))
    assert 0 < diff.mean() < 20
    same = HEDJitter().apply(image, alpha=np.ones(3), beta=np.zeros(3))
    np.testing.assert_array_equal(same, image)  # the identity is exact (no clipping of stain concentrations)


@pytest.mark.parametrize("name", ["flip", "rot90", "affine", "elastic", "colour", "hed", "blur", "noise"])
def test_probabilities_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match=f"AugmentConfig.{name}"):
        AugmentConfig(**{name: 1.5})
    assert AugmentConfig().to_dict()["flip"] == 0.5
