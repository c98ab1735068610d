"""What every recipe shares: reading label tables, checking audio, writing the manifest
atomically and summarising what went into it."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from ..errors import ConfigError, ManifestError

CORPUS_COLUMNS = ["id", "path", "split", "activation", "valence", "dominance",
                  "speaker", "gender", "emotion"]
# Written as text even when they look like numbers (MSP-Podcast speaker ids are digits).
TEXT_COLUMNS = {"id", "path", "split", "speaker", "gender", "emotion"}
SPLIT_ORDER = ["train", "dev", "test", "test1", "test2", "test3"]
logger = logging.getLogger(__name__)
LISTED = 5  # names shown in a message before "and N more"
Rows = list[tuple[str, dict[str, str]]]  # (where a row is: `labels.csv line 7`; its cells)


def listed(names: list[str]) -> str:
    """`a, b, c, d, e and 7 more`: the first few names of a long list, for one-line messages."""
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def as_number(text: str) -> float | None:
    """The cell as a float, or None when it is blank or not a number."""
    try:
        number = float(text)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def number_cell(text: str, *, field: str, where: str) -> str:
    """A label cell normalised to Python's float text; blank stays blank (unknown, not 0)."""
    if not text:
        return ""
    number = as_number(text)
    if number is None:
        raise ManifestError(f"{where}: {field} {text!r} is not a number; fix the cell or leave "
                            "it blank")
    return str(number)


def check_out(out: Path, *, reads: tuple = ()) -> None:
    """Refuse an output name the cache builder would not read, or one of the files `reads`
    (the labels table), before any work."""
    for source in reads:
        if source is not None and out.resolve() == Path(source).resolve():
            raise ConfigError(f"--out {out}: that is {source}, which this command reads; write "
                              "the manifest to another file")
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ConfigError(f"--out {out}: a manifest ends with .csv or .parquet")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending with .csv or .parquet")


def text_cell(value) -> str:
    """A JSON or Parquet value as manifest text: None and NaN become blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def read_table(path: Path, *, required: list[str]) -> tuple[list[str], Rows]:
    """Read a CSV or Parquet labels table as text cells.

    CSV may carry a UTF-8 BOM and Windows line endings; blank lines are skipped; cells are
    stripped; a blank cell stays blank.

    Returns:
        The column names and, per row, where it is (`labels.csv line 7`) and its cells.

    Raises:
        ManifestError: the file is missing or unreadable, lacks a required column, or a row
            has more or fewer cells than the header.
    """
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    if path.suffix.lower() == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            reason = str(err).splitlines()[0]
            raise ManifestError(f"{path}: cannot read Parquet: {reason}") from None
        header = table.column_names
        rows = [(f"{path} row {i}", {k: text_cell(v) for k, v in record.items()})
                for i, record in enumerate(table.to_pylist())]
    else:
        header, rows = [], []
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = [name.strip() for name in next(reader, [])]
                for cells in reader:
                    if not any(cell.strip() for cell in cells):
                        continue
                    where = f"{path} line {reader.line_num}"
                    if len(cells) != len(header):
                        raise ManifestError(f"{where}: {len(cells)} cells but the header has "
                                            f"{len(header)}; fix the row (an unquoted comma?)")
                    rows.append((where, {k: v.strip() for k, v in zip(header, cells)}))
        except UnicodeDecodeError:
            raise ManifestError(f"{path}: not UTF-8 text; save it as UTF-8") from None
        except csv.Error as err:
            raise ManifestError(f"{path}: not a readable CSV ({err})") from None
    missing = [name for name in required if name not in header]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)} "
                            f"(found: {', '.join(header) or 'none'})")
    return header, rows


def read_json_records(path: Path, *, key: str) -> Rows:
    """Read a JSON object of objects (`{"name": {"field": value}}`) as rows of text cells,
    with the outer key stored under `key`."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()):
        raise ManifestError(f"{path}: expected an object keyed by {key}, each value an object")
    return [(f"{path} entry {name!r}", {key: name, **{k: text_cell(v) for k, v in fields.items()}})
            for name, fields in records.items()]


def check_missing(missing: list[str], *, total: int, source: str | Path,
                  audio_dir: str | Path, skip_missing: bool) -> dict[str, list[str]]:
    """Raise on labelled utterances without audio unless `skip_missing`; return what was skipped."""
    if missing and not skip_missing:
        raise ManifestError(f"{len(missing)} of {total} utterances in {source} have no audio "
                            f"under {audio_dir} ({listed(missing)}); restore the files or pass "
                            "--skip-missing to leave them out")
    return {"without audio": missing} if missing else {}


def audio_seconds(path: str) -> float | None:
    """Duration from the file header (nothing is decoded); None when the header is unreadable."""
    try:
        info = sf.info(path)
    except RuntimeError:  # soundfile.LibsndfileError
        return None
    return info.frames / info.samplerate if info.samplerate else None


def relative_path(path: str, folder: str) -> str:
    """`path` relative to `folder` with '/' separators (absolute across Windows drives)."""
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:
        return Path(path).as_posix()


@dataclass(frozen=True)
class LabelRange:
    low: float
    high: float
    count: int  # rows with a value; the rest are blank


@dataclass(frozen=True)
class PrepareSummary:
    """What a recipe wrote. `str(summary)` is the report the CLI prints.

    Attributes:
        manifest: the file written.
        utterances: rows per split ('' when a row has no split).
        hours: hours of audio per split, from file headers.
        label_ranges: numeric label columns: lowest, highest and how many rows have a value.
        label_values: text label columns: rows per value.
        skipped: rows left out, by reason: their names.
        notes: things kept but worth a look, one line each.
    """

    manifest: Path
    utterances: dict[str, int]
    hours: dict[str, float]
    label_ranges: dict[str, LabelRange]
    label_values: dict[str, dict[str, int]]
    skipped: dict[str, list[str]]
    notes: list[str]

    def __str__(self) -> str:
        total = sum(self.utterances.values())
        lines = [f"wrote {self.manifest}: {total} utterances, "
                 f"{sum(self.hours.values()):.2f} hours of audio"]
        for split, count in self.utterances.items():
            lines.append(f"  {split or '(no split)'}: {count} utterances, "
                         f"{self.hours[split]:.2f} h")
        for name, span in self.label_ranges.items():
            lines.append(f"  {name}: {span.low:g} .. {span.high:g} ({span.count} of {total} set)")
        for name, counts in self.label_values.items():
            if len(counts) > 12:
                lines.append(f"  {name}: {len(counts)} distinct values")
            else:
                lines.append(f"  {name}: " + ", ".join(f"{value or '(blank)'} {count}"
                                                       for value, count in counts.items()))
        for reason, names in self.skipped.items():
            lines.append(f"  skipped {len(names)} {reason}: {listed(names)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _split_key(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def _is_numeric(name: str, rows: list[dict[str, str]]) -> bool:
    values = [row[name] for row in rows if row[name]]
    return (name not in TEXT_COLUMNS and bool(values)
            and all(as_number(v) is not None for v in values))


def write_manifest(rows: list[dict[str, str]], *, columns: list[str], out: Path) -> None:
    """Write CSV (or Parquet for `.parquet`) through a temporary file renamed into place, so
    a reader never sees half a manifest. In Parquet, blank cells are nulls and label columns
    that hold numbers are float64."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if out.suffix.lower() == ".parquet":
            arrays = {}
            for name in columns:
                if _is_numeric(name, rows):
                    arrays[name] = pa.array([as_number(r[name]) if r[name] else None for r in rows],
                                            pa.float64())
                else:
                    arrays[name] = pa.array([r[name] or None for r in rows], pa.string())
            pq.write_table(pa.table(arrays), tmp)
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(columns)
                writer.writerows([row[name] for name in columns] for row in rows)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def finish(rows: list[dict[str, str]], *, columns: list[str], out: Path,
           skipped: dict[str, list[str]], notes: list[str] | None = None) -> PrepareSummary:
    """Measure, write and summarise a recipe's rows.

    Args:
        rows: one dict per utterance with every name in `columns`; `path` is the audio
            file's path (absolute or relative to the working directory).
        columns: the manifest's columns, `id, path, split` first.
        out: the manifest to write; paths are written relative to its folder.
        skipped: rows left out, by reason.
        notes: things kept but worth a look.

    Raises:
        ManifestError: two rows share an id.
    """
    notes = list(notes or [])
    first_path: dict[str, str] = {}
    for row in rows:
        if row["id"] in first_path:
            raise ManifestError(f"id {row['id']!r} names two files: {first_path[row['id']]} and "
                                f"{row['path']}; ids must be unique")
        first_path[row["id"]] = row["path"]
    rows = sorted(rows, key=lambda row: (_split_key(row["split"]), row["id"]))
    logger.info("reading the headers of %d audio files", len(rows))
    with ThreadPoolExecutor(max_workers=8) as pool:  # header reads wait on the disk, not the CPU
        seconds = list(pool.map(audio_seconds, [row["path"] for row in rows]))
    unreadable = [row["id"] for row, s in zip(rows, seconds) if s is None]
    if unreadable:
        notes.append(f"{len(unreadable)} audio file(s) with a header soundfile cannot read, kept "
                     f"(`ser cache build` will report them): {listed(unreadable)}")

    folder = os.path.abspath(out.parent)
    rows = [{**row, "path": relative_path(os.path.abspath(row["path"]), folder)} for row in rows]
    write_manifest(rows, columns=columns, out=out)

    utterances: dict[str, int] = {}
    hours: dict[str, float] = {}
    for row, s in zip(rows, seconds):
        utterances[row["split"]] = utterances.get(row["split"], 0) + 1
        hours[row["split"]] = hours.get(row["split"], 0.0) + (s or 0.0) / 3600
    label_ranges, label_values = {}, {}
    for name in columns[3:]:
        if _is_numeric(name, rows):
            values = [as_number(row[name]) for row in rows if row[name]]
            label_ranges[name] = LabelRange(min(values), max(values), len(values))
        else:
            label_values[name] = dict(Counter(row[name] for row in rows).most_common())
    return PrepareSummary(manifest=out, utterances=utterances, hours=hours,
                          label_ranges=label_ranges, label_values=label_values,
                          skipped={k: v for k, v in skipped.items() if v}, notes=notes)
