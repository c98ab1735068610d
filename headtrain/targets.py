"""What the head predicts: dimensional targets (one standardised output each) and categorical
targets (one logit per class), the multi-task loss over them, and outputs back to labels.

Label arrays keep one column per target: a dimensional value (label scale, or standardised
for training) or a categorical target's class index. The head's output has one column per
dimensional target and one per class, in the order of the targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cachegen.errors import ConfigError

# Named class sets for `--classes`: a `+` merges the classes after the first into it.
CLASS_PRESETS = {
    # IEMOCAP's usual 4-class task: excited counts as happy; other categories are left out.
    "iemocap4": "neutral,happy+excited,angry,sad",
}


@dataclass(frozen=True)
class Target:
    """One predicted label column. `classes` is empty for a dimensional target."""
    name: str
    classes: tuple[str, ...] = ()
    mean: float = 0.0  # standardisation of a dimensional target (train split)
    std: float = 1.0

    @property
    def categorical(self) -> bool:
        return bool(self.classes)

    @property
    def width(self) -> int:
        return len(self.classes) or 1


def make_targets(names: Sequence[str], classes: dict[str, tuple[str, ...]],
                 train_values: np.ndarray) -> list[Target]:
    """Targets from their names, the classes of the categorical ones, and the training
    split's (N, targets) values (dimensional targets are standardised with its mean and std)."""
    targets = []
    for i, name in enumerate(names):
        if name in classes:
            targets.append(Target(name, classes=tuple(classes[name])))
            continue
        column = train_values[:, i]
        std = float(column.std())
        targets.append(Target(name, mean=float(column.mean()), std=std if std > 0 else 1.0))
    return targets


def output_width(targets: Sequence[Target]) -> int:
    return sum(t.width for t in targets)


def output_columns(targets: Sequence[Target]) -> list[slice]:
    """The head-output columns of each target."""
    columns, start = [], 0
    for target in targets:
        columns.append(slice(start, start + target.width))
        start += target.width
    return columns


def parse_classes(spec: str) -> dict[str, str]:
    """`--classes` -> {label value: class}. `neutral,happy+excited` keeps neutral and happy,
    and counts excited as happy; a preset name (`iemocap4`) stands for its list."""
    spec = CLASS_PRESETS.get(spec, spec)
    mapping: dict[str, str] = {}
    for group in spec.split(","):
        names = [n.strip() for n in group.split("+")]
        if not all(names):
            raise ConfigError(f"--classes {spec!r}: an empty class name; write e.g. "
                              f"'neutral,happy+excited,angry,sad' or one of {', '.join(CLASS_PRESETS)}")
        for name in names:
            if name in mapping:
                raise ConfigError(f"--classes {spec!r}: '{name}' is named twice")
            mapping[name] = names[0]
    if len(set(mapping.values())) < 2:
        raise ConfigError(f"--classes {spec!r}: a classification needs at least two classes")
    return mapping


def class_order(mapping: dict[str, str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(mapping.values()))


def standardised(targets: Sequence[Target], values: np.ndarray) -> np.ndarray:
    """(N, targets) label values -> training values (class indices stay as they are)."""
    mean = np.array([t.mean for t in targets])
    std = np.array([t.std for t in targets])
    return (values - mean) / std


def to_labels(targets: Sequence[Target], outputs: np.ndarray) -> np.ndarray:
    """(N, output width) head outputs -> (N, targets): label-scale values and class indices."""
    labels = np.zeros((len(outputs), len(targets)))
    for i, (target, columns) in enumerate(zip(targets, output_columns(targets))):
        part = outputs[:, columns]
        labels[:, i] = part.argmax(1) if target.categorical else part[:, 0] * target.std + target.mean
    return labels


def class_weights(target: Target, indices: np.ndarray) -> np.ndarray:
    """Inverse class frequency in the training split, normalised so a balanced split gets 1s."""
    counts = np.bincount(indices.astype(int), minlength=len(target.classes))
    absent = [c for c, n in zip(target.classes, counts) if n == 0]
    if absent:
        raise ConfigError(f"--class-weights balanced: class(es) {', '.join(absent)} of '{target.name}' "
                          "have no training rows")
    return len(indices) / (len(counts) * counts)


def multitask_loss(targets: Sequence[Target], *, dimensional: Callable, weights: Sequence[float],
                   class_weights: dict[str, np.ndarray] | None = None) -> Callable:
    """loss(pred (B, output width), true (B, targets)) -> scalar: the weighted mean of the
    dimensional loss (CCC or MSE) and each categorical target's cross-entropy.

    Dimensional targets of equal weight share one call of `dimensional` (CCC averages over
    its columns), so dimensional targets alone train exactly as with `dimensional` itself.
    """
    columns = output_columns(targets)
    groups: dict[float, list[int]] = {}  # weight -> dimensional target indices
    for i, target in enumerate(targets):
        if not target.categorical:
            groups.setdefault(weights[i], []).append(i)
    categorical = [i for i, t in enumerate(targets) if t.categorical]
    total_weight = float(sum(weights))
    class_weights = class_weights or {}

    def loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        dimensional_parts = []
        for weight, indices in groups.items():
            out = torch.cat([pred[:, columns[i]] for i in indices], dim=1)
            dimensional_parts.append((weight * len(indices), dimensional(out, true[:, indices])))
        if not categorical and len(dimensional_parts) == 1:
            return dimensional_parts[0][1]
        total = sum(weight * part for weight, part in dimensional_parts)
        for i in categorical:
            name = targets[i].name
            weight_tensor = (torch.as_tensor(class_weights[name], dtype=torch.float32, device=pred.device)
                             if name in class_weights else None)
            total = total + weights[i] * torch.nn.functional.cross_entropy(
                pred[:, columns[i]].float(), true[:, i].long(), weight=weight_tensor)
        return total / total_weight

    return loss


def targets_from_info(info: dict, spec) -> list[Target]:
    """The targets a run (config.json) or an export (ser_head.json) was trained on: classes
    from its ModelSpec, standardisation from the info."""
    return [Target(name=name, classes=tuple(spec.classes.get(name, ())), mean=float(mean), std=float(std))
            for name, mean, std in zip(spec.targets, info["label_mean"], info["label_std"])]
