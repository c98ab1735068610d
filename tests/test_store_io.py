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
                zero_chunk: bool = False) -> dict[str, np.ndarray]:
    """A store of random float32 states (as `dtype`) with short, chunk-crossing and
    longer-than-a-shard utterances; returns the float32 states by id."""
    import torch

    rng = np.random.default_rng(seed)
    meta = {"format": FORMAT, "format_version": version, "dtype": dtype, "hidden_size": HIDDEN,
            "chunk_frames": CHUNK, "shard_frames": SHARD, "layers": 2, "frame_rate": 50.0}
    if checksum:
        meta["checksum"] = checksum
    if compression:
        meta["compression"] = compression
    writer = StoreWriter(path, meta)
    states = {}
    for i, frames in enumerate([1, 7, 8, 9, 30, 63, 64, 150, 5, 17, 40, 3]):
        values = rng.standard_normal((frames, HIDDEN)).astype(np.float32) * 3
        if zero_chunk and frames == 40:
            values[8:24] = 0  # whole inner chunks of zeros: zarr writes no bytes for them
        states[f"u{i}"] = values
        writer.add({"id": f"u{i}", "seconds": frames / 50, "source_rate": 16000, "audio_sha256": ""},
                   to_storage(torch.from_numpy(values), dtype))
    writer.flush()
    writer.finalize(table=None, extra_meta={"complete": True})
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


def test_damaged_shard_index_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    write_store(store)
    path = shard_file(store)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt, match="'u0'.*crc32c"):
        open_cache(store)["u0"]


@pytest.mark.parametrize("edit", [
    lambda t: t.__setitem__((0, 0), 2**40),  # offset far beyond the file
    lambda t: t.__setitem__((0, 1), 7),  # an uncompressed chunk of the wrong length
    lambda t: t.__setitem__((1, 0), 2**64 - 2),  # offset + length overflowing 64 bits
])
def test_shard_index_pointing_outside_is_refused(tmp_path, edit):
    store = tmp_path / "s.zarr"
    write_store(store)
    rewrite_index(shard_file(store), edit)
    with pytest.raises(StoreCorrupt, match="'u0'.*outside"):
        open_cache(store)["u0"]


def test_truncated_shard_is_refused(tmp_path):
    store = tmp_path / "s.zarr"
    write_store(store)
    path = shard_file(store)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(StoreCorrupt, match="'u0'"):
        open_cache(store)["u0"]


def test_missing_shard_reads_as_damage(tmp_path):
    store = tmp_path / "s.zarr"
    write_store(store)
    shard_file(store).unlink()
    with pytest.raises(StoreCorrupt, match="'u0'.*checksum"):
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
