"""IEMOCAP (USC SAIL) to a manifest: turn lines of `Session{n}/dialog/EmoEvaluation/*.txt`
joined with `Session{n}/sentences/wav/<dialog>/<turn>.wav`, split by session."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError, ManifestError
from .common import (CORPUS_COLUMNS, PrepareSummary, Rows, check_missing, check_out, finish,
                     number_cell)

SESSIONS = range(1, 6)
# `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`;
# the bracket holds valence, activation, dominance, in that order.
TURN_LINE = re.compile(r"\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(\S+)\s+(\S+)\s+\[([^\]]*)\]\s*")
# Ses01F_impro01_F000: session 01, dialog Ses01F_impro01, spoken by the session's F actor.
TURN_NAME = re.compile(r"(Ses\d\d)[FM]_.+_([FM])\d+")
EMOTIONS = {"neu": "neutral", "ang": "angry", "hap": "happy", "exc": "excited", "sad": "sad",
            "fru": "frustrated", "fea": "fear", "sur": "surprise", "dis": "disgust",
            "oth": "other", "xxx": "no_agreement"}


def _turns(path: Path) -> Rows:
    """The turn lines of one EmoEvaluation file; headers and annotator lines are ignored."""
    turns = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.startswith("["):
                continue  # `%` header, `C-E1:` / `A-E1:` annotator lines, blank lines
            where = f"{path} line {number}"
            match = TURN_LINE.fullmatch(line.rstrip("\r\n"))
            values = match.group(3).split(",") if match else []
            if len(values) != 3:
                raise ManifestError(f"{where}: expected '[start - end]<TAB>turn<TAB>category"
                                    f"<TAB>[V, A, D]', got {line.strip()!r}; fix the line")
            turn, category = match.group(1), match.group(2)
            name = TURN_NAME.fullmatch(turn)
            if not name:
                raise ManifestError(f"{where}: turn name {turn!r} is not like "
                                    "Ses01F_impro01_F000; fix the line")
            if category not in EMOTIONS:
                raise ManifestError(f"{where}: category {category!r} is not one of "
                                    f"{', '.join(EMOTIONS)}; fix the line")
            valence, activation, dominance = (value.strip() for value in values)
            turns.append((where, {
                "id": turn,
                "dialog": turn.rsplit("_", 1)[0],
                "activation": number_cell(activation, field="activation", where=where),
                "valence": number_cell(valence, field="valence", where=where),
                "dominance": number_cell(dominance, field="dominance", where=where),
                "speaker": f"{name.group(1)}_{name.group(2)}",
                "session": name.group(1),  # for leave-one-session-out folds
                "gender": name.group(2),
                "emotion": EMOTIONS[category],
            }))
    return turns


def prepare_iemocap(root: str | Path, *, out: str | Path, test_session: int = 5,
                    dev_session: int = 4, skip_missing: bool = False) -> PrepareSummary:
    """Write a manifest for IEMOCAP (the `IEMOCAP_full_release` folder).

    Labels stay on the corpus's 1..5 scale. Speakers are `Ses01_F`, `Ses01_M`, ... (each
    session has one female and one male actor); gender is F/M from the turn name's last
    segment; categories become words (`xxx`, no agreement, becomes `no_agreement`).

    Args:
        root: the release folder, holding `Session1` .. `Session5`.
        out: the manifest to write (.csv or .parquet); audio paths are relative to its folder.
        test_session: the session whose turns make the `test` split.
        dev_session: the session whose turns make the `dev` split; the rest are `train`.
        skip_missing: leave out turns whose audio is missing instead of failing.

    Returns:
        What was written; `str()` of it is a readable report.

    Raises:
        ConfigError: sessions outside 1..5 or equal, or `out` not .csv/.parquet.
        ManifestError: no EmoEvaluation files, a malformed turn line, or missing audio
            (without `skip_missing`).
    """
    root, out = Path(root), Path(out)
    if test_session not in SESSIONS or dev_session not in SESSIONS or test_session == dev_session:
        raise ConfigError(f"--test-session {test_session} and --dev-session {dev_session}: "
                          "pick two different sessions from 1..5")
    check_out(out)
    rows, missing, notes, total = [], [], [], 0
    for session in SESSIONS:
        evaluations = sorted(path for path in
                             (root / f"Session{session}" / "dialog" / "EmoEvaluation").glob("*.txt")
                             if not path.name.startswith("."))  # macOS `._` files
        if not evaluations:
            notes.append(f"Session{session}: no dialog/EmoEvaluation/*.txt, none of its turns "
                         "are in the manifest")
        split = {test_session: "test", dev_session: "dev"}.get(session, "train")
        for evaluation in evaluations:
            for _, turn in _turns(evaluation):
                total += 1
                audio = (root / f"Session{session}" / "sentences" / "wav" / turn.pop("dialog")
                         / f"{turn['id']}.wav")
                if audio.is_file():
                    rows.append({**turn, "path": str(audio), "split": split})
                else:
                    missing.append(turn["id"])
    if not total:
        raise ManifestError(f"{root}: no turns in Session1..5/dialog/EmoEvaluation/*.txt; ROOT "
                            "should be the IEMOCAP_full_release folder")
    skipped = check_missing(missing, total=total, source=f"{root}/Session*/dialog/EmoEvaluation",
                            audio_dir=f"{root}/Session*/sentences/wav",
                            skip_missing=skip_missing)
    return finish(rows, columns=[*CORPUS_COLUMNS, "session"], out=out, skipped=skipped, notes=notes)
