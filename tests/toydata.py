"""Tiny in-memory datasets and stand-ins shared by the training tests (analytic disks, MONAI-style np.ogrid)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from cellseg.imageops import normalize_image


def disk_sample(size: int, rng: np.random.Generator, n_classes: int = 2):
    """Image with a few non-overlapping disks of random classes; returns image, inst_map, type_map."""
    img = np.full((size, size, 3), 230, np.uint8)
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    yy, xx = np.ogrid[:size, :size]
    k = 0
    for _ in range(12):
        r = int(rng.integers(4, 8))
        cy, cx = rng.integers(r, size - r, 2)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if inst[m].any():
            continue
        k += 1
        c = 1 + (k - 1) % n_classes
        inst[m], types[m] = k, c
        img[m] = (200, 60, 60) if c == 1 else (80, 60, 200)
    return img, inst, types


def simple_hv(inst: np.ndarray) -> np.ndarray:
    hv = np.zeros((2,) + inst.shape, np.float32)
    for i in range(1, inst.max() + 1):
        ys, xs = np.nonzero(inst == i)
        if len(ys) == 0:
            continue
        dx, dy = xs - xs.mean(), ys - ys.mean()
        hv[0, ys, xs] = np.where(dx < 0, dx / max(1e-6, -dx.min()), dx / max(1e-6, dx.max())) if dx.any() else 0
        hv[1, ys, xs] = np.where(dy < 0, dy / max(1e-6, -dy.min()), dy / max(1e-6, dy.max())) if dy.any() else 0
    return hv


class ToyDataset(Dataset):
    """Deterministic per (seed, epoch, index): a random flip changes with the epoch, like real augmentation."""

    def __init__(self, n: int = 8, size: int = 32, seed: int = 0, n_classes: int = 2):
        self.samples = [disk_sample(size, np.random.default_rng([seed, i]), n_classes) for i in range(n)]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        img, inst, types = self.samples[i]
        if np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            img, inst, types = img[:, ::-1], inst[:, ::-1], types[:, ::-1]
        inst, types = np.ascontiguousarray(inst), np.ascontiguousarray(types)
        return {"image": normalize_image(np.ascontiguousarray(img)), "np": torch.from_numpy((inst > 0).astype(np.int64)),
                "hv": torch.from_numpy(simple_hv(inst)), "nc": torch.from_numpy(types.astype(np.int64)),
                "ignore": torch.zeros(inst.shape, dtype=torch.bool), "inst_map": torch.from_numpy(inst.astype(np.int64)),
                "index": torch.tensor(i)}


class FakeCheckpoints:
    """Records what the loop asks the checkpoint manager to do (for tests of the loop's own logic)."""

    def __init__(self):
        self.saves: list[dict] = []
        self.events: list[tuple] = []

    def save(self, state, *, epoch_end, is_best, reason="epoch"):
        self.saves.append({"epoch_end": epoch_end, "is_best": is_best, "reason": reason})

    def resume(self, mode, **kw):
        return None

    def ledger_event(self, event, **fields):
        self.events.append((event, fields))
