"""CCC (primary), Pearson and MSE per target, and the CCC loss."""

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


def target_metrics(pred: np.ndarray, true: np.ndarray, targets: list[str]) -> dict:
    """{target: {"ccc", "pearson", "mse"}} for (N, targets) arrays on the label scale."""
    return {name: {"ccc": ccc(pred[:, i], true[:, i]), "pearson": pearson(pred[:, i], true[:, i]),
                   "mse": float(np.mean((pred[:, i] - true[:, i]) ** 2))}
            for i, name in enumerate(targets)}


def mean_ccc(metrics: dict) -> float:
    return float(np.mean([m["ccc"] for m in metrics.values()]))


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
