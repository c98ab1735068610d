"""`ser cache copy` and `ser cache pack`: move a store anywhere, resumably, verified, atomically.

The files to copy are named by the store itself, because HTTP cannot list: zarr.json,
states/zarr.json, index.parquet, manifest.parquet and the shard files its index uses. They are
staged where no reader can mistake them for a store (DST.partial/, or DST without its zarr.json),
verified by checksum, and only then published: zarr.json written last, and a rename where the
destination has one. A rerun after an interruption keeps what was staged for the same source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, StoreCorrupt, StoreError
from .reader import CacheReader, open_cache
from .sources import ROOT, URL, FolderSource, FsspecSource, OverlaySource, Source, ZipSource, read_key
from .store import write_atomic

log = logging.getLogger(__name__)

MARKER = ".ser-copy.json"  # in the staging area: which source its files came from


# --- targets: where a copy is staged, then published; one class per kind of destination -------

class Target:
    """A destination: `begin` a staging area, `write` files into it, `staged` to verify it,
    `publish` to make it a store. Until `publish`, nothing at `location` opens as a store."""

    location: str

    def begin(self, marker: dict) -> set[str]:
        """Prepare the staging area; returns the keys already staged there for the same source."""
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def discard(self, keys: list[str]) -> None:
        raise NotImplementedError

    def staged(self, root: bytes) -> Source:
        """The staged copy as a source, as it will read once published with zarr.json `root`."""
        raise NotImplementedError

    def publish(self, root: bytes) -> None:
        raise NotImplementedError


def write_file(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so a file that exists is complete (and
    readable by the team, not just its writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


class FolderTarget(Target):
    """A local or shared-disk folder: staged in DST.partial/, renamed to DST at the end."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.location = str(path)
        self.staging = self.path.with_name(self.path.name + ".partial")

    def _refuse_existing(self) -> None:
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ConfigError(f"{self.path} already exists; remove it or choose another destination")

    def begin(self, marker):
        self._refuse_existing()
        marker_file = self.staging / MARKER
        if self.staging.exists():
            if not marker_file.is_file():
                raise ConfigError(f"{self.staging} exists but was not made by `ser cache copy`; "
                                  "move it away first")
            if json.loads(marker_file.read_text()) == marker:
                return {p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*")
                        if p.is_file() and not p.name.startswith(".")}
            log.info("%s holds a copy of another source or version; starting over", self.staging)
            shutil.rmtree(self.staging)
        write_file(marker_file, json.dumps(marker).encode())
        return set()

    def write(self, key, data):
        write_file(self.staging / key, data)

    def discard(self, keys):
        for key in keys:
            (self.staging / key).unlink(missing_ok=True)

    def staged(self, root):
        return OverlaySource(FolderSource(self.staging), {ROOT: root})

    def publish(self, root):
        self._refuse_existing()
        write_file(self.staging / ROOT, root)
        (self.staging / MARKER).unlink()
        if self.path.is_dir():
            self.path.rmdir()  # an empty folder made in advance
        os.rename(self.staging, self.path)


class ZipTarget(Target):
    """A .zip file: staged as the folder OUT.zip.partial/, zipped (stored: the shards are
    compressed already) into OUT.zip.tmp, verified there, renamed to OUT.zip at the end."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.location = str(path)
        self.folder = FolderTarget(self.path)  # its staging folder is OUT.zip.partial/
        self.tmp = self.path.with_name(self.path.name + ".tmp")

    def begin(self, marker):
        self.tmp.unlink(missing_ok=True)
        return self.folder.begin(marker)

    def write(self, key, data):
        self.folder.write(key, data)

    def discard(self, keys):
        self.folder.discard(keys)

    def staged(self, root):
        staging = self.folder.staging
        write_file(staging / ROOT, root)
        files = sorted(p for p in staging.rglob("*") if p.is_file() and not p.name.startswith("."))
        try:
            with zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED) as archive:
                for path in files:
                    archive.write(path, path.relative_to(staging).as_posix())
        except BaseException:  # e.g. disk full: no half-written zip stays behind
            self.tmp.unlink(missing_ok=True)
            raise
        return ZipSource(self.tmp)

    def publish(self, root):
        self.folder._refuse_existing()
        os.replace(self.tmp, self.path)
        shutil.rmtree(self.folder.staging)


class FsspecTarget(Target):
    """An fsspec URL (s3://, gs://, ...): object stores have no rename, but a PUT is atomic, so
    files are written in place and zarr.json, which makes them a store, is written last."""

    def __init__(self, url: str):
        self.location = url.rstrip("/")
        self.source = FsspecSource(self.location)  # the same connection reads the staged copy
        self.fs, self.root = self.source.fs, self.source.root

    def _call(self, method: str, key: str, *args):
        """`fs.method(path of key, *args)`; a missing bucket, denied credentials or a lost
        connection become one error naming the destination."""
        try:
            return getattr(self.fs, method)(f"{self.root}/{key}", *args)
        except Exception as err:
            raise StoreError(f"{self.location}: cannot {ACTIONS[method]} {key} ({type(err).__name__}: "
                             f"{err}); check the bucket and credentials, then rerun the same command "
                             "to resume") from None

    def begin(self, marker):
        if self._call("exists", ROOT):
            raise ConfigError(f"{self.location} already holds a store; remove it or choose another "
                              "destination")
        same = self._call("exists", MARKER) and json.loads(self._call("cat_file", MARKER)) == marker
        if not same:
            self._call("pipe_file", MARKER, json.dumps(marker).encode())
            return set()  # files of another source may be there: every one is written again
        try:  # one listing where the store can list (S3, GCS), else one request per file
            present = {p.removeprefix(self.root + "/") for p in self.fs.find(self.root)}
        except Exception:
            present = {key for key in marker["keys"] if self._call("exists", key)}
        return present & set(marker["keys"])

    def write(self, key, data):
        self._call("pipe_file", key, data)

    def discard(self, keys):
        for key in keys:
            if self._call("exists", key):
                self._call("rm_file", key)

    def staged(self, root):
        self.source._sizes.clear()
        return OverlaySource(self.source, {ROOT: root})

    def publish(self, root):
        self._call("pipe_file", ROOT, root)
        self._call("rm_file", MARKER)


ACTIONS = {"exists": "check", "cat_file": "read", "pipe_file": "write", "rm_file": "delete"}


def open_target(destination: str | Path) -> Target:
    destination = str(destination)
    if URL.search(destination):
        if destination.endswith(".zip"):
            raise ConfigError(f"{destination}: pack to a local .zip, then upload that file")
        return FsspecTarget(destination)
    if destination.endswith(".zip"):
        return ZipTarget(destination)
    return FolderTarget(destination)


# --- copy and pack ----------------------------------------------------------------------------

@dataclass
class CopySummary:
    source: str
    destination: str
    files: int = 0  # files of the store
    copied: int = 0  # copied by this run
    skipped: int = 0  # staged by an earlier, interrupted run
    bytes: int = 0  # copied by this run
    utterances: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        resumed = f"; {self.skipped} were already copied by an earlier run" if self.skipped else ""
        return (f"Copied {self.copied} of {self.files} files ({self.bytes / 2**20:.1f} MiB) from "
                f"{self.source} to {self.destination} in {self.seconds:.1f} s{resumed}; verified: "
                f"{self.utterances} utterances, every checksum matches")


def copy_store(source: str | Path, destination: str | Path, *, jobs: int = 4) -> CopySummary:
    """Copy a store (see `_copy_store`); a file that cannot be written (read-only folder, full
    disk) is one StoreError naming it, and nothing at `destination` reads as a store."""
    try:
        return _copy_store(source, destination, jobs=jobs)
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        raise StoreError(f"{destination}: cannot write{where} ({err.strerror or err}); nothing was "
                         "published - fix that and rerun the same command to resume") from None


def _copy_store(source: str | Path, destination: str | Path, *, jobs: int = 4) -> CopySummary:
    """Copy a store from any location `open_cache` reads to a folder, a .zip or an fsspec URL.

    Resumable: a rerun skips files an interrupted run already staged for the same source.
    Verified: every checksum of the staged copy is checked before it is published. Atomic: the
    destination becomes a store only at the end (zarr.json last, then a rename where possible).

    Args:
        source: a store folder, a .zip or an fsspec URL (http(s)://, s3://, gs://).
        destination: a folder, a path ending in .zip, or an fsspec URL such as s3://bucket/x.zarr.
        jobs: files fetched at once (helps over HTTP and S3).

    Raises:
        ConfigError: the destination exists already, or is the source.
        StoreCorrupt: the copy fails verification twice (the source itself is likely damaged).
        StoreError: the source cannot be read or the destination cannot be written.

    Example:
        >>> copy_store("http://nas:8000/msp.zarr", "/scratch/msp.zarr")  # doctest: +SKIP
    """
    from .verify import verify_reader

    started = time.perf_counter()
    source, destination = str(source), str(destination)
    if not URL.search(source + destination):
        src, dst = Path(source).resolve(), Path(destination).resolve()
        if dst == src:
            raise ConfigError(f"{destination} is the source itself; choose another destination")
        if dst.is_relative_to(src):
            raise ConfigError(f"{destination} is inside the source store {source}; choose a "
                              "destination outside it")
    with open_cache(source) as reader:  # refuses unsafe or unfinished stores before any copying
        keys = [key for key in reader.keys() if key != ROOT]
        shards = set(reader.shard_keys())
        target = open_target(destination)
        marker = {"source": source, "zarr_json_sha256": hashlib.sha256(reader.root_json).hexdigest(),
                  "keys": keys}
        done = target.begin(marker) & shards  # small metadata files are always copied again
        summary = CopySummary(source, destination, files=len(keys) + 1, skipped=len(done))
        todo = [key for key in keys if key not in done]
        log.info("copying %d of %d files from %s to %s%s", len(todo) + 1, len(keys) + 1, source,
                 destination, f" ({summary.skipped} copied by an earlier run)" if summary.skipped else "")
        digests = _copy_files(reader, target, todo, jobs=jobs)
        summary.bytes += sum(size for size, _ in digests.values())
        for attempt in (1, 2):
            staged = target.staged(reader.root_json)
            for key in keys:  # metadata files have no checksum inside the store: compare them
                if key not in shards and _digest(read_key(staged, key)) != digests[key]:
                    staged.close()
                    raise StoreCorrupt(f"{destination}: {key} differs from the source after copying; "
                                       "rerun the same command")
            with CacheReader(staged) as copy:
                report = verify_reader(copy)
                damaged_keys = copy.shard_keys(report.damaged)
            if report.ok:
                break
            at_source = [uid for uid in report.damaged if not _intact(reader, uid)]
            if at_source:
                raise StoreCorrupt(f"{source}: {len(at_source)} utterance(s) fail their checksums at "
                                   f"the source (first '{at_source[0]}'); nothing was published at "
                                   f"{destination}; run `ser cache verify {source}`")
            if attempt == 2 or len(report.damaged) < len(report.problems):
                raise StoreCorrupt(f"{destination}: the copy fails verification ({len(report.problems)} "
                                   f"problem(s), first: {report.problems[0]}); nothing was published")
            log.warning("%d file(s) of the copy fail their checksums; copying them again", len(damaged_keys))
            target.discard(damaged_keys)
            again = _copy_files(reader, target, damaged_keys, jobs=jobs)
            summary.bytes += sum(size for size, _ in again.values())
        target.publish(reader.root_json)
        summary.copied = len(todo) + 1
        summary.bytes += len(reader.root_json)
        summary.utterances = report.checked
    summary.seconds = time.perf_counter() - started
    return summary


def _intact(reader: CacheReader, uid: str) -> bool:
    try:
        reader.read_raw(uid)
        return True
    except StoreCorrupt:
        return False


def _digest(data: bytes | None) -> tuple[int, str] | None:
    return None if data is None else (len(data), hashlib.sha256(data).hexdigest())


def _copy_files(reader: CacheReader, target: Target, keys: list[str], *, jobs: int) -> dict:
    """Copy `keys` of `reader`'s store, `jobs` at a time; returns {key: (size, sha256)} of what
    was written. A file larger than the store's chunk shapes allow is refused unread."""
    from zarr.core.sync import sync

    source = reader.source

    def copy_one(key: str) -> tuple[int, str]:
        sync(reader.store.refuse_large(key))
        data = read_key(source, key)
        if data is None:
            raise StoreCorrupt(f"{source.location}: {key} is missing; the store is incomplete "
                               "(`ser cache verify` names the utterances it holds)")
        try:
            target.write(key, data)
        except OSError as err:
            raise StoreError(f"{target.location}: cannot write {key} ({err}); fix that and rerun "
                             "the same command to resume") from None
        return _digest(data)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(keys, pool.map(copy_one, keys)))


def pack_store(store: str | Path, out: str | Path) -> CopySummary:
    """Pack a store into one .zip (stored, not deflated: the shards are compressed already),
    staged as a folder, zipped, verified, then renamed into place; `open_cache` reads it as is.

    Example:
        >>> pack_store("msp.zarr", "msp.zarr.zip")  # doctest: +SKIP
    """
    if not str(out).endswith(".zip") or URL.search(str(out)):
        raise ConfigError(f"{out}: the packed store must be a local path ending in .zip")
    return copy_store(store, out)
