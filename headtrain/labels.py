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


def _spaced(name: str) -> str:
    """`name`, quoted where spaces around it would otherwise be invisible in a message."""
    return repr(name) if name != name.strip() else name


def read_labels(path: str) -> pa.Table:
    """A labels table (CSV/Parquet: id, targets, optional split) with numeric columns parsed."""
    from cachegen.manifest import parse_labels, read_table

    table, offset = read_table(path)
    if table.num_rows == 0:
        raise ManifestError(f"{path}: has a header but no rows; nothing to train or evaluate on")
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
                label_range: tuple[float, float] | None = None,
                classes: dict[str, tuple[str, ...]] | None = None) -> dict[str, Split]:
    """Rows of each named split with their target values; a categorical target (named in
    `classes`, a text column) gets the index of its class.

    Raises:
        ManifestError: naming every problem: unknown target columns, no split column, a split
            without rows, duplicate ids, blank/NaN/out-of-range labels, a class outside
            `classes`, ids not in the store.
    """
    classes = classes or {}
    columns = table.column_names
    unknown = [t for t in targets if t not in columns]
    if unknown:
        numeric = [c for c in columns if pa.types.is_floating(table.schema.field(c).type)]
        text = [c for c in categorical_columns(table, columns) if c not in ("id", "path", "split")]
        raise ManifestError(f"{source}: no label column(s) {', '.join(unknown)}; numeric columns: "
                            f"{', '.join(numeric) or 'none'}; text (categorical) columns: "
                            f"{', '.join(text) or 'none'}")
    empty = [t for t in targets if table.num_rows and table.column(t).null_count == table.num_rows]
    if empty:
        raise ManifestError(f"{source}: label column(s) {', '.join(empty)} are blank in every row")
    not_numeric = [t for t in targets if t not in classes
                   and not pa.types.is_floating(table.schema.field(t).type)]
    if not_numeric:
        raise ManifestError(f"{source}: label column(s) {', '.join(not_numeric)} hold text, not numbers"
                            + _decimal_comma_hint(table, not_numeric))
    numeric_classes = [t for t in classes if not pa.types.is_string(table.schema.field(t).type)]
    if numeric_classes:
        raise ManifestError(f"{source}: categorical target(s) {', '.join(numeric_classes)} hold "
                            "numbers; a class column holds words (e.g. neutral, happy)")
    if "split" not in columns:
        raise ManifestError(f"{source}: no 'split' column; add one (train/dev/test) or pass --labels "
                            "with a split column")
    rows = table.select(["id", "split", *targets]).to_pylist()
    found = sorted({_spaced(r["split"]) for r in rows if r["split"] is not None})
    problems = []
    for name in splits:
        if not any(r["split"] == name for r in rows):
            problems.append(f"split '{name}' has no rows (splits found: {', '.join(found) or 'none'})")
    used = [r for r in rows if r["split"] in splits]
    # an id on two rows of any splits is ambiguous, and a training utterance in a test split
    # would make the test score a training score
    where: dict[str, list[str]] = {}
    for r in rows:
        where.setdefault(r["id"], []).append(r["split"] or "no split")
    duplicates = [f"{_spaced(uid)} ({', '.join(names)})" for uid, names in where.items()
                  if len(names) > 1 and uid is not None]
    if duplicates:
        problems.append(f"duplicate id(s) {_listed(duplicates)}")
    if None in where:
        problems.append(f"{len(where[None])} row(s) with a blank id")
    for target in targets:
        if target in classes:
            blank = [r["id"] for r in used if r[target] is None or not r[target].strip()]
            if blank:
                problems.append(f"'{target}' is blank for {len(blank)} row(s): {_listed(blank)}")
            other = [f"{r['id']}={r[target]}" for r in used if r[target] and r[target].strip()
                     and r[target] not in classes[target]]
            if other:
                problems.append(f"'{target}' is not one of the classes {', '.join(classes[target])} "
                                f"for {len(other)} row(s): {_listed(other)} (use --classes to merge or "
                                "leave out classes)")
            continue
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
        absent = [_spaced(r["id"]) for r in used if r["id"] is not None and r["id"] not in available]
        if absent:
            problems.append(f"{len(absent)} id(s) not in the store: {_listed(absent)} (the build "
                            "skipped or never saw them: rebuild, or drop these rows)")
    if problems:
        raise ManifestError(f"{source}: " + "; ".join(problems))
    index = {t: {c: i for i, c in enumerate(names)} for t, names in classes.items()}

    def value(row: dict, target: str) -> float:
        return index[target][row[target]] if target in index else row[target]

    return {name: Split(name=name, ids=[r["id"] for r in used if r["split"] == name],
                        targets=np.array([[value(r, t) for t in targets] for r in used if r["split"] == name],
                                         dtype=np.float64).reshape(-1, len(targets)))
            for name in splits}


def drop_unusable(table: pa.Table, source) -> pa.Table:
    """Leave out audio files training cannot use (unreadable header, shorter than the
    model's receptive field), with a warning naming each, as a build skips them."""
    unusable = getattr(source, "unusable", {})
    return _drop(table, unusable, lambda ids: "leaving out %d audio file(s) that cannot be used: %s" % (
        len(ids), "; ".join(unusable[uid] for uid in ids[:MAX_LISTED]) +
        (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")))


def categorical_columns(table: pa.Table, targets: list[str]) -> list[str]:
    """The targets that are text columns of words: categorical (e.g. `emotion`). A column of
    blanks, or of numbers written with a decimal comma, is not (load_splits names it)."""
    return [t for t in targets if t in table.column_names
            and pa.types.is_string(table.schema.field(t).type)
            and table.column(t).null_count < table.num_rows and not _decimal_comma_hint(table, [t])]


def _decimal_comma_hint(table: pa.Table, columns: list[str]) -> str:
    """' (...)' naming the first of `columns` whose every value is a number written with a
    decimal comma (3,265), which is text to a CSV reader; '' when there is none."""
    import re

    number = re.compile(r"\s*[-+]?\d*,\d+\s*")
    for name in columns:
        values = [v for v in table.column(name).to_pylist() if v is not None and v.strip()]
        if values and all(number.fullmatch(v) for v in values):
            return (f" (column '{name}' writes numbers with a decimal comma, e.g. '{values[0].strip()}';"
                    " write them with a decimal point)")
    return ""


def split_classes(table: pa.Table, target: str, split: str) -> tuple[str, ...]:
    """The classes a split uses, sorted (the class order when `--classes` does not give one)."""
    import pyarrow.compute as pc

    if "split" not in table.column_names:
        return ()
    values = table.filter(pc.equal(table.column("split"), split)).column(target).to_pylist()
    return tuple(sorted({v for v in values if v is not None and v.strip()}))


def apply_classes(table: pa.Table, target: str, mapping: dict[str, str]) -> pa.Table:
    """Rows whose `target` is a key of `mapping`, relabelled to its class (e.g. excited ->
    happy); the rest are left out with a count per left-out value in the log."""
    import logging
    from collections import Counter

    values = table.column(target).to_pylist()
    keep = [v in mapping for v in values]
    left_out = Counter(v for v, k in zip(values, keep) if not k)
    if left_out:
        logging.getLogger(__name__).info(
            "--classes leaves out %d row(s): %s", sum(left_out.values()),
            ", ".join(f"{v if v is not None else 'blank'} {n}" for v, n in left_out.most_common()))
    table = table.filter(pa.array(keep))
    relabelled = pa.array([mapping[v] for v in table.column(target).to_pylist()], pa.string())
    return table.set_column(table.column_names.index(target), target, relabelled)


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
