"""Read and validate a manifest (CSV or Parquet: id, path[, split][, label columns]).

Every problem is collected and reported at once, before any compute, with the rows named.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import ManifestError

# Columns that hold text by convention; every other column must be numeric (a label) or text
# throughout. A column mixing numbers and words is a typo in a label, reported by row.
TEXT_COLUMNS = {"id", "path", "split", "speaker", "gender", "emotion"}
MAX_LISTED = 10


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str  # absolute, resolved
    row: int  # the row as a person finds it: CSV line number, or Parquet row index


@dataclass(frozen=True)
class Manifest:
    source: str
    table: pa.Table  # all columns, labels as float64, paths as written
    utterances: list[Utterance]

    @property
    def label_columns(self) -> list[str]:
        return [name for name in self.table.column_names
                if pa.types.is_floating(self.table.schema.field(name).type)]


def read_table(path: str | Path) -> tuple[pa.Table, int]:
    """Read a CSV or Parquet table with every column as text (blank cells -> null).

    Returns the table and the offset from row index to the row number a person sees
    (2 for CSV: header is line 1; 0 for Parquet).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            _refuse_duplicate_columns(path, pq.read_schema(path).names)
            return _as_text(path, pq.read_table(path)), 0
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        _refuse_duplicate_columns(path, header)
        types = {name: pa.string() for name in header}
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=True, null_values=[""]))
        return table, 2
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read table: {str(err).splitlines()[0]}") from None


def _as_text(path: Path, table: pa.Table) -> pa.Table:
    """Every column of a Parquet table as text; a column that has no text form (a list, a
    struct) is named."""
    columns = []
    for field in table.schema:
        try:
            columns.append(table.column(field.name).cast(pa.string()))
        except pa.ArrowNotImplementedError:
            raise ManifestError(f"{path}: column '{field.name}' holds {field.type}, which a manifest "
                                "cannot use (ids, paths and labels are text or numbers); drop "
                                "that column") from None
        except pa.ArrowInvalid as err:  # bytes that are not UTF-8
            raise ManifestError(f"{path}: column '{field.name}' cannot be read as text "
                                f"({str(err).splitlines()[0]})") from None
    return pa.table(columns, names=table.column_names)


def _refuse_duplicate_columns(path: Path, names: list[str]) -> None:
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ManifestError(f"{path}: column(s) {', '.join(repr(n) for n in twice)} appear more than "
                            "once in the header; rename or drop the copies")


def _rows(indices, offset: int) -> str:
    shown = ", ".join(str(i + offset) for i in indices[:MAX_LISTED])
    more = f" and {len(indices) - MAX_LISTED} more" if len(indices) > MAX_LISTED else ""
    return shown + more


def _to_float(value: str | None) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        return math.nan if value.strip().lower() == "nan" else None
    return number


def parse_labels(table: pa.Table, offset: int, source: str, problems: list[str]) -> pa.Table:
    """Convert every non-text column to float64; a column with both numbers and words is a
    problem naming the rows."""
    columns = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if name in TEXT_COLUMNS:
            columns[name] = pa.array(values, pa.string())
            continue
        parsed = [_to_float(v) for v in values]
        numeric = [i for i, (v, p) in enumerate(zip(values, parsed)) if p is not None]
        words = [i for i, (v, p) in enumerate(zip(values, parsed))
                 if p is None and v is not None and v.strip()]
        if numeric and words:
            problems.append(f"column '{name}' has values that are not numbers at row(s) "
                            f"{_rows(words, offset)} (e.g. {values[words[0]]!r})")
            columns[name] = pa.array(values, pa.string())
        elif numeric:
            columns[name] = pa.array(parsed, pa.float64())
        else:
            columns[name] = pa.array(values, pa.string())
    return pa.table(columns)


def load_manifest(path: str | Path, *, audio_root: str | Path | None = None,
                  check_files: bool = True) -> Manifest:
    """Read and validate a manifest.

    Args:
        path: CSV or Parquet file with columns `id` and `path`, optional `split` and labels.
        audio_root: folder that relative paths resolve against (default: the manifest's folder).
        check_files: whether to check that every audio file exists.

    Raises:
        ManifestError: listing every problem found (missing columns, blank or duplicate ids,
            missing files, unparsable labels), with row numbers.
    """
    path = Path(path)
    table, offset = read_table(path)
    missing = [c for c in ("id", "path") if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; a manifest needs "
                            f"'id' and 'path' (found: {', '.join(table.column_names) or 'none'})")
    if table.num_rows == 0:
        raise ManifestError(f"{path}: has a header but no rows; nothing to do")
    problems: list[str] = []
    table = parse_labels(table, offset, str(path), problems)
    ids = table.column("id").to_pylist()
    paths = table.column("path").to_pylist()
    root = Path(audio_root) if audio_root else path.parent

    blank_ids = [i for i, v in enumerate(ids) if v is None or not v.strip()]
    if blank_ids:
        problems.append(f"blank id at row(s) {_rows(blank_ids, offset)}")
    seen: dict[str, int] = {}
    duplicates = []
    for i, uid in enumerate(ids):
        if uid is None:
            continue
        if uid in seen:
            duplicates.append(f"'{uid}' (rows {seen[uid] + offset} and {i + offset})")
        else:
            seen[uid] = i
    if duplicates:
        problems.append(f"duplicate id(s): {', '.join(duplicates[:MAX_LISTED])}"
                        + (f" and {len(duplicates) - MAX_LISTED} more" if len(duplicates) > MAX_LISTED else ""))
    blank_paths = [i for i, v in enumerate(paths) if v is None or not v.strip()]
    if blank_paths:
        problems.append(f"blank path at row(s) {_rows(blank_paths, offset)}")

    utterances = []
    absent = []
    for i, (uid, rel) in enumerate(zip(ids, paths)):
        if not uid or not rel:
            continue
        full = os.path.normpath(root / os.path.expanduser(rel.strip()))
        if check_files and not os.path.isfile(full):
            absent.append((i, full))
        utterances.append(Utterance(id=uid, path=full, row=i + offset))
    if absent:
        names = ", ".join(f"row {i + offset}: {paths[i]}" + (" is a folder" if os.path.isdir(full) else "")
                          for i, full in absent[:MAX_LISTED])
        more = f" and {len(absent) - MAX_LISTED} more" if len(absent) > MAX_LISTED else ""
        problems.append(f"{len(absent)} audio file(s) not found under {root} ({names}{more}); "
                        "use --audio-root if paths are relative to another folder")
    if problems:
        raise ManifestError(f"{path}: " + "; ".join(problems))
    return Manifest(source=str(path), table=table, utterances=utterances)


def split_counts(table: pa.Table) -> dict[str, int]:
    if "split" not in table.column_names:
        return {}
    counts = pc.value_counts(table.column("split")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}
