"""PNG figures people look at: training curves and predicted-vs-true scatter plots.

Figures are built with matplotlib's `Figure` directly (no pyplot state, no backend switch)
and returned, so tests can look at what a figure shows; `save` writes the PNG.
"""

from __future__ import annotations

import numpy as np


def _figure(width: float, height: float, *, columns: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def best_epoch_of(history: list[dict]) -> int | None:
    """The epoch training kept: the first with the highest finite dev score (the selection
    value: mean dev CCC, or the --select target's)."""
    scores = [(r.get("dev_score"), -r["epoch"]) for r in history
              if r.get("dev_score") is not None and np.isfinite(r["dev_score"])]
    return -max(scores)[1] if scores else None


def curves_figure(history: list[dict], *, best_epoch: int | None = None):
    """Train loss and dev CCC per target, per epoch; the best epoch (default: the history's)
    marked on both panels."""
    best_epoch = best_epoch if best_epoch is not None else best_epoch_of(history)
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = _figure(10, 4, columns=2)
    epochs = [r["epoch"] for r in history]
    left.plot(epochs, [r["train_loss"] if r["train_loss"] is not None else np.nan for r in history], "o-")
    left.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for target in history[0]["dev"]:
        right.plot(epochs, [r["dev"][target]["ccc"] for r in history], "o-", label=target)
    right.plot(epochs, [r["dev_mean_ccc"] for r in history], "k--", label="mean")
    right.set(xlabel="epoch", ylabel="CCC", title="dev CCC")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if best_epoch:
            ax.axvline(best_epoch, color="tab:green", linestyle=":", label=f"best epoch {best_epoch}")
    right.legend()
    return fig


def plot_curves(history: list[dict], path: str) -> None:
    save(curves_figure(history), path)


def scatter_figure(pred: np.ndarray, true: np.ndarray, targets: list[str], metrics: dict, *,
                   split: str):
    """Predicted against true value, one panel per target, with the identity line; the title
    names the split and the number of utterances."""
    fig, axes = _figure(4 * len(targets), 4.3, columns=len(targets))
    for i, (ax, target) in enumerate(zip(axes, targets)):
        ax.scatter(true[:, i], pred[:, i], s=10, alpha=0.6)
        low = min(true[:, i].min(), pred[:, i].min())
        high = max(true[:, i].max(), pred[:, i].max())
        ax.plot([low, high], [low, high], "k--", linewidth=1)
        ax.set(xlabel=f"true {target}", ylabel=f"predicted {target}",
               title=f"{target}: CCC {metrics[target]['ccc']:.3f}")
    fig.suptitle(f"split '{split}', n = {len(true)}")
    return fig


def plot_scatter(pred: np.ndarray, true: np.ndarray, targets: list[str], metrics: dict, path: str,
                 *, split: str) -> None:
    save(scatter_figure(pred, true, targets, metrics, split=split), path)
