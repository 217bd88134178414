"""Inference: tiling with blending and flip/rot90 TTA must not change the output of models that are exact
functions of the image; HV vectors must be mapped back correctly; AMP; argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torch import nn

from cellseg.data.targets import hv_maps
from cellseg.inference import (
    TTA_TRANSFORMS,
    apply_transform,
    blend_window,
    hv_matrix,
    invert_outputs,
    predict_image,
    predict_instances,
    tile_starts,
)
from cellseg.metrics import pair_table, panoptic_counts


class PointwiseModel(nn.Module):
    """1x1 convolutions only: an exact function of each pixel, so tiling cannot change its output."""

    def __init__(self, n_classes: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, 4 + n_classes + 1, 1))

    def forward(self, x):
        y = self.body(x)
        return {"np": y[:, :2], "hv": torch.tanh(y[:, 2:4]), "nc": y[:, 4:]}


class OracleModel(nn.Module):
    """Segments bright-red objects and returns their exact HV maps: equivariant to flips and rotations, so TTA must
    reproduce its output exactly. Class 1 where green is high, class 2 elsewhere."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x):
        np_l, hv_l, nc_l = [], [], []
        for img in x:
            fg = (img[0] > 0).cpu().numpy()
            inst, _ = ndi.label(fg)
            hv_l.append(torch.from_numpy(hv_maps(inst)))
            fg_t = torch.from_numpy(fg).float()
            np_l.append(torch.stack([-4 * fg_t + 2, 4 * fg_t - 2]))
            green = (img[1] > 0).float().cpu()
            nc_l.append(torch.stack([3 - 6 * fg_t, 3 * green * fg_t, 3 * (1 - green) * fg_t]))
        return {"np": torch.stack(np_l).to(x), "hv": torch.stack(hv_l).to(x), "nc": torch.stack(nc_l).to(x)}


def asymmetric_image() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An L-shape, an off-axis ellipse and a triangle: no symmetry that could hide a wrong HV sign or swap."""
    h, w = 72, 80
    inst = np.zeros((h, w), np.int32)
    inst[8:30, 6:12] = 1
    inst[24:30, 6:26] = 1
    yy, xx = np.mgrid[:h, :w]
    u, v = (xx - 50) * 0.8 + (yy - 20) * 0.6, -(xx - 50) * 0.6 + (yy - 20) * 0.8
    inst[(u / 14) ** 2 + (v / 6) ** 2 <= 1] = 2
    inst[(yy > 40) & (yy < 66) & (xx > 20) & (xx - 20 < (yy - 40) * 1.4)] = 3
    types = np.array([0, 1, 2, 1])[inst]
    image = np.zeros((h, w, 3), np.uint8)
    image[inst > 0, 0] = 220
    image[types == 1, 1] = 200
    image[..., 2] = (xx * 3 % 256).astype(np.uint8)
    return image, inst, types


def random_image(h: int = 80, w: int = 72, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("tile_size, overlap", [(32, 0.25), (48, 0.5), (40, 0.0), (64, 0.1)])
def test_tiling_does_not_change_a_pointwise_model(tile_size, overlap):
    model = PointwiseModel()
    image = random_image()
    whole = predict_image(model, image, tile_size=None)
    tiled = predict_image(model, image, tile_size=tile_size, overlap=overlap, batch_size=3)
    for key in ("fg_prob", "hv", "nc_prob"):
        assert tiled[key].dtype == np.float32 and tiled[key].shape == whole[key].shape
        np.testing.assert_allclose(tiled[key], whole[key], atol=1e-5)
    assert whole["fg_prob"].shape == (80, 72) and whole["hv"].shape == (2, 80, 72) and whole["nc_prob"].shape == (3, 80, 72)


def test_tiling_blends_overlaps_of_a_context_model():
    """A model with context (3x3 conv) differs at tile borders; blending keeps the difference small and spread,
    and the blended result stays a proper probability map."""
    torch.manual_seed(0)

    class Ctx(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 7, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return {"np": y[:, :2], "hv": torch.tanh(y[:, 2:4]), "nc": y[:, 4:]}

    model = Ctx()
    image = random_image(96, 96, seed=1)
    whole = predict_image(model, image)
    tiled = predict_image(model, image, tile_size=40, overlap=0.5)
    np.testing.assert_allclose(tiled["nc_prob"].sum(axis=0), 1.0, atol=1e-5)
    assert np.abs(tiled["fg_prob"] - whole["fg_prob"]).mean() < 0.01


def test_tile_starts_and_window():
    assert tile_starts(100, 40, 0.25) == [0, 30, 60]
    assert tile_starts(100, 40, 0.0) == [0, 40, 60]
    assert tile_starts(30, 40, 0.25) == [0]
    assert tile_starts(41, 40, 0.5) == [0, 1]
    win = blend_window(16, 8)
    assert win.shape == (16, 8) and float(win.min()) > 0 and win[8, 4] > win[0, 0]


# ----------------------------------------------------------------------------- TTA
def test_hv_matrix_matches_the_transform_of_a_coordinate_grid():
    """Move a grid of (x, y) positions with the image transform and read the displacement matrix back."""
    h = w = 9
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([xx, yy])[None]  # (1, 2, H, W): each pixel holds its own (x, y)
    for flip, k in TTA_TRANSFORMS:
        moved = apply_transform(grid, flip, k)[0]  # old coordinates at the new positions
        # new position of old pixel (x, y): read where each old coordinate went
        new_y, new_x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        old = moved.reshape(2, -1).T.numpy()
        new = torch.stack([new_x, new_y]).reshape(2, -1).T.numpy().astype(np.float64)
        a = hv_matrix(flip, k)
        # new - centre = A (old - centre) for the centre of the (square) grid
        c = (w - 1) / 2
        np.testing.assert_allclose(new - c, (old - c) @ a.T, atol=1e-6)


def test_tta_reproduces_an_equivariant_model_with_asymmetric_objects():
    model = OracleModel()
    image, inst, _ = asymmetric_image()
    plain = predict_image(model, image)
    np.testing.assert_allclose(plain["hv"], hv_maps(inst), atol=1e-6)
    aug = predict_image(model, image, tta=True)
    for key in ("fg_prob", "hv", "nc_prob"):
        np.testing.assert_allclose(aug[key], plain[key], atol=1e-5)


def test_each_transform_maps_hv_back():
    """Every one of the 8 transforms separately, and the naive inverse (no HV fix) demonstrably wrong."""
    model = OracleModel()
    image, _, _ = asymmetric_image()
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255 - 0.45
    ref = model(x)
    n_wrong = 0
    for flip, k in TTA_TRANSFORMS:
        out = model(apply_transform(x, flip, k))
        back = invert_outputs(out, flip, k)
        for key in ("np", "hv", "nc"):
            torch.testing.assert_close(back[key], ref[key], atol=1e-5, rtol=0)
        naive = torch.rot90(out["hv"], -k, dims=(-2, -1))
        naive = naive.flip(-1) if flip else naive
        n_wrong += not torch.allclose(naive, ref["hv"], atol=1e-3)
    assert n_wrong == 7  # only the identity needs no HV fix


def test_tta_and_tiling_together_keep_pointwise_probabilities():
    model = PointwiseModel()
    image = random_image(64, 96, seed=2)
    whole = predict_image(model, image)
    both = predict_image(model, image, tile_size=40, overlap=0.25, tta=True)
    np.testing.assert_allclose(both["fg_prob"], whole["fg_prob"], atol=1e-5)
    np.testing.assert_allclose(both["nc_prob"], whole["nc_prob"], atol=1e-5)


# ----------------------------------------------------------------------------- AMP, modes, instances
def test_bf16_autocast_close_to_fp32():
    model = PointwiseModel()
    image = random_image()
    ref = predict_image(model, image)
    out = predict_image(model, image, amp="bf16")
    assert out["fg_prob"].dtype == np.float32
    np.testing.assert_allclose(out["fg_prob"], ref["fg_prob"], atol=0.03)


def test_model_mode_is_restored():
    model = PointwiseModel().train()
    predict_image(model, random_image(16, 16))
    assert model.training


def test_predict_instances_end_to_end():
    model = OracleModel()
    image, inst, types = asymmetric_image()
    out = predict_instances(model, image, pp_params={"object_diameter": 20}, tta=True)
    counts, _ = panoptic_counts(pair_table(inst, out["inst_map"]))
    assert float(counts.quality()["pq"]) > 0.95
    n = int(out["inst_map"].max())
    assert out["scores"].shape == (n,) and out["inst_types"].shape == (n,) and out["class_probs"].shape == (n, 2)
    assert ((out["type_map"] == types) | (inst == 0)).mean() > 0.99
    assert np.all((out["scores"] > 0.5) & (out["scores"] <= 1))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"amp": "fp8"}, "amp must be one of"),
        ({"tile_size": 4}, "tile_size must be None"),
        ({"tile_size": 32.0}, "tile_size must be None"),
        ({"overlap": 1.0}, r"overlap must lie in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"device": "cuda"}, r"move the model first with model.to\('cuda'\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_image(PointwiseModel(), random_image(16, 16), **kwargs)


def test_bad_model_outputs():
    class Missing(nn.Module):
        def forward(self, x):
            return {"np": x[:, :2], "hv": x[:, :2]}

    class WrongShape(nn.Module):
        def forward(self, x):
            return {"np": x[:, :2, ::2], "hv": x[:, :2], "nc": x}

    with pytest.raises(ValueError, match=r"lacks the keys \['nc'\]"):
        predict_image(Missing(), random_image(16, 16))
    with pytest.raises(ValueError, match="model outputs must be"):
        predict_image(WrongShape(), random_image(16, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_matches_cpu(amp):
    model = PointwiseModel()
    image = random_image(200, 180)
    ref = predict_image(model, image, tile_size=64, tta=True)
    out = predict_image(model.cuda(), image, tile_size=64, tta=True, amp=amp, device="cuda")
    for key in ("fg_prob", "hv", "nc_prob"):
        np.testing.assert_allclose(out[key], ref[key], atol=1e-4 if amp == "none" else 0.03)


def test_project_model_runs_tiled_with_tta():
    """The project's network (timm test_vit + HoVer-Net decoder) through tiling and TTA on an odd-sized image."""
    from cellseg.model import build_model

    torch.manual_seed(0)
    model = build_model("test_vit", num_classes=2, width=8)
    out = predict_instances(model, random_image(70, 90), tile_size=48, overlap=0.25, tta=True, amp="bf16")
    assert out["fg_prob"].shape == (70, 90) and out["hv"].shape == (2, 70, 90) and out["nc_prob"].shape == (3, 70, 90)
    np.testing.assert_allclose(out["nc_prob"].sum(axis=0), 1.0, atol=1e-4)
    assert np.isfinite(out["hv"]).all() and out["inst_map"].dtype == np.int32


class PoisonedModel(PointwiseModel):
    """A pointwise model whose outputs turn NaN (or Inf) in one corner, as a diverged checkpoint's would."""

    def __init__(self, key: str, value: float):
        super().__init__()
        self.key, self.value = key, value

    def forward(self, x):
        out = super().forward(x)
        out[self.key] = out[self.key].clone()
        out[self.key][..., :3, :3] = self.value
        return out


@pytest.mark.parametrize("key, value, kind", [("np", float("nan"), "NaN"), ("hv", float("inf"), "Inf"),
                                              ("nc", float("nan"), "NaN")])
@pytest.mark.parametrize("kwargs", [{}, {"tile_size": 16, "overlap": 0.25}, {"tta": True}])
def test_non_finite_outputs_are_an_error_naming_image_and_checkpoint(key, value, kind, kwargs):
    from cellseg.inference import NonFiniteOutputError

    model = PoisonedModel(key, value)
    model.checkpoint_file = "checkpoints/phase2/best.pt"  # what cellseg.loading.load_trained_model records
    with pytest.raises(NonFiniteOutputError) as e:
        predict_instances(model, random_image(40, 40), image_name="data/test/img_007.png",
                          pp_params={"object_diameter": 8}, **kwargs)
    msg = str(e.value)
    for part in ("data/test/img_007.png", "checkpoints/phase2/best.pt", f"'{key}'", kind):
        assert part in msg, part
    with pytest.raises(NonFiniteOutputError, match="other.pt"):
        predict_image(model, random_image(16, 16), checkpoint="other.pt")
