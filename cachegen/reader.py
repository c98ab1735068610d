"""Open a store read-only from a local folder, a .zip file or an fsspec URL (http, s3, gs).

Each place a store can live is a `Source`: it hands out the bytes of a key, whole or a range, and
nothing else: no listing (HTTP has none) and no writes. `SourceStore` lets zarr read the states
through any source; `CacheReader` checks the metadata, dtype and codecs before zarr decodes a byte.
`LocalCopy` keeps the files of a remote store on local disk after their first use (`--cache-dir`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import struct
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, SerError, StoreCorrupt, StoreError, UnsafeInput
from .store import (ALLOWED_CODECS, CHECKSUMS, FORMAT, INDEX_OPTIONAL, INDEX_SCHEMA, POOLED_CRC,
                    READABLE_VERSIONS, STORAGE_DTYPES, check_meta, checksum, from_storage,
                    pooled_shape, quiet_zarr, storage_width, write_atomic)

log = logging.getLogger(__name__)

# What a store's files may weigh, decoded; anything larger is refused before it is read or
# inflated (a zip or decompression bomb). A ser store's zarr.json and Parquet files stay far
# below the first; the others follow from the chunk shapes, which must match the metadata.
MAX_METADATA_BYTES = 256 * 2**20
MAX_CHUNK_BYTES = 64 * 2**20  # one inner chunk of states
MAX_SHARD_CHUNKS = 2**16  # inner chunks per shard (its index is 16 bytes each)

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|::")  # an fsspec URL, chained ones included
EXTRAS = {"http": "http", "https": "http", "s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}
ROOT, ARRAY, POOLED = "zarr.json", "states", "pooled"


# --- sources: the bytes of a store's keys, one class per place a store can live ---------------

class Source:
    """Read-only bytes of a store's keys ('zarr.json', 'states/c/0/0', ...); no listing."""

    kind = "source"
    location: str

    async def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes | None:
        """Bytes [start:end) of `key`; a negative `start` with no `end` means the last -start bytes.
        None when the key does not exist."""
        raise NotImplementedError

    async def size(self, key: str) -> int | None:
        """Size of `key` in bytes, or None when it does not exist."""
        raise NotImplementedError

    def file_span(self, key: str) -> tuple[str, int, int] | None:
        """(local file, offset, size) holding the bytes of `key` as they are, for reading them
        with `os.pread`; None when they are not in a local file (remote, or compressed in a zip)."""
        return None

    def close(self) -> None:
        pass


def arrow_owned(data: bytes) -> pa.Buffer:
    """A copy of `data` in memory Arrow owns, for Arrow to read from. Arrow's scan threads may
    drop the last reference to what it reads; a buffer that wraps a Python object then takes
    the GIL from a native thread, which crashes CPython 3.11 under tracemalloc or at exit."""
    buffer = pa.allocate_buffer(len(data))
    np.frombuffer(buffer, np.uint8)[:] = np.frombuffer(data, np.uint8)
    return buffer


def read_key(source: Source, key: str, start: int | None = None, end: int | None = None) -> bytes | None:
    """`source.read` from synchronous code (on zarr's event loop, where zarr itself reads)."""
    from zarr.core.sync import sync

    return sync(source.read(key, start, end))


def read_key_size(source: Source, key: str) -> int | None:
    from zarr.core.sync import sync

    return sync(source.size(key))


def byte_bounds(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """[first, last) of a read of `size` bytes: None means the start or the end, a negative
    `start` counts from the end (a suffix read), and both are clipped to the size."""
    first = 0 if start is None else max(0, size + start) if start < 0 else min(start, size)
    last = size if end is None else min(end, size)
    return first, max(first, last)


def _span(f, start: int | None, end: int | None, size: int, *, offset: int = 0) -> bytes:
    """Bytes [start:end) of a `size`-byte file that begins at `offset` in `f`."""
    first, last = byte_bounds(start, end, size)
    f.seek(offset + first)
    return f.read(last - first)


def _member_path(key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts:
        raise UnsafeInput(f"refusing key '{key}' that leaves the store")
    return path


class FolderSource(Source):
    """A store folder on local or shared disk."""

    kind = "folder"

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self.location = str(path)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_member_path(key).parts)

    async def read(self, key, start=None, end=None):
        try:
            with open(self._path(key), "rb") as f:
                return _span(f, start, end, os.fstat(f.fileno()).st_size)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    async def size(self, key):
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def file_span(self, key):
        path = self._path(key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (str(path), 0, info.st_size) if stat.S_ISREG(info.st_mode) else None


def check_zip(path: str, archive: zipfile.ZipFile) -> None:
    """Refuse members that could escape the archive ('..', absolute paths, symlinks) or that are
    ambiguous (the same name twice), before anything is read."""
    seen = set()
    for info in archive.infolist():
        name = info.filename.replace("\\", "/")
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or re.match(r"^[A-Za-z]:", name):
            raise UnsafeInput(f"{path}: refusing zip member '{info.filename}' (absolute or '..' path)")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeInput(f"{path}: refusing zip member '{info.filename}' (symbolic link)")
        if name in seen:
            raise UnsafeInput(f"{path}: refusing zip with member '{name}' twice; repack it with "
                              "`ser cache pack`")
        seen.add(name)


class ZipSource(Source):
    """A zip of a store (as `ser cache pack` writes it, or zipped by hand with one top folder).

    Stored members are read in place by offset, so a range costs one seek; deflated members are
    inflated whole on every read (slow for shards: repack with `ser cache pack`)."""

    kind = "zip"

    def __init__(self, path: str | Path):
        self.location = str(path)
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise StoreError(f"{path}: not a readable zip file ({err})") from None
        check_zip(self.location, self.archive)
        self.members = {info.filename: info for info in self.archive.infolist() if not info.is_dir()}
        tops = [name[:-len(ROOT)] for name in self.members if name.endswith("/" + ROOT) and name.count("/") == 1]
        self.prefix = "" if ROOT in self.members or len(tops) != 1 else tops[0]
        self.file = open(path, "rb")
        self.lock = threading.Lock()
        self.offsets: dict[str, int] = {}
        if any(info.compress_type != zipfile.ZIP_STORED for info in self.members.values()):
            log.warning("%s has compressed members: every read inflates a whole file; "
                        "`ser cache pack` writes a zip that reads faster", path)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        if info.filename not in self.offsets:  # after the local header, whose lengths may differ
            self.file.seek(info.header_offset)
            header = self.file.read(30)
            if header[:4] != b"PK\x03\x04":
                raise StoreCorrupt(f"{self.location}: zip member '{info.filename}' has no local header")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            self.offsets[info.filename] = info.header_offset + 30 + name_length + extra_length
        return self.offsets[info.filename]

    async def read(self, key, start=None, end=None):
        info = self.members.get(self.prefix + str(_member_path(key)))
        if info is None:
            return None
        with self.lock:
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                return _span(self.file, start, end, info.file_size, offset=self._data_offset(info))
            first, last = byte_bounds(start, end, info.file_size)
            try:  # inflates only up to the range (seek inflates and drops in small blocks)
                with self.archive.open(info) as member:
                    member.seek(first)
                    return member.read(last - first)
            except (RuntimeError, zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as err:
                raise StoreCorrupt(f"{self.location}: cannot read zip member '{info.filename}' ({err})") from None

    async def size(self, key):
        info = self.members.get(self.prefix + str(_member_path(key)))
        return None if info is None else info.file_size

    def file_span(self, key):
        info = self.members.get(self.prefix + str(_member_path(key)))
        if info is None or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        with self.lock:
            return self.location, self._data_offset(info), info.file_size

    def close(self):
        self.file.close()
        self.archive.close()


class ShortBody(Exception):
    """A response with fewer bytes than were asked for (a transient fault: tried again)."""


def transient(err: Exception) -> bool:
    """Whether a failed remote read is worth another try: timeouts, dropped connections, short
    bodies and 5xx/408/429 answers are; other HTTP statuses and refused permissions are not."""
    status = getattr(err, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    return not isinstance(err, (PermissionError, NotImplementedError, ValueError, TypeError))


class FsspecSource(Source):
    """A store behind an fsspec URL: http(s)://, s3://, gs://, ... (read with ranged GETs).

    Suffix and offset reads become explicit ranges (the size is asked once per file), because
    simple servers refuse `Range: bytes=-N`; a server that ignores ranges altogether still gives
    correct bytes, only slowly, and says so once. Every read is bounded in time: over HTTP a
    connection or a read that waits `timeout` seconds for a byte fails; a failed read that may
    be transient (see `transient`), or a body shorter than asked for, is tried `retries` more
    times after `backoff`, 2x`backoff`, ... seconds, then refused in one line naming the URL."""

    kind = "fsspec"
    timeout = 30.0
    retries = 3
    backoff = 0.5

    def __init__(self, url: str, *, storage_options: dict | None = None):
        self.location = url
        self.options = dict(storage_options or {})
        self._pid: int | None = None
        self._warned = False
        self.fs  # noqa: B018 -- a missing backend is reported at open, not at first read

    @property
    def fs(self):
        if self._pid != os.getpid():  # a forked worker needs its own connections
            self._fs, self.root = self._connect()
            self._sizes: dict[str, int] = {}
            self._pid = os.getpid()
        return self._fs

    def _connect(self):
        import fsspec

        protocol = self.location.split("://")[0].split("::")[-1] if "://" in self.location else ""
        options = dict(self.options)
        if protocol.lower() in ("http", "https") and "timeout" not in options.get("client_kwargs", {}):
            import aiohttp  # fsspec's HTTP backend; without a timeout a stalled server hangs a read

            options["client_kwargs"] = {**options.get("client_kwargs", {}), "timeout": aiohttp.ClientTimeout(
                total=None, sock_connect=self.timeout, sock_read=self.timeout)}
        try:
            fs, root = fsspec.core.url_to_fs(self.location, **options)
        except (ImportError, ValueError) as err:
            extra = EXTRAS.get(protocol.lower())
            hint = f"pip install 'ser[{extra}]'" if extra else "install the fsspec backend for it"
            raise StoreError(f"{self.location}: cannot open ({err}); {hint}") from None
        return fs, root.rstrip("/")

    def _path(self, key: str) -> str:
        self.fs  # noqa: B018 -- (re)connects first, which sets self.root
        return f"{self.root}/{_member_path(key)}"

    async def _call(self, method: str, path: str, *, want: int | None = None, whole: str | None = None,
                    **kwargs):
        """`fs.method(path, **kwargs)`, tried again on transient faults; None when not found.
        `want`: the bytes a read must return (fewer is a short body); `whole`: the key of a
        whole-file read, checked by `cut_off` (a short body whose length nobody knew)."""
        url = f"{self.location.rstrip('/')}/{path.removeprefix(self.root + '/')}"
        for attempt in range(self.retries + 1):
            try:
                result = await asyncio.to_thread(getattr(self.fs, method), path, **kwargs)
                if want is not None and result is not None and len(result) < want:
                    raise ShortBody(f"short body: {len(result)} of {want} bytes")
                problem = whole and result is not None and cut_off(whole, result, None)
                if problem:
                    raise ShortBody(f"cut off or damaged: {problem}")
                return result
            except FileNotFoundError:
                return None
            except Exception as err:  # network, permissions, server errors: not damage in the store
                reason = f"{type(err).__name__}: {err}".strip().rstrip(":").splitlines()[0]
                if attempt == self.retries or not transient(err):
                    tries = f" after {attempt + 1} tries" if attempt else ""
                    raise StoreError(f"{url}: cannot read ({reason}){tries}") from None
                log.debug("%s: %s; trying again", url, reason)
                await asyncio.sleep(self.backoff * 2 ** attempt)

    async def size(self, key):
        path = self._path(key)
        if path not in self._sizes:
            info = await self._call("info", path)
            if info is None or info.get("size") is None:
                return None if info is None else len(await self.read(key))
            self._sizes[path] = int(info["size"])
        return self._sizes[path]

    async def read(self, key, start=None, end=None):
        path = self._path(key)
        if start is None and end is None:
            # a short body is caught by aiohttp when it breaks Content-Length, by `cut_off` for
            # JSON and Parquet, and by the file's size (one HEAD, remembered) for the rest
            metadata = key.endswith((ROOT, ".parquet"))
            want = self._sizes.get(path) if metadata else await self.size(key)
            return await self._call("cat_file", path, want=want, whole=key)
        if end is None or (start or 0) < 0 or path in self._sizes:
            size = await self.size(key)
            if size is None:
                return None
            start, end = byte_bounds(start, end, size)
        start = start or 0
        if end <= start:
            return b""
        data = await self._call("cat_file", path, start=start, end=end,
                                want=end - start if path in self._sizes else None)
        if data is not None and len(data) > end - start:  # the server ignored the Range header
            if not self._warned:
                log.warning("%s ignores HTTP Range requests: each read downloads a whole file; use "
                            "a server with range support (nginx, RangeHTTPServer) or --cache-dir",
                            self.location)
                self._warned = True
            data = data[start:end]
        elif data is not None and len(data) < end - start:  # past the end, or a short body
            size = await self.size(key)
            if size is not None and len(data) < min(end, size) - start:
                data = await self._call("cat_file", path, start=start, end=end, want=min(end, size) - start)
        return data


class LocalCopy(Source):
    """A remote source whose files are kept whole on local disk after their first read.

    The local copy mirrors the store's layout under `cache_dir/<hash of the location>/` and is
    kept only while the remote zarr.json is byte-identical to the cached one (a rebuilt or
    extended store drops it). When the remote cannot be reached, the local copy is read alone.
    A downloaded file is kept only when it is whole (see `cut_off`): a short body is fetched
    once more, and if still short, used for this read but never kept."""

    kind = "cached"

    def __init__(self, remote: Source, cache_dir: str | Path):
        self.remote = remote
        self.location = remote.location
        self.folder = Path(cache_dir) / hashlib.sha256(remote.location.encode()).hexdigest()[:16]
        self.local = FolderSource(self.folder)
        self.offline, self._warned = False, False
        self._refresh()

    def _refresh(self) -> None:
        cached = self.folder / ROOT
        try:
            root = read_key(self.remote, ROOT)
        except StoreError as err:
            if not cached.is_file():
                raise
            log.warning("%s; reading the local copy in %s", err, self.folder)
            self.offline = True
            return
        if root is None:  # no store there any more: its old copy must not stand in for it
            shutil.rmtree(self.folder, ignore_errors=True)
        elif cut_off(ROOT, root, None):
            return  # garbage or cut off: read remotely every time, so the reader names it
        elif not cached.is_file() or cached.read_bytes() != root:
            if self.folder.exists():
                log.info("%s changed since it was cached; dropping the local copy", self.location)
                shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(cached, root)

    async def read(self, key, start=None, end=None):
        local = await self.local.read(key, start, end)
        if local is not None:
            return local
        if self.offline:
            raise StoreError(f"{self.location} cannot be reached and {key} is not in the local copy "
                             f"{self.folder}")
        data = await self.remote.read(key)
        if data is None:
            return None
        problem = cut_off(key, data, self._states_meta())
        if problem:
            data = await self.remote.read(key)
            problem = None if data is None else cut_off(key, data, self._states_meta())
            if data is None or problem:
                log.warning("%s/%s looks cut off (%s); not keeping it in %s", self.location, key,
                            problem, self.folder)
                return None if data is None else _span(io.BytesIO(data), start, end, len(data))
        target = self.folder.joinpath(*_member_path(key).parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(write_atomic, target, data)
        except OSError as err:  # a full or read-only cache costs speed, never the read
            if not self._warned:
                log.warning("cannot keep %s in %s (%s); reading remotely", key, self.folder, err)
                self._warned = True
        return _span(io.BytesIO(data), start, end, len(data))

    def _states_meta(self) -> dict | None:
        """The states' array metadata from the local copy of zarr.json (to check shard files)."""
        if getattr(self, "_states", None) is None:
            try:
                root = json.loads((self.folder / ROOT).read_bytes())
                self._states = root["consolidated_metadata"]["metadata"][ARRAY]
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return self._states

    async def size(self, key):
        local = await self.local.size(key)
        return local if local is not None or self.offline else await self.remote.size(key)

    def file_span(self, key):
        return self.local.file_span(key)

    def close(self):
        self.remote.close()


def cut_off(key: str, data: bytes, states_meta: dict | None) -> str | None:
    """Why `data` cannot be the whole file `key` of a store (a download cut short), or None.
    JSON must parse, Parquet must have its footer, and a shard in ser's layout must end with a
    shard index whose crc32c matches and whose chunks lie inside the file."""
    name = PurePosixPath(key).name
    if name == ROOT:
        try:
            json.loads(data)
        except ValueError:
            return "not whole JSON"
    elif name.endswith(".parquet"):
        try:
            pq.read_metadata(pa.BufferReader(arrow_owned(data)))
        except Exception:  # pyarrow raises several types for a cut-off footer
            return "not a whole Parquet file"
    elif key.startswith(f"{ARRAY}/c/") and states_meta is not None:
        try:
            layout = _coalescible(states_meta)
        except (KeyError, TypeError, AttributeError, IndexError):
            layout = None
        if layout is None:
            return None
        index_size = layout[2]
        if len(data) < index_size:
            return f"{len(data)} bytes, shorter than its shard index ({index_size} bytes)"
        index = data[-index_size:]
        if checksum(np.frombuffer(index[:-4], np.uint8)) != int.from_bytes(index[-4:], "little"):
            return "its shard index fails its crc32c"
        table = np.frombuffer(index[:-4], "<u8").reshape(-1, 2)
        written = table[table[:, 0] != np.iinfo(np.uint64).max]
        if len(written) and int((written[:, 0] + written[:, 1]).max()) > len(data) - index_size:
            return "its shard index points past its end"
    return None


def open_source(location: str | Path, *, cache_dir: str | Path | None = None) -> Source:
    """The source for a folder, a .zip or an fsspec URL; remote ones cached in `cache_dir`."""
    location = str(location)
    if URL.search(location):
        source = FsspecSource(location)
        return LocalCopy(source, cache_dir) if cache_dir else source
    path = Path(location)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise StoreError(f"{location}: a file that is not a zip; a store is a folder, a .zip "
                             "(`ser cache pack`) or a URL")
        return ZipSource(path)
    if not path.is_dir():
        raise StoreError(f"{location}: no such store (expected a folder, a .zip or a URL)")
    return FolderSource(path)


def configure_storage(options: str | dict, *, source: str = "storage options") -> None:
    """Give fsspec backends their options (endpoint, credentials, region, ...) in this process.

    `options` maps a protocol to keyword arguments of its fsspec filesystem, in the form of
    fsspec's own configuration files (`~/.config/fsspec/*.json`, `FSSPEC_S3='{...}'`), e.g.
    `{"s3": {"endpoint_url": "http://minio:9000"}}`; a JSON string of that is accepted too.
    They are merged into `fsspec.config.conf`, where every filesystem fsspec makes afterwards
    (ser's readers and copies included) takes its defaults from; nothing is written anywhere.

    Args:
        options: the mapping, or its JSON text.
        source: what the options came from, for error messages (`--storage-options`).

    Raises:
        ConfigError: not JSON, not an object of objects, or a protocol fsspec does not know.

    Example:
        >>> configure_storage('{"s3": {"endpoint_url": "http://127.0.0.1:9000"}}')  # doctest: +SKIP
        >>> open_cache("s3://lab/msp.zarr")  # doctest: +SKIP
    """
    import fsspec.config
    from fsspec.registry import known_implementations, registry

    example = '\'{"s3": {"endpoint_url": "http://127.0.0.1:9000"}}\''
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError as err:
            raise ConfigError(f"{source}: not JSON ({err}); expected options per protocol, such as "
                              f"{example}") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ConfigError(f"{source}: expected a JSON object of options per protocol, such as {example}")
    unknown = [p for p in options if p not in known_implementations and p not in registry]
    if unknown:
        raise ConfigError(f"{source}: unknown protocol {unknown[0]!r} (known: s3, gs, http, ...); "
                          f"expected options per protocol, such as {example}")
    for protocol, values in options.items():
        fsspec.config.conf.setdefault(protocol, {}).update(values)


# --- zarr's view of a source ------------------------------------------------------------------

def _store_base():
    from zarr.abc.store import Store

    return Store


class SourceStore(_store_base()):
    """A read-only zarr Store over a Source. It never lists and never writes; shard indexes
    (zarr's suffix reads) are kept in memory, so reading an utterance costs only its chunks."""

    INDEX_CACHE_BYTES = 32 * 2**20

    SPANS = 16  # prefetched byte spans kept (a few utterances read at once by threads)

    def __init__(self, source: Source):
        super().__init__(read_only=True)
        self.source = source
        self._suffixes: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._suffix_bytes = 0
        self._spans: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._sized: set[str] = set()  # keys whose size was checked against the limits

    def __eq__(self, other):
        return isinstance(other, SourceStore) and other.source is self.source

    def __repr__(self):
        return f"SourceStore({self.source.location!r})"

    limits: tuple[int, int] | None = None  # (chunk, shard) bytes, from `chunk_limits`

    async def _refuse_large(self, key: str, byte_range) -> None:
        """Refuse a range, or a file, larger than the chunk shapes allow, before a byte of it
        is fetched or inflated (file sizes known without a request: zip, folder, local copy)."""
        from zarr.abc.store import RangeByteRequest

        shard = key.startswith(f"{ARRAY}/c/")
        most, length = None, None
        if isinstance(byte_range, RangeByteRequest) and shard and self.limits:
            most, length = self.limits[0], byte_range.end - byte_range.start
        elif key not in self._sized and self.source.kind in ("zip", "folder", "cached"):
            self._sized.add(key)
            most = (self.limits[1] if self.limits else None) if shard else (
                None if key.startswith(f"{POOLED}/c/") else MAX_METADATA_BYTES)
            length = await self.source.size(key) if most else None
        if most and length is not None and length > most:
            raise UnsafeInput(f"{self.source.location}: refusing to read {length} bytes of '{key}', more "
                              f"than its chunk shapes allow ({most}); the store is damaged or hostile")

    async def get(self, key, prototype, byte_range=None):
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

        await self._refuse_large(key, byte_range)
        if byte_range is None:
            data = await self.source.read(key)
        elif isinstance(byte_range, RangeByteRequest):
            data = self._from_span(key, byte_range.start, byte_range.end)
            if data is None:
                data = await self.source.read(key, byte_range.start, byte_range.end)
        elif isinstance(byte_range, OffsetByteRequest):
            data = await self.source.read(key, byte_range.offset, None)
        elif isinstance(byte_range, SuffixByteRequest):
            data = await self._suffix(key, byte_range.suffix)
        else:
            raise TypeError(f"unexpected byte range {byte_range!r}")
        return None if data is None else prototype.buffer.from_bytes(data)

    async def _suffix(self, key: str, length: int) -> bytes | None:
        cached = self._suffixes.get((key, length))
        if cached is not None:
            self._suffixes.move_to_end((key, length))
            return cached
        data = await self.source.read(key, -length, None)
        if data is not None and len(data) <= self.INDEX_CACHE_BYTES // 64:
            self._suffixes[(key, length)] = data
            self._suffix_bytes += len(data)
            while self._suffix_bytes > self.INDEX_CACHE_BYTES:
                self._suffix_bytes -= len(self._suffixes.popitem(last=False)[1])
        return data

    async def prefetch(self, key: str, first: int, last: int, *, chunks: int, index_size: int) -> None:
        """Fetch inner chunks first..last of shard `key` in one ranged read, so that zarr's
        chunk-by-chunk reads of one utterance cost one request instead of one each. Assumes ser's
        shard layout (index at the end: `chunks` pairs of little-endian uint64 offset, length; then
        a crc32c); zarr still decodes and checks everything, so a wrong guess only costs speed."""
        index = await self._suffix(key, index_size)
        if index is None or len(index) != index_size:
            return
        table = np.frombuffer(index, "<u8", count=2 * chunks).reshape(chunks, 2)[first:last + 1]
        table = table[table[:, 0] != np.iinfo(np.uint64).max]  # chunks never written
        if not len(table):
            return
        start, end = int(table[:, 0].min()), int((table[:, 0] + table[:, 1]).max())
        if end - start > 2 * int(table[:, 1].sum()) + 2**16:  # not contiguous: read chunk by chunk
            return
        data = await self.source.read(key, start, end)
        if data is not None and len(data) == end - start:
            self._spans[(key, start)] = data
            while len(self._spans) > self.SPANS:
                self._spans.popitem(last=False)

    def _from_span(self, key: str, start: int, end: int) -> bytes | None:
        for (span_key, span_start), data in reversed(self._spans.items()):
            if span_key == key and span_start <= start and end <= span_start + len(data):
                return data[start - span_start:end - span_start]
        return None

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key):
        return await self.source.size(key) is not None

    @property
    def supports_writes(self):
        return False

    @property
    def supports_deletes(self):
        return False

    @property
    def supports_listing(self):
        return False

    async def set(self, key, value):
        raise StoreError(f"{self.source.location} is opened read-only")

    async def delete(self, key):
        raise StoreError(f"{self.source.location} is opened read-only")

    def _no_listing(self):
        raise StoreError(f"{self.source.location}: ser reads a store without listing it; this "
                         "needs the consolidated metadata in zarr.json")

    async def list(self):
        self._no_listing()
        yield  # pragma: no cover

    async def list_prefix(self, prefix):
        self._no_listing()
        yield  # pragma: no cover

    async def list_dir(self, prefix):
        self._no_listing()
        yield  # pragma: no cover

    def close(self):
        super().close()
        self.source.close()


# --- the reader -------------------------------------------------------------------------------

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


def chunk_limits(location: str, meta: dict, array_meta: dict) -> tuple[int, int]:
    """(most bytes of one encoded inner chunk, of one shard file) that the states' chunk shapes
    allow, after checking that those shapes are the ones the metadata declares and are not
    absurd. A chunk's decoded size is what zarr allocates to read even one frame of it.

    Raises:
        UnsafeInput: a chunk shape that the metadata does not justify."""
    try:
        shape = [int(n) for n in array_meta["shape"]]
        shard = [int(n) for n in array_meta["chunk_grid"]["configuration"]["chunk_shape"]]
        inner = shard
        for codec in array_meta.get("codecs", []):
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                inner = [int(n) for n in codec["configuration"]["chunk_shape"]]
        itemsize = np.dtype(array_meta["data_type"]).itemsize
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StoreCorrupt(f"{location}: cannot be opened: the states' chunk layout is unreadable ({err})") from None
    hidden = storage_width(meta["hidden_size"], meta["dtype"])  # int8 rows carry their scale
    wrong = (len(shape) != 2 or len(shard) != 2 or len(inner) != 2 or shape[1] != hidden
             or shard[1] != hidden or inner[1] != hidden or shard[0] != meta["shard_frames"]
             or inner[0] != meta["chunk_frames"] or min(shard[0], inner[0]) < 1 or shard[0] % inner[0])
    if wrong:
        raise UnsafeInput(f"{location}: refusing states with shard shape {shard} and chunk shape "
                          f"{inner}; the metadata declares ({meta['shard_frames']}, {hidden}) and "
                          f"({meta['chunk_frames']}, {hidden})")
    chunk_bytes, chunks = inner[0] * hidden * itemsize, shard[0] // inner[0]
    if chunk_bytes > MAX_CHUNK_BYTES or chunks > MAX_SHARD_CHUNKS:
        raise UnsafeInput(f"{location}: refusing chunks of {chunk_bytes / 2**20:.0f} MiB, {chunks} "
                          f"per shard (at most {MAX_CHUNK_BYTES // 2**20} MiB and {MAX_SHARD_CHUNKS})")
    encoded = chunk_bytes + chunk_bytes // 8 + 4096  # codec headers; compressed data never grows more
    return encoded, chunks * encoded + chunks * 16 + 4


def _coalescible(array_meta: dict) -> tuple[int, int, int] | None:
    """(rows per shard, rows per inner chunk, shard index bytes) when the states use the shard
    layout ser writes (index at the end, uint64 pairs then crc32c); otherwise None."""
    codecs = array_meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    config = codecs[0].get("configuration", {})
    index_codecs = [c.get("name") for c in config.get("index_codecs", [])]
    shard_rows = array_meta["chunk_grid"]["configuration"]["chunk_shape"]
    chunk_rows = config.get("chunk_shape", [])
    if (config.get("index_location", "end") != "end" or index_codecs != ["bytes", "crc32c"]
            or len(chunk_rows) != 2 or chunk_rows[1] != shard_rows[1] or shard_rows[0] % chunk_rows[0]):
        return None
    return shard_rows[0], chunk_rows[0], shard_rows[0] // chunk_rows[0] * 16 + 4


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

    @classmethod
    def for_array(cls, source: Source, array_meta: dict, key_of) -> "LocalShards | None":
        layout, codec = _coalescible(array_meta), _inner_codec(array_meta)
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
                return data[begin:begin + frames * self.row_bytes].view(self.dtype).reshape(frames, self.hidden)
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
        return entry

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
        self.store = SourceStore(self.source)
        self.store.limits = chunk_limits(location, meta, consolidated[ARRAY])
        group = zarr.open_group(self.store, mode="r", zarr_format=3, use_consolidated=True)
        self.states = group[ARRAY]
        self.pooled_layers: list[int] = list(meta.get("pooled_layers") or [])
        self.pooled_array = None
        if self.pooled_layers:
            expected = math.prod(pooled_shape(meta))
            node = consolidated.get(POOLED) or {}
            if node.get("data_type") != "float32" or node.get("shape", [0, 0])[1:] != [expected]:
                raise StoreCorrupt(f"{location}: metadata lists pooled layers {self.pooled_layers} "
                                   f"but the 'pooled' array is missing or not (utterances, {expected}) float32")
            self.pooled_array = group[POOLED]
        index = self._parquet("index.parquet")
        if index is None:
            raise StoreError(f"{location}: index.parquet is missing: the build was interrupted "
                             "before its first commit was finalised; rerun `ser cache build`")
        self.index: pa.Table = index
        self._layout = _coalescible(consolidated[ARRAY]) if self.source.kind == "fsspec" else None
        self._local = LocalShards.for_array(self.source, consolidated[ARRAY], self._shard_key)
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
            return pq.read_table(pa.BufferReader(arrow_owned(data)))
        except (pa.ArrowException, OSError) as err:
            raise StoreCorrupt(f"{self.location}: {key} cannot be read ({err})") from None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, uid: str) -> bool:
        return uid in self._rows

    def frames(self, uid: str) -> int:
        return self._rows[uid][1]

    def read_raw(self, uid: str) -> np.ndarray:
        """The stored array of `uid`, checked against its checksum."""
        try:
            start, frames, crc = self._rows[uid]
        except KeyError:
            raise KeyError(f"{uid!r} is not in store {self.location}") from None
        if frames < 1 or start < 0:  # a damaged or hand-edited index: never an empty utterance
            raise StoreCorrupt(f"{self.location}: utterance '{uid}' has an impossible index row "
                               f"(start {start}, frames {frames}); run `ser cache verify`")
        try:
            raw = self._local.read(start, frames) if self._local else None
            if raw is None:
                if self._layout:
                    self._prefetch(start, frames)
                raw = self.states[start:start + frames]
        except (StoreError, UnsafeInput):
            raise  # unreachable or refused: nothing is known about the bytes
        except Exception as err:  # a damaged shard fails inside the codec pipeline
            raise StoreCorrupt(f"{self.location}: utterance '{uid}' cannot be read ({err}); "
                               "run `ser cache verify`") from None
        if checksum(raw, self.checksum) != crc:
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
        start = self._rows[uid][0]
        try:
            row = self.pooled_array[start // self.meta["chunk_frames"]]
        except StoreError:
            raise
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
        return from_storage(self.read_raw(uid), self.dtype)

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
