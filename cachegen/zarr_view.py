"""zarr's read-only view of a `Source`: `SourceStore` lets zarr read a store's arrays through
any source, never listing and never writing, and refuses a file larger than a store's files can
be before it is read."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .errors import StoreError, UnsafeInput
from .sources import MAX_METADATA_BYTES, Source

# What a store's files may weigh, decoded; anything larger is refused before it is read or
# inflated (a zip or decompression bomb). The chunks' follow from the chunk shapes, which must
# match the metadata; the metadata files' (MAX_METADATA_BYTES) is in `cachegen.sources`.
MAX_CHUNK_BYTES = 64 * 2**20  # one inner chunk of states
MAX_SHARD_CHUNKS = 2**16  # inner chunks per shard (its index is 16 bytes each)


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
        self.limits: dict[str, tuple[int, int]] = {}  # array -> (chunk, shard) bytes, `chunk_limits`

    def __eq__(self, other):
        return isinstance(other, SourceStore) and other.source is self.source

    def __repr__(self):
        return f"SourceStore({self.source.location!r})"

    async def refuse_large(self, key: str, byte_range=None) -> None:
        """Refuse a range, or a file, larger than the chunk shapes allow, before a byte of it
        is fetched or inflated (file sizes known without a request: zip, folder, local copy;
        over fsspec, a shard's size, which reading it asks for anyway)."""
        from zarr.abc.store import RangeByteRequest

        array, chunk, _ = key.partition("/c/")  # a shard's key: 'states/c/3/0'
        limits = self.limits.get(array) if chunk else None
        most, length = None, None
        if isinstance(byte_range, RangeByteRequest) and limits:
            most, length = limits[0], byte_range.end - byte_range.start
        elif key not in self._sized and (self.source.kind in ("zip", "folder", "cached")
                                         or limits and self.source.kind == "fsspec"):
            self._sized.add(key)
            most = limits[1] if limits else None if chunk else MAX_METADATA_BYTES
            length = await self.source.size(key) if most else None
        if most and length is not None and length > most:
            raise UnsafeInput(f"{self.source.location}: refusing to read {length} bytes of '{key}', more "
                              f"than its chunk shapes allow ({most}); the store is damaged or hostile")

    async def get(self, key, prototype, byte_range=None):
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

        await self.refuse_large(key, byte_range)
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
        await self.refuse_large(key)
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

    def forget(self, keys: list[str]) -> None:
        """Drop what is held of these files (their shard indexes, prefetched spans, checked
        sizes): they were replaced."""
        for key in keys:
            self._sized.discard(key)
        for cache in (self._suffixes, self._spans):
            for held in [held for held in cache if held[0] in keys]:
                data = cache.pop(held)
                if cache is self._suffixes:
                    self._suffix_bytes -= len(data)

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
