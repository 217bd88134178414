"""Branch losses: ignore pixels excluded everywhere, perfect predictions score low, MSGE in fp32, class weights."""

from __future__ import annotations

import pytest
import torch

from cellseg.branches import Branch
from cellseg.losses import HoVerLoss, LossWeights, hv_gradients, soft_dice_loss


def _batch(seed=0, h=24, w=32, classes=2):
    g = torch.Generator().manual_seed(seed)
    np_t = (torch.rand(2, h, w, generator=g) > 0.5).long()
    nc_t = np_t * torch.randint(1, classes + 1, (2, h, w), generator=g)
    hv = (torch.rand(2, 2, h, w, generator=g) * 2 - 1) * np_t[:, None]
    ignore = torch.zeros(2, h, w, dtype=torch.bool)
    ignore[:, :, :8] = True
    return {"np": np_t, "nc": nc_t, "hv": hv, "ignore": ignore}


def _perfect(batch, classes=2, scale=20.0):
    np_l = torch.nn.functional.one_hot(batch["np"], 2).permute(0, 3, 1, 2).float() * scale
    nc_l = torch.nn.functional.one_hot(batch["nc"], classes + 1).permute(0, 3, 1, 2).float() * scale
    return {Branch.NP: np_l, Branch.HV: batch["hv"].clone(), Branch.NC: nc_l}


@pytest.mark.parametrize("np_loss", ["ce_dice", "dice_focal"])
def test_ignored_pixels_do_not_count(np_loss):
    batch = _batch()
    loss = HoVerLoss(LossWeights(np_loss=np_loss, focal_alpha=(0.3, 0.7) if np_loss == "dice_focal" else ()), 2)
    torch.manual_seed(0)
    out = {Branch.NP: torch.randn(2, 2, 24, 32), Branch.HV: torch.randn(2, 2, 24, 32), Branch.NC: torch.randn(2, 3, 24, 32)}
    ref = loss(out, batch)
    for k in out:  # change predictions only where ignored
        out[k][..., :8] = torch.randn_like(out[k][..., :8]) * 100
    for k in ("np", "nc"):  # and the targets there
        batch[k][..., :8] = 1 - batch[k][..., :8].clamp(max=1)
    changed = loss(out, batch)
    for k in ("total", "np", "hv", "nc"):
        torch.testing.assert_close(changed[k], ref[k])


def test_perfect_prediction_scores_near_zero_and_noise_scores_higher():
    batch = _batch()
    loss = HoVerLoss(LossWeights(), 2)
    good = loss(_perfect(batch), batch)
    assert good["total"] < 0.01
    noisy = _perfect(batch, scale=0.1)
    noisy[Branch.HV] = noisy[Branch.HV] + 0.5
    bad = loss(noisy, batch)
    assert all(bad[k] > good[k] + 0.1 for k in ("np", "hv", "nc"))


def test_msge_is_fp32_and_masked_to_foreground():
    batch = _batch()
    out = _perfect(batch)
    out[Branch.HV] = out[Branch.HV].bfloat16()
    losses = HoVerLoss(LossWeights(msge=2.0), 2)(out, batch)
    assert losses["hv"].dtype == torch.float32
    # background-only HV errors do not reach MSGE (only MSE)
    out2 = _perfect(batch)
    out2[Branch.HV] = out2[Branch.HV] + 0.3 * (batch["np"] == 0)[:, None]
    no_msge = HoVerLoss(LossWeights(msge=0.0), 2)(out2, batch)["hv"]
    assert no_msge > 0
    g = hv_gradients(torch.ones(1, 2, 9, 9))
    assert torch.allclose(g[..., 2:-2, 2:-2], torch.zeros(1, 2, 5, 5), atol=1e-6)


def test_gradient_kernels_sign():
    x = torch.arange(10.0).repeat(10, 1)  # increases along x
    hv = torch.stack([x, x.t()])[None]
    g = hv_gradients(hv)[0, :, 5, 5]
    assert g[0] > 0 and g[1] > 0


def test_class_weights_change_the_nc_loss():
    batch = _batch(classes=2)
    torch.manual_seed(0)
    out = {Branch.NP: torch.randn(2, 2, 24, 32), Branch.HV: torch.randn(2, 2, 24, 32), Branch.NC: torch.randn(2, 3, 24, 32)}
    a = HoVerLoss(LossWeights(), 2)(out, batch)["nc"]
    b = HoVerLoss(LossWeights(class_weights=(0.1, 1.0, 5.0)), 2)(out, batch)["nc"]
    assert not torch.isclose(a, b)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="CLASS_WEIGHTS needs 3"):
        HoVerLoss(LossWeights(class_weights=(1.0, 1.0)), 2)
    with pytest.raises(ValueError, match="NP_LOSS"):
        HoVerLoss(LossWeights(np_loss="bce"), 2)


def test_dice_all_ignored_is_zero_not_nan():
    probs = torch.rand(1, 2, 4, 4)
    assert soft_dice_loss(probs, torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.bool)) == 0


def test_hv_loss_is_fp32_under_autocast():
    # autocast runs conv2d (the Sobel derivatives) in bf16 even on fp32 inputs: the HV loss must leave autocast
    from cellseg.losses import hv_loss

    batch = _batch(h=32, w=32)
    g = torch.Generator().manual_seed(1)
    pred = batch["hv"] + 0.1 * torch.randn(batch["hv"].shape, generator=g)
    fg, valid = batch["np"] > 0, ~batch["ignore"]
    ref = hv_loss(pred, batch["hv"], fg, valid, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hv_loss(pred, batch["hv"], fg, valid, 2.0)
        grads = hv_gradients(pred)
    for r, x in zip(ref, got):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, r, rtol=1e-6, atol=1e-7)
    assert grads.dtype == torch.bfloat16  # the trap itself: the bare derivative does run in bf16 under autocast


def test_dice_counts_only_classes_in_the_target_or_the_prediction():
    # one image, classes {0, 1} in the target, class 2 neither there nor arg-max anywhere (but with softmax mass)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 0] = 2.0 * (target[0] == 0)
    logits[0, 1] = 2.0 * (target[0] == 1)
    probs = logits.softmax(1)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)

    def one(c):
        t = (target[0] == c).float()
        return 1 - 2 * (probs[0, c] * t).sum() / (probs[0, c] + t).sum()

    torch.testing.assert_close(soft_dice_loss(probs, target, valid), (one(0) + one(1)) / 2)
    # a class predicted where the target has none is a false positive: it counts
    logits[0, 2, 0, 0] = 10.0
    probs = logits.softmax(1)
    assert probs[0, :, 0, 0].argmax() == 2
    torch.testing.assert_close(soft_dice_loss(probs, target, valid), (one(0) + one(1) + one(2)) / 3)
