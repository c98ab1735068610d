"""Dataset recipes on miniature copies of each release layout, checked row by row."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from click.testing import CliRunner

from cachegen.errors import ConfigError, ManifestError
from cachegen.recipes import SplitRule, prepare_folder, prepare_iemocap, prepare_msp_podcast
from cli import cache, main

CORPUS_COLUMNS = ["id", "path", "split", "activation", "valence", "dominance", "speaker",
                  "gender", "emotion"]


def write_audio(path: Path, seconds: float, *, sample_rate: int = 16000, fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    sf.write(path, 0.1 * rng.standard_normal(int(seconds * sample_rate)), sample_rate, format=fmt)


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def by_id(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["id"]: row for row in rows}


def assert_paths_resolve(manifest: Path, rows: list[dict[str, str]]):
    for row in rows:
        assert not os.path.isabs(row["path"]) and "\\" not in row["path"]
        assert (manifest.parent / row["path"]).is_file(), row


# --- MSP-Podcast -----------------------------------------------------------------------------

MSP_HEADER = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]
MSP_ROWS = [  # the last one has no audio
    ["MSP-PODCAST_0001_0001.wav", "N", "4.2", "3.8", "4.0", "127", "Female", "Train"],
    ["MSP-PODCAST_0001_0002.wav", "A", "6.0", "2.0", "5.5", "127", "Female", "Train"],
    ["MSP-PODCAST_0002_0001.wav", "X", "3.4", "4.4", "3.0", "200", "Male", "Development"],
    ["MSP-PODCAST_0003_0001.wav", "H", "", "5.0", "", "Unknown", "Unknown", "Test1"],
    ["MSP-PODCAST_0004_0001.wav", "S", "2.0", "1.5", "2.5", "300", "Male", "Test2"],
    ["MSP-PODCAST_0005_0001.wav", "", "", "", "", "", "", "Test3"],
    ["MSP-PODCAST_0006_0001.wav", "C", "4.0", "4.0", "4.0", "301", "Female", "Train"],
]
MSP_SECONDS = [0.5, 0.75, 1.0, 0.25, 0.5, 0.5]


def json_value(text: str):
    """A cell as the JSON release writes it: numbers as numbers, blanks as null."""
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text or None


def msp_release(root: Path, *, labels: str = "csv", rows=MSP_ROWS) -> Path:
    for row, seconds in zip(MSP_ROWS[:-1], MSP_SECONDS):
        write_audio(root / "Audios" / row[0], seconds)
    (root / "Labels").mkdir(parents=True)
    if labels == "csv":  # as exported on Windows: BOM and CRLF
        lines = [",".join(MSP_HEADER)] + [",".join(row) for row in rows]
        (root / "Labels" / "labels_consensus.csv").write_bytes(
            ("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    else:
        records = {row[0]: dict(zip(MSP_HEADER[1:], map(json_value, row[1:]))) for row in rows}
        (root / "Labels" / "labels_consensus.json").write_text(json.dumps(records, indent=1))
    return root


def test_msp_podcast_rows(tmp_path):
    root = msp_release(tmp_path / "MSP-Podcast")
    out = tmp_path / "manifests" / "msp.csv"
    summary = prepare_msp_podcast(root, out=out, skip_missing=True)

    with open(out, newline="") as f:
        assert next(csv.reader(f)) == CORPUS_COLUMNS
    rows = by_id(read_manifest(out))
    assert_paths_resolve(out, list(rows.values()))
    assert set(rows) == {row[0][:-4] for row in MSP_ROWS[:-1]}
    assert rows["MSP-PODCAST_0001_0001"] == {
        "id": "MSP-PODCAST_0001_0001", "path": "../MSP-Podcast/Audios/MSP-PODCAST_0001_0001.wav",
        "split": "train", "activation": "4.2", "valence": "3.8", "dominance": "4.0",
        "speaker": "127", "gender": "F", "emotion": "neutral"}
    assert rows["MSP-PODCAST_0001_0002"]["emotion"] == "angry"
    no_agreement = rows["MSP-PODCAST_0002_0001"]  # X keeps its dimensional labels
    assert (no_agreement["split"], no_agreement["emotion"], no_agreement["activation"],
            no_agreement["gender"]) == ("dev", "no_agreement", "3.4", "M")
    blank = rows["MSP-PODCAST_0003_0001"]  # blank stays blank, Unknown becomes blank
    assert (blank["split"], blank["activation"], blank["valence"], blank["dominance"],
            blank["speaker"], blank["gender"], blank["emotion"]) == ("test1", "", "5.0", "", "", "",
                                                                     "happy")
    assert rows["MSP-PODCAST_0004_0001"]["split"] == "test2"
    assert rows["MSP-PODCAST_0005_0001"]["split"] == "test3"
    assert rows["MSP-PODCAST_0005_0001"]["activation"] == ""

    assert summary.utterances == {"train": 2, "dev": 1, "test1": 1, "test2": 1, "test3": 1}
    assert sum(summary.hours.values()) == pytest.approx(sum(MSP_SECONDS) / 3600)
    assert summary.hours["train"] == pytest.approx(1.25 / 3600)
    assert (summary.label_ranges["activation"].low, summary.label_ranges["activation"].high,
            summary.label_ranges["activation"].count) == (2.0, 6.0, 4)
    assert summary.skipped == {"without audio": ["MSP-PODCAST_0006_0001.wav"]}
    text = str(summary)
    assert "train: 2 utterances" in text and "skipped 1 without audio" in text


def test_msp_podcast_missing_audio_is_an_error_that_writes_nothing(tmp_path):
    root = msp_release(tmp_path / "MSP-Podcast")
    out = tmp_path / "msp.csv"
    out.write_text("previous manifest\n")
    message = r"1 of 7 .* \(MSP-PODCAST_0006_0001.wav\).*--skip-missing"
    with pytest.raises(ManifestError, match=message):
        prepare_msp_podcast(root, out=out)
    assert out.read_text() == "previous manifest\n"
    assert sorted(os.listdir(tmp_path)) == ["MSP-Podcast", "msp.csv"]  # no temporary file left


def test_msp_podcast_json_labels_match_csv(tmp_path):
    from_csv = prepare_msp_podcast(msp_release(tmp_path / "a"), out=tmp_path / "a.csv",
                                   skip_missing=True)
    from_json = prepare_msp_podcast(msp_release(tmp_path / "b", labels="json"),
                                    out=tmp_path / "b.csv", skip_missing=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "path"} for r in rows]  # noqa: E731
    assert strip(read_manifest(tmp_path / "a.csv")) == strip(read_manifest(tmp_path / "b.csv"))
    assert from_json.skipped == from_csv.skipped


def test_msp_podcast_prefers_csv_over_json(tmp_path):
    root = msp_release(tmp_path / "MSP-Podcast")
    (root / "Labels" / "labels_consensus.json").write_text(json.dumps(
        {row[0]: {"EmoAct": 1.0, "Split_Set": "Train"} for row in MSP_ROWS}))
    prepare_msp_podcast(root, out=tmp_path / "msp.csv", skip_missing=True)
    rows = by_id(read_manifest(tmp_path / "msp.csv"))
    assert rows["MSP-PODCAST_0001_0001"]["activation"] == "4.2"


def test_msp_podcast_bad_rows_are_named(tmp_path):
    bad_split = MSP_ROWS[:2] + [["MSP-PODCAST_0002_0001.wav", "N", "3", "3", "3", "1", "Male",
                                 "Validation"]]
    root = msp_release(tmp_path / "a", rows=bad_split)
    with pytest.raises(ManifestError, match=r"labels_consensus.csv line 4: Split_Set 'Validation'"):
        prepare_msp_podcast(root, out=tmp_path / "a.csv")
    not_number = MSP_ROWS[:1] + [["MSP-PODCAST_0001_0002.wav", "A", "high", "2", "5", "1", "Male",
                                  "Train"]]
    root = msp_release(tmp_path / "b", rows=not_number)
    with pytest.raises(ManifestError, match=r"line 3: EmoAct 'high' is not a number"):
        prepare_msp_podcast(root, out=tmp_path / "b.csv")


def test_msp_podcast_parquet_output_keeps_blanks_as_nulls(tmp_path):
    out = tmp_path / "msp.parquet"
    prepare_msp_podcast(msp_release(tmp_path / "MSP-Podcast"), out=out, skip_missing=True)
    table = pq.read_table(out)
    assert table.column_names == CORPUS_COLUMNS
    assert table.schema.field("activation").type == pa.float64()
    assert table.schema.field("speaker").type == pa.string()
    rows = {row["id"]: row for row in table.to_pylist()}
    assert rows["MSP-PODCAST_0003_0001"]["activation"] is None
    assert rows["MSP-PODCAST_0003_0001"]["valence"] == 5.0
    assert rows["MSP-PODCAST_0001_0001"]["speaker"] == "127"
    assert_paths_resolve(out, table.to_pylist())


# --- IEMOCAP ---------------------------------------------------------------------------------

def iemocap_turns(session: int) -> list[tuple[str, str, str]]:
    """(turn, category, '[V, A, D]') per turn; distinct V, A, D values expose a swapped order."""
    dialog = f"Ses0{session}F_impro01"
    return [(f"{dialog}_F000", "neu", f"[1.5000, 4.0000, 3.{session}000]"),
            (f"{dialog}_M000", "xxx" if session == 1 else "ang", "[2.0000, 5.0000, 4.5000]")]


def iemocap_release(root: Path, *, missing: str | None = None) -> Path:
    for session in range(1, 6):
        dialog = f"Ses0{session}F_impro01"
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        for i, (turn, category, vad) in enumerate(iemocap_turns(session)):
            lines += [f"[{i}.2901 - {i}.9000]\t{turn}\t{category}\t{vad}",
                      "C-E2:\tNeutral;\t()", "C-E3:\tNeutral;\t()",
                      "A-E3:\tval 3; act 2; dom  2;\t()", ""]
            if turn != missing:
                wav = root / f"Session{session}" / "sentences" / "wav" / dialog / f"{turn}.wav"
                write_audio(wav, 0.25 * (i + 1))
        evaluation = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        evaluation.mkdir(parents=True)
        newline = "\r\n" if session == 2 else "\n"
        (evaluation / f"{dialog}.txt").write_bytes(newline.join(lines).encode())
        (evaluation / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07junk")  # macOS copy
    return root


def test_iemocap_rows(tmp_path):
    root = iemocap_release(tmp_path / "IEMOCAP_full_release")
    out = tmp_path / "iemocap.csv"
    summary = prepare_iemocap(root, out=out)

    rows = by_id(read_manifest(out))
    assert len(rows) == 10
    assert_paths_resolve(out, list(rows.values()))
    assert rows["Ses01F_impro01_F000"] == {
        "id": "Ses01F_impro01_F000",
        "path": ("IEMOCAP_full_release/Session1/sentences/wav/Ses01F_impro01/"
                 "Ses01F_impro01_F000.wav"),
        "split": "train", "activation": "4.0", "valence": "1.5", "dominance": "3.1",
        "speaker": "Ses01_F", "gender": "F", "emotion": "neutral", "session": "Ses01"}
    male = rows["Ses01F_impro01_M000"]
    assert (male["speaker"], male["gender"], male["emotion"]) == ("Ses01_M", "M", "no_agreement")
    assert rows["Ses02F_impro01_F000"]["dominance"] == "3.2"  # the CRLF file
    assert rows["Ses03F_impro01_M000"]["emotion"] == "angry"
    assert {uid: row["split"] for uid, row in rows.items() if row["split"] != "train"} == {
        "Ses04F_impro01_F000": "dev", "Ses04F_impro01_M000": "dev",
        "Ses05F_impro01_F000": "test", "Ses05F_impro01_M000": "test"}
    assert summary.utterances == {"train": 6, "dev": 2, "test": 2}
    assert sum(summary.hours.values()) == pytest.approx(5 * 0.75 / 3600)
    assert summary.label_values["speaker"]["Ses05_M"] == 1
    assert summary.label_ranges["valence"].high == 2.0


def test_iemocap_sessions_choose_splits(tmp_path):
    root = iemocap_release(tmp_path / "IEMOCAP")
    summary = prepare_iemocap(root, out=tmp_path / "m.csv", test_session=1, dev_session=2)
    splits = {row["id"][:5]: row["split"] for row in read_manifest(tmp_path / "m.csv")}
    assert splits == {"Ses01": "test", "Ses02": "dev", "Ses03": "train", "Ses04": "train",
                      "Ses05": "train"}
    assert summary.utterances == {"train": 6, "dev": 2, "test": 2}
    with pytest.raises(ConfigError, match="two different sessions"):
        prepare_iemocap(root, out=tmp_path / "m.csv", test_session=3, dev_session=3)


def test_iemocap_missing_audio(tmp_path):
    root = iemocap_release(tmp_path / "IEMOCAP", missing="Ses03F_impro01_M000")
    with pytest.raises(ManifestError, match=r"1 of 10 .*\(Ses03F_impro01_M000\).*--skip-missing"):
        prepare_iemocap(root, out=tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()
    summary = prepare_iemocap(root, out=tmp_path / "m.csv", skip_missing=True)
    assert "Ses03F_impro01_M000" not in by_id(read_manifest(tmp_path / "m.csv"))
    assert summary.skipped == {"without audio": ["Ses03F_impro01_M000"]}


def test_iemocap_malformed_turn_line_is_named(tmp_path):
    root = iemocap_release(tmp_path / "IEMOCAP")
    evaluation = root / "Session3" / "dialog" / "EmoEvaluation" / "Ses03F_impro01.txt"
    two_values = "[9.0 - 9.5]\tSes03F_impro01_F009\tneu\t[2.0, 3.0]\n"
    evaluation.write_text(evaluation.read_text() + two_values)
    with pytest.raises(ManifestError, match=r"Ses03F_impro01.txt line \d+: expected"):
        prepare_iemocap(root, out=tmp_path / "m.csv")


# --- plain folder ----------------------------------------------------------------------------

def folder_corpus(root: Path) -> Path:
    write_audio(root / "spk1" / "a.wav", 0.5)
    write_audio(root / "spk1" / "b.flac", 0.25)
    write_audio(root / "spk2" / "c.ogg", 0.5, fmt="OGG")
    write_audio(root / "top.wav", 1.0)
    write_audio(root / ".trash" / "old.wav", 0.25)
    (root / "notes.txt").write_text("not audio")
    return root


def write_labels(path: Path, text: str) -> Path:
    path.write_bytes(("\ufeff" + text.replace("\n", "\r\n")).encode())
    return path


def test_folder_with_labels_and_hash_split(tmp_path):
    root = folder_corpus(tmp_path / "clips")
    labels = write_labels(tmp_path / "labels.csv", "id,activation,valence,mood\n"
                          "spk1/a,0.5,0.25,calm\n"
                          "spk1/b,,0.75,\n"  # blank labels
                          "spk2/c,0.9,0.1,tense\n"
                          "ghost,1,1,calm\n")  # no audio
    out = tmp_path / "clips.csv"
    summary = prepare_folder(root, out=out, labels=labels)

    rows = by_id(read_manifest(out))
    assert list(read_manifest(out)[0]) == ["id", "path", "split", "activation", "valence", "mood"]
    assert set(rows) == {"spk1/a", "spk1/b", "spk2/c", "top"}
    assert_paths_resolve(out, list(rows.values()))
    assert rows["spk2/c"]["path"] == "clips/spk2/c.ogg"
    assert (rows["spk1/a"]["activation"], rows["spk1/a"]["mood"]) == ("0.5", "calm")
    assert (rows["spk1/b"]["activation"], rows["spk1/b"]["valence"]) == ("", "0.75")
    assert rows["top"]["activation"] == rows["top"]["mood"] == ""
    for uid, row in rows.items():
        assert row["split"] == SplitRule().split_of(uid)
    assert summary.skipped == {"label rows without audio": ["ghost"]}
    assert any("1 audio file(s) without a label row" in note and "top" in note
               for note in summary.notes)
    assert sum(summary.hours.values()) == pytest.approx(2.25 / 3600, rel=1e-3)
    assert summary.label_ranges["activation"].count == 2


def test_folder_column_split_from_parquet_labels(tmp_path):
    root = folder_corpus(tmp_path / "clips")
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"id": ["spk1/a", "spk1/b", "spk2/c", "top"],
                             "fold": ["train", "train", "test", "dev"],
                             "valence": [1.0, None, 3.5, 2.0]}), labels)
    out = tmp_path / "clips.parquet"
    summary = prepare_folder(root, out=out, labels=labels, split="column:fold")
    table = pq.read_table(out)
    assert table.column_names == ["id", "path", "split", "valence"]
    rows = {row["id"]: row for row in table.to_pylist()}
    assert {uid: row["split"] for uid, row in rows.items()} == {
        "spk1/a": "train", "spk1/b": "train", "spk2/c": "test", "top": "dev"}
    assert rows["spk1/b"]["valence"] is None and rows["spk2/c"]["valence"] == 3.5
    assert summary.utterances == {"train": 2, "dev": 1, "test": 1}


def test_folder_keeps_audio_with_an_unreadable_header_and_says_so(tmp_path):
    root = folder_corpus(tmp_path / "clips")
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    summary = prepare_folder(root, out=tmp_path / "m.csv")
    assert "broken" in by_id(read_manifest(tmp_path / "m.csv"))
    assert any("cannot read" in note and "broken" in note for note in summary.notes)
    assert sum(summary.hours.values()) == pytest.approx(2.25 / 3600, rel=1e-3)


def test_hash_split_is_stable_and_proportional(tmp_path):
    rule = SplitRule.parse("hash:80/10/10")
    ids = [f"speaker{i % 37}/utt{i:05d}" for i in range(10000)]
    splits = [rule.split_of(uid) for uid in ids]
    assert splits.count("train") / 10000 == pytest.approx(0.8, abs=0.015)
    assert splits.count("dev") / 10000 == pytest.approx(0.1, abs=0.01)
    assert splits.count("test") / 10000 == pytest.approx(0.1, abs=0.01)
    # pinned: a change here reshuffles every team's folder splits
    assert [rule.split_of(f"utt{i}") for i in range(8)] == ["dev", "train", "train", "test",
                                                            "train", "dev", "dev", "test"]
    # the same in a fresh interpreter with another string-hash seed
    code = ("from cachegen.recipes import SplitRule; r = SplitRule.parse('hash:80/10/10'); "
            "print(','.join(r.split_of(f'speaker{i % 37}/utt{i:05d}') for i in range(300)))")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert fresh.stdout.strip().split(",") == splits[:300]
    assert SplitRule.parse("hash:50/0/50").split_of("x") in ("train", "test")
    assert {SplitRule.parse("hash:0/100/0").split_of(uid) for uid in ids[:50]} == {"dev"}


def test_folder_errors_name_the_fix(tmp_path):
    root = folder_corpus(tmp_path / "clips")
    with pytest.raises(ConfigError, match="hash:TRAIN/DEV/TEST"):
        prepare_folder(root, out=tmp_path / "m.csv", split="hash:80/10")
    with pytest.raises(ConfigError, match="needs --labels"):
        prepare_folder(root, out=tmp_path / "m.csv", split="column:fold")
    with pytest.raises(ConfigError, match=".csv or .parquet"):
        prepare_folder(root, out=tmp_path / "m.tsv")
    with_extension = write_labels(tmp_path / "ext.csv", "id,valence\nspk1/a.wav,1\n")
    with pytest.raises(ManifestError, match="no id matches an audio file .*'spk1/a.wav'"):
        prepare_folder(root, out=tmp_path / "m.csv", labels=with_extension)
    twice = write_labels(tmp_path / "twice.csv", "id,valence\nspk1/a,1\nspk1/a,2\n")
    with pytest.raises(ManifestError, match=r"twice.csv line 3: id 'spk1/a' appears twice"):
        prepare_folder(root, out=tmp_path / "m.csv", labels=twice)
    odd = write_labels(tmp_path / "odd.csv", "id,valence\nspk1/a,1,2\n")
    with pytest.raises(ManifestError, match=r"odd.csv line 2: 3 cells but the header has 2"):
        prepare_folder(root, out=tmp_path / "m.csv", labels=odd)
    write_audio(root / "spk1" / "a.flac", 0.25)
    with pytest.raises(ManifestError, match="share the id 'spk1/a'"):
        prepare_folder(root, out=tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


# --- the command line ------------------------------------------------------------------------

def test_cli_prepare_commands(tmp_path):
    runner = CliRunner()

    def prepare(*args):
        return runner.invoke(main, ["prepare", *map(str, args)])

    msp = msp_release(tmp_path / "MSP-Podcast")
    result = prepare("msp-podcast", msp, "--out", tmp_path / "m.csv")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("ser: error: 1 of 7 utterances")
    assert "--skip-missing" in result.output and not (tmp_path / "m.csv").exists()

    result = prepare("msp-podcast", msp, "--out", tmp_path / "m.csv", "--skip-missing")
    assert result.exit_code == 0, result.output
    assert "6 utterances" in result.output and "test3: 1 utterances" in result.output
    assert len(read_manifest(tmp_path / "m.csv")) == 6

    iemocap = iemocap_release(tmp_path / "IEMOCAP")
    result = prepare("iemocap", iemocap, "--out", tmp_path / "i.csv", "--test-session", 2,
                     "--dev-session", 3)
    assert result.exit_code == 0, result.output
    assert "test: 2 utterances" in result.output
    assert by_id(read_manifest(tmp_path / "i.csv"))["Ses02F_impro01_M000"]["split"] == "test"
    result = prepare("iemocap", iemocap, "--out", tmp_path / "i.csv", "--test-session", 7)
    assert result.exit_code == 1 and "ser: error: --test-session 7" in result.output

    clips = folder_corpus(tmp_path / "clips")
    result = prepare("folder", clips, "--out", tmp_path / "f.csv")
    assert result.exit_code == 0, result.output
    assert len(read_manifest(tmp_path / "f.csv")) == 4
    result = prepare("folder", clips, "--out", tmp_path / "f.csv", "--split", "random")
    assert result.exit_code == 1 and "ser: error: --split 'random'" in result.output
    result = prepare("folder", tmp_path / "nowhere", "--out", tmp_path / "x.csv")
    assert result.exit_code == 2  # click's own usage error


@pytest.mark.skipif("build" not in cache.commands, reason="`ser cache build` is not registered yet")
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_recipe_output_feeds_cache_build(tmp_path, suffix):
    from cachegen.reader import open_cache
    from cachegen.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    manifest = tmp_path / "manifests" / f"msp{suffix}"
    prepare_msp_podcast(msp_release(tmp_path / "MSP-Podcast"), out=manifest, skip_missing=True)
    store = tmp_path / "msp.zarr"
    result = CliRunner().invoke(main, ["cache", "build", str(manifest), "--model", str(model),
                                       "--layers", "2", "--out", str(store), "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    with open_cache(store) as reader:
        assert sorted(reader.ids) == sorted(row[0][:-4] for row in MSP_ROWS[:-1])
