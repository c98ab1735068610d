"""A rerun after audio files changed: the change is detected (size and mtime, then sha256) and
those utterances are computed again, named; unchanged ones are not (reliability item 15)."""

import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from cachegen import open_cache
from cachegen.testing import synth_corpus
from helpers import run_cli


def build(manifest, model, out, *extra):
    return run_cli("cache", "build", manifest, "--model", model, "--layers", 2, "--dtype", "float32",
                   "--batch-size", 2, "--shard-frames", 64, "--out", out, "--no-progress", *extra)


def shard_times(store):
    return {f: f.stat().st_mtime_ns for f in (store / "states" / "c").rglob("*") if f.is_file()}


@pytest.fixture
def corpus_dir(tmp_path):
    return synth_corpus(tmp_path / "c", utterances=8, seconds=(0.5, 0.9)).parent


def replace_audio(path, seed):
    """New content of the same length (and so the same size)."""
    samples, rate = sf.read(path, dtype="float32")
    rng = np.random.default_rng(seed)
    sf.write(path, (0.3 * rng.standard_normal(samples.shape)).astype(np.float32), rate, subtype="PCM_16")


def test_replaced_audio_is_computed_again_and_named(tiny_model, corpus_dir, tmp_path):
    manifest = corpus_dir / "manifest.csv"
    store = tmp_path / "s.zarr"
    assert build(manifest, tiny_model, store).exit_code == 0
    old = open_cache(store)["utt0003"]
    size = (corpus_dir / "wav" / "utt0003.wav").stat().st_size
    replace_audio(corpus_dir / "wav" / "utt0003.wav", seed=7)
    assert (corpus_dir / "wav" / "utt0003.wav").stat().st_size == size  # only mtime and bytes differ
    os.utime(corpus_dir / "wav" / "utt0005.wav")  # touched, same bytes: not computed again
    result = build(manifest, tiny_model, store)
    assert result.exit_code == 0, result.output
    assert "utt0003" in result.stderr and "changed" in result.stderr and "utt0005" not in result.stderr
    assert "Cached 1 utterances" in result.output and "7 were already cached" in result.output
    fresh = tmp_path / "fresh.zarr"
    assert build(manifest, tiny_model, fresh).exit_code == 0
    rebuilt, expected = open_cache(store), open_cache(fresh)
    assert sorted(rebuilt.ids) == sorted(expected.ids)
    for uid in expected.ids:  # every utterance equals a build from the audio as it is now
        assert rebuilt[uid].tobytes() == expected[uid].tobytes(), uid
    assert not np.array_equal(rebuilt["utt0003"], old)
    assert run_cli("cache", "verify", store).exit_code == 0
    before = shard_times(store)
    result = build(manifest, tiny_model, store)  # nothing changed since: nothing recomputed
    assert "Cached 0 utterances" in result.output and shard_times(store) == before


def test_changed_audio_of_an_unfinished_build(tiny_model, corpus_dir, tmp_path):
    """Records still in _building/ (a --part job's) are retired too; a part itself refuses."""
    manifest = corpus_dir / "manifest.csv"
    store = tmp_path / "s.zarr"
    assert build(manifest, tiny_model, store, "--part", "1/1").exit_code == 0
    assert (store / "_building").is_dir() and not (store / "index.parquet").exists()
    replace_audio(corpus_dir / "wav" / "utt0001.wav", seed=3)
    result = build(manifest, tiny_model, store, "--part", "1/1")
    assert result.exit_code == 1 and "utt0001" in result.stderr and "without --part" in result.stderr
    result = build(manifest, tiny_model, store)  # the final step computes it again
    assert result.exit_code == 0 and "Cached 1 utterances" in result.output
    fresh = tmp_path / "fresh.zarr"
    assert build(manifest, tiny_model, fresh).exit_code == 0
    assert open_cache(store)["utt0001"].tobytes() == open_cache(fresh)["utt0001"].tobytes()
    assert len(open_cache(store)) == 8


def test_store_without_recorded_sizes_compares_hashes(tiny_model, corpus_dir, tmp_path):
    """An index without audio_bytes/audio_mtime_ns (an older store) still detects a change."""
    import pyarrow.parquet as pq

    manifest = corpus_dir / "manifest.csv"
    store = tmp_path / "s.zarr"
    assert build(manifest, tiny_model, store).exit_code == 0
    index = pq.read_table(store / "index.parquet")
    pq.write_table(index.drop_columns(["audio_bytes", "audio_mtime_ns"]), store / "index.parquet")
    assert len(open_cache(store)) == 8  # still readable
    replace_audio(corpus_dir / "wav" / "utt0002.wav", seed=4)
    result = build(manifest, tiny_model, store)
    assert result.exit_code == 0 and "Cached 1 utterances" in result.output and "utt0002" in result.stderr
