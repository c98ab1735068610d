"""The store's read path (memory-mapped shards, CRC-32C) and write options (compression, dtype),
checked against zarr itself reading the same files, and against damaged shards."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cachegen import open_cache
from cachegen.errors import StoreCorrupt, StoreError
from cachegen.store import FORMAT, FORMAT_VERSION, StoreWriter, to_storage

HIDDEN = 24
CHUNK, SHARD = 8, 64


def write_store(path: Path, *, dtype: str = "float16", compression: str | None = "none",
                checksum: str | None = "crc32c", version: int = FORMAT_VERSION, seed: int = 0,
                zero_chunk: bool = False, hidden: int = HIDDEN) -> dict[str, np.ndarray]:
    """A store of random float32 states (as `dtype`) with short, chunk-crossing and
    longer-than-a-shard utterances; returns the float32 states by id."""
    import torch

    rng = np.random.default_rng(seed)
    meta = {"format": FORMAT, "format_version": version, "dtype": dtype, "hidden_size": hidden,
            "chunk_frames": CHUNK, "shard_frames": SHARD, "layers": 2, "frame_rate": 50.0,
            "model_id": "random", "model_sha256": "0" * 64, "model_type": "wav2vec2",
            "num_hidden_layers": 4, "sample_rate": 16000}  # every field a ser store records
    if checksum:
        meta["checksum"] = checksum
    if compression:
        meta["compression"] = compression
    writer = StoreWriter(path, meta)
    states = {}
    for i, frames in enumerate([1, 7, 8, 9, 30, 63, 64, 150, 5, 17, 40, 3]):
        values = rng.standard_normal((frames, hidden)).astype(np.float32) * 3
        if zero_chunk and frames == 40:
            values[8:24] = 0  # whole inner chunks of zeros: zarr writes no bytes for them
        states[f"u{i}"] = values
        writer.add({"id": f"u{i}", "seconds": frames / 50, "source_rate": 16000, "audio_sha256": ""},
                   to_storage(torch.from_numpy(values), dtype))
    import pyarrow as pa

    writer.flush()
    writer.finalize(table=pa.table({"id": list(states)}), extra_meta={"complete": True})
    writer.close()
    return states


def zarr_rows(path: Path, start: int, frames: int) -> np.ndarray:
    """The rows as zarr itself reads them (no ser code)."""
    import zarr

    group = zarr.open_group(zarr.storage.LocalStore(str(path), read_only=True), mode="r",
                            use_consolidated=True)
    return group["states"][start:start + frames]


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_fast_reads_equal_zarr_for_every_compression(tmp_path, compression):
    store = tmp_path / "s.zarr"
    write_store(store, compression=compression)
    reader = open_cache(store)
    assert reader._local is not None  # the memory-mapped path, not zarr's
    index = reader.index.to_pylist()
    for row in index:
        ours = reader.read_raw(row["id"])
        assert np.array_equal(ours, zarr_rows(store, row["start"], row["frames"]))
        assert ours.shape == (row["frames"], HIDDEN)
    if compression == "none":  # adjacent uncompressed chunks come back as a view of the map
        assert not reader.read_raw("u4").flags.writeable
    reader.close()


def test_float16_states_survive_the_round_trip(tmp_path):
    states = write_store(tmp_path / "s.zarr")
    reader = open_cache(tmp_path / "s.zarr")
    for uid, values in states.items():
        assert reader[uid].dtype == np.float16
        np.testing.assert_array_equal(reader[uid], values.astype(np.float16))


def test_zero_chunks_read_as_zeros(tmp_path):
    states = write_store(tmp_path / "s.zarr", zero_chunk=True)
    reader = open_cache(tmp_path / "s.zarr")
    np.testing.assert_array_equal(reader["u10"], states["u10"].astype(np.float16))
    assert not reader["u10"][8:24].any()


def test_version_1_store_reads_with_zlib_crc32_and_blosc(tmp_path):
    """A store written before `checksum` and `compression` existed (zlib crc32, blosc zstd)."""
    import zlib

    store = tmp_path / "v1.zarr"
    states = write_store(store, compression=None, checksum=None, version=1)
    codecs = json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]["states"]["codecs"]
    assert [c["name"] for c in codecs[0]["configuration"]["codecs"]] == ["bytes", "blosc"]
    reader = open_cache(store)
    for row in reader.index.to_pylist():
        raw = reader.read_raw(row["id"])
        assert zlib.crc32(raw.tobytes()) == row["crc32"]
        np.testing.assert_array_equal(raw, states[row["id"]].astype(np.float16))


def test_zip_of_a_store_reads_through_the_map(tmp_path):
    from cachegen.share import pack_store

    store = tmp_path / "s.zarr"
    states = write_store(store)
    pack_store(str(store), str(tmp_path / "s.zip"))
    reader = open_cache(tmp_path / "s.zip")
    assert reader.source.file_span(reader.shard_keys()[0]) is not None
    for uid, values in states.items():
        np.testing.assert_array_equal(reader[uid], values.astype(np.float16))


def test_threads_read_the_same_values(tmp_path):
    states = write_store(tmp_path / "s.zarr")
    reader = open_cache(tmp_path / "s.zarr")
    wrong = []

    def work(ids):
        for _ in range(20):
            wrong.extend(uid for uid in ids if not np.array_equal(reader[uid], states[uid].astype(np.float16)))

    ids = list(states)
    threads = [threading.Thread(target=work, args=(ids[k::2],)) for k in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert wrong == []


def test_an_utterance_read_before_is_checked_again(tmp_path):
    """A read of an utterance read before skips the index lookups, never the checksum: a byte
    changed in place in the mapped shard after the first read fails the next one."""
    import os

    store = tmp_path / "s.zarr"
    states = write_store(store)
    reader = open_cache(store)
    stored = states["u4"].astype(np.float16)
    assert np.array_equal(reader["u4"], stored) and np.array_equal(reader["u4"], stored)
    path = next(f for f in (store / "states" / "c").rglob("*") if f.is_file() and stored.tobytes() in f.read_bytes())
    at = path.read_bytes().find(stored.tobytes())
    fd = os.open(path, os.O_RDWR)  # in place: the same file, as the map sees it
    try:
        os.pwrite(fd, bytes([path.read_bytes()[at + 5] ^ 0x20]), at + 5)
        with pytest.raises(StoreCorrupt, match="'u4'.*checksum"):
            reader["u4"]
        os.pwrite(fd, bytes([path.read_bytes()[at + 5] ^ 0x20]), at + 5)
    finally:
        os.close(fd)
    assert np.array_equal(reader["u4"], stored)


def test_reads_keep_no_more_shard_files_open_than_the_map_limit(tmp_path):
    """Each mapped shard holds a file descriptor; views kept of utterances read before must not
    keep a dropped map (and its descriptor) alive."""
    import os

    store = tmp_path / "s.zarr"
    states = write_store(store)
    reader = open_cache(store)
    reader._local.maps = 2  # normally a quarter of the descriptors the process may open

    def open_shards():
        names = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{fd}")]
        return sum(name.startswith(str(store / "states")) for name in names)

    most = 0
    for _ in range(3):
        for uid in states:
            assert np.array_equal(reader[uid], states[uid].astype(np.float16))
            most = max(most, open_shards())
    assert 0 < most <= 2
    assert len({start // SHARD for start, _, _ in reader._rows.values()}) > 2  # more shards than maps


# --- damage: every way a shard can be wrong gives a one-line StoreCorrupt naming the utterance --

def shard_file(store: Path) -> Path:
    return store / "states" / "c" / "0" / "0"


def rewrite_index(path: Path, edit) -> None:
    """Edit the (offset, length) table at the end of a shard and give it a valid crc32c again,
    so that only ser's own bounds checks can catch it."""
    import crc32c

    data = bytearray(path.read_bytes())
    chunks = SHARD // CHUNK
    size = chunks * 16
    table = np.frombuffer(bytes(data[-size - 4:-4]), "<u8").reshape(chunks, 2).copy()
    edit(table)
    data[-size - 4:-4] = table.tobytes()
    data[-4:] = crc32c.crc32c(bytes(data[-size - 4:-4])).to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_flipped_chunk_byte_fails_the_checksum(tmp_path, compression):
    store = tmp_path / "s.zarr"
    write_store(store, compression=compression)
    path = shard_file(store)
    data = bytearray(path.read_bytes())
    first_chunk = int(np.frombuffer(bytes(data[-(SHARD // CHUNK) * 16 - 4:]), "<u8", count=1)[0])
    data[first_chunk + 10] ^= 0x40  # inside u0's only row (or its compressed chunk)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt, match="'u0'"):
        open_cache(store)["u0"]


def flip_index_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))


# how a shard file is damaged -> what the refusal names (always the utterance)
SHARD_DAMAGE = {
    "index byte flipped": (flip_index_byte, "'u0'.*crc32c"),
    "offset beyond the file": (lambda p: rewrite_index(p, lambda t: t.__setitem__((0, 0), 2**40)), "'u0'.*outside"),
    "chunk of the wrong length": (lambda p: rewrite_index(p, lambda t: t.__setitem__((0, 1), 7)), "'u0'.*outside"),
    "offset + length overflowing": (lambda p: rewrite_index(p, lambda t: t.__setitem__((1, 0), 2**64 - 2)),
                                    "'u0'.*outside"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-500]), "'u0'"),
    "missing": (lambda p: p.unlink(), "'u0'.*checksum"),
}


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_damaged_shard_is_refused(tmp_path, damage):
    """An index entry edited with a valid crc32c again is caught by ser's own bounds checks; a
    missing shard reads as damage, never as zeros."""
    store = tmp_path / "s.zarr"
    write_store(store)
    edit, named = SHARD_DAMAGE[damage]
    edit(shard_file(store))
    with pytest.raises(StoreCorrupt, match=named):
        open_cache(store)["u0"]


def test_unknown_checksum_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    write_store(store)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["ser"]["checksum"] = "md5"
    (store / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreError, match="checksum 'md5'"):
        open_cache(store)


def test_zip_deflated_members_fall_back_to_zarr(tmp_path):
    store = tmp_path / "s.zarr"
    states = write_store(store)
    archive = tmp_path / "deflated.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for file in sorted(store.rglob("*")):
            if file.is_file():
                z.write(file, file.relative_to(store).as_posix())
    reader = open_cache(archive)
    assert reader.source.file_span(reader.shard_keys()[0]) is None
    np.testing.assert_array_equal(reader["u7"], states["u7"].astype(np.float16))


# --- dtypes: every storage dtype reads back within its documented bound ---------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_every_dtype_reads_back_within_its_bound(tmp_path, dtype, compression):
    store = tmp_path / "s.zarr"
    states = write_store(store, dtype=dtype, compression=compression)
    reader = open_cache(store)
    for uid, values in states.items():
        got = reader[uid]
        assert got.shape == values.shape
        ours = np.asarray(got, np.float32)
        if dtype == "float32":
            np.testing.assert_array_equal(ours, values)
        elif dtype == "int8":  # documented: |error| <= max |x| of the frame / 254
            bound = np.abs(values).max(axis=1, keepdims=True) / 254
            assert (np.abs(ours - values) <= bound * (1 + 1e-6)).all()
        else:  # half precisions: relative rounding 2**-11 (float16), 2**-8 (bfloat16)
            rel = 2.0 ** (-11 if dtype == "float16" else -8)
            assert (np.abs(ours - values) <= np.abs(values) * rel + 1e-7).all()


def test_int8_takes_at_most_055_of_float16_bytes(tmp_path):
    sizes = {}
    for dtype in ("float16", "int8"):  # wav2vec2-base width: the scale's 4 bytes per frame count
        write_store(tmp_path / dtype, dtype=dtype, hidden=768)
        sizes[dtype] = sum(f.stat().st_size for f in (tmp_path / dtype / "states").rglob("*") if f.is_file())
    assert sizes["int8"] <= 0.55 * sizes["float16"]


def test_int8_outlier_channels_and_silent_frames():
    """Per-frame scales: an outlier channel costs only its own frame's precision; an all-zero
    frame stays exactly zero."""
    import torch

    from cachegen.store import from_storage

    values = np.random.default_rng(1).standard_normal((6, HIDDEN)).astype(np.float32)
    values[2, 5] = 500.0
    values[4] = 0.0
    stored = to_storage(torch.from_numpy(values), "int8")
    assert stored.dtype == np.int8 and stored.shape == (6, HIDDEN + 4)
    back = from_storage(stored, "int8")
    assert not back[4].any()
    assert np.abs(back[0] - values[0]).max() <= np.abs(values[0]).max() / 254 * (1 + 1e-6)
    assert np.abs(back[2, 5] - 500.0) <= 500.0 / 254


# --- training batches: compact on the host, float32 on the device; preload ------------------

@pytest.mark.parametrize("dtype,carried", [("float16", "float16"), ("bfloat16", "bfloat16"),
                                           ("int8", "int8"), ("float32", "float32")])
def test_batches_travel_compact_and_become_float32_on_the_device(tmp_path, dtype, carried):
    import torch

    from headtrain.data import CacheSource, iterate_batches, plan_batches

    write_store(tmp_path / "s.zarr", dtype=dtype)
    reader = open_cache(tmp_path / "s.zarr")
    source = CacheSource(reader)
    ids = reader.ids
    plan = plan_batches([reader.frames(u) for u in ids], batch_size=4, seed=0, epoch=0)
    seen = set()
    for batch in iterate_batches(source, ids, None, plan, workers=2):
        assert batch.inputs.dtype == getattr(torch, carried)
        batch.to(torch.device("cpu"))
        assert batch.inputs.dtype == torch.float32
        for row, uid in enumerate(batch.ids):
            frames = reader.frames(uid)
            expected = torch.from_numpy(np.array(reader[uid], np.float32))
            # int8 is dequantised on the device, as the reader does: the same float32 values
            assert batch.inputs[row, :frames].equal(expected)
            assert not batch.inputs[row, frames:].any() and batch.mask[row].sum() == frames
            seen.add(uid)
    assert seen == set(ids)


def test_preload_reads_each_utterance_once(tmp_path, monkeypatch):
    from headtrain import data
    from headtrain.data import CacheSource, iterate_batches, plan_batches

    write_store(tmp_path / "s.zarr")
    reader = open_cache(tmp_path / "s.zarr")
    reads = []
    original = reader.read_raw
    monkeypatch.setattr(reader, "read_raw", lambda uid: reads.append(uid) or original(uid))
    ids = reader.ids
    lengths = [reader.frames(u) for u in ids]

    def two_epochs(source):
        reads.clear()
        out = []
        for epoch in range(2):
            plan = plan_batches(lengths, batch_size=4, seed=0, epoch=epoch)
            out += [b.inputs.clone() for b in iterate_batches(source, ids, None, plan, epoch=epoch)]
        return out

    preloaded = two_epochs(CacheSource(reader, preload=True))
    assert sorted(reads) == sorted(ids)  # one read per utterance, over two epochs
    streamed = two_epochs(CacheSource(reader, preload=False))
    assert len(reads) == 2 * len(ids)
    assert all(a.equal(b) for a, b in zip(preloaded, streamed))
    assert CacheSource(reader, preload=None).preload  # a tiny store fits the budget
    monkeypatch.setattr(data, "PRELOAD_BUDGET", 0)
    assert not CacheSource(reader, preload=None).preload


def test_training_from_int8_reaches_the_dev_ccc_of_float16(tiny_model, tmp_path):
    """The learning test of int8 storage: same corpus, seed and options; only the dtype differs."""
    from cachegen.build import BuildConfig, build_cache
    from cachegen.testing import synth_corpus
    from headtrain import TrainConfig, train

    manifest = synth_corpus(tmp_path / "c", utterances=120, seed=5)
    ccc = {}
    for dtype in ("float16", "int8"):
        store = tmp_path / f"{dtype}.zarr"
        build_cache(BuildConfig(manifest=str(manifest), out=str(store), model=tiny_model, layers=2,
                                dtype=dtype, progress=False))
        assert open_cache(store).meta["dtype"] == dtype
        result = train(TrainConfig(out=str(tmp_path / dtype), from_cache=str(store), top_layers=2,
                                   targets=("activation",), epochs=6, batch_size=8, lr=5e-4,
                                   head_lr=3e-3, dropout=0.0, warmup=0.05, seed=0, progress=False))
        ccc[dtype] = result.best_dev["activation"]["ccc"]
    assert ccc["float16"] > 0.3  # it learned something to compare
    assert abs(ccc["int8"] - ccc["float16"]) <= 0.01, ccc


@pytest.mark.parametrize("dtype,compression", [("float16", "none"), ("int8", "none"),
                                               ("bfloat16", "lz4"), ("float16", None)])
def test_cache_format_recipe_reads_with_zarr_and_pyarrow_alone(tmp_path, dtype, compression):
    """The Python recipe of docs/cache-format.md, run as written (no ser imported), gives the
    values ser reads, for new dtypes and compressions and for a version 1 store."""
    import re
    import subprocess
    import sys

    store = tmp_path / "store.zarr"
    write_store(store, dtype=dtype, compression=compression,
                **({"checksum": None, "version": 1} if compression is None else {}))
    doc = (Path(__file__).parent.parent / "docs" / "cache-format.md").read_text()
    recipe = re.search(r"```python\n(import json\n.*?)```", doc, re.S).group(1)
    recipe += "\nnp.save('first.npy', hidden)\nimport sys\nassert 'cachegen' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", recipe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    reader = open_cache(store)
    np.testing.assert_array_equal(np.load(tmp_path / "first.npy"), np.asarray(reader[reader.ids[0]], np.float32))


@pytest.mark.parametrize("dtype,compression", [("int8", "none"), ("float16", "lz4"), ("float16", "zstd")])
def test_resumed_build_equals_one_build_for_new_dtypes_and_compressions(tiny_model, corpus, tmp_path,
                                                                        dtype, compression):
    """A build stopped after part 1 of 2 and resumed equals an uninterrupted build; the store
    records its dtype and compression, and `cache info` shows them."""
    from cachegen.build import BuildConfig, build_cache
    from helpers import run_cli

    def build(out, **options):
        return build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=2,
                                       dtype=dtype, compression=compression, batch_size=4,
                                       progress=False, **options))

    build(tmp_path / "once.zarr")
    build(tmp_path / "resumed.zarr", part=(1, 2))
    summary = build(tmp_path / "resumed.zarr")
    assert summary.already > 0 and summary.cached > 0
    once, resumed = open_cache(tmp_path / "once.zarr"), open_cache(tmp_path / "resumed.zarr")
    assert sorted(once.ids) == sorted(resumed.ids) and len(once) == 24
    for uid in once.ids:
        np.testing.assert_array_equal(once.read_raw(uid), resumed.read_raw(uid))
    assert resumed.meta["dtype"] == dtype and resumed.meta["compression"] == compression
    info = run_cli("cache", "info", tmp_path / "resumed.zarr")
    assert f"dtype:        {dtype}" in info.output and f"compression {compression}" in info.output
