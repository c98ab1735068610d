"""Cross-validation from one store: leave one group out, by the values of a column (e.g.
IEMOCAP's session).

With groups g1 < g2 < ... < gn (sorted), fold i tests on g_i, selects its best epoch on the
next group g_(i+1) (g1 after gn) and trains on the rest. Every utterance with a group value
is tested exactly once over the n folds. Each fold is a labels table (the original one with
its `split` column rewritten to train/dev/test) written next to the runs, so a fold is a
normal `ser train --labels` run and `ser evaluate --split test` of it.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cachegen.errors import ConfigError

log = logging.getLogger(__name__)
TRAIN, DEV, TEST = "train", "dev", "test"
# How a fold's dev group is chosen (written into sweep.json and summary.md).
FOLD_RULE = ("groups sorted; fold i tests group i, selects its best epoch on group i+1 (the "
             "first group after the last) and trains on the others")


@dataclass(frozen=True)
class Fold:
    name: str  # the left-out group, as written in the column
    test: str
    dev: str
    labels: str  # the fold's labels table

    @property
    def train_options(self) -> dict:
        return {"labels": self.labels, "train_split": TRAIN, "dev_split": DEV}


def _group_name(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # session 1.0 -> "1"
    return str(value)


def labels_table(config, *, reader=None) -> tuple[pa.Table, str]:
    """The table a training config labels its utterances from: --labels, or the store's
    manifest table (from `reader`, the store opened), or the manifest."""
    from .labels import drop_failed, read_labels

    if config.labels:
        table, source = read_labels(config.labels), config.labels
        return (drop_failed(table, reader.meta) if reader else table), source
    if reader is not None:
        return drop_failed(reader.table, reader.meta), f"{config.from_cache} (manifest table)"
    from cachegen.manifest import load_manifest

    return load_manifest(config.manifest, audio_root=config.audio_root, check_files=False).table, config.manifest


def plan_folds(config, *, column: str, folder: Path, reader=None) -> list[Fold]:
    """One Fold per value of `column`; writes each fold's labels table into `folder`.

    Raises:
        ConfigError: no such column, or fewer than three groups (a fold needs a test, a dev
            and at least one training group).
    """
    table, source = labels_table(config, reader=reader)
    if column not in table.column_names:
        raise ConfigError(f"--folds {column}: {source} has no column '{column}' (columns: "
                          f"{', '.join(table.column_names)})")
    values = table.column(column).to_pylist()
    blank = [uid for uid, v in zip(table.column("id").to_pylist(), values)
             if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())]
    if blank:
        log.warning("--folds %s: %d row(s) have no %s and are left out of every fold", column,
                    len(blank), column)
    groups = sorted({_group_name(v) for v in values if v is not None and _group_name(v).strip()
                     and _group_name(v) != "nan"})
    if len(groups) < 3:
        raise ConfigError(f"--folds {column}: {len(groups)} group(s) ({', '.join(groups) or 'none'}); "
                          "leave-one-group-out needs at least 3 (test, dev and training groups)")
    folder.mkdir(parents=True, exist_ok=True)
    names = [c for c in table.column_names if c != "split"]
    rows = table.select(names).to_pylist()
    folds = []
    for i, group in enumerate(groups):
        dev = groups[(i + 1) % len(groups)]
        path = folder / f"{column}={_safe(group)}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*names, "split"])
            for row in rows:
                value = row[column]
                if value is None or _group_name(value) in ("", "nan"):
                    continue
                name = _group_name(value)
                split = TEST if name == group else DEV if name == dev else TRAIN
                writer.writerow([_cell(row[c]) for c in names] + [split])
        folds.append(Fold(name=group, test=group, dev=dev, labels=str(path)))
    return folds


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # exact round trip of a label
    return str(value)
