"""A plain folder of audio files to a manifest, with an optional labels table joined by id
and a split rule (`hash:80/10/10` or `column:NAME`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from ..errors import ConfigError, ManifestError
from .common import PrepareSummary, check_out, finish, listed, read_table

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}
if "MP3" in sf.available_formats():  # libsndfile >= 1.1
    AUDIO_SUFFIXES.add(".mp3")


@dataclass(frozen=True)
class SplitRule:
    """How `prepare_folder` assigns splits.

    Either `shares`, the percentages of train, dev and test drawn by a stable hash of the id
    (`hash:80/10/10`), or `column`, a column of the labels table that holds the split
    (`column:fold`).
    """

    shares: tuple[float, float, float] = (80.0, 10.0, 10.0)
    column: str | None = None

    @classmethod
    def parse(cls, text: str) -> SplitRule:
        """Read `hash:TRAIN/DEV/TEST` (percentages summing to 100) or `column:NAME`.

        Raises:
            ConfigError: any other text.
        """
        kind, _, value = text.partition(":")
        if kind == "column" and value:
            return cls(column=value)
        if kind == "hash":
            try:
                shares = tuple(float(share) for share in value.split("/"))
            except ValueError:
                shares = ()
            if len(shares) == 3 and min(shares) >= 0 and abs(sum(shares) - 100) < 1e-6:
                return cls(shares=shares)
        raise ConfigError(f"--split {text!r}: use hash:TRAIN/DEV/TEST with percentages that sum "
                          "to 100 (e.g. hash:80/10/10) or column:NAME")

    def split_of(self, uid: str) -> str:
        """The split of `uid` under the hash rule: the same on every run and machine."""
        digest = hashlib.sha1(uid.encode("utf-8")).digest()
        percent = int.from_bytes(digest[:8], "big") / 2**64 * 100
        train, dev, _ = self.shares
        return "train" if percent < train else "dev" if percent < train + dev else "test"


def _audio_files(root: Path) -> dict[str, Path]:
    """Audio files under `root` by id (relative path without extension, '/' separators);
    hidden files and folders are ignored."""
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if (path.suffix.lower() not in AUDIO_SUFFIXES or not path.is_file()
                or any(part.startswith(".") for part in relative.parts)):
            continue
        uid = relative.with_suffix("").as_posix()
        if uid in files:
            raise ManifestError(f"{files[uid]} and {path} would share the id {uid!r}; rename "
                                "or move one of them")
        files[uid] = path
    return files


def prepare_folder(root: str | Path, *, out: str | Path, labels: str | Path | None = None,
                   split: str = "hash:80/10/10") -> PrepareSummary:
    """Write a manifest for every audio file (wav, flac, ogg, and mp3 where soundfile reads
    it) under a folder.

    The id of a file is its path under `root` without the extension (`spk1/utt3`). Every
    column of the labels table other than `id` (and a split column) becomes a label column.
    Audio without a label row is kept with blank labels; label rows without audio are left
    out; both are reported. The hash split draws from the id alone, so one speaker's files
    can land in several splits: use `column:NAME` for speaker-independent splits.

    Args:
        root: the folder to scan, recursively.
        out: the manifest to write (.csv or .parquet); audio paths are relative to its folder.
        labels: optional CSV or Parquet table with an `id` column.
        split: `hash:TRAIN/DEV/TEST` percentages, or `column:NAME` of the labels table.

    Returns:
        What was written; `str()` of it is a readable report.

    Raises:
        ConfigError: a bad split rule, `column:` without labels, or `out` not .csv/.parquet.
        ManifestError: no audio, two files with one id, a labels table without `id` or the
            split column, duplicate or blank label ids, or no label id matching any file.

    Example:
        >>> prepare_folder("clips", out="clips.csv", labels="ratings.csv",
        ...                split="column:fold")  # doctest: +SKIP
    """
    root, out = Path(root), Path(out)
    rule = SplitRule.parse(split)
    if rule.column and labels is None:
        raise ConfigError(f"--split column:{rule.column} needs --labels, the table holding "
                          "that column")
    check_out(out, reads=(labels,))

    header, records = ["id"], []
    if labels is not None:
        labels = Path(labels)
        required = ["id", rule.column] if rule.column else ["id"]
        header, records = read_table(labels, required=required)
        if "path" in header or ("split" in header and rule.column != "split"):
            raise ManifestError(f"{labels}: columns 'path' and 'split' are the manifest's own; "
                                "rename them (or pass --split column:split to use 'split')")
    label_columns = [name for name in header if name not in ("id", rule.column)]
    by_id: dict[str, dict[str, str]] = {}
    for where, record in records:
        if not record["id"]:
            raise ManifestError(f"{where}: blank id; fill it or delete the row")
        if record["id"] in by_id:
            raise ManifestError(f"{where}: id {record['id']!r} appears twice; keep one row")
        if rule.column and not record[rule.column]:
            raise ManifestError(f"{where}: blank {rule.column!r} (the split column); fill it")
        by_id[record["id"]] = record

    files = _audio_files(root)
    if not files:
        raise ManifestError(f"{root}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
    if by_id and not by_id.keys() & files.keys():
        raise ManifestError(f"{labels}: no id matches an audio file (label id "
                            f"{next(iter(by_id))!r}, file id {next(iter(files))!r}); ids are "
                            f"paths under {root} without extension, with '/' separators")

    rows, unlabelled = [], []
    for uid, path in files.items():
        record = by_id.get(uid)
        if record is None and labels is not None:
            unlabelled.append(uid)
        record = record or {}
        rows.append({"id": uid, "path": str(path),
                     "split": record.get(rule.column, "") if rule.column else rule.split_of(uid),
                     **{name: record.get(name, "") for name in label_columns}})
    notes = []
    if unlabelled:
        notes.append(f"{len(unlabelled)} audio file(s) without a label row, kept with blank "
                     f"labels{' and no split' if rule.column else ''}: {listed(unlabelled)}")
    skipped = {"label rows without audio": [uid for uid in by_id if uid not in files]}
    return finish(rows, columns=["id", "path", "split", *label_columns], out=out,
                  skipped=skipped, notes=notes)
