"""`ser predict` in batch use, and training from audio that holds unusable files (issue 11)."""

import errno
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from headtrain import TrainConfig, train
from helpers import read_csv, run_cli

TARGETS = ("activation", "valence", "dominance")


@pytest.fixture(scope="module")
def run_dir(built_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    train(TrainConfig(out=str(out), from_cache=built_store, targets=TARGETS, top_layers=2, epochs=1,
                      batch_size=4, progress=False, workers=1))
    return out


def wav_folder(corpus):
    return corpus.rsplit("/", 1)[0] + "/wav"


@pytest.fixture
def bad_files(tmp_path):
    """An empty file, a garbage file, a file of 100 samples (shorter than the 400-sample
    receptive field) and a file that only looks like audio."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.wav").write_bytes(b"")
    (folder / "garbage.wav").write_bytes(b"RIFF not really a wave file" * 10)
    sf.write(folder / "short.wav", np.zeros(100, dtype=np.float32) + 0.1, 16000)
    (folder / "fake.flac").write_bytes(os.urandom(500))
    return folder


def test_unusable_files_are_skipped_named_and_the_rest_predicted(run_dir, corpus, bad_files, tmp_path):
    good = [f"{wav_folder(corpus)}/utt0001.wav", f"{wav_folder(corpus)}/utt0002.wav"]
    assert run_cli("predict", run_dir, *good, "--out", tmp_path / "alone.csv").exit_code == 0
    bad = sorted(str(p) for p in bad_files.iterdir())
    result = run_cli("predict", run_dir, good[0], *bad, good[1], "--out", tmp_path / "p.csv",
                     "--batch-size", 2)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    for path in bad:
        assert path in result.stderr, path
    assert "shorter than the model's receptive field" in result.stderr
    assert "file is empty" in result.stderr
    assert "4 file(s) skipped" in result.stderr
    rows, alone = read_csv(tmp_path / "p.csv"), read_csv(tmp_path / "alone.csv")
    assert [r["id"] for r in rows] == ["utt0001", "utt0002"]
    assert [r["path"] for r in rows] == good
    for row, reference in zip(rows, alone):  # skipping changes nothing for the others
        for target in TARGETS:
            assert float(row[f"{target}_pred"]) == pytest.approx(float(reference[f"{target}_pred"]), abs=1e-5)


def test_folders_are_searched_and_progress_is_shown(run_dir, corpus, tmp_path):
    folder = tmp_path / "clips"
    shutil.copytree(wav_folder(corpus), folder / "a")
    shutil.copy(f"{wav_folder(corpus)}/utt0003.wav", folder / "top.wav")
    (folder / "notes.txt").write_text("not audio")
    result = run_cli("predict", run_dir, folder, "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.stderr
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == 25 and {"a/utt0000", "top"} <= {r["id"] for r in rows}
    assert all(os.path.isfile(r["path"]) for r in rows)
    assert "predicting" in result.stderr and "utt/s" in result.stderr  # tqdm's bar, with its rate


def test_parquet_output_holds_the_same_predictions(run_dir, corpus, tmp_path):
    files = [f"{wav_folder(corpus)}/utt000{i}.wav" for i in range(4)]
    assert run_cli("predict", run_dir, *files, "--out", tmp_path / "p.csv").exit_code == 0
    assert run_cli("predict", run_dir, *files, "--out", tmp_path / "p.parquet").exit_code == 0
    assert (tmp_path / "p.parquet").read_bytes()[:4] == b"PAR1"
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    rows = read_csv(tmp_path / "p.csv")
    assert list(table) == list(rows[0]) == ["id", "path", *(f"{t}_pred" for t in TARGETS)]
    assert table["id"] == [r["id"] for r in rows]
    for target in TARGETS:
        assert table[f"{target}_pred"] == pytest.approx([float(r[f"{target}_pred"]) for r in rows], rel=1e-5)
    result = run_cli("predict", run_dir, *files, "--out", tmp_path / "p.json")
    assert result.exit_code == 1 and "name a .csv or .parquet file" in result.stderr


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_full_disk_leaves_no_cut_predictions(suffix, run_dir, corpus, tmp_path, monkeypatch):
    out = tmp_path / f"p.{suffix}"
    files = [f"{wav_folder(corpus)}/utt000{i}.wav" for i in range(3)]
    assert run_cli("predict", run_dir, *files, "--out", out).exit_code == 0
    before = out.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the bytes are written, then the disk is full
    result = run_cli("predict", run_dir, *files[:2], "--out", out)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"ser: error: {out}: cannot be written (No space left on device); " \
        "free space or choose a writable place"
    assert out.read_bytes() == before  # the earlier file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left


def test_training_from_audio_leaves_out_too_short_files_naming_them(tiny_model, corpus, tmp_path):
    from pathlib import Path

    lines = Path(corpus).read_text().splitlines()
    folder = Path(corpus).parent
    sf.write(tmp_path / "short.wav", np.full(200, 0.1, dtype=np.float32), 16000)
    (tmp_path / "noise.wav").write_bytes(b"garbage" * 20)
    header = lines[0].split(",")
    rows = [line.replace("wav/", f"{folder}/wav/", 1) for line in lines[1:]]
    for name in ("short", "noise"):
        extra = {"id": name, "path": str(tmp_path / f"{name}.wav"), "split": "train", "speaker": "spk9",
                 "activation": "4", "valence": "4", "dominance": "4"}
        rows.append(",".join(extra[c] for c in header))
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join([lines[0], *rows]) + "\n")
    result = run_cli("train", "--manifest", manifest, "--model", tiny_model, "--top-layers", 2,
                     "--out", tmp_path / "r", "--epochs", 1, "--batch-size", 4, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert "leaving out 2 audio file(s) that cannot be used" in result.stderr
    assert f"{tmp_path / 'short.wav'}: 200 samples at 16000 Hz, shorter than the model's receptive field" \
        in result.stderr
    assert f"{tmp_path / 'noise.wav'}: cannot be read" in result.stderr
    import json
    assert json.load(open(tmp_path / "r" / "config.json"))["train_utterances"] == \
        sum(1 for r in rows if ",train," in r) - 2
