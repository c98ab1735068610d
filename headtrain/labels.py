"""Labels joined by id, validated up front: every problem is reported at once, rows named."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cachegen.errors import ManifestError

MAX_LISTED = 10
MAX_LABEL = 1e15  # larger labels are an error in the table, and their squares lose all precision


@dataclass(frozen=True)
class Split:
    name: str
    ids: list[str]
    targets: np.ndarray  # (N, targets), label scale


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def read_labels(path: str) -> pa.Table:
    """A labels table (CSV/Parquet: id, targets, optional split) with numeric columns parsed."""
    from cachegen.manifest import parse_labels, read_table

    table, offset = read_table(path)
    if "id" not in table.column_names:
        raise ManifestError(f"{path}: labels table needs an 'id' column (found: "
                            f"{', '.join(table.column_names)})")
    problems: list[str] = []
    table = parse_labels(table, offset, path, problems)
    if problems:
        raise ManifestError(f"{path}: " + "; ".join(problems))
    return table


def load_splits(table: pa.Table, *, source: str, targets: list[str], splits: list[str],
                available: set[str] | None = None,
                label_range: tuple[float, float] | None = None) -> dict[str, Split]:
    """Rows of each named split with their target values.

    Raises:
        ManifestError: naming every problem: unknown target columns, no split column, a split
            without rows, duplicate ids, blank/NaN/out-of-range labels, ids not in the store.
    """
    columns = table.column_names
    unknown = [t for t in targets if t not in columns]
    if unknown:
        numeric = [c for c in columns if pa.types.is_floating(table.schema.field(c).type)]
        raise ManifestError(f"{source}: no label column(s) {', '.join(unknown)}; numeric columns: "
                            f"{', '.join(numeric) or 'none'}")
    not_numeric = [t for t in targets if not pa.types.is_floating(table.schema.field(t).type)]
    if not_numeric:
        raise ManifestError(f"{source}: label column(s) {', '.join(not_numeric)} hold text, not numbers")
    if "split" not in columns:
        raise ManifestError(f"{source}: no 'split' column; add one (train/dev/test) or pass --labels "
                            "with a split column")
    rows = table.select(["id", "split", *targets]).to_pylist()
    found = sorted({r["split"] for r in rows if r["split"] is not None})
    problems = []
    for name in splits:
        if not any(r["split"] == name for r in rows):
            problems.append(f"split '{name}' has no rows (splits found: {', '.join(found) or 'none'})")
    used = [r for r in rows if r["split"] in splits]
    seen, duplicates = set(), []
    for r in used:
        if r["id"] in seen:
            duplicates.append(r["id"])
        seen.add(r["id"])
    if duplicates:
        problems.append(f"duplicate id(s) {_listed(duplicates)}")
    for target in targets:
        blank = [r["id"] for r in used if r[target] is None or math.isnan(r[target])]
        if blank:
            problems.append(f"'{target}' is blank or NaN for {len(blank)} row(s): {_listed(blank)}")
        # beyond ±MAX_LABEL the standardisation (squares) overflows; 1e400 parses as Inf
        huge = [f"{r['id']}={r[target]:g}" for r in used if r[target] is not None
                and not math.isnan(r[target]) and not abs(r[target]) <= MAX_LABEL]
        if huge:
            problems.append(f"'{target}' is infinite or beyond ±{MAX_LABEL:g} for {len(huge)} row(s): "
                            f"{_listed(huge)}")
        if label_range:
            low, high = label_range
            outside = [f"{r['id']}={r[target]:g}" for r in used if r[target] is not None
                       and abs(r[target]) <= MAX_LABEL and not low <= r[target] <= high]
            if outside:
                problems.append(f"'{target}' outside [{low:g}, {high:g}] for {len(outside)} row(s): "
                                f"{_listed(outside)}")
    if available is not None:
        absent = [r["id"] for r in used if r["id"] not in available]
        if absent:
            problems.append(f"{len(absent)} id(s) not in the store: {_listed(absent)} (the build "
                            "skipped or never saw them: rebuild, or drop these rows)")
    if problems:
        raise ManifestError(f"{source}: " + "; ".join(problems))
    return {name: Split(name=name, ids=[r["id"] for r in used if r["split"] == name],
                        targets=np.array([[r[t] for t in targets] for r in used if r["split"] == name],
                                         dtype=np.float64).reshape(-1, len(targets)))
            for name in splits}


def drop_unusable(table: pa.Table, source) -> pa.Table:
    """Leave out audio files training cannot use (unreadable header, shorter than the
    model's receptive field), with a warning naming each, as a build skips them."""
    unusable = getattr(source, "unusable", {})
    return _drop(table, unusable, lambda ids: "leaving out %d audio file(s) that cannot be used: %s" % (
        len(ids), "; ".join(unusable[uid] for uid in ids[:MAX_LISTED]) +
        (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")))


def drop_failed(table: pa.Table, meta: dict) -> pa.Table:
    """Leave out the utterances the cache build could not use (recorded in the store), with a
    warning naming them: they have no states, and the build already reported why."""
    failed = sorted({f["id"] for f in meta.get("failures", [])})
    return _drop(table, failed, lambda ids: "leaving out %d utterance(s) the cache build could not "
                 "use: %s" % (len(failed), _listed(failed)))


def _drop(table: pa.Table, ids, message) -> pa.Table:
    """`table` without the rows whose id is in `ids`, warning `message(dropped ids)` if any."""
    import logging

    import pyarrow.compute as pc

    if not ids or "id" not in table.column_names:
        return table
    present = pc.is_in(table.column("id"), value_set=pa.array(sorted(ids)))
    if not pc.any(present).as_py():
        return table
    logging.getLogger(__name__).warning(message(table.filter(present).column("id").to_pylist()))
    return table.filter(pc.invert(present))
