"""MSP-Podcast (UT Dallas MSP lab) to a manifest: `Labels/labels_consensus.csv` (or `.json`)
joined with `Audios/<FileName>`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ManifestError
from .common import (CORPUS_COLUMNS, PrepareSummary, Rows, check_missing, check_out, finish,
                     number_cell, read_json_records, read_table)

FIELDS = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]
SPLITS = {"Train": "train", "Development": "dev", "Test1": "test1", "Test2": "test2",
          "Test3": "test3"}
# X means the annotators did not agree on a category; the row keeps its dimensional labels.
EMOTIONS = {"A": "angry", "S": "sad", "H": "happy", "U": "surprise", "F": "fear",
            "D": "disgust", "C": "contempt", "N": "neutral", "O": "other", "X": "no_agreement"}
GENDERS = {"Female": "F", "Male": "M", "Unknown": ""}


def _labels(root: Path) -> tuple[Path, Rows]:
    """The consensus labels, from the CSV when a release has both CSV and JSON."""
    csv_path = root / "Labels" / "labels_consensus.csv"
    json_path = csv_path.with_suffix(".json")
    if csv_path.is_file():
        return csv_path, read_table(csv_path, required=FIELDS)[1]
    if json_path.is_file():
        return json_path, read_json_records(json_path, key="FileName")
    raise ManifestError(f"{root}: no Labels/labels_consensus.csv or .json; ROOT should be the "
                        "MSP-Podcast release folder holding Audios/ and Labels/")


def _row(where: str, record: dict[str, str], audio_dir: Path) -> dict[str, str]:
    name = record.get("FileName", "")
    if not name:
        raise ManifestError(f"{where}: blank FileName; fill it or delete the row")
    split = record.get("Split_Set", "")
    if split not in SPLITS:
        raise ManifestError(f"{where}: Split_Set {split!r} is not one of "
                            f"{', '.join(SPLITS)}; fix the row")
    emotion = record.get("EmoClass", "")
    if emotion and emotion not in EMOTIONS:
        raise ManifestError(f"{where}: EmoClass {emotion!r} is not one of "
                            f"{', '.join(EMOTIONS)}; fix the cell or leave it blank")
    gender = record.get("Gender", "")
    if gender and gender not in GENDERS:
        raise ManifestError(f"{where}: Gender {gender!r} is not one of "
                            f"{', '.join(GENDERS)}; fix the cell or leave it blank")
    speaker = record.get("SpkrID", "")
    return {
        "id": Path(name).stem,
        "path": str(audio_dir / name),
        "split": SPLITS[split],
        "activation": number_cell(record.get("EmoAct", ""), field="EmoAct", where=where),
        "valence": number_cell(record.get("EmoVal", ""), field="EmoVal", where=where),
        "dominance": number_cell(record.get("EmoDom", ""), field="EmoDom", where=where),
        "speaker": "" if speaker == "Unknown" else speaker,
        "gender": GENDERS.get(gender, ""),
        "emotion": EMOTIONS.get(emotion, ""),
    }


def prepare_msp_podcast(root: str | Path, *, out: str | Path,
                        skip_missing: bool = False) -> PrepareSummary:
    """Write a manifest for an MSP-Podcast release.

    Labels stay on the corpus's 1..7 scale; splits become `train, dev, test1, test2, test3`;
    `EmoClass` codes become words (`X`, no agreement, becomes `no_agreement`); `Gender`
    becomes F/M; `Unknown` speakers and genders are left blank.

    Args:
        root: the release folder, holding `Audios/` and `Labels/labels_consensus.csv`
            (or `labels_consensus.json`; the CSV wins when both exist).
        out: the manifest to write (.csv or .parquet); audio paths are relative to its folder.
        skip_missing: leave out labelled utterances whose audio is missing instead of failing.

    Returns:
        What was written; `str()` of it is a readable report.

    Raises:
        ManifestError: audio is missing (without `skip_missing`), or a row holds an unknown
            split, emotion code or gender, or a label that is not a number.
        ConfigError: `out` does not end with .csv or .parquet.

    Example:
        >>> prepare_msp_podcast("/data/MSP-Podcast", out="msp.csv")  # doctest: +SKIP
    """
    root, out = Path(root), Path(out)
    check_out(out, reads=tuple(root / "Labels" / f"labels_consensus.{kind}" for kind in ("csv", "json")))
    source, records = _labels(root)
    audio_dir = root / "Audios"
    if not audio_dir.is_dir():
        raise ManifestError(f"{audio_dir}: no such folder; ROOT should be the MSP-Podcast "
                            "release folder holding Audios/ and Labels/")
    present = set(os.listdir(audio_dir))  # one listing instead of 100k+ stat calls
    rows, missing = [], []
    for where, record in records:
        row = _row(where, record, audio_dir)
        if record["FileName"] in present:
            rows.append(row)
        else:
            missing.append(record["FileName"])
    skipped = check_missing(missing, total=len(records), source=source, audio_dir=audio_dir,
                            skip_missing=skip_missing)
    return finish(rows, columns=CORPUS_COLUMNS, out=out, skipped=skipped)
