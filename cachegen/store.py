"""The store: lower-layer hidden states of every utterance in one Zarr v3 group.

Layout (docs/cache-format.md has the full description):
    zarr.json          group; attributes["ser"] = metadata; consolidated metadata of `states`
    states/            (capacity, hidden) array, sharded: shard files of `shard_frames` rows,
                       inner chunks of `chunk_frames` rows; every utterance starts on an inner
                       chunk and never crosses a shard (unless longer than one)
    pooled/            (slots, values) float32, only with --pooled-layers: per utterance the
                       mean and std over frames of each pooled layer, in slot start // chunk_frames
    index.parquet      id, start, frames, seconds, source_rate, audio_sha256, crc32[, pooled_crc32]
    manifest.parquet   the manifest's columns (labels for convenience; states never use them)
    _building/         commit records of a build in progress (gone once finalised)
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tempfile
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreCorrupt, StoreError

FORMAT = "ser-cache"
# Version 2 added the `checksum` and `compression` metadata fields (CRC-32C, no compression by
# default); version 1 stores (zlib CRC-32, blosc zstd) stay readable.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STORAGE_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16", "int8": "int8"}
# int8 rows hold `hidden` quantised values then the frame's float32 scale as 4 bytes
SCALE_BYTES = {"int8": 4}
# Compression of the inner chunks, by the metadata's `compression` (absent: zstd, the codec of
# version 1 stores); chosen by measurement (docs/benchmarks.md): "none" by default.
COMPRESSIONS = ("none", "lz4", "zstd")
# Checksum of an utterance's stored bytes, by the metadata's `checksum` (absent: crc32).
CHECKSUMS = ("crc32", "crc32c")
# Codecs a store may use; anything else is refused before a byte is decoded.
ALLOWED_CODECS = {"sharding_indexed", "bytes", "blosc", "zstd", "gzip", "crc32c", "transpose"}
# Fields that decide whether an existing store can be resumed or trained from.
FINGERPRINT = ("format_version", "model_sha256", "model_config_sha256", "model_type", "layers",
               "num_hidden_layers", "hidden_size", "do_stable_layer_norm", "dtype", "preprocessing",
               "sample_rate", "pooled_layers")
INDEX_SCHEMA = pa.schema([
    ("id", pa.string()), ("start", pa.int64()), ("frames", pa.int64()), ("seconds", pa.float64()),
    ("source_rate", pa.int64()), ("audio_sha256", pa.string()), ("crc32", pa.int64()),
    # size and mtime of the audio file when it was read: a rerun hashes only files whose size
    # or mtime differ (absent, null, in stores built before they were recorded)
    ("audio_bytes", pa.int64()), ("audio_mtime_ns", pa.int64()),
])
INDEX_OPTIONAL = {"audio_bytes", "audio_mtime_ns"}
# Stores with pooled statistics (`pooled_layers` in the metadata) add this column.
POOLED_CRC = pa.field("pooled_crc32", pa.int64())


def index_schema(meta: dict) -> pa.Schema:
    return INDEX_SCHEMA.append(POOLED_CRC) if meta.get("pooled_layers") else INDEX_SCHEMA


def is_layer_list(value, highest: int | None = None) -> bool:
    """Whether `value` (read from JSON) lists distinct layer numbers in increasing order, each
    in 0..`highest`: a store's or a run's pooled layers."""
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n and (highest is None or n <= highest)
        for n in value) and value == sorted(set(value))


def pooled_shape(meta: dict) -> tuple[int, int, int]:
    """(layers, 2, hidden): how a row of `pooled` reshapes (mean and std of each pooled layer)."""
    return len(meta["pooled_layers"]), 2, meta["hidden_size"]


@contextmanager
def quiet_zarr():
    """Within the block (or the decorated function), zarr does not warn about what ser does on
    purpose (consolidated metadata, parquet files beside the arrays); the program's own warning
    filters are restored afterwards."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
        yield


def compressors(compression: str) -> list:
    """The zarr compressors of a `compression` name (byte shuffles suit 16-bit floats)."""
    from zarr.codecs import BloscCodec

    return {"none": [], "lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
            "zstd": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]}[compression]


def storage_width(hidden: int, dtype: str) -> int:
    """Columns of the stored array: `hidden`, plus the scale's bytes for int8."""
    return hidden + SCALE_BYTES.get(dtype, 0)


def to_storage(states, dtype: str) -> np.ndarray:
    """torch tensor (frames, hidden), float32 or already in the storage dtype -> numpy array
    in the storage dtype.

    int8 is quantised per frame: scale = max |x| over the frame's channels / 127, value =
    round(x / scale), so that every value is within scale / 2 = max |x| / 254 of the float32
    state (docs/cache-format.md); the scale follows the values in the same row."""
    import torch

    if dtype == "bfloat16":
        return states.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if dtype == "int8":
        values = states.detach().float().cpu().numpy()
        scale = (np.abs(values).max(axis=1, initial=0.0) / 127).astype(np.float32)
        quantised = np.rint(values / np.where(scale > 0, scale, 1)[:, None]).clip(-127, 127)
        out = np.empty((values.shape[0], storage_width(values.shape[1], dtype)), np.int8)
        out[:, :values.shape[1]] = quantised
        out[:, values.shape[1]:] = scale.astype("<f4").view(np.int8).reshape(-1, 4)
        return out
    return states.to(getattr(torch, dtype)).numpy()


def int8_parts(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored int8 rows -> (values (frames, hidden) int8, scales (frames, 1) float32)."""
    scales = np.ascontiguousarray(array[:, -SCALE_BYTES["int8"]:]).view("<f4")
    return array[:, :-SCALE_BYTES["int8"]], scales


def from_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array -> numpy float array (bfloat16 bits widen exactly to float32; int8 is
    dequantised to float32)."""
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        values, scales = int8_parts(array)
        return values.astype(np.float32) * scales
    return array


# the dtype training moves to the device: the stored one (int8 rows keep their scales and are
# dequantised on the device; bfloat16 travels as its bits)
COMPACT_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16", "int8": "int8"}


def crc_function(kind: str):
    """The CRC of a buffer's bytes: "crc32c" (Castagnoli, in hardware where the CPU has it) or
    "crc32" (zlib's, the checksum of version 1 stores)."""
    if kind == "crc32c":
        import crc32c

        return crc32c.crc32c
    return zlib.crc32


def checksum(array: np.ndarray, kind: str = "crc32c") -> int:
    """CRC of the little-endian bytes of `array`. No copy when already little-endian and contiguous."""
    return crc_function(kind)(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")))


def default_shard_frames(hidden: int, dtype: str, chunk_frames: int) -> int:
    """About 16 MiB per shard file: few files per audio hour, small enough to write at once."""
    frame_bytes = storage_width(hidden, dtype) * np.dtype(STORAGE_DTYPES[dtype]).itemsize
    frames = 1 << max(0, int(np.log2(16 * 2**20 / frame_bytes)))
    return max(chunk_frames, frames // chunk_frames * chunk_frames)


def aligned(frames: int, chunk_frames: int) -> int:
    return -(-frames // chunk_frames) * chunk_frames


def current_umask() -> int:
    """The process's umask now, read without changing it (Linux reports it in /proc); elsewhere
    set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a filesystem without fsync
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; teammates must read a shared store
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        fsync_path(path.parent)  # the rename itself survives a power cut
    except PermissionError:  # a folder one may write but not read: the file is written all the same
        pass


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# Metadata fields every reader relies on, with their types; checked before any is used.
META_FIELDS = {"format": str, "format_version": int, "model_id": str, "model_sha256": str,
               "model_type": str, "layers": int, "num_hidden_layers": int, "hidden_size": int,
               "dtype": str, "frame_rate": (int, float), "sample_rate": int, "chunk_frames": int,
               "shard_frames": int}
# Fields checked when present (hand-written stores may leave them out).
OPTIONAL_META_FIELDS = {"do_stable_layer_norm": bool, "complete": bool, "failures": list, "versions": dict,
                        "created": str, "updated": str, "model_config_sha256": str, "compression": str}
# What a store folder holds at its top level (besides build locks and temp files of atomic
# writes): `--overwrite` deletes nothing else.
STORE_ENTRIES = {"zarr.json", "states", "index.parquet", "manifest.parquet", "_building"}


def check_meta(location: str, meta) -> dict:
    """`meta` when every field in META_FIELDS is present, of its type and in range, and those of
    OPTIONAL_META_FIELDS that are present are of their type.

    Raises:
        StoreCorrupt: naming the first field that is missing or wrong.
    """
    where = f"{location}: zarr.json metadata"
    if not isinstance(meta, dict):
        raise StoreCorrupt(f"{where} is not an object")
    for name, kind in (META_FIELDS | OPTIONAL_META_FIELDS).items():
        value = meta.get(name)
        if value is None and name in OPTIONAL_META_FIELDS:
            continue
        if value is None:
            raise StoreCorrupt(f"{where} lacks field '{name}'; rebuild the store")
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise StoreCorrupt(f"{where}: field '{name}' is {json.dumps(value)[:60]}, expected "
                               f"{' or '.join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))}")
    if not all(isinstance(f, dict) and isinstance(f.get("id"), str) and isinstance(f.get("error"), str)
               for f in meta.get("failures") or []):
        raise StoreCorrupt(f"{where}: field 'failures' is {json.dumps(meta['failures'])[:60]}, "
                           "expected a list of {\"id\": ..., \"error\": ...}")
    if meta["dtype"] not in STORAGE_DTYPES:
        raise StoreCorrupt(f"{where}: field 'dtype' is {meta['dtype']!r}, expected one of "
                           f"{', '.join(STORAGE_DTYPES)}")
    positive = ("num_hidden_layers", "hidden_size", "frame_rate", "sample_rate", "chunk_frames",
                "shard_frames")
    for name in positive:
        if not 0 < meta[name] < 2**40:
            raise StoreCorrupt(f"{where}: field '{name}' is {meta[name]}, expected a positive number")
    if not 0 <= meta["layers"] <= meta["num_hidden_layers"]:
        raise StoreCorrupt(f"{where}: field 'layers' is {meta['layers']}, expected 0 to "
                           f"num_hidden_layers ({meta['num_hidden_layers']})")
    if meta["shard_frames"] % meta["chunk_frames"]:
        raise StoreCorrupt(f"{where}: 'shard_frames' {meta['shard_frames']} is not a multiple of "
                           f"'chunk_frames' {meta['chunk_frames']}")
    return meta


def read_root(location: str, raw: bytes) -> dict:
    """A store's zarr.json as a dict; garbage is named, never a traceback."""
    try:
        root = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise StoreCorrupt(f"{location}: zarr.json is not JSON ({err})") from None
    if not isinstance(root, dict):
        raise StoreCorrupt(f"{location}: zarr.json is not a JSON object")
    return root


def ser_meta(root: dict) -> dict | None:
    """The 'ser' attributes of a parsed zarr.json, or None when it is not a ser store."""
    attributes = root.get("attributes")
    meta = attributes.get("ser") if isinstance(attributes, dict) else None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def read_meta(path: str | Path) -> dict | None:
    """The checked metadata of a local store, or None when `path` holds no zarr.json.

    Raises:
        StoreCorrupt: zarr.json is not JSON, or its metadata lacks a field or has a wrong one.
        StoreError: zarr.json is not a ser store's.
    """
    root = Path(path) / "zarr.json"
    if not root.is_file():
        return None
    try:
        raw = root.read_bytes()
    except OSError as err:
        raise StoreError(f"{root}: cannot read ({err.strerror})") from None
    meta = ser_meta(read_root(str(path), raw))
    if meta is None:
        raise StoreError(f"{path}: holds a zarr.json that is not a ser store's; choose another --out")
    return check_meta(str(path), meta)


def is_store_folder(path: Path) -> bool:
    """Whether `path` holds a ser store and nothing else (so that deleting it loses no other
    file): a zarr.json with ser metadata, and only the entries a store has."""
    from .lock import is_lock_file

    try:
        meta = ser_meta(read_root(str(path), (path / "zarr.json").read_bytes()))
    except (OSError, StoreCorrupt):
        return False
    others = [p.name for p in path.iterdir() if p.name not in STORE_ENTRIES
              and not is_lock_file(p.name) and not (p.name.startswith(".") and p.name.endswith(".partial"))]
    return meta is not None and not others


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """The first fingerprint field that differs, as 'field: old -> new', or None."""
    for field in FINGERPRINT:
        if old.get(field) != new.get(field):
            return f"{field}: store has {old.get(field)!r}, this build has {new.get(field)!r}"
    return None


# Shards per writer region: writer w of W (a process of a multi-process build, or a --part)
# writes only shards [w * REGION, (w + 1) * REGION), so writers never share a shard file.
# 2**20 shards of ~16 MiB: far more audio than any corpus; the array is sparse, files are not.
REGION = 2**20


class StoreWriter:
    """Appends utterances to a local store; commits whole shards, one writer per shard.

    `add` buffers states into the current shard; a full shard is written in one piece (zarr
    rewrites whole shards anyway) by a background thread, then its index records are committed
    by an atomic rename into `_building/`. `finalize` merges the records into index.parquet and
    consolidates metadata. What is committed survives a kill; what was not is simply redone.
    Several writers (processes or parts) may build one store at once, each in its own region.
    """

    @quiet_zarr()
    def __init__(self, path: str | Path, meta: dict, *, writer: int = 0):
        import zarr

        self.path = Path(path)
        self.meta = meta
        self.dtype = meta["dtype"]
        self.checksum = meta.get("checksum", "crc32")
        self.chunk_frames = meta["chunk_frames"]
        self.shard_frames = meta["shard_frames"]
        self.hidden = storage_width(meta["hidden_size"], meta["dtype"])  # columns as stored
        self.path.mkdir(parents=True, exist_ok=True)
        # mode "a" never deletes: writers starting together may all get here first, and the
        # one that loses the race to create the group finds it created
        try:
            group = zarr.open_group(str(self.path), mode="a")
        except zarr.errors.ContainsGroupError:
            group = zarr.open_group(str(self.path), mode="r+")
        if "ser" not in group.attrs:
            group.attrs["ser"] = meta
        self.pooled_values = math.prod(pooled_shape(meta)) if meta.get("pooled_layers") else 0
        self.slots = self.shard_frames // self.chunk_frames  # pooled rows per shard
        if self.pooled_values and "pooled" not in group:
            try:  # one row per utterance, in slot start // chunk_frames; shards match the states'
                group.create_array(
                    "pooled", shape=(0, self.pooled_values), dtype="float32",
                    chunks=(1, self.pooled_values), shards=(self.slots, self.pooled_values),
                    compressors=[zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
                    fill_value=0, dimension_names=["utterance", "statistic"])
            except zarr.errors.ContainsArrayError:
                pass
        if "states" not in group:
            try:
                group.create_array(
                    "states", shape=(0, self.hidden), dtype=STORAGE_DTYPES[self.dtype],
                    chunks=(self.chunk_frames, self.hidden), shards=(self.shard_frames, self.hidden),
                    compressors=compressors(meta.get("compression", "zstd")) or None,
                    fill_value=0, dimension_names=["frame", "hidden"])
            except zarr.errors.ContainsArrayError:
                pass
        (self.path / "_building").mkdir(exist_ok=True)
        self.group = zarr.open_group(str(self.path), mode="r+")
        self.states = self.group["states"]
        self.plain = plain_shards(self.states.metadata.to_dict())
        self.pooled = self.group["pooled"] if self.pooled_values else None
        self.committed = load_index(self.path)
        first, last = writer * REGION, (writer + 1) * REGION
        mine = [r["start"] + aligned(r["frames"], self.chunk_frames) for r in self.committed.values()
                if first <= r["start"] // self.shard_frames < last]
        self.next_shard = max(first, -(-max(mine, default=0) // self.shard_frames))
        self.region_end = last
        capacity = last * self.shard_frames
        from zarr.core.sync import sync
        if self.states.shape[0] < capacity:  # this handle's view only grows; finalize sets the truth
            sync(self.states.async_array.resize((capacity, self.hidden), delete_outside_chunks=False))
        if self.pooled is not None and self.pooled.shape[0] < last * self.slots:
            sync(self.pooled.async_array.resize((last * self.slots, self.pooled_values),
                                                delete_outside_chunks=False))
        self.buffer = None
        self.pending: list[dict] = []
        self.cursor = 0
        self.io = ThreadPoolExecutor(max_workers=1)
        self.in_flight: Future | None = None

    def add(self, record: dict, states: np.ndarray, pooled: np.ndarray | None = None) -> None:
        """Queue one utterance's (frames, hidden) states; `record` holds its index fields;
        `pooled` its (layers, 2, hidden) statistics when the store keeps them."""
        if self.pooled is not None:
            if pooled is None or pooled.size != self.pooled_values:
                raise StoreError(f"{self.path}: utterance '{record['id']}' needs pooled statistics "
                                 f"of {self.pooled_values} values")
            record = {**record, "_pooled": np.ascontiguousarray(pooled, np.float32).reshape(-1)}
        frames = states.shape[0]
        size = aligned(frames, self.chunk_frames)
        if size > self.shard_frames:  # a very long utterance gets whole shards of its own
            self.flush()
            shards = -(-size // self.shard_frames)
            buffer = np.zeros((shards * self.shard_frames, self.hidden), states.dtype)
            buffer[:frames] = states
            self._commit(buffer, [self._record(record, states, self.next_shard * self.shard_frames)])
            self.next_shard += shards
            return
        if self.cursor + size > self.shard_frames:
            self.flush()
        if self.buffer is None:
            self.buffer = np.zeros((self.shard_frames, self.hidden), states.dtype)
        start = self.next_shard * self.shard_frames + self.cursor
        self.buffer[self.cursor:self.cursor + frames] = states
        self.pending.append(self._record(record, states, start))
        self.cursor += size

    def _record(self, record: dict, states: np.ndarray, start: int) -> dict:
        return {**record, "start": start, "frames": states.shape[0], "crc32": checksum(states, self.checksum)}

    def flush(self) -> None:
        if not self.pending:
            return
        self._commit(self.buffer, self.pending)
        self.next_shard += 1
        self.buffer, self.pending, self.cursor = None, [], 0

    def _commit(self, buffer: np.ndarray, records: list[dict]) -> None:
        first = records[0]["start"] // self.shard_frames * self.shard_frames
        self.wait()
        self.in_flight = self.io.submit(self._write, first, buffer, records)

    def _write(self, first: int, buffer: np.ndarray, records: list[dict]) -> None:
        end = first + buffer.shape[0]
        if end > self.region_end * self.shard_frames:
            raise StoreError(f"{self.path}: writer region full ({REGION} shards)")
        if self.plain:
            for shard in range(first // self.shard_frames, end // self.shard_frames):
                rows = buffer[(shard - first // self.shard_frames) * self.shard_frames:][:self.shard_frames]
                self._write_shard(shard, rows)
        else:
            self.states[first:end] = buffer
        if self.pooled is not None:  # before the commit record, like the states
            shard = first // self.shard_frames
            rows = np.zeros((self.slots, self.pooled_values), np.float32)
            for r in records:
                rows[r["start"] // self.chunk_frames - shard * self.slots] = r["_pooled"]
                r["pooled_crc32"] = checksum(r.pop("_pooled"), self.checksum)
            self.pooled[shard * self.slots:(shard + 1) * self.slots] = rows
        table = pa.Table.from_pylist(records, schema=index_schema(self.meta))
        # the record count in the name lets a progress bar count commits without reading them
        name = f"shard-{first // self.shard_frames:012d}-n{len(records)}.parquet"
        write_atomic(self.path / "_building" / name, parquet_bytes(table))
        for r in records:
            self.committed[r["id"]] = r

    def _write_shard(self, shard: int, rows: np.ndarray) -> None:
        """Write one shard file of an uncompressed store as zarr's sharding codec would, byte for
        byte (inner chunks in order, those equal to the fill value left out, then the index of
        little-endian uint64 (offset, length) pairs and its crc32c), without zarr's per-chunk
        pipeline, which writes at a third of the speed (docs/benchmarks.md, "Feeding a GPU")."""
        chunks = self.shard_frames // self.chunk_frames
        data = np.ascontiguousarray(rows, rows.dtype.newbyteorder("<")).view(np.uint8).reshape(chunks, -1)
        written = data.any(axis=1)  # zarr compares bit patterns with the fill value 0
        index = np.full((chunks, 2), 2**64 - 1, "<u8")
        index[written, 1] = data.shape[1]
        index[written, 0] = np.arange(int(written.sum()), dtype="<u8") * data.shape[1]
        path = self.path / "states" / self.states.metadata.encode_chunk_key((shard, 0))
        if not written.any():  # zarr keeps no file for a shard of fill values
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        table = index.tobytes()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            with open(tmp, "wb") as f:
                edges = np.flatnonzero(np.diff(np.concatenate(([0], written.view(np.int8), [0]))))
                for begin, end in zip(edges[::2], edges[1::2]):  # runs of written chunks
                    f.write(memoryview(data[begin:end]))
                f.write(table + checksum(np.frombuffer(table, np.uint8)).to_bytes(4, "little"))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def retire(self, ids: set[str]) -> None:
        """Forget the committed records of `ids` (their audio changed), so they are computed again.

        Every commit record and index.parquet listing one of them is rewritten without it
        (atomically; a kill in between leaves some still listed, and a rerun finds them changed
        again). Their old rows stay in the array, unused. Only the holder of the store's build
        lock may call this: it rewrites other writers' records."""
        self.wait()
        files = [self.path / "index.parquet"] if (self.path / "index.parquet").is_file() else []
        files += sorted((self.path / "_building").glob("shard-*.parquet"))
        for file in files:
            table = pq.read_table(file)
            keep = [uid not in ids for uid in table.column("id").to_pylist()]
            if all(keep):
                continue
            kept = table.filter(pa.array(keep))
            if file.parent.name == "_building":  # the record count is in the name
                first = file.name.split("-n")[0]
                file.unlink()
                if kept.num_rows:
                    write_atomic(file.with_name(f"{first}-n{kept.num_rows}.parquet"), parquet_bytes(kept))
            else:
                write_atomic(file, parquet_bytes(kept))
        for uid in ids:
            self.committed.pop(uid, None)

    def wait(self) -> None:
        """Block until the shard being written is committed; re-raise its error."""
        if self.in_flight is not None:
            future, self.in_flight = self.in_flight, None
            future.result()

    @quiet_zarr()
    def finalize(self, *, table: pa.Table | None, extra_meta: dict) -> None:
        """Merge committed records into index.parquet, write metadata, consolidate."""
        import zarr

        from zarr.core.sync import sync

        self.wait()
        self.committed = load_index(self.path)  # other writers' commits too
        rows = sorted(self.committed.values(), key=lambda r: r["start"])
        used = max((r["start"] + r["frames"] for r in rows), default=0)
        sync(self.states.async_array.resize((used, self.hidden), delete_outside_chunks=False))
        if self.pooled is not None:
            sync(self.pooled.async_array.resize((-(-used // self.chunk_frames), self.pooled_values),
                                                delete_outside_chunks=False))
        self.group.attrs["ser"] = {**self.meta, **extra_meta}
        # the shape first, the index after: a kill in between leaves an old index inside a
        # larger array (still valid), never a new index beyond an old shape
        zarr.consolidate_metadata(str(self.path))
        index = pa.Table.from_pylist(rows, schema=index_schema(self.meta))
        write_atomic(self.path / "index.parquet", parquet_bytes(index))
        if table is not None:
            write_atomic(self.path / "manifest.parquet", parquet_bytes(table))
        shutil.rmtree(self.path / "_building", ignore_errors=True)

    def close(self) -> None:
        self.io.shutdown(wait=True)


def plain_shards(array_meta: dict) -> bool:
    """Whether an array's shards hold uncompressed little-endian inner chunks with the index at
    the end ([bytes, crc32c]): the layout `StoreWriter` writes without zarr."""
    codecs = array_meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    config = codecs[0].get("configuration", {})
    inner = config.get("codecs", [])
    return (config.get("index_location", "end") == "end"
            and [c.get("name") for c in config.get("index_codecs", [])] == ["bytes", "crc32c"]
            and len(inner) == 1 and inner[0].get("name") == "bytes"
            and (inner[0].get("configuration") or {}).get("endian", "little") == "little")


def committed_count(path: Path) -> int:
    """Utterances committed by unfinalised writers, counted from record names (no reads)."""
    folder = Path(path) / "_building"
    names = [f.name for f in folder.glob("shard-*-n*.parquet")] if folder.is_dir() else []
    return sum(int(name.rsplit("-n", 1)[1].split(".")[0]) for name in names)


def load_index(path: Path) -> dict[str, dict]:
    """Committed records of a local store: index.parquet plus `_building/` commit records."""
    records: dict[str, dict] = {}
    files = [path / "index.parquet"] if (path / "index.parquet").is_file() else []
    files += sorted((path / "_building").glob("shard-*.parquet")) if (path / "_building").is_dir() else []
    for file in files:
        try:
            # one small file each: ParquetFile skips read_table's dataset machinery (8x faster)
            rows = pq.ParquetFile(file).read(use_threads=False).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise StoreCorrupt(f"{file}: cannot be read ({str(err).splitlines()[0]}); the store's "
                               "index is damaged: rebuild it with --overwrite") from None
        for r in rows:
            if not isinstance(r.get("id"), str) or not all(
                    isinstance(r.get(k), int) for k in ("start", "frames", "crc32")):
                raise StoreCorrupt(f"{file}: a record lacks id, start, frames or crc32; the store's "
                                   "index is damaged: rebuild it with --overwrite")
            records[r["id"]] = r
    return records
