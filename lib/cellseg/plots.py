"""Training curves from ``history.jsonl``: per-branch losses, the learning rate of every group, validation metrics."""

from __future__ import annotations

import json
from pathlib import Path

# No matplotlib.use() here: importing a library must not switch a Jupyter kernel away from inline plots. Without a
# display, matplotlib picks Agg by itself; the figures below are saved and closed, so no backend is needed.
import matplotlib.pyplot as plt


def read_history(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: train the phase first (notebooks/01_train.ipynb).")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_history(history: list[dict], out_dir: str | Path, metrics: tuple[str, ...] = ("pq", "mpq", "det_f1", "dice"),
                 ) -> list[Path]:
    """Write ``loss_curves.png``, ``lr_curves.png``, ``val_curves.png`` and (with per-class validation metrics)
    ``class_f1_curves.png``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in history[0]["train_loss"] if history else []:
        ax.plot(epochs, [h["train_loss"][key] for h in history], marker="o", label=f"train {key}")
    for key in ("val_loss",):
        if history and key in history[0]["val"]:
            ax.plot(epochs, [h["val"][key] for h in history], "--", label=key)
    ax.set(xlabel="epoch", ylabel="loss", title="losses per branch")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "loss_curves.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for group in history[0]["lr"] if history else []:
        ax.plot(epochs, [h["lr"][group] for h in history], marker="o", label=group)
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate per group", yscale="log")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "lr_curves.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in metrics:
        if history and m in history[0]["val"]:
            ax.plot(epochs, [h["val"][m] for h in history], marker="o", label=m)
    ax.set(xlabel="epoch", ylabel="value", title="validation metrics")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "val_curves.png"))
    classes = list(history[0]["val"].get("per_class", {})) if history else []
    if classes:  # a class that collapses shows here long before the headline PQ moves
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in classes:
            ax.plot(epochs, [_nan(h["val"].get("per_class", {}).get(c, {}).get("f1")) for h in history], marker="o",
                    label=c)
        ax.set(xlabel="epoch", ylabel="F1 (centroid matching)", title="validation F1 per class", ylim=(0, 1))
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "class_f1_curves.png"))
    return paths


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
