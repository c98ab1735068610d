"""Metrics per target: CCC (primary), Pearson and MSE for a dimensional target; UAR
(primary), macro-F1, accuracy and the confusion matrix for a categorical one. And the CCC loss."""

from __future__ import annotations

import numpy as np
import torch


def ccc(pred: np.ndarray, true: np.ndarray) -> float:
    """Lin's concordance correlation coefficient (population moments)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    mp, mt = pred.mean(), true.mean()
    covariance = ((pred - mp) * (true - mt)).mean()
    denominator = pred.var() + true.var() + (mp - mt) ** 2
    return float(2 * covariance / denominator) if denominator > 0 else 0.0


def pearson(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.std() == 0 or true.std() == 0:
        return 0.0
    return float(((pred - pred.mean()) * (true - true.mean())).mean() / (pred.std() * true.std()))


def target_metrics(pred: np.ndarray, true: np.ndarray, targets) -> dict:
    """{target: metrics} for (N, targets) arrays of label values and class indices:
    {"ccc", "pearson", "mse"}, or class_metrics for a categorical target. `targets` are
    headtrain.targets.Target values, or plain names of dimensional targets."""
    out = {}
    for i, target in enumerate(targets):
        if getattr(target, "categorical", False):
            out[target.name] = class_metrics(pred[:, i], true[:, i], target.classes)
        else:
            out[getattr(target, "name", target)] = {
                "ccc": ccc(pred[:, i], true[:, i]), "pearson": pearson(pred[:, i], true[:, i]),
                "mse": float(np.mean((pred[:, i] - true[:, i]) ** 2))}
    return out


def ccc_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """1 - CCC, averaged over targets; (B, targets) tensors, computed in float32."""
    pred, true = pred.float(), true.float()
    mp, mt = pred.mean(0), true.mean(0)
    covariance = ((pred - mp) * (true - mt)).mean(0)
    denominator = pred.var(0, unbiased=False) + true.var(0, unbiased=False) + (mp - mt) ** 2
    return (1 - 2 * covariance / (denominator + 1e-8)).mean()


def mse_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), true.float())


LOSSES = {"ccc": ccc_loss, "mse": mse_loss}


def class_metrics(pred: np.ndarray, true: np.ndarray, classes: tuple[str, ...]) -> dict:
    """UAR, macro-F1, accuracy and the confusion matrix of class indices.

    UAR (unweighted average recall) averages the recall of the classes present in `true`;
    macro-F1 averages 2TP / (2TP + FP + FN) over the classes present in `true` or `pred`.
    `confusion[i][j]` counts utterances of class i predicted as class j.
    """
    pred, true = np.asarray(pred).astype(int), np.asarray(true).astype(int)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    hits = np.diag(confusion)
    actual, predicted = confusion.sum(1), confusion.sum(0)
    present = actual > 0
    seen = present | (predicted > 0)
    recall = hits[present] / actual[present]
    f1 = 2 * hits[seen] / (actual[seen] + predicted[seen])
    return {"uar": float(recall.mean()) if present.any() else 0.0,
            "macro_f1": float(f1.mean()) if seen.any() else 0.0,
            "accuracy": float(hits.sum() / max(len(true), 1)),
            "classes": list(classes), "confusion": confusion.tolist()}


# The metric that selects the best epoch and ranks configurations, by kind of target.
PRIMARY = ("ccc", "uar")


def primary_metric(metrics: dict) -> tuple[str, float]:
    """(name, value) of a target's primary metric: CCC, or UAR for a categorical target."""
    name = next(n for n in PRIMARY if n in metrics)
    return name, metrics[name]


def mean_score(metrics: dict) -> float:
    """The dev score: the mean over targets of their primary metric (CCC or UAR)."""
    return float(np.mean([primary_metric(m)[1] for m in metrics.values()]))


def format_metrics(metrics: dict) -> str:
    """`CCC activation 0.512, UAR emotion 0.634`: each target's primary metric."""
    return ", ".join(f"{primary_metric(m)[0].upper()} {target} {primary_metric(m)[1]:.3f}"
                     for target, m in metrics.items())
