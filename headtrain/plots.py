"""PNG figures people look at: training curves, predicted-vs-true scatter plots, confusion
matrices, layer weights and sweep summaries.

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
    """Train loss and each target's primary dev metric (CCC, or UAR) per epoch; the best epoch
    (default: the history's) marked on both panels."""
    best_epoch = best_epoch if best_epoch is not None else best_epoch_of(history)
    from matplotlib.ticker import MaxNLocator

    from .metrics import primary_metric

    fig, (left, right) = _figure(10, 4, columns=2)
    epochs = [r["epoch"] for r in history]
    left.plot(epochs, [r["train_loss"] if r["train_loss"] is not None else np.nan for r in history], "o-")
    left.set(xlabel="epoch", ylabel="train loss", title="training loss")
    names = set()
    for target, metrics in history[0]["dev"].items():
        name, _ = primary_metric(metrics)
        names.add(name.upper())
        right.plot(epochs, [primary_metric(r["dev"][target])[1] for r in history], "o-",
                   label=f"{target} ({name.upper()})")
    # dev_mean_ccc: the key of runs trained before categorical targets
    right.plot(epochs, [r.get("dev_mean", r.get("dev_mean_ccc")) for r in history], "k--", label="mean")
    right.set(xlabel="epoch", ylabel=" / ".join(sorted(names)), title="dev")
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


def bar_layer_weights(ax, weights: dict[str, float], *, title: str) -> None:
    """The softmax weight of each layer (keys: layer numbers) as bars, on `ax`."""
    ax.bar([int(k) for k in weights], list(weights.values()), color="tab:green")
    ax.set_xticks([int(k) for k in weights])
    ax.set(xlabel="layer (0 = input of layer 1)", ylabel="softmax weight", title=title)


def plot_layer_weights(weights: dict[str, float], path: str, *, title: str) -> None:
    """A weighted-sum run's layer weights as a bar plot."""
    fig, (ax,) = _figure(6, 4)
    bar_layer_weights(ax, weights, title=title)
    save(fig, path)


def plot_scatter(pred: np.ndarray, true: np.ndarray, targets: list[str], metrics: dict, path: str,
                 *, split: str) -> None:
    save(scatter_figure(pred, true, targets, metrics, split=split), path)


def confusion_figure(target: str, metrics: dict, *, split: str):
    """Rows: true class; columns: predicted; each cell the count and the row's share."""
    confusion = np.asarray(metrics["confusion"])
    classes = metrics["classes"]
    size = 1.5 + 0.7 * len(classes)
    fig, (ax,) = _figure(size + 1, size)
    share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{confusion[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    fontsize=8, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel=f"predicted {target}", ylabel=f"true {target}",
           title=f"{target}, split '{split}', n = {int(confusion.sum())}\n"
                 f"UAR {metrics['uar']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
                 f"accuracy {metrics['accuracy']:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    return fig


def plot_confusion(target: str, metrics: dict, path: str, *, split: str) -> None:
    save(confusion_figure(target, metrics, split=split), path)


def summary_figure(rows: list[dict]):
    """Mean ± std of the score per configuration of a sweep (best first, highlighted); with
    folds, the left-out folds' score."""
    part = "test" if "test_score_mean" in rows[0] else "dev"
    values = [c for c in rows[0] if not c.endswith(("_mean", "_std")) and c not in ("best", "runs")]
    labels = [", ".join(f"{c}={row[c]:g}" if isinstance(row[c], float) else f"{c}={row[c]}"
                        for c in values) or "all runs" for row in rows]
    means = [row[f"{part}_score_mean"] for row in rows]
    stds = [0.0 if np.isnan(row[f"{part}_score_std"]) else row[f"{part}_score_std"] for row in rows]
    fig, (ax,) = _figure(7, 1.2 + 0.45 * len(rows))
    colors = ["tab:green" if row["best"] else "tab:blue" for row in rows]
    positions = np.arange(len(rows))[::-1]
    ax.barh(positions, means, xerr=stds, color=colors, capsize=3)
    ax.set_yticks(positions, [f"{label} (n={row['runs']})" for label, row in zip(labels, rows)],
                  fontsize=8)
    ax.set(xlabel=f"{'left-out folds' if part == 'test' else 'dev'} score (mean over targets of "
                  "CCC / UAR), mean ± std over runs",
           title="sweep summary (best by dev score in green)")
    return fig


def plot_summary(rows: list[dict], path: str) -> None:
    save(summary_figure(rows), path)
