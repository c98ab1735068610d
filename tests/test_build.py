"""Building a store: resume after SIGKILL, refusal of mismatched stores, bad input, disk full,
corruption detected by verify (checklist items 1-4, 8, 9, 11 of docs/design.md)."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cachegen import open_cache
from cachegen.build import BuildConfig, build_cache
from cachegen.errors import StoreCorrupt, StoreError
from cachegen.testing import synth_corpus
from helpers import one_error_line, run_cli

SER = [sys.executable, "-c", "from cli import main; main()"]


def states_by_id(store):
    reader = open_cache(store)
    return {uid: reader[uid] for uid in reader.ids}


def test_info_verify_and_reader_api(built_store, corpus):
    reader = open_cache(built_store)
    assert len(reader) == 24 and len(reader.ids) == 24
    first = reader[reader.ids[0]]
    assert first.ndim == 2 and first.shape[1] == 32 and first.shape[0] == reader.frames(reader.ids[0])
    assert reader.meta["layers"] == 2 and reader.meta["dtype"] == "float32"
    assert len(reader.meta["model_sha256"]) == 64 and reader.meta["frame_rate"] == 50
    assert {"id", "path", "split", "activation", "valence", "dominance"} <= set(reader.table.column_names)
    assert reader.index.num_rows == 24 and reader.index.column("audio_sha256")[0].as_py()
    result = run_cli("cache", "info", built_store)
    assert result.exit_code == 0
    for expected in ("cached layer: 2", "float32", "utterances:   24", "per audio hour", "failed:       0"):
        assert expected in result.output
    result = run_cli("cache", "verify", built_store)
    assert result.exit_code == 0 and "24 utterances" in result.output


def test_files_grow_with_audio_not_utterances(tiny_model, tmp_path):
    manifest = synth_corpus(tmp_path / "c", utterances=40, seconds=(0.5, 0.8))
    build_cache(BuildConfig(manifest=str(manifest), out=str(tmp_path / "s"), model=tiny_model,
                            layers=1, progress=False))
    files = [f for f in (tmp_path / "s").rglob("*") if f.is_file()]
    assert len(files) <= 6  # 40 utterances, one shard file, metadata, index, manifest


def test_resume_after_sigkill_equals_uninterrupted_build(tiny_model, tmp_path):
    manifest = synth_corpus(tmp_path / "c", utterances=60, seconds=(0.5, 1.0))
    args = ["cache", "build", manifest, "--model", tiny_model, "--layers", "3", "--batch-size", "1",
            "--workers", "1", "--shard-frames", "64", "--no-progress"]
    killed = tmp_path / "killed.zarr"
    import torch  # the killed process computes with as many threads as this one: the same bytes

    proc = subprocess.Popen(SER + [str(a) for a in args] + ["--out", str(killed)],
                            cwd=Path(__file__).parents[1], stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "_building").glob("shard-*.parquet"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from cachegen.store import committed_count

    committed = committed_count(killed)  # utterances in commit records (a shard may hold several)
    assert 5 <= committed < 60, "the build must be killed midway"
    with pytest.raises(StoreError, match="interrupted"):
        open_cache(killed)  # never readable as complete
    # the killed build's lock file stays, naming it; the kernel dropped its lock, so the rerun
    # takes it over (and removes the file when done)
    assert f'"pid": {proc.pid}' in (killed / ".ser-build.lock").read_text()
    first_shard = killed / "states" / "c" / "0" / "0"
    first_bytes, first_mtime = first_shard.read_bytes(), first_shard.stat().st_mtime_ns
    result = run_cli(*args, "--out", killed)
    assert result.exit_code == 0, result.output
    assert f"{committed} were already cached" in result.output
    assert first_shard.stat().st_mtime_ns == first_mtime and first_shard.read_bytes() == first_bytes
    whole = tmp_path / "whole.zarr"
    assert run_cli(*args, "--out", whole).exit_code == 0
    resumed, uninterrupted = states_by_id(killed), states_by_id(whole)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) == 60
    for uid in resumed:
        assert resumed[uid].tobytes() == uninterrupted[uid].tobytes()
    assert not (killed / "_building").exists() and not (killed / ".ser-build.lock").exists()
    assert run_cli("cache", "verify", killed).exit_code == 0


def test_rerun_of_a_finished_store_recomputes_nothing(built_store, tiny_model, corpus, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built_store, copy)  # a finished store moved elsewhere, then "resumed"
    before = {f: f.stat().st_mtime_ns for f in (copy / "states" / "c").rglob("*") if f.is_file()}
    result = run_cli("cache", "build", corpus, "--model", tiny_model, "--layers", 2, "--dtype",
                     "float32", "--out", copy, "--no-progress")
    assert result.exit_code == 0 and "Cached 0 utterances" in result.output
    assert "24 were already cached" in result.output
    assert before == {f: f.stat().st_mtime_ns for f in (copy / "states" / "c").rglob("*") if f.is_file()}


@pytest.mark.parametrize("flag,value,field", [
    ("--layers", "3", "layers"), ("--dtype", "float16", "dtype")])
def test_store_built_differently_is_refused_then_overwritten(flag, value, field, built_store, tiny_model,
                                                             corpus, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built_store, copy)
    args = {"--layers": "2", "--dtype": "float32", flag: value}
    base = ["cache", "build", corpus, "--model", tiny_model, "--out", copy, "--no-progress"]
    base += [x for kv in args.items() for x in kv]
    result = run_cli(*base)
    assert result.exit_code == 1
    assert f"({field}: store has" in result.stderr and result.stderr.count("\n") == 1
    result = run_cli(*base, "--overwrite")
    assert result.exit_code == 0
    assert open_cache(copy).meta[field] == (int(value) if field == "layers" else value)


def test_other_model_weights_are_refused(built_store, corpus, tmp_path):
    from cachegen.testing import save_tiny_model
    other = save_tiny_model(tmp_path / "other", seed=1)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built_store, copy)
    result = run_cli("cache", "build", corpus, "--model", other, "--layers", 2, "--dtype", "float32",
                     "--out", copy, "--no-progress")
    assert result.exit_code == 1 and "model_sha256: store has" in result.stderr


def test_manifest_problems_reported_at_once_before_compute(tiny_model, tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,activation\n"
                        "u1,a.wav,3.0\n"
                        "u1,a.wav,4.0\n"
                        "u3,missing.wav,2.0\n"
                        ",a.wav,1.0\n"
                        "u5,a.wav,high\n")
    out = tmp_path / "s.zarr"
    result = run_cli("cache", "build", manifest, "--model", tiny_model, "--layers", 1, "--out", out)
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "duplicate id(s): 'u1' (rows 2 and 3)" in message
    assert "row 4: missing.wav" in message
    assert "blank id at row(s) 5" in message
    assert "column 'activation' has values that are not numbers at row(s) 6" in message
    assert not out.exists()  # nothing computed or written


def test_missing_columns_named(tiny_model, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("name,file\nu1,a.wav\n")
    result = run_cli("cache", "build", manifest, "--model", tiny_model, "--out", tmp_path / "s")
    assert result.exit_code == 1 and "missing column(s) id, path" in result.stderr


def test_unreachable_hub_model_says_to_pass_a_local_folder(corpus, tmp_path):
    result = run_cli("cache", "build", corpus, "--model", "nobody/no-such-model", "--out", tmp_path / "s")
    assert result.exit_code == 1
    assert "nobody/no-such-model" in result.stderr and "local folder" in result.stderr


def write_bad_audio(folder: Path) -> dict:
    """Every kind of audio item 8 of the checklist in docs/design.md names; returns {id: expected outcome}."""
    rng = np.random.default_rng(0)
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "garbage.wav").write_bytes(rng.bytes(3000))
    sf.write(folder / "short.wav", tone[:300], 16000)  # < 400 samples receptive field
    nan = tone.copy()
    nan[100] = np.nan
    sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(folder / "stereo.wav", np.stack([tone, tone], 1), 16000)
    for rate in (8000, 44100, 48000):
        sf.write(folder / f"r{rate}.wav", np.sin(2 * np.pi * 220 * np.arange(rate) / rate) * 0.3, rate)
    sf.write(folder / "r44100.flac", tone, 16000)
    sf.write(folder / "liar.wav", tone, 16000)
    data = (folder / "liar.wav").read_bytes()
    (folder / "liar.wav").write_bytes(data[:len(data) // 2])  # header promises twice the samples
    return {"empty": "fail", "garbage": "fail", "short": "fail", "nan": "fail", "stereo": "ok",
            "r8000": "ok", "r44100": "ok", "r48000": "ok", "flac": "ok", "liar": "ok"}


def test_bad_audio_is_skipped_named_recorded_and_retried(tiny_model, tmp_path):
    expected = write_bad_audio(tmp_path)
    files = {"flac": "r44100.flac"}
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\n" + "".join(f"{uid},{files.get(uid, uid + '.wav')}\n" for uid in expected))
    out = tmp_path / "s.zarr"
    result = run_cli("cache", "build", manifest, "--model", tiny_model, "--layers", 2, "--out", out,
                     "--no-progress")
    assert result.exit_code == 1
    assert "Traceback" not in result.output + result.stderr
    failed = sorted(u for u, outcome in expected.items() if outcome == "fail")
    for uid in failed:
        assert f"skipped {uid}:" in result.stderr
    reader = open_cache(out)
    assert sorted(reader.ids) == sorted(u for u, o in expected.items() if o == "ok")
    assert sorted(f["id"] for f in reader.meta["failures"]) == failed
    assert "empty (0 bytes)" in str(reader.meta["failures"]) and "receptive field" in str(reader.meta["failures"])
    assert reader["r48000"].shape[0] == 49  # one second at 50 frames/s, resampled
    assert reader["liar"].shape[0] < 49  # decoded what is really there
    info = run_cli("cache", "info", out)
    assert "failed:       4" in info.output and "nan" in info.output
    # fix one file: the rerun computes only that one and still reports the rest
    sf.write(tmp_path / "short.wav", np.sin(np.arange(8000) / 5) * 0.2, 16000)
    result = run_cli("cache", "build", manifest, "--model", tiny_model, "--layers", 2, "--out", out,
                     "--no-progress")
    assert "Cached 1 utterances" in result.output and result.exit_code == 1
    assert "short" in open_cache(out).ids and len(open_cache(out).meta["failures"]) == 3


def test_disk_full_keeps_committed_and_resumes(tiny_model, tmp_path, monkeypatch):
    import cachegen.store as store

    manifest = synth_corpus(tmp_path / "c", utterances=12, seconds=(0.5, 0.9))
    out = tmp_path / "s.zarr"
    config = BuildConfig(manifest=str(manifest), out=str(out), model=tiny_model, layers=1,
                         batch_size=1, shard_frames=64, chunk_frames=64, progress=False)  # one per shard
    real_write, calls = store.write_atomic, {"n": 0}

    def filling_disk(path, data):
        if "_building" in str(path):
            calls["n"] += 1
            if calls["n"] > 4:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(store, "write_atomic", filling_disk)
    with pytest.raises(StoreError, match="disk full"):
        build_cache(config)
    reader = open_cache(out)  # what was committed stays readable
    assert len(reader) == 4 and all(reader[uid].shape[0] > 0 for uid in reader.ids)
    monkeypatch.setattr(store, "write_atomic", real_write)
    summary = build_cache(config)
    assert summary.already == 4 and summary.cached == 8 and len(open_cache(out)) == 12


def test_flipped_byte_and_deleted_chunk_are_detected(built_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built_store, copy)
    shard = sorted((copy / "states" / "c").rglob("*"))[-1]
    data = bytearray(shard.read_bytes())
    data[8] ^= 0x10  # inside the first row of the shard's first utterance (compressed or not)
    shard.write_bytes(bytes(data))
    result = run_cli("cache", "verify", copy)
    assert result.exit_code == 1 and "problem:" in result.stderr
    reader = open_cache(copy)
    damaged = [uid for uid in reader.ids if _fails(reader, uid)]
    assert damaged and len(damaged) < len(reader.ids)
    assert damaged[0] in result.stderr
    shard.unlink()  # a missing chunk must never read as zeros
    result = run_cli("cache", "verify", copy)
    assert result.exit_code == 1
    with pytest.raises(StoreCorrupt):
        for uid in open_cache(copy).ids:
            open_cache(copy)[uid]


def test_verify_repair_forgets_the_damaged_and_the_same_build_computes_them_again(tiny_model, corpus,
                                                                                  tmp_path):
    """Bit rot in one shard: `verify --repair` keeps every intact utterance, forgets the
    damaged ones (the store reads cleanly, marked incomplete), and the same build command
    computes only those again, to the states an intact build holds."""
    out = tmp_path / "s.zarr"
    build = ["cache", "build", corpus, "--model", tiny_model, "--layers", 2, "--dtype", "float32",
             "--shard-frames", 64, "--out", out, "--no-progress"]
    assert run_cli(*build).exit_code == 0
    before = {uid: np.array(states) for uid, states in states_by_id(out).items()}  # not views of the files
    shard = sorted((out / "states" / "c").rglob("*"))[1]
    data = bytearray(shard.read_bytes())
    data[8] ^= 0x10  # inside the first row of that shard's first utterance
    shard.write_bytes(bytes(data))
    reader = open_cache(out)
    damaged = [uid for uid in reader.ids if _fails(reader, uid)]
    assert len(damaged) == 1
    assert run_cli("cache", "verify", out).exit_code == 1  # without --repair nothing changes
    assert len(open_cache(out)) == len(before)

    result = run_cli("cache", "verify", out, "--repair")
    assert result.exit_code == 0 and f"forgot 1 damaged utterance(s) ({damaged[0]})" in result.output
    reader = open_cache(out)
    assert set(reader.ids) == set(before) - set(damaged) and reader.meta["complete"] is False
    assert all(np.array_equal(reader[uid], before[uid]) for uid in reader.ids)
    assert run_cli("cache", "verify", out).exit_code == 0

    result = run_cli(*build)
    assert result.exit_code == 0 and "Cached 1 utterances" in result.output, result.output
    after = states_by_id(out)
    assert set(after) == set(before) and open_cache(out).meta["complete"] is True
    for uid, states in before.items():
        assert np.abs(after[uid] - states).max() <= 1e-4 * np.abs(states).max(), uid
    assert run_cli("cache", "verify", out).exit_code == 0


def test_verify_repair_refuses_what_it_cannot_repair(built_store, tmp_path):
    from cachegen.verify import VerifyReport, repair_store

    damage = VerifyReport(store="x", checked=1, problems=["'u' fails its checksum"], damaged=["u"])
    with pytest.raises(StoreError, match="local store folder"):
        repair_store(str(tmp_path / "s.zip"), damage)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built_store, copy)
    (copy / "_building").mkdir()
    result = run_cli("cache", "verify", copy, "--repair")
    assert result.exit_code == 1 and "_building/ exists" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ser: error:")
    twice = VerifyReport(store="x", checked=1, problems=["index: id(s) listed twice: 'u'"], unnamed=1)
    with pytest.raises(StoreError, match="listed twice"):
        repair_store(str(built_store), twice)


@pytest.mark.parametrize("damage, expected", [
    (lambda f: f.write_text(f.read_text().replace('"fill_value": 0.0', '"fill_value": 7.0')),
     "differs from its copy consolidated"),
    (lambda f: f.write_bytes(f.read_bytes() + b"}"), "cannot be read"),
    (lambda f: f.unlink(), "is missing"),
])
def test_verify_checks_each_arrays_own_metadata(damage, expected, built_store, tmp_path):
    """ser reads the consolidated copy in the root zarr.json, zarr alone reads states/zarr.json:
    verify holds the two equal, and --repair, having no utterance to compute again, refuses."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built_store, copy)
    assert run_cli("cache", "verify", copy).exit_code == 0
    own = copy / "states" / "zarr.json"
    before = own.read_text()
    damage(own)
    assert own.exists() != (expected == "is missing") and (not own.exists() or own.read_text() != before)
    result = run_cli("cache", "verify", copy)
    assert result.exit_code == 1 and f"states/zarr.json {expected}" in result.stderr, result.stderr
    assert run_cli("cache", "info", copy).exit_code == 0  # the consolidated copy still reads
    one_error_line(run_cli("cache", "verify", copy, "--repair"), "damaged array metadata")


def _fails(reader, uid):
    try:
        reader[uid]
        return False
    except StoreCorrupt:
        return True


def edited_model(model_dir, tmp_path, name: str, **changes) -> Path:
    """A copy of `model_dir` whose JSON file `name` has `changes`; the weights stay the same."""
    import json as json_module

    changed = tmp_path / "model"
    shutil.copytree(model_dir, changed)
    fields = json_module.loads((changed / name).read_text())
    fields.update(changes)
    (changed / name).write_text(json_module.dumps(fields))
    return changed


def rebuild_copy(store, corpus, model_dir, tmp_path):
    """Run the store's build again on a copy of it with `model_dir`: (copy, CLI result)."""
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    return copy, run_cli("cache", "build", corpus, "--model", model_dir, "--layers", 2, "--dtype",
                         "float32", "--out", copy, "--no-progress")


def test_same_weights_with_another_config_are_refused(built_store, tiny_model, corpus, tmp_path):
    # same weights, other computation
    changed = edited_model(tiny_model, tmp_path, "config.json", hidden_act="relu", layer_norm_eps=0.1)
    copy, result = rebuild_copy(built_store, corpus, changed, tmp_path)
    assert result.exit_code == 1 and "model_config_sha256: store has" in result.stderr
    result = run_cli("train", "--from-cache", copy, "--model", changed, "--top-layers", 2,
                     "--out", tmp_path / "run")
    assert result.exit_code == 1 and "another model config" in result.stderr


def test_other_preprocessing_is_refused(built_store, tiny_model, corpus, tmp_path):
    changed = edited_model(tiny_model, tmp_path, "preprocessor_config.json", do_normalize=False)
    _, result = rebuild_copy(built_store, corpus, changed, tmp_path)
    assert result.exit_code == 1 and "preprocessing: store has" in result.stderr


@pytest.mark.parametrize("compression", ["none", "lz4"])  # shard files written by ser / by zarr
def test_disk_full_while_writing_a_shard(compression, tiny_model, tmp_path, monkeypatch):
    import zarr

    from cachegen.store import StoreWriter

    manifest = synth_corpus(tmp_path / "c", utterances=10, seconds=(0.5, 0.9))
    out = tmp_path / "s.zarr"
    config = BuildConfig(manifest=str(manifest), out=str(out), model=tiny_model, layers=1,
                         batch_size=1, shard_frames=64, chunk_frames=64, progress=False,
                         compression=compression)  # one per shard
    shards = {"n": 0}

    def full_after_three():
        shards["n"] += 1
        if shards["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    if compression == "none":
        real, owner, name = StoreWriter._write_shard, StoreWriter, "_write_shard"

        def filling_disk(self, shard, rows):
            full_after_three()
            return real(self, shard, rows)
    else:
        real, owner, name = zarr.storage.LocalStore.set, zarr.storage.LocalStore, "set"

        async def filling_disk(self, key, value):
            if "/c/" in key:
                full_after_three()
            return await real(self, key, value)

    monkeypatch.setattr(owner, name, filling_disk)
    with pytest.raises(StoreError, match="disk full"):
        build_cache(config)
    reader = open_cache(out)
    assert len(reader) == 3 and all(reader[uid].shape[0] > 0 for uid in reader.ids)
    monkeypatch.setattr(owner, name, real)
    summary = build_cache(config)
    assert summary.already == 3 and summary.cached == 7
    assert run_cli("cache", "verify", out).exit_code == 0


def test_utterances_longer_than_a_shard(tiny_model, tmp_path):
    """An utterance longer than a shard gets whole shards of its own and reads back intact."""
    manifest = synth_corpus(tmp_path / "c", utterances=6, seconds=(2.0, 4.0))  # 100-200 frames
    small, large = tmp_path / "small.zarr", tmp_path / "large.zarr"
    for out, shard in ((small, 64), (large, 1024)):
        build_cache(BuildConfig(manifest=str(manifest), out=str(out), model=tiny_model, layers=1,
                                batch_size=2, shard_frames=shard, progress=False))
    assert states_by_id(small).keys() == states_by_id(large).keys()
    for uid, states in states_by_id(small).items():
        assert states.shape[0] > 64 and states.tobytes() == states_by_id(large)[uid].tobytes()
    assert run_cli("cache", "verify", small).exit_code == 0
