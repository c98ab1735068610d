"""Experiment tracking through accelerate's trackers (`--log-with tensorboard`, wandb, mlflow
...): the run's options once, then per epoch the training loss, the dev metrics and the
learning rate. log.jsonl stays the record of a run; a tracker is a view of it."""

from __future__ import annotations

from dataclasses import asdict

from cachegen.errors import ConfigError

PROJECT = "ser"  # the tracker's project; tensorboard writes its events to RUN/ser/
INSTALL = {"tensorboard": "pip install 'ser[tensorboard]'"}


def check_tracker(name: str) -> None:
    """Refuse a tracker accelerate does not know, or one whose package is not installed
    (accelerate itself would drop it with a warning and train untracked)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    if name not in known:
        raise ConfigError(f"--log-with {name!r}: choose one of {', '.join(known)}")
    if name not in [str(getattr(t, "value", t)) for t in get_available_trackers()]:
        raise ConfigError(f"--log-with {name}: its package is not installed; "
                          f"{INSTALL.get(name, f'pip install {name}')}")


def run_options(config) -> dict:
    """The training config as the plain values trackers accept (hparams)."""
    values = {}
    for name, value in asdict(config).items():
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        values[name] = "none" if value is None else value
    return values


def epoch_values(record: dict) -> dict[str, float]:
    """One epoch of log.jsonl as tracker scalars: train/loss, dev/score, dev/<target>/<metric>,
    lr, utterances_per_second."""
    values = {"dev/score": record["dev_score"], "lr": record["lr"],
              "skipped_steps": record["skipped_steps"]}
    if record["train_loss"] is not None:
        values["train/loss"] = record["train_loss"]
    if record.get("utterances_per_second"):
        values["utterances_per_second"] = record["utterances_per_second"]
    for target, metrics in record["dev"].items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)):  # not the class names or the confusion matrix
                values[f"dev/{target}/{metric}"] = value
    return values
