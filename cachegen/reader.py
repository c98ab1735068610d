"""Read a store: `CacheReader` checks the metadata, dtype, codecs and chunk shapes before zarr
decodes a byte, then reads utterances (from memory-mapped shard files where the store is local,
through zarr otherwise) and their pooled statistics; `open_cache` opens one from a folder, a
.zip file or an fsspec URL. Where the bytes come from is `cachegen.sources`; how zarr sees them,
`cachegen.zarr_view`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import SerError, StoreCorrupt, StoreError, UnsafeInput
from .sources import (ARRAY, POOLED, ROOT, LocalCopy, OverlaySource, Source, arrow_owned, open_source, read_key,
                      read_key_size, shard_layout)
from .store import (ALLOWED_CODECS, CHECKSUMS, FORMAT, INDEX_OPTIONAL, INDEX_SCHEMA, POOLED_CRC,
                    READABLE_VERSIONS, STORAGE_DTYPES, check_meta, checksum, crc_function, from_storage,
                    is_layer_list, pooled_shape, quiet_zarr, storage_width)
from .zarr_view import MAX_CHUNK_BYTES, MAX_METADATA_BYTES, MAX_SHARD_CHUNKS, SourceStore

log = logging.getLogger(__name__)


def check_safe(location: str, array_meta: dict) -> None:
    """Refuse dtypes, codecs and layouts outside what ser writes, before anything is decoded."""
    dtype = array_meta.get("data_type")
    if dtype not in STORAGE_DTYPES.values():
        raise UnsafeInput(f"{location}: refusing states of data type {json.dumps(dtype)}; expected one "
                          f"of {', '.join(sorted(set(STORAGE_DTYPES.values())))}")

    def names(codecs):
        for codec in codecs if isinstance(codecs, list) else [codecs]:
            codec = codec if isinstance(codec, dict) else {"name": codec}
            yield codec.get("name")
            config = codec.get("configuration") or {}
            yield from names(config.get("codecs", []))
            yield from names(config.get("index_codecs", []))

    unknown = sorted({str(n) for n in names(array_meta.get("codecs", [])) if n not in ALLOWED_CODECS})
    if unknown:
        raise UnsafeInput(f"{location}: refusing unknown codec(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(ALLOWED_CODECS))}")
    if array_meta.get("storage_transformers"):
        raise UnsafeInput(f"{location}: refusing storage transformers "
                          f"{[t.get('name') for t in array_meta['storage_transformers']]}")
    if array_meta.get("node_type") != "array" or len(array_meta.get("shape", [])) != 2:
        raise StoreCorrupt(f"{location}: 'states' must be a 2-D array (frames, hidden)")


def chunk_limits(location: str, name: str, array_meta: dict, *, shard: tuple[int, int],
                 inner: tuple[int, int]) -> tuple[int, int]:
    """(most bytes of one encoded inner chunk, of one shard file) that the chunk shapes of array
    `name` allow, after checking that they are the `shard` and `inner` chunk shapes the metadata
    declares, and not absurd. A chunk's decoded size is what zarr allocates to read even one
    row of it.

    Raises:
        UnsafeInput: a chunk shape that the metadata does not justify."""
    try:
        shape = [int(n) for n in array_meta["shape"]]
        shards = [int(n) for n in array_meta["chunk_grid"]["configuration"]["chunk_shape"]]
        chunks = shards
        for codec in array_meta.get("codecs", []):
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                chunks = [int(n) for n in codec["configuration"]["chunk_shape"]]
        itemsize = np.dtype(array_meta["data_type"]).itemsize
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StoreCorrupt(f"{location}: cannot be opened: the chunk layout of '{name}' is unreadable ({err})") from None
    wrong = (len(shape) != 2 or shape[1] != shard[1] or shards != list(shard) or chunks != list(inner)
             or min(shard[0], inner[0]) < 1 or shard[0] % inner[0])
    if wrong:
        raise UnsafeInput(f"{location}: refusing {name} with shard shape {shards} and chunk shape "
                          f"{chunks}; the metadata declares {tuple(shard)} and {tuple(inner)}")
    chunk_bytes, chunks = inner[0] * inner[1] * itemsize, shard[0] // inner[0]
    if chunk_bytes > MAX_CHUNK_BYTES or chunks > MAX_SHARD_CHUNKS:
        raise UnsafeInput(f"{location}: refusing chunks of {chunk_bytes / 2**20:.0f} MiB, {chunks} "
                          f"per shard (at most {MAX_CHUNK_BYTES // 2**20} MiB and {MAX_SHARD_CHUNKS})")
    encoded = chunk_bytes + chunk_bytes // 8 + 4096  # codec headers; compressed data never grows more
    return encoded, chunks * encoded + chunks * 16 + 4


# utterances whose mapped view a reader keeps (about 300 bytes each: 80 MB at most)
MAX_VIEWS = 2**18
MAX_TABLE_BYTES = 2**30  # a store's index or manifest, decoded (a million rows take a few hundred MiB)


def parquet_table(location: str, key: str, data: bytes) -> pa.Table:
    """The table in `data` (a store's Parquet file), refused before its values are decoded
    when they would take more than MAX_TABLE_BYTES: a Parquet bomb decodes from a few hundred
    bytes into gigabytes (a long string in a dictionary, referenced by every row; billions of
    rows of one run-length-encoded value). Text is read dictionary-encoded first, measured,
    then decoded.

    Raises:
        UnsafeInput: too large decoded, or nested columns (a store's files hold flat ones).
        pa.ArrowException, OSError: not a readable Parquet file."""
    import pyarrow.compute as pc

    buffer = arrow_owned(data)
    schema = pq.ParquetFile(pa.BufferReader(buffer)).schema_arrow
    nested = [f.name for f in schema if pa.types.is_nested(f.type)]
    if nested:
        raise UnsafeInput(f"{location}: refusing {key} with nested column '{nested[0]}' (a store's "
                          "index and manifest hold flat columns)")
    texts = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_binary(f.type)
             or pa.types.is_large_string(f.type) or pa.types.is_large_binary(f.type)]
    file = pq.ParquetFile(pa.BufferReader(buffer), read_dictionary=texts)
    row = sum(8 if f.name in texts else max(1, _bit_width(f.type) // 8) for f in schema)
    size = file.metadata.num_rows * row  # fixed-width values, and text offsets
    if size <= MAX_TABLE_BYTES:
        table = file.read(use_threads=False)
        for column in table.columns:
            if pa.types.is_dictionary(column.type):
                for chunk in column.chunks:
                    lengths = pc.binary_length(chunk.dictionary.cast(pa.large_binary()))
                    size += pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0
    if size > MAX_TABLE_BYTES:
        raise UnsafeInput(f"{location}: refusing {key}: its values would take {size / 2**20:.0f} MiB "
                          f"decoded (at most {MAX_TABLE_BYTES // 2**20}); damaged or hostile")
    return table.cast(pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
                                 for f in table.schema], metadata=table.schema.metadata))


def _bit_width(kind: pa.DataType) -> int:
    try:
        return kind.bit_width
    except ValueError:  # variable width (text is measured apart) or none (null)
        return 64


def _inner_codec(array_meta: dict) -> str | None:
    """How ser's fast local path decodes an inner chunk of the states: "none" (the bytes are the
    little-endian values), "blosc" or "zstd"; None for anything else (zarr then reads it)."""
    inner = array_meta["codecs"][0].get("configuration", {}).get("codecs", [])
    if not inner or inner[0].get("name") != "bytes":
        return None
    if (inner[0].get("configuration") or {}).get("endian", "little") != "little":
        return None
    rest = [c.get("name") for c in inner[1:]]
    return {(): "none", ("blosc",): "blosc", ("zstd",): "zstd"}.get(tuple(rest))


class LocalShards:
    """Rows of the states read straight from local files: a store folder, a stored zip member, or
    the local copy of a remote store (whatever `Source.file_span` can name).

    Each shard file is memory-mapped once (its index read and its crc32c checked then). An
    utterance whose rows are uncompressed and adjacent in the file (what ser writes) is returned
    as a read-only view of the mapped page cache, so reading it costs its checksum and no copy;
    anything else (compressed chunks, chunks never written, an utterance over several shards) is
    assembled into a new array. zarr's per-chunk asynchronous pipeline cost about ten times the
    copy itself (docs/benchmarks.md). Anything unexpected in a shard raises ValueError, which
    the reader reports as damage of the utterance; a shard with no local file gives None (zarr
    reads it then). A shard file must not be truncated in place while mapped (ser never does:
    every file is replaced by a rename).
    """

    def __init__(self, source: Source, key_of, *, layout: tuple[int, int, int], codec: str,
                 hidden: int, dtype: np.dtype):
        import resource

        self.source, self.key_of, self.codec = source, key_of, codec
        self.shard_rows, self.chunk_rows, self.index_size = layout
        self.hidden, self.dtype = hidden, np.dtype(dtype).newbyteorder("<")
        self.row_bytes = hidden * self.dtype.itemsize
        self.chunk_bytes = self.chunk_rows * self.row_bytes
        # each map holds a file descriptor: keep a quarter of what the process may open
        self.maps = min(4096, max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
        # shard -> (its chunk bytes, mapped; offset, length and run of adjacent chunks per chunk)
        self._shards: OrderedDict[int, tuple[np.ndarray, list[int], list[int], list[int]]] = OrderedDict()
        self._files: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.on_unmap = lambda: None  # called when maps are dropped: views of them must go too

    @classmethod
    def for_array(cls, source: Source, array_meta: dict, key_of) -> "LocalShards | None":
        layout, codec = shard_layout(array_meta), _inner_codec(array_meta)
        if layout is None or codec is None or (
                array_meta["chunk_grid"]["configuration"]["chunk_shape"][1] != array_meta["shape"][1]):
            return None
        return cls(source, key_of, layout=layout, codec=codec, hidden=array_meta["shape"][1],
                   dtype=np.dtype(array_meta["data_type"]))

    def read(self, start: int, frames: int) -> np.ndarray | None:
        """Rows [start, start + frames), or None when a shard has no local file."""
        shard, low = divmod(start, self.shard_rows)
        if self.codec == "none" and low + frames <= self.shard_rows:
            entry = self._shards.get(shard) or self._open(shard)
            if entry is None:
                return None
            data, offsets, _, runs = entry
            first, last = low // self.chunk_rows, (low + frames - 1) // self.chunk_rows
            if runs[first] == runs[last] >= 0:  # one run of adjacent chunks: a view, no copy
                begin = offsets[first] + (low - first * self.chunk_rows) * self.row_bytes
                return np.ndarray((frames, self.hidden), self.dtype, data, begin)
        out = np.empty((frames, self.hidden), self.dtype)
        row, end = start, start + frames
        while row < end:
            shard = row // self.shard_rows
            stop = min(end, (shard + 1) * self.shard_rows)
            base = shard * self.shard_rows
            if not self._copy_rows(shard, row - base, stop - base, out[row - start:stop - start]):
                return None
            row = stop
        return out

    def _open(self, shard: int) -> tuple[np.ndarray, list[int], list[int], list[int]] | None:
        """Map shard `shard` and check its index; None when it has no local file."""
        import mmap

        key = self.key_of(shard)
        span = self.source.file_span(key)
        if span is None:
            return None
        path, base, size = span
        if size < self.index_size:
            raise ValueError(f"{key} is shorter than its shard index")
        mapped = self._files.get(path)  # a zip's members share one map of the archive
        if mapped is None:
            with open(path, "rb") as f:
                mapped = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
            if base:
                self._files[path] = mapped
        if mapped.size < base + size:
            raise ValueError(f"{key} ends early")
        data = mapped[base:base + size]
        index = data[size - self.index_size:]
        if checksum(index[:-4], "crc32c") != int.from_bytes(index[-4:].tobytes(), "little"):
            raise ValueError(f"{key}: shard index fails its crc32c")
        table = index[:-4].view("<u8").reshape(-1, 2)
        data_size = size - self.index_size
        written = table[:, 0] != np.iinfo(np.uint64).max
        used = table[written]
        if ((used > data_size).any() or (used[:, 0] + used[:, 1] > data_size).any()
                or (self.codec == "none" and (used[:, 1] != self.chunk_bytes).any())):
            raise ValueError(f"{key}: shard index points outside its chunks")
        offsets, runs = table[:, 0].tolist(), []
        for chunk, offset in enumerate(offsets):  # runs of chunks adjacent in the file
            if not written[chunk]:
                runs.append(-1)
            elif chunk and runs[-1] >= 0 and offsets[chunk - 1] + self.chunk_bytes == offset:
                runs.append(runs[-1])
            else:
                runs.append(chunk)
        entry = (data[:data_size], offsets, table[:, 1].tolist(), runs)
        with self._lock:
            self._shards[shard] = entry
            while len(self._shards) > self.maps:  # arrays still viewing a dropped map keep it alive
                self._shards.popitem(last=False)
                self.on_unmap()
        return entry

    def forget(self, shards) -> None:
        """Map these shards again on their next read (their files were replaced)."""
        with self._lock:
            for shard in shards:
                self._shards.pop(shard, None)
        self.on_unmap()

    def _copy_rows(self, shard: int, low: int, high: int, out: np.ndarray) -> bool:
        """Rows [low, high) of shard `shard` into `out`; False when the shard is not local."""
        entry = self._shards.get(shard) or self._open(shard)
        if entry is None:
            return False
        data, offsets, lengths, _ = entry
        for chunk in range(low // self.chunk_rows, (high - 1) // self.chunk_rows + 1):
            first = max(low, chunk * self.chunk_rows)
            last = min(high, (chunk + 1) * self.chunk_rows)
            skip, rows = first - chunk * self.chunk_rows, slice(first - low, last - low)
            offset = offsets[chunk]
            if offset == np.iinfo(np.uint64).max:  # never written: the fill value
                out[rows] = 0
            elif self.codec == "none":
                begin = offset + skip * self.row_bytes
                out[rows] = data[begin:begin + (last - first) * self.row_bytes].view(self.dtype).reshape(-1, self.hidden)
            else:
                decoded = self._decode(data[offset:offset + lengths[chunk]])
                out[rows] = decoded.view(self.dtype).reshape(self.chunk_rows, self.hidden)[skip:skip + last - first]
        return True

    def _decode(self, chunk: np.ndarray) -> np.ndarray:
        import numcodecs

        decoder = numcodecs.Blosc() if self.codec == "blosc" else numcodecs.Zstd()
        decoded = np.frombuffer(decoder.decode(chunk), np.uint8)
        if decoded.size != self.chunk_bytes:
            raise ValueError(f"an inner chunk decodes to {decoded.size} bytes, not {self.chunk_bytes}")
        return decoded


class CacheReader:
    """Read-only view of a store: `.ids`, `len()`, `reader[id]` -> (frames, hidden) array,
    `.meta`, `.table` (the manifest), `.index` (one row per cached utterance), `.keys()` (the
    files that make the store)."""

    def __init__(self, location: str | Source, *, cache_dir: str | Path | None = None):
        import zarr

        self.source = location if isinstance(location, Source) else open_source(location, cache_dir=cache_dir)
        self.location = self.source.location
        try:
            self._open(zarr)
        except SerError:
            self.source.close()
            raise
        except Exception as err:  # metadata that parses as JSON but not as a zarr array
            self.source.close()
            raise StoreCorrupt(f"{self.location}: cannot be opened ({type(err).__name__}: {err})") from None
        except BaseException:
            self.source.close()
            raise

    @quiet_zarr()
    def _open(self, zarr) -> None:
        location = self.location
        raw = self._read_small(ROOT)
        if raw is None:
            raise StoreError(f"{location}: no zarr.json: not a ser store (an unfinished "
                             "`ser cache copy` has none until it is verified)")
        self.root_json = raw
        try:
            root = json.loads(raw)
        except ValueError as err:
            raise StoreCorrupt(f"{location}: zarr.json is not JSON ({err})") from None
        meta = root.get("attributes", {}).get("ser") if isinstance(root, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{location}: not a ser store (no 'ser' metadata in zarr.json)")
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(f"{location}: store format version {meta.get('format_version')} is not "
                             f"supported by this ser (reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}); rebuild it or install the "
                             "matching ser")
        if meta.get("checksum", "crc32") not in CHECKSUMS:
            raise StoreError(f"{location}: unknown checksum {meta.get('checksum')!r} (this ser knows "
                             f"{', '.join(CHECKSUMS)}); install the matching ser")
        check_meta(location, meta)
        consolidated = (root.get("consolidated_metadata") or {}).get("metadata") or {}
        if ARRAY not in consolidated:
            raise StoreError(f"{location}: zarr.json has no consolidated metadata, which reading "
                             "without listing (HTTP, zip) needs: its build was interrupted before "
                             "it was finalised; rerun `ser cache build` to resume")
        for name, node in consolidated.items():
            if node.get("node_type") == "array" or name == ARRAY:
                check_safe(location, node)
        if STORAGE_DTYPES.get(meta.get("dtype")) != consolidated[ARRAY]["data_type"]:
            raise StoreCorrupt(f"{location}: metadata dtype {meta.get('dtype')!r} does not match the "
                               f"states' data type {consolidated[ARRAY]['data_type']!r}")
        width = consolidated[ARRAY].get("shape", [0, 0])[1]
        if isinstance(meta.get("hidden_size"), int) and width != storage_width(meta["hidden_size"], meta["dtype"]):
            raise StoreCorrupt(f"{location}: states have {width} columns; hidden_size "
                               f"{meta['hidden_size']} in {meta['dtype']} needs "
                               f"{storage_width(meta['hidden_size'], meta['dtype'])}")
        self.meta: dict = meta
        self.dtype: str = meta["dtype"]
        self.checksum: str = meta.get("checksum", "crc32")
        self._crc = crc_function(self.checksum)
        # zarr reads the zarr.json checked here, never a second one (which a server could swap)
        self.store = SourceStore(OverlaySource(self.source, {ROOT: raw}))
        hidden = storage_width(meta["hidden_size"], meta["dtype"])  # int8 rows carry their scale
        self.store.limits[ARRAY] = chunk_limits(location, ARRAY, consolidated[ARRAY],
                                                shard=(meta["shard_frames"], hidden),
                                                inner=(meta["chunk_frames"], hidden))
        group = zarr.open_group(self.store, mode="r", zarr_format=3, use_consolidated=True)
        self.states = group[ARRAY]
        pooled = meta.get("pooled_layers") or []
        if not is_layer_list(pooled, meta["num_hidden_layers"]):
            raise StoreCorrupt(f"{location}: zarr.json metadata: field 'pooled_layers' is "
                               f"{json.dumps(pooled)[:60]}, expected distinct layer numbers in "
                               f"0..{meta['num_hidden_layers']}, in increasing order")
        self.pooled_layers: list[int] = pooled
        self.pooled_array = None
        if self.pooled_layers:
            expected = math.prod(pooled_shape(meta))
            node = consolidated.get(POOLED) or {}
            if node.get("data_type") != "float32" or node.get("shape", [0, 0])[1:] != [expected]:
                raise StoreCorrupt(f"{location}: metadata lists pooled layers {self.pooled_layers} "
                                   f"but the 'pooled' array is missing or not (utterances, {expected}) float32")
            slots = meta["shard_frames"] // meta["chunk_frames"]  # one row per utterance start
            self.store.limits[POOLED] = chunk_limits(location, POOLED, node, shard=(slots, expected),
                                                     inner=(1, expected))
            self.pooled_array = group[POOLED]
        index = self._parquet("index.parquet")
        if index is None:
            raise StoreError(f"{location}: index.parquet is missing: the build was interrupted "
                             "before its first commit was finalised; rerun `ser cache build`")
        self.index: pa.Table = index
        self._layout = shard_layout(consolidated[ARRAY]) if self.source.kind == "fsspec" else None
        self._local = LocalShards.for_array(self.source, consolidated[ARRAY], self._shard_key)
        # uid -> (view of a mapped shard, crc) of utterances read before: reading one again
        # costs its checksum and a dict lookup, the least Python under the GIL per read, which
        # is what lets reads scale with threads (docs/benchmarks.md, "Feeding a GPU")
        self._views: dict[str, tuple[np.ndarray, int]] = {}
        if self._local:
            self._local.on_unmap = self._views.clear
        self._as_stored = self.dtype in ("float16", "float32")
        expected_fields = list(INDEX_SCHEMA) + ([POOLED_CRC] if self.pooled_layers else [])
        missing = [f.name for f in expected_fields if f.name not in INDEX_OPTIONAL and (
                   self.index.schema.get_field_index(f.name) < 0
                   or not self.index.schema.field(f.name).type.equals(f.type))]
        if missing:
            raise StoreCorrupt(f"{location}: index.parquet lacks column(s) {', '.join(missing)} "
                               "of the expected type")
        manifest = self._parquet("manifest.parquet")
        self.has_manifest = manifest is not None
        self.table: pa.Table = manifest if manifest is not None else pa.table({})
        columns = self.index.to_pydict()
        self.ids: list[str] = columns["id"]
        self._rows = {uid: (start, frames, crc) for uid, start, frames, crc in
                      zip(columns["id"], columns["start"], columns["frames"], columns["crc32"])}
        self._pooled_crc = dict(zip(columns["id"], columns.get(POOLED_CRC.name) or []))
        if self.source.kind == "fsspec" or isinstance(self.source, LocalCopy) and self.source.fetched:
            self._check_unchanged()  # the index and manifest are of the zarr.json read first

    def _check_unchanged(self) -> None:
        """Refuse to go on when the remote zarr.json is no longer the one this reader opened: a
        store rebuilt or replaced on the server is never read mixed with the one opened (and its
        local copy, which may hold files of both, is dropped)."""
        remote = self.source.remote if isinstance(self.source, LocalCopy) else self.source
        if remote.kind != "fsspec" or getattr(self.source, "offline", False):
            return
        try:
            now = read_key(remote, ROOT)
        except StoreError:
            return  # unreachable now: nothing is known
        if now != self.root_json:
            if isinstance(self.source, LocalCopy):
                self.source.drop()
            raise StoreError(f"{self.location} changed while it was being read (its zarr.json is no "
                             "longer the one opened: rebuilt or replaced on the server?); run the "
                             "command again")

    def _read_small(self, key: str) -> bytes | None:
        """A metadata file, refused unread when it is larger than any store's (a zip's declared
        size, or a local file's, is known before anything is inflated or read)."""
        if self.source.kind in ("zip", "folder"):
            size = read_key_size(self.source, key)
            if size is not None and size > MAX_METADATA_BYTES:
                raise UnsafeInput(f"{self.location}: refusing {key} of {size} bytes (at most "
                                  f"{MAX_METADATA_BYTES} for a store's metadata); damaged or hostile")
        return read_key(self.source, key)

    def _parquet(self, key: str) -> pa.Table | None:
        data = self._read_small(key)
        if data is None:
            return None
        try:
            return parquet_table(self.location, key, data)
        except (pa.ArrowException, OSError) as err:
            raise StoreCorrupt(f"{self.location}: {key} cannot be read ({err})") from None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, uid: str) -> bool:
        return uid in self._rows

    def frames(self, uid: str) -> int:
        return self._rows[uid][1]

    def read_raw(self, uid: str) -> np.ndarray:
        """The stored array of `uid`, checked against its checksum. Over the network, an
        utterance that fails is never blamed on the store when the store changed on the server;
        from the local copy of a remote store, the files of one that fails are dropped from the
        copy and fetched once more (and dropped again if they still fail)."""
        seen = self._views.get(uid)
        if seen is not None:
            if self._crc(seen[0]) == seen[1]:
                return seen[0]
            self._views.pop(uid, None)  # read again below, and named there
        try:
            start, frames, crc = self._rows[uid]
        except KeyError:
            raise KeyError(f"{uid!r} is not in store {self.location}") from None
        if frames < 1 or start < 0:  # a damaged or hand-edited index: never an empty utterance
            raise StoreCorrupt(f"{self.location}: utterance '{uid}' has an impossible index row "
                               f"(start {start}, frames {frames}); run `ser cache verify`")
        try:  # the hot path: nothing more per read than the read and its check
            return self._read_checked(uid, start, frames, crc)
        except StoreCorrupt as err:
            rows = self.states.metadata.chunk_grid.chunk_shape[0]
            shards = range(start // rows, (start + frames - 1) // rows + 1)
            return self._damaged(err, lambda: self._read_checked(uid, start, frames, crc),
                                 [self._shard_key(shard) for shard in shards], shards)

    def _damaged(self, err: StoreCorrupt, read, keys: list[str], shards=()):
        """After `read()` found damage (`err`): over the network, a store changed on the server
        is named as such; from the local copy of a remote store, the files `keys` (and the
        mapped `shards`) are dropped from the copy and read once more, and dropped again if
        they still fail: the copy never keeps a file found wrong."""
        if isinstance(self.source, LocalCopy):
            self._forget(keys, shards)
            if not self.source.offline:
                try:
                    return read()
                except StoreCorrupt as again:
                    err = again
                    self._forget(keys, shards)
        self._check_unchanged()
        raise err

    def _forget(self, keys: list[str], shards) -> None:
        """Drop the local copy's files `keys`, and what this reader holds of them."""
        self.source.forget(keys)
        self.store.forget(keys)
        if self._local:
            self._local.forget(shards)

    def _read_checked(self, uid: str, start: int, frames: int, crc: int) -> np.ndarray:
        try:
            raw = self._local.read(start, frames) if self._local else None
            if raw is not None:  # little-endian and contiguous: checked in place (the hot path)
                crc_ok = self._crc(raw) == crc
                if crc_ok and raw.base is not None and len(self._views) < MAX_VIEWS:  # a view
                    self._views[uid] = (raw, crc)
            else:
                if self._layout:
                    self._prefetch(start, frames)
                raw = self.states[start:start + frames]
                crc_ok = checksum(raw, self.checksum) == crc
        except (StoreError, UnsafeInput):
            raise  # unreachable or refused: nothing is known about the bytes
        except Exception as err:  # a damaged shard fails inside the codec pipeline
            raise StoreCorrupt(f"{self.location}: utterance '{uid}' cannot be read ({err}); "
                               "run `ser cache verify`") from None
        if not crc_ok:
            raise StoreCorrupt(f"{self.location}: utterance '{uid}' fails its checksum (damaged or "
                               "missing chunk); run `ser cache verify` and rebuild the store")
        return raw

    def _prefetch(self, start: int, frames: int) -> None:
        """One ranged read per shard the utterance touches (remote sources only)."""
        from zarr.core.sync import sync

        shard_rows, chunk_rows, index_size = self._layout
        chunks, requests = shard_rows // chunk_rows, []
        for shard in range(start // shard_rows, (start + frames - 1) // shard_rows + 1):
            low = max(start, shard * shard_rows) - shard * shard_rows
            high = min(start + frames, (shard + 1) * shard_rows) - shard * shard_rows
            first, last = low // chunk_rows, (high - 1) // chunk_rows
            if last - first + 1 < chunks:  # zarr reads a whole shard in one piece by itself
                key = self._shard_key(shard)
                requests.append(self.store.prefetch(key, first, last, chunks=chunks, index_size=index_size))

        async def gather():
            await asyncio.gather(*requests)

        if requests:
            sync(gather())

    def pooled(self, uid: str) -> np.ndarray:
        """(layers, 2, hidden) float32 mean and std over frames of `uid`'s hidden states at
        each of `pooled_layers`, checked against its checksum.

        Raises:
            StoreError: the store was built without --pooled-layers.
            StoreCorrupt: the row fails its checksum.
        """
        if self.pooled_array is None:
            raise StoreError(f"{self.location}: holds no pooled statistics; build it with "
                             "`ser cache build ... --pooled-layers all`")
        if uid not in self._rows:
            raise KeyError(f"{uid!r} is not in store {self.location}")
        slot = self._rows[uid][0] // self.meta["chunk_frames"]
        try:
            return self._read_pooled(uid, slot)
        except StoreCorrupt as err:
            shard = slot // self.pooled_array.metadata.chunk_grid.chunk_shape[0]
            key = f"{POOLED}/{self.pooled_array.metadata.encode_chunk_key((shard, 0))}"
            return self._damaged(err, lambda: self._read_pooled(uid, slot), [key])

    def _read_pooled(self, uid: str, slot: int) -> np.ndarray:
        try:
            row = self.pooled_array[slot]
        except (StoreError, UnsafeInput):
            raise  # unreachable or refused: nothing is known about the bytes
        except Exception as err:
            raise StoreCorrupt(f"{self.location}: pooled statistics of '{uid}' cannot be read "
                               f"({err}); run `ser cache verify`") from None
        if checksum(row, self.checksum) != self._pooled_crc[uid]:
            raise StoreCorrupt(f"{self.location}: pooled statistics of '{uid}' fail their checksum "
                               "(damaged or missing chunk); run `ser cache verify` and rebuild the store")
        return row.reshape(pooled_shape(self.meta))

    def _shard_key(self, shard: int) -> str:
        return f"{ARRAY}/{self.states.metadata.encode_chunk_key((shard, 0))}"

    def __getitem__(self, uid: str) -> np.ndarray:
        """(frames, hidden) states of `uid`: float16/float32 as stored (read-only when they are
        a view of a mapped shard), bfloat16 widened and int8 dequantised to float32."""
        raw = self.read_raw(uid)
        return raw if self._as_stored else from_storage(raw, self.dtype)

    def shard_keys(self, uids=None) -> list[str]:
        """The shard files holding `uids` (default: every utterance), in grid order."""
        rows_per_file = self.states.metadata.chunk_grid.chunk_shape[0]
        numbers, pooled = set(), set()
        for uid in self.ids if uids is None else uids:
            start, frames, _ = self._rows[uid]
            numbers.update(range(start // rows_per_file, (start + max(frames, 1) - 1) // rows_per_file + 1))
            pooled.add(start // rows_per_file)  # pooled shard k holds the utterances starting in states shard k
        keys = [self._shard_key(n) for n in sorted(numbers)]
        if self.pooled_array is not None:
            keys += [f"{POOLED}/{self.pooled_array.metadata.encode_chunk_key((n, 0))}" for n in sorted(pooled)]
        return keys

    def keys(self) -> list[str]:
        """Every file of the store, named by the store itself (no listing): metadata first."""
        keys = [ROOT, f"{ARRAY}/zarr.json", "index.parquet"]
        keys += [f"{POOLED}/zarr.json"] if self.pooled_array is not None else []
        keys += ["manifest.parquet"] if self.has_manifest else []
        return keys + self.shard_keys()

    def nbytes(self) -> int | None:
        """Bytes of every file of the store (one size request per file when remote)."""
        from zarr.core.sync import sync

        async def sizes():
            return await asyncio.gather(*(self.source.size(key) for key in self.keys()))

        try:
            found = sync(sizes())
        except StoreError:
            return None
        return sum(s for s in found if s is not None)

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(location: str | Path, *, cache_dir: str | Path | None = None) -> CacheReader:
    """Open a store read-only; nothing is written to it, and it is never listed.

    Args:
        location: a store folder, a .zip of one, or an fsspec URL (http(s)://, s3://, gs://;
            cloud backends need `pip install 'ser[s3]'` or `'ser[gs]'`).
        cache_dir: keep the files of a remote store here after their first read, so later
            epochs and later runs read from local disk (and still work when the remote is down).

    Raises:
        StoreError: no store there, unreachable, unfinished, or another format version.
        UnsafeInput: a dtype, codec or zip member that ser never writes.
        StoreCorrupt: metadata or index that cannot be read.

    Example:
        >>> reader = open_cache("http://nas:8000/msp.zarr", cache_dir="~/.cache/ser")  # doctest: +SKIP
        >>> reader[reader.ids[0]].shape  # doctest: +SKIP
        (312, 768)
    """
    return CacheReader(str(location), cache_dir=os.path.expanduser(cache_dir) if cache_dir else None)
