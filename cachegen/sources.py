"""Where a store's bytes come from: one `Source` per place a store can live (a local folder, a
.zip file, an fsspec URL such as http, s3 or gs), and `LocalCopy`, which keeps the files of a
remote store on local disk after their first use (`--cache-dir`).

A source hands out the bytes of a key, whole or a range, and nothing else: no listing (HTTP has
none) and no writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import struct
import threading
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, StoreCorrupt, StoreError, UnsafeInput
from .store import checksum, write_atomic

log = logging.getLogger(__name__)

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|::")  # an fsspec URL, chained ones included
EXTRAS = {"http": "http", "https": "http", "s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}
ROOT, ARRAY, POOLED = "zarr.json", "states", "pooled"
# The most a store's zarr.json or Parquet file may weigh; a larger one is refused before it is
# read (or, over HTTP, as soon as that many bytes came). A ser store's stay far below it.
MAX_METADATA_BYTES = 256 * 2**20


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
        raise UnsafeInput(f"refusing key '{key[:100]}' that leaves the store")
    if any(len(part.encode()) > 255 for part in path.parts):  # no file system holds such a name
        raise UnsafeInput(f"refusing key '{key[:100]}...' with a name over 255 bytes")
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


class OwnFolder(FolderSource):
    """A folder only ser writes to (the local copy of a remote store, in `--cache-dir`): a key
    is read only from a regular file reached through real folders. A symbolic link, FIFO,
    socket or device found on the way is not ser's (a FIFO would block a read forever, a link
    would read or write elsewhere): it is removed, and the key reads as absent."""

    def _path(self, key: str) -> Path | None:
        path, mode = self.root, None
        if self.root.is_symlink():
            log.warning("removing %s: a local copy holds only files and folders ser wrote", path)
            self.root.unlink()
            return None
        for part in _member_path(key).parts:
            path = path / part
            try:
                mode = path.lstat().st_mode
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                log.warning("removing %s: a local copy holds only files and folders ser wrote", path)
                path.unlink(missing_ok=True)
                return None
        return path if mode is not None and stat.S_ISREG(mode) else None

    def span(self, key: str, start: int | None = None, end: int | None = None) -> bytes | None:
        """Bytes [start:end) of `key`, or None (absent, unreadable, or not a regular file)."""
        path = self._path(key)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # replaced meanwhile, or another user's file: fetched again
            return None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            return _span(f, start, end, info.st_size) if stat.S_ISREG(info.st_mode) else None

    async def read(self, key, start=None, end=None):
        return self.span(key, start, end)

    async def size(self, key):
        path = self._path(key)
        return None if path is None else path.stat().st_size

    def file_span(self, key):
        path = self._path(key)
        return None if path is None else (str(path), 0, path.stat().st_size)

    def writable(self, key: str) -> Path | None:
        """Where `key` is written: its path, when its folders are real ones inside the root
        (created as needed); None when a link or a file stands in the way."""
        target = self.root.joinpath(*_member_path(key).parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        expected = os.path.join(os.path.realpath(self.root.parent), self.root.name, *target.parts[len(self.root.parts):-1])
        return target if os.path.realpath(target.parent) == expected else None


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


class OverlaySource(Source):
    """A source with some keys replaced: a staged copy seen with the zarr.json it will get, or
    a store seen by zarr with the zarr.json the reader checked."""

    def __init__(self, base: Source, extra: dict[str, bytes]):
        self.base, self.extra = base, extra
        self.location, self.kind = base.location, base.kind

    async def read(self, key, start=None, end=None):
        if key in self.extra:
            data = self.extra[key]
            first, last = byte_bounds(start, end, len(data))
            return data[first:last]
        return await self.base.read(key, start, end)

    async def size(self, key):
        return len(self.extra[key]) if key in self.extra else await self.base.size(key)

    def file_span(self, key):
        return None if key in self.extra else self.base.file_span(key)

    def close(self):
        self.base.close()


class ShortBody(Exception):
    """A response with fewer bytes than were asked for (a transient fault: tried again)."""


class SlowAnswer(Exception):
    """A server too slow to answer: no status and headers in time, or a body that drips (a
    transient fault: tried again)."""


class BadAnswer(Exception):
    """An HTTP answer ser refuses to use: more bytes than asked for, other bytes than asked for,
    or compressed bytes (not tried again: the server would answer the same)."""


def transient(err: Exception) -> bool:
    """Whether a failed remote read is worth another try: timeouts, dropped connections, short
    bodies and 5xx/408/429 answers are; other HTTP statuses, refused permissions and answers
    ser refuses (`BadAnswer`, a redirect loop or to another scheme) are not."""
    from aiohttp import RedirectClientError

    status = getattr(err, "status", None)  # aiohttp's ClientResponseError
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    return not isinstance(err, (PermissionError, NotImplementedError, ValueError, TypeError, BadAnswer,
                                RedirectClientError))


class FsspecSource(Source):
    """A store behind an fsspec URL: http(s)://, s3://, gs://, ... (read with ranged GETs).

    Suffix and offset reads become explicit ranges (the size is asked once per file), because
    simple servers refuse `Range: bytes=-N`; a server that ignores ranges altogether still gives
    correct bytes, only slowly, and says so once. Every read is bounded in time: over HTTP a
    connection or a read that waits `timeout` seconds for a byte fails, and so does a body that
    comes slower than `min_rate` bytes/s over `timeout` seconds (a drip); a failed read that may
    be transient (see `transient`), or a body shorter than asked for, is tried `retries` more
    times after `backoff`, 2x`backoff`, ... seconds, then refused in one line naming the URL.
    Over HTTP every read is bounded in memory too (see `_http_get`)."""

    kind = "fsspec"
    timeout = 30.0
    min_rate = 16 * 1024
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
        http = protocol.lower() in ("http", "https")
        if http and "timeout" not in options.get("client_kwargs", {}):
            import aiohttp  # fsspec's HTTP backend; without a timeout a stalled server hangs a read

            options["client_kwargs"] = {**options.get("client_kwargs", {}), "timeout": aiohttp.ClientTimeout(
                total=None, sock_connect=self.timeout, sock_read=self.timeout)}
        try:
            fs, root = fsspec.core.url_to_fs(self.location, **options)
        except (ImportError, ValueError) as err:
            extra = EXTRAS.get(protocol.lower())
            hint = f"pip install 'ser[{extra}]'" if extra else "install the fsspec backend for it"
            raise StoreError(f"{self.location}: cannot open ({err}); {hint}") from None
        if http:  # plain HTTP(S) is read by `_http_get`, bounded; a chained URL keeps its reads
            from fsspec.implementations.http import HTTPFileSystem

            http = isinstance(fs, HTTPFileSystem)
        self.http = http
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
        bounded = method == "cat_file" and self.http
        call = self._http_get if bounded else getattr(self.fs, method)
        if not bounded:
            kwargs.pop("most", None)
        for attempt in range(self.retries + 1):
            try:
                result = await asyncio.to_thread(call, path, **kwargs)
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
                if isinstance(err, asyncio.TimeoutError) and not str(err):  # aiohttp's and fsspec's say nothing
                    reason = f"{type(err).__name__}: nothing came for {self.timeout:g} s"
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
            most = MAX_METADATA_BYTES if want is None or metadata and want > MAX_METADATA_BYTES else want
            return await self._call("cat_file", path, want=want, whole=key, most=most)
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
            self._no_ranges()
            data = data[start:end]
        elif data is not None and len(data) < end - start:  # past the end, or a short body
            size = await self.size(key)
            if size is not None and len(data) < min(end, size) - start:
                data = await self._call("cat_file", path, start=start, end=end, want=min(end, size) - start)
        return data

    def _no_ranges(self) -> None:
        if not self._warned:
            log.warning("%s ignores HTTP Range requests: each read downloads a whole file; use "
                        "a server with range support (nginx, RangeHTTPServer) or --cache-dir",
                        self.location)
            self._warned = True

    def _http_get(self, path: str, *, start: int | None = None, end: int | None = None,
                  most: int | None = None) -> bytes:
        """`fs.cat_file(path, start, end)` over HTTP, bounded (from a worker thread)."""
        from fsspec.asyn import sync

        return sync(self.fs.loop, self._http_stream, path, start, end, most)

    async def _http_stream(self, path: str, start: int | None, end: int | None, most: int | None) -> bytes:
        """GET `path` (bytes [start:end) when given) with fsspec's session and options, keeping
        no more bytes than were asked for: a ranged read keeps at most `end - start` bytes of a
        206 (at most `end` of a 200 that ignores the range: the rest is never received), a whole
        read at most `most`. Anything more, a 206 of other bytes than asked, or compressed bytes
        (ser asks for none, so a decompression bomb is never inflated) is a `BadAnswer`; a body
        slower than `min_rate` bytes/s over `timeout` seconds, or no status and headers within
        twice `timeout`, is a `SlowAnswer`."""
        fs = self.fs
        kwargs = dict(fs.kwargs)
        headers = {**kwargs.pop("headers", {}), "Accept-Encoding": "identity"}
        ranged = start is not None or end is not None
        if ranged:
            headers["Range"] = f"bytes={start}-{end - 1}"
            most = end  # a 200 ignoring the range holds the file from its start: `end` bytes suffice
        session = await fs.set_session()
        try:  # a byte every few seconds keeps a socket's read timeout at bay, but not this one
            response = await asyncio.wait_for(session.get(
                fs.encode_url(path), headers=headers, auto_decompress=False, **kwargs), 2 * self.timeout)
        except asyncio.TimeoutError:
            raise SlowAnswer(f"no status and headers within {2 * self.timeout:g} s") from None
        async with response as r:
            if r.status == 404:
                raise FileNotFoundError(path)
            r.raise_for_status()
            encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise BadAnswer(f"the server sent Content-Encoding {encoding!r}; ser asks for the "
                                "bytes as they are (Accept-Encoding: identity)")
            if r.status == 206:
                span = re.match(r"\s*bytes\s+(\d+)-(\d+)/", r.headers.get("Content-Range", ""))
                if not ranged or not span or int(span[1]) != start or not start <= int(span[2]) < end:
                    asked = f"bytes {start}-{end - 1}" if ranged else "the whole file"
                    raise BadAnswer(f"asked for {asked}, the server answered 206 with Content-Range "
                                    f"{r.headers.get('Content-Range')!r}")
                most = end - start
            elif ranged:
                self._no_ranges()
                return (await self._http_body(r, most, cut=True))[start:]
            return await self._http_body(r, most, cut=False)

    async def _http_body(self, response, most: int | None, *, cut: bool) -> bytes:
        """The body of `response`, at most `most` bytes: beyond that, the first `most` when
        `cut` (the connection is closed then, the rest never received), else a `BadAnswer`."""
        loop = asyncio.get_running_loop()
        parts, size = [], 0
        since, received = loop.time(), 0  # the current window of `timeout` seconds
        async for chunk in response.content.iter_any():
            parts.append(chunk)
            size += len(chunk)
            if most is not None and size > most:
                if cut:
                    break
                raise BadAnswer(f"the server sent more than the {most} bytes asked for")
            received += len(chunk)
            now = loop.time()
            if now - since >= self.timeout:
                if received < self.min_rate * (now - since):
                    raise SlowAnswer(f"the body came at {received / (now - since):.0f} bytes/s over "
                                       f"{now - since:.0f} s (at least {self.min_rate} are needed)")
                since, received = now, 0
        data = b"".join(parts)
        return data[:most] if cut else data


class LocalCopy(Source):
    """A remote source whose files are kept whole on local disk after their first read.

    The local copy mirrors the store's layout under `cache_dir/<hash of the location>/` and is
    kept only while the remote zarr.json is byte-identical to the cached one (a rebuilt or
    extended store drops it). When the remote cannot be reached, the local copy is read alone.
    A downloaded file is kept only when it is whole (see `cut_off`): a short body is fetched
    once more, and if still short, used for this read but never kept. Only regular files ser
    wrote are read from the copy (see `OwnFolder`), and a file the reader finds wrong is
    `forget`-ten. `fetched` tells whether anything came from the remote since it was opened."""

    kind = "cached"

    def __init__(self, remote: Source, cache_dir: str | Path):
        self.remote = remote
        self.location = remote.location
        self.folder = Path(cache_dir) / hashlib.sha256(remote.location.encode()).hexdigest()[:16]
        self.local = OwnFolder(self.folder)
        self.offline, self.fetched, self._warned = False, False, False
        self.root: bytes | None = None  # the zarr.json the copy is of; files are kept only beside it
        self._refresh()

    def _refresh(self) -> None:
        cached = self.local.span(ROOT)
        try:
            root = read_key(self.remote, ROOT)
        except StoreError as err:
            if cached is None:
                raise
            log.warning("%s; reading the local copy in %s", err, self.folder)
            self.offline, self.root = True, cached
            return
        if root is None:  # no store there any more: its old copy must not stand in for it
            self.drop()
        elif cut_off(ROOT, root, None):
            return  # garbage or cut off: read remotely every time, so the reader names it
        elif cached != root:
            if cached is not None:
                log.info("%s changed since it was cached; dropping the local copy", self.location)
            self.drop()
            self.root = root
            self._keep(ROOT, root)
        else:
            self.root = root

    def drop(self) -> None:
        """Forget the whole local copy (a link in its place is removed, never followed)."""
        if self.folder.is_symlink():
            self.folder.unlink()
        else:
            shutil.rmtree(self.folder, ignore_errors=True)

    def forget(self, keys: list[str]) -> None:
        """Remove the local files of `keys` (found wrong): the next read fetches them again."""
        for key in keys:
            path = self.local._path(key)
            if path is not None:
                path.unlink(missing_ok=True)

    def _keep(self, key: str, data: bytes) -> None:
        if self.root is None or key != ROOT and self.local.span(ROOT) != self.root:
            return  # another process holds the copy of another version of the store now
        target = self.local.writable(key)
        try:
            if target is None:
                raise OSError(f"a link or a file stands in the way of {key}")
            write_atomic(target, data)
        except OSError as err:  # a full or read-only cache costs speed, never the read
            if not self._warned:
                log.warning("cannot keep %s in %s (%s); reading remotely", key, self.folder, err)
                self._warned = True

    async def read(self, key, start=None, end=None):
        local = await self.local.read(key, start, end)
        if local is not None:
            return local
        if self.offline:
            raise StoreError(f"{self.location} cannot be reached and {key} is not in the local copy "
                             f"{self.folder}")
        self.fetched = True
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
        await asyncio.to_thread(self._keep, key, data)
        return _span(io.BytesIO(data), start, end, len(data))

    def _states_meta(self) -> dict | None:
        """The states' array metadata from the local copy of zarr.json (to check shard files)."""
        if getattr(self, "_states", None) is None:
            try:
                root = json.loads(self.local.span(ROOT) or b"")
                self._states = root["consolidated_metadata"]["metadata"][ARRAY]
            except (ValueError, KeyError, TypeError):
                return None
        return self._states

    async def size(self, key):
        local = await self.local.size(key)
        return local if local is not None or self.offline else await self.remote.size(key)

    def file_span(self, key):
        return self.local.file_span(key)

    def close(self):
        self.remote.close()


def shard_layout(array_meta: dict) -> tuple[int, int, int] | None:
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
            layout = shard_layout(states_meta)
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
