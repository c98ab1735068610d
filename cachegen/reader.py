"""Open a store read-only from a local folder, a .zip file or an fsspec URL (http, s3, gs).

All three go through one interface, a read-only zarr Store: zarr reads the states through it
and `read_key` fetches index.parquet and manifest.parquet through it. Nothing is written.
"""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreCorrupt, StoreError, UnsafeInput
from .store import ALLOWED_CODECS, FORMAT, FORMAT_VERSION, STORAGE_DTYPES, _quiet_zarr, checksum, from_storage

URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://", "az://", "abfs://", "file://",
                "simplecache::", "filecache::")


def check_zip(path: str) -> None:
    """Refuse zip members that could escape the archive: '..', absolute paths, symlinks."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name.split("/")[0]:
                    raise UnsafeInput(f"{path}: refusing zip member '{name}' (absolute or '..' path)")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeInput(f"{path}: refusing zip member '{name}' (symbolic link)")
    except zipfile.BadZipFile as err:
        raise StoreError(f"{path}: not a readable zip file ({err})") from None


def open_store(location: str, *, cache_dir: str | None = None):
    """A read-only zarr Store for a folder, a .zip or a URL."""
    import zarr

    location = str(location)
    if location.startswith(URL_PREFIXES):
        url = location
        options = {}
        if cache_dir and not url.startswith(("simplecache::", "filecache::")):
            url = f"simplecache::{url}"
            options = {"simplecache": {"cache_storage": str(cache_dir)}}
        try:
            return zarr.storage.FsspecStore.from_url(url, read_only=True, storage_options=options)
        except (ImportError, ValueError) as err:
            raise StoreError(f"{location}: cannot open ({err}); remote stores need the matching "
                             "extra, e.g. pip install 'ser[http]' or 'ser[s3]'") from None
    path = Path(location)
    if path.is_file() and zipfile.is_zipfile(path):
        check_zip(str(path))
        return zarr.storage.ZipStore(path, mode="r", read_only=True)
    if not path.is_dir():
        raise StoreError(f"{location}: no such store (expected a folder, a .zip or a URL)")
    return zarr.storage.LocalStore(path, read_only=True)


def read_key(store, key: str) -> bytes | None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def check_safe(location: str, array_meta: dict) -> None:
    """Refuse dtypes and codecs outside what ser writes, before anything is decoded."""
    dtype = array_meta.get("data_type")
    if dtype not in STORAGE_DTYPES.values():
        raise UnsafeInput(f"{location}: refusing states of data type {dtype!r}; expected one of "
                          f"{', '.join(sorted(set(STORAGE_DTYPES.values())))}")

    def names(codecs):
        for codec in codecs:
            yield codec.get("name")
            config = codec.get("configuration", {})
            yield from names(config.get("codecs", []))
            yield from names(config.get("index_codecs", []))

    unknown = sorted({n for n in names(array_meta.get("codecs", [])) if n not in ALLOWED_CODECS})
    if unknown:
        raise UnsafeInput(f"{location}: refusing unknown codec(s) {', '.join(map(str, unknown))}; "
                          f"allowed: {', '.join(sorted(ALLOWED_CODECS))}")


class CacheReader:
    """Read-only view of a store: `.ids`, `len()`, `reader[id]` -> (frames, hidden) array,
    `.meta`, `.table` (the manifest), `.index` (one row per cached utterance)."""

    def __init__(self, location: str, *, cache_dir: str | None = None):
        import json

        import zarr

        _quiet_zarr()
        self.location = str(location)
        self.store = open_store(self.location, cache_dir=cache_dir)
        root = read_key(self.store, "zarr.json")
        if root is None:
            raise StoreError(f"{location}: no zarr.json: not a ser store")
        root = json.loads(root)
        meta = root.get("attributes", {}).get("ser")
        if not meta or meta.get("format") != FORMAT:
            raise StoreError(f"{location}: not a ser store (no 'ser' metadata in zarr.json)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{location}: store format version {meta.get('format_version')} is not "
                             f"supported by this ser (reads version {FORMAT_VERSION}); rebuild it "
                             "or install the matching ser")
        consolidated = (root.get("consolidated_metadata") or {}).get("metadata") or {}
        if "states" not in consolidated:
            raise StoreError(f"{location}: consolidated metadata is missing: its build was "
                             "interrupted before it was finalised; rerun `ser cache build` to resume")
        check_safe(self.location, consolidated["states"])
        self.meta: dict = meta
        self.dtype: str = meta["dtype"]
        group = zarr.open_group(self.store, mode="r", use_consolidated=True)
        self.states = group["states"]
        index = read_key(self.store, "index.parquet")
        if index is None:
            raise StoreError(f"{location}: index.parquet is missing: the build was interrupted "
                             "before its first commit was finalised; rerun `ser cache build`")
        self.index: pa.Table = pq.read_table(io.BytesIO(index))
        manifest = read_key(self.store, "manifest.parquet")
        self.table: pa.Table = pq.read_table(io.BytesIO(manifest)) if manifest else pa.table({})
        columns = self.index.to_pydict()
        self.ids: list[str] = columns["id"]
        self._rows = {uid: (start, frames, crc) for uid, start, frames, crc in
                      zip(columns["id"], columns["start"], columns["frames"], columns["crc32"])}

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
        try:
            raw = self.states[start:start + frames]
        except Exception as err:  # a damaged shard fails inside the codec pipeline
            raise StoreCorrupt(f"{self.location}: utterance '{uid}' cannot be read ({err}); "
                               "run `ser cache verify`") from None
        if checksum(raw) != crc:
            raise StoreCorrupt(f"{self.location}: utterance '{uid}' fails its checksum (damaged or "
                               "missing chunk); run `ser cache verify` and rebuild the store")
        return raw

    def __getitem__(self, uid: str) -> np.ndarray:
        """(frames, hidden) states of `uid` (float16/float32 as stored; bfloat16 as float32)."""
        return from_storage(self.read_raw(uid), self.dtype)

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(location: str | Path, *, cache_dir: str | None = None) -> CacheReader:
    """Open a store read-only.

    Args:
        location: a store folder, a .zip of one, or an fsspec URL (http(s)://, s3://, gs://).
        cache_dir: keep fetched remote chunks here, so later epochs read from local disk.

    Example:
        >>> reader = open_cache("msp.zarr")  # doctest: +SKIP
        >>> reader[reader.ids[0]].shape  # doctest: +SKIP
        (312, 768)
    """
    return CacheReader(str(location), cache_dir=cache_dir)
