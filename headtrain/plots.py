"""PNG figures people look at: training curves and predicted-vs-true scatter plots."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history: list[dict], path: str) -> None:
    """Train loss and dev CCC per target, per epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] if r["train_loss"] is not None else np.nan for r in history], "o-")
    left.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for target in history[0]["dev"]:
        right.plot(epochs, [r["dev"][target]["ccc"] for r in history], "o-", label=target)
    right.plot(epochs, [r["dev_mean_ccc"] for r in history], "k--", label="mean")
    right.set(xlabel="epoch", ylabel="CCC", title="dev CCC")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scatter(pred: np.ndarray, true: np.ndarray, targets: list[str], metrics: dict, path: str) -> None:
    """Predicted against true value, one panel per target, with the identity line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 4), squeeze=False)
    for i, (ax, target) in enumerate(zip(axes[0], targets)):
        ax.scatter(true[:, i], pred[:, i], s=10, alpha=0.6)
        low = min(true[:, i].min(), pred[:, i].min())
        high = max(true[:, i].max(), pred[:, i].max())
        ax.plot([low, high], [low, high], "k--", linewidth=1)
        ax.set(xlabel=f"true {target}", ylabel=f"predicted {target}",
               title=f"{target}: CCC {metrics[target]['ccc']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
