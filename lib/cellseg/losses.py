"""HoVer-Net losses per branch (Graham et al., 2019; weights and Dice/focal variants as in CellViT, Hörst et al., 2024).

- NP: cross-entropy + Dice, or Dice + focal (gamma; alpha = per-class weights).
- HV: MSE + gradient MSE (MSGE, Sobel derivatives), both in fp32; MSGE only on the ground-truth foreground, where it is
  defined (the cellseg_models maintainer dropped MSGE after it "blew up the gradients" unmasked in low precision).
- NC: class-weighted cross-entropy + multi-class Dice.
Pixels marked ignore are excluded from every term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cellseg.branches import Branch

_EPS = 1e-6


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - Dice, per image over the classes present in its target or prediction, averaged over images.

    A class counts in an image when a valid pixel of the target has it or the prediction's arg-max picks it there (a
    false-positive class is penalised; a class neither there nor predicted is left out). Softmax mass alone cannot
    decide it: every class has some everywhere, so "present" would always be true and each absent class would add a
    term of ~1 with almost no gradient, diluting the classes that are there. HoVer-Net's ``dice_loss`` instead pools
    the batch and sums over all classes; per image (not pooled) keeps gradient accumulation and DDP equal to one
    large batch.
    Shape: probs (B, K, H, W), target (B, H, W) int64, valid (B, H, W) bool -> scalar.
    """
    k = probs.shape[1]
    onehot = F.one_hot(target.clamp(min=0), k).permute(0, 3, 1, 2).to(probs.dtype)
    m = valid[:, None].to(probs.dtype)
    inter = (probs * onehot * m).sum(dim=(2, 3))  # (B, K)
    denom = ((probs + onehot) * m).sum(dim=(2, 3))
    predicted = F.one_hot(probs.detach().argmax(1), k).permute(0, 3, 1, 2).to(probs.dtype)
    present = (((onehot + predicted) * m).sum(dim=(2, 3)) > 0).to(probs.dtype)  # (B, K)
    dice = (2 * inter + _EPS) / (denom + _EPS)
    per_image = ((1.0 - dice) * present).sum(1) / present.sum(1).clamp(min=1.0)  # (B,)
    return per_image.mean()


def per_image_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over each image's pixels, then the mean over images.

    Every loss term is a mean of per-image terms, so gradient accumulation and DDP equal one large batch exactly.
    Shape: values, weights (B, ...) -> scalar.
    """
    dims = tuple(range(1, values.ndim))
    return ((values * weights).sum(dims) / weights.sum(dims).clamp(min=_EPS)).mean()


def masked_ce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over valid pixels (class-weighted mean when weights are given), per image, then averaged.

    Shape: logits (B, K, H, W), target (B, H, W), valid (B, H, W) -> scalar.
    """
    t = target.clamp(min=0)
    ce = F.cross_entropy(logits.float(), t, reduction="none")  # (B, H, W)
    w = valid.float() if weight is None else valid.float() * weight.to(ce.device)[t]
    return per_image_mean(ce, w)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, gamma: float,
               alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) over valid pixels, per image, then averaged. Shape: as :func:`masked_ce`."""
    logp = F.log_softmax(logits.float(), dim=1)
    t = target.clamp(min=0)
    logp_t = logp.gather(1, t[:, None])[:, 0]
    loss = -((1 - logp_t.exp()) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * alpha.to(loss.device)[t]
    return per_image_mean(loss, valid.float())


def _sobel_kernels(size: int = 5, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """HoVer-Net's normalised Sobel-like kernels: d/dx and d/dy. Shape: (1, 1, k, k) each."""
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32, device=device)
    h, v = torch.meshgrid(r, r, indexing="xy")  # h varies along x (columns), v along y (rows)
    kx = h / (h * h + v * v + 1e-15)
    ky = v / (h * h + v * v + 1e-15)
    return kx[None, None], ky[None, None]


def hv_gradients(hv: torch.Tensor) -> torch.Tensor:
    """d(h)/dx and d(v)/dy. Shape: (B, 2, H, W) -> (B, 2, H, W)."""
    kx, ky = _sobel_kernels(5, hv.device)
    gx = F.conv2d(hv[:, :1].float(), kx, padding=2)
    gy = F.conv2d(hv[:, 1:].float(), ky, padding=2)
    return torch.cat([gx, gy], dim=1)


def hv_loss(pred: torch.Tensor, target: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor,
            msge_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE over valid pixels and MSGE over valid foreground, in fp32. Returns (mse, msge).

    Runs outside autocast: autocast runs ``conv2d`` (the Sobel derivatives) in bf16/fp16 even on fp32 inputs, and the
    gradient term is the one that "blew up" in low precision.

    Shape: pred, target (B, 2, H, W); fg, valid (B, H, W) bool.
    """
    with torch.autocast(pred.device.type, enabled=False):
        return _hv_loss_fp32(pred.float(), target.float(), fg, valid, msge_weight)


def _hv_loss_fp32(pred: torch.Tensor, target: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor,
                  msge_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    mse = per_image_mean((pred - target) ** 2, valid[:, None].float().expand_as(pred))
    if msge_weight == 0:
        return mse, mse * 0.0
    # the 5x5 derivative reads neighbours: keep pixels whose whole window is valid, so ignored pixels never count
    near_ignore = F.max_pool2d((~valid)[:, None].float(), 5, stride=1, padding=2) > 0
    m = (fg[:, None] & ~near_ignore).float().expand_as(pred)
    msge = per_image_mean((hv_gradients(pred) - hv_gradients(target)) ** 2, m)
    return mse, msge


@dataclass
class LossWeights:
    np: float = 1.0
    hv: float = 1.0
    nc: float = 1.0
    msge: float = 2.0
    np_loss: str = "ce_dice"
    focal_gamma: float = 2.0
    focal_alpha: tuple[float, ...] = ()
    class_weights: tuple[float, ...] = ()


class HoVerLoss(torch.nn.Module):
    """Weighted sum of the three branch losses; returns the total and each branch's term."""

    def __init__(self, weights: LossWeights, num_classes: int):
        super().__init__()
        self.w = weights
        if weights.class_weights and len(weights.class_weights) != num_classes + 1:
            raise ValueError(f"CLASS_WEIGHTS needs {num_classes + 1} numbers (background + {num_classes} classes), "
                             f"got {len(weights.class_weights)}: {list(weights.class_weights)}.")
        if weights.np_loss not in ("ce_dice", "dice_focal"):
            raise ValueError(f"NP_LOSS must be 'ce_dice' or 'dice_focal', got {weights.np_loss!r}.")
        cw = torch.tensor(weights.class_weights, dtype=torch.float32) if weights.class_weights else None
        alpha = torch.tensor(weights.focal_alpha, dtype=torch.float32) if weights.focal_alpha else None
        self.register_buffer("class_weights", cw, persistent=False)
        self.register_buffer("focal_alpha", alpha, persistent=False)

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        valid = ~batch["ignore"]
        np_t, nc_t = batch[Branch.NP.value], batch[Branch.NC.value]
        np_logits = out[Branch.NP].float()
        np_probs = np_logits.softmax(1)
        if self.w.np_loss == "ce_dice":
            l_np = masked_ce(np_logits, np_t, valid) + soft_dice_loss(np_probs, np_t, valid)
        else:
            l_np = focal_loss(np_logits, np_t, valid, self.w.focal_gamma, self.focal_alpha) \
                + soft_dice_loss(np_probs, np_t, valid)
        mse, msge = hv_loss(out[Branch.HV], batch[Branch.HV.value], np_t > 0, valid, self.w.msge)
        l_hv = mse + self.w.msge * msge
        nc_logits = out[Branch.NC].float()
        l_nc = masked_ce(nc_logits, nc_t, valid, self.class_weights) + soft_dice_loss(nc_logits.softmax(1), nc_t, valid)
        total = self.w.np * l_np + self.w.hv * l_hv + self.w.nc * l_nc
        return {"total": total, Branch.NP.value: l_np, Branch.HV.value: l_hv, Branch.NC.value: l_nc}


def loss_from_config(cfg, num_classes: int, class_weights: list[float] | None = None) -> HoVerLoss:
    """The loss of ``cfg``; ``class_weights`` (e.g. derived from the data) stand in for an empty ``CLASS_WEIGHTS``."""
    cw = tuple(cfg.CLASS_WEIGHTS) or tuple(class_weights or ())
    return HoVerLoss(LossWeights(np=cfg.LOSS_WEIGHT_NP, hv=cfg.LOSS_WEIGHT_HV, nc=cfg.LOSS_WEIGHT_NC,
                                 msge=cfg.HV_MSGE_WEIGHT, np_loss=cfg.NP_LOSS, focal_gamma=cfg.FOCAL_GAMMA,
                                 focal_alpha=tuple(cfg.FOCAL_ALPHA), class_weights=cw), num_classes)
