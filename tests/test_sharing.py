"""Sharing a store: read over HTTP (real server, ranged GETs) and from a zip, local caching of
remote files, copy and pack (resumable, verified, atomic), and refusal of unsafe stores
(docs/design.md, checklist items 4-7)."""

import json
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import torch

from cachegen import open_cache
from cachegen.build import BuildConfig, build_cache
from cachegen.errors import StoreCorrupt, StoreError
from helpers import one_error_line, run_cli
from http_server import StaticServer


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, corpus):
    """A float16 store with shards of 256 frames (4 inner chunks): ~10 shard files, most shared
    by several utterances of 1-2 chunks."""
    out = tmp_path_factory.mktemp("sharing") / "s.zarr"
    summary = build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=2,
                                      shard_frames=256, chunk_frames=64, batch_size=8, progress=False))
    assert not summary.failed
    assert len(list((out / "states" / "c").rglob("*"))) >= 8
    return out


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="module")
def server(www):
    """RangeHTTPServer on 127.0.0.1 serving `www`, for the whole module."""
    server = StaticServer(www)
    yield server
    server.stop()


def serve(store: Path, www: Path, name: str) -> Path:
    """A copy of `store` under the served folder."""
    copy = www / name
    shutil.copytree(store, copy)
    return copy


def local_states(store) -> dict:
    with open_cache(store) as reader:
        return {uid: reader.read_raw(uid).tobytes() for uid in reader.ids}


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- read from anywhere -----------------------------------------------------------------------

def test_http_store_reads_byte_for_byte_like_local(store, www, server):
    serve(store, www, "http.zarr")
    url = f"{server.url}/http.zarr"
    mark = server.mark()
    local = open_cache(store)
    with open_cache(url) as remote:
        assert remote.ids == local.ids and remote.meta == local.meta
        assert remote.table.equals(local.table) and remote.index.equals(local.index)
        for uid in reversed(remote.ids):
            assert remote.read_raw(uid).tobytes() == local.read_raw(uid).tobytes()
            assert remote.frames(uid) == local.frames(uid)
    requests = server.requests_since(mark)
    assert requests and {r["method"] for r in requests} <= {"GET", "HEAD"}  # read-only
    assert all(r["status"] in ("200", "206") for r in requests)
    shard_reads = [r for r in requests if "/states/c/" in r["path"] and r["method"] == "GET"]
    assert any(r["status"] == "206" for r in shard_reads)  # ranged reads where a shard is shared
    # per shard its index, then one read per utterance (its chunks coalesced), or one whole read
    from collections import Counter
    users = Counter(key for uid in local.ids for key in local.shard_keys([uid]))
    reads = Counter(r["path"].removeprefix("/http.zarr/") for r in shard_reads)
    assert any(users[key] > 1 and any(local.frames(u) > 64 for u in local.ids if key in local.shard_keys([u]))
               for key in users)  # the fixture has utterances of several chunks in shared shards
    assert all(reads[key] <= 1 + users[key] for key in users), (reads, users)

    result = run_cli("cache", "verify", url)
    assert result.exit_code == 0 and f"{url}: ok (24 utterances" in result.output
    result = run_cli("cache", "info", url)
    assert result.exit_code == 0
    for expected in ("utterances:   24", "cached layer: 2", "float16", "weights:      sha256 ",
                     "MiB in ", "columns:      id, path, split", "built:        20"):
        assert expected in result.output
    info = json.loads(run_cli("cache", "info", url, "--json").output)
    assert info["bytes"] == sum(len(b) for b in files_of(store).values())
    assert info["files"] == len(files_of(store))


_FORKED = {}


def _read_in_worker(uid):
    return _FORKED["reader"].read_raw(uid).tobytes()


def test_http_reader_opened_before_a_fork_reads_in_the_workers(store, www, server):
    """Data-loader workers are forked after the reader is opened; each needs its own connections."""
    import multiprocessing

    serve(store, www, "fork.zarr")
    with open_cache(f"{server.url}/fork.zarr") as reader:
        reader.read_raw(reader.ids[0])  # connections and zarr's event loop exist before the fork
        _FORKED["reader"] = reader
        with multiprocessing.get_context("fork").Pool(2) as pool:
            states = pool.map(_read_in_worker, reader.ids)
    assert states == list(local_states(store).values())


def test_local_reading_writes_nothing(store, tmp_path):
    copy = serve(store, tmp_path, "s.zarr")
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in copy.rglob("*")}
    assert run_cli("cache", "verify", copy).exit_code == 0
    assert run_cli("cache", "info", copy).exit_code == 0
    assert before == {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in copy.rglob("*")}


def test_http_corruption_is_detected(store, www, server):
    copy = serve(store, www, "flipped.zarr")
    shard = sorted((copy / "states" / "c").rglob("*"))[3]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x04
    shard.write_bytes(bytes(data))
    result = run_cli("cache", "verify", f"{server.url}/flipped.zarr")
    assert result.exit_code == 1 and "problem: utterance" in result.stderr


def test_http_without_consolidated_metadata_is_an_explicit_error(store, www, server):
    copy = serve(store, www, "plain.zarr")
    root = json.loads((copy / "zarr.json").read_text())
    del root["consolidated_metadata"]
    (copy / "zarr.json").write_text(json.dumps(root))
    one_error_line(run_cli("cache", "info", f"{server.url}/plain.zarr"), "no consolidated metadata")


def test_python_http_server_without_range_support_still_reads_right(store, tmp_path):
    serve(store, tmp_path, "s.zarr")
    plain = StaticServer(tmp_path, module="http.server")
    try:
        result = run_cli("cache", "verify", f"{plain.url}/s.zarr")
        assert result.exit_code == 0 and "ignores HTTP Range requests" in result.stderr
    finally:
        plain.stop()


def test_cache_dir_second_read_is_local_and_survives_the_server_stopping(store, tmp_path):
    serve(store, tmp_path / "www", "s.zarr")
    cache_dir, expected = tmp_path / "cache", local_states(store)
    server = StaticServer(tmp_path / "www")
    url = f"{server.url}/s.zarr"
    try:
        with open_cache(url, cache_dir=cache_dir) as reader:
            assert {uid: reader.read_raw(uid).tobytes() for uid in reader.ids} == expected
        first = [r["path"] for r in server.requests() if r["method"] == "GET"]
        # each file fetched once, whole; zarr.json again once the index came (unchanged meanwhile)
        assert first.count("/s.zarr/zarr.json") == 2 and len(first) == len(set(first)) + 1
        mark = server.mark()
        with open_cache(url, cache_dir=cache_dir) as reader:  # a second epoch, or a second run
            assert {uid: reader.read_raw(uid).tobytes() for uid in reader.ids} == expected
        assert [r["path"] for r in server.requests_since(mark)] == ["/s.zarr/zarr.json"]

        root = json.loads((tmp_path / "www" / "s.zarr" / "zarr.json").read_text())
        root["attributes"]["ser"]["updated"] = "later"  # the store changed on the server
        (tmp_path / "www" / "s.zarr" / "zarr.json").write_text(json.dumps(root))
        mark = server.mark()
        with open_cache(url, cache_dir=cache_dir) as reader:
            assert reader.meta["updated"] == "later" and reader.read_raw(reader.ids[0]).tobytes()
        assert "/s.zarr/index.parquet" in [r["path"] for r in server.requests_since(mark)]
        with open_cache(url, cache_dir=cache_dir) as reader:
            [reader.read_raw(uid) for uid in reader.ids]
    finally:
        server.stop()
    result = run_cli("cache", "verify", url, "--cache-dir", cache_dir)  # the server is gone
    assert result.exit_code == 0 and "24 utterances" in result.output
    assert "reading the local copy" in result.stderr
    with open_cache(url, cache_dir=cache_dir) as reader:
        assert {uid: reader.read_raw(uid).tobytes() for uid in reader.ids} == expected
    one_error_line(run_cli("cache", "verify", url), f"{url}/zarr.json: cannot read")


def test_cached_copy_never_stands_in_for_a_store_removed_from_the_server(store, www, server, tmp_path):
    served = serve(store, www, "removed.zarr")
    url = f"{server.url}/removed.zarr"
    with open_cache(url, cache_dir=tmp_path) as reader:
        reader.read_raw(reader.ids[0])
    shutil.rmtree(served)
    with pytest.raises(StoreError, match="no zarr.json"):
        open_cache(url, cache_dir=tmp_path)


# --- zip ----------------------------------------------------------------------------------------

def test_pack_to_zip_reads_and_verifies_in_place(store, tmp_path):
    out = tmp_path / "s.zip"
    result = run_cli("cache", "pack", store, out)
    assert result.exit_code == 0 and "verified: 24 utterances" in result.output
    assert not (tmp_path / "s.zip.partial").exists() and not (tmp_path / "s.zip.tmp").exists()
    with zipfile.ZipFile(out) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
        assert sorted(archive.namelist()) == sorted(files_of(store))
    assert local_states(out) == local_states(store)
    assert run_cli("cache", "verify", out).exit_code == 0
    result = run_cli("cache", "info", out)
    assert result.exit_code == 0 and "utterances:   24" in result.output and "columns:" in result.output
    one_error_line(run_cli("cache", "pack", store, out), "already exists")

    with zipfile.ZipFile(out) as archive:  # flip one byte inside a shard, size unchanged
        info = archive.getinfo(sorted(n for n in archive.namelist() if n.startswith("states/c/"))[2])
    data = bytearray(out.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0x08
    out.write_bytes(bytes(data))
    result = run_cli("cache", "verify", out)
    assert result.exit_code == 1 and "problem: utterance" in result.stderr


def test_zip_made_by_hand_with_a_top_folder_opens(store, tmp_path):
    out = tmp_path / "hand.zip"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files_of(store).items():
            archive.writestr(f"s.zarr/{name}", data)
    assert local_states(out) == local_states(store)


# --- copy -------------------------------------------------------------------------------------

def test_copy_from_http_to_folder_zip_and_object_store(store, www, server, tmp_path):
    serve(store, www, "src.zarr")
    expected = files_of(store)
    result = run_cli("cache", "copy", f"{server.url}/src.zarr", tmp_path / "a.zarr")
    assert result.exit_code == 0 and "verified: 24 utterances" in result.output
    assert files_of(tmp_path / "a.zarr") == expected and not (tmp_path / "a.zarr.partial").exists()
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 for p in (tmp_path / "a.zarr").rglob("*"))
    assert run_cli("cache", "copy", tmp_path / "a.zarr", tmp_path / "b.zip").exit_code == 0
    assert local_states(tmp_path / "b.zip") == local_states(store)
    # an object store (memory:// stands in for s3://): files in place, zarr.json last
    assert run_cli("cache", "copy", tmp_path / "b.zip", "memory://bucket/c.zarr").exit_code == 0
    assert local_states("memory://bucket/c.zarr") == local_states(store)
    one_error_line(run_cli("cache", "copy", store, tmp_path / "a.zarr"), "already exists")


def crash_after(count: int, real_write, written: list):
    """A Target.write that writes `count` files (recorded in `written`), then crashes."""
    def write(self, key, data):
        if len(written) == count:
            raise RuntimeError("simulated crash")
        written.append(key)
        real_write(self, key, data)
    return write


def test_interrupted_copy_is_never_a_store_and_resumes(store, tmp_path, monkeypatch):
    from cachegen import share

    destination = tmp_path / "copy.zarr"
    real_write, written = share.FolderTarget.write, []
    monkeypatch.setattr(share.FolderTarget, "write", crash_after(7, real_write, written))
    with pytest.raises(RuntimeError, match="simulated crash"):
        share.copy_store(store, destination, jobs=1)
    assert not destination.exists() and len(files_of(tmp_path / "copy.zarr.partial")) == 7 + 1
    with pytest.raises(StoreError, match="no such store"):
        open_cache(destination)
    monkeypatch.setattr(share.FolderTarget, "write", real_write)
    result = run_cli("cache", "copy", store, destination)
    shards = sum(key.startswith("states/c/") for key in written)  # metadata files are copied again
    assert result.exit_code == 0 and f"; {shards} were already copied" in result.output and shards >= 3
    assert files_of(destination) == files_of(store)
    assert run_cli("cache", "verify", destination).exit_code == 0


def test_interrupted_copy_to_an_object_store_has_no_zarr_json(store, monkeypatch):
    from cachegen import share

    real_write, written = share.FsspecTarget.write, []
    monkeypatch.setattr(share.FsspecTarget, "write", crash_after(5, real_write, written))
    with pytest.raises(RuntimeError):
        share.copy_store(store, "memory://bucket/half.zarr", jobs=1)
    with pytest.raises(StoreError, match="no zarr.json"):
        open_cache("memory://bucket/half.zarr")
    monkeypatch.setattr(share.FsspecTarget, "write", real_write)
    summary = share.copy_store(store, "memory://bucket/half.zarr")
    assert summary.skipped == sum(key.startswith("states/c/") for key in written) >= 1
    assert local_states("memory://bucket/half.zarr") == local_states(store)


def test_copy_damaged_in_transit_is_copied_again(store, tmp_path, monkeypatch):
    from cachegen import share

    real_write, flipped = share.FolderTarget.write, []

    def flip_once(self, key, data):
        if key.startswith("states/c/") and not flipped:
            flipped.append(key)
            data = data[:40] + bytes([data[40] ^ 0x20]) + data[41:]
        real_write(self, key, data)

    monkeypatch.setattr(share.FolderTarget, "write", flip_once)
    share.copy_store(store, tmp_path / "copy.zarr")
    assert flipped and files_of(tmp_path / "copy.zarr") == files_of(store)

    def damage_index(self, key, data):  # metadata has no checksum inside the store
        real_write(self, key, data[:-1] + b"\0" if key == "index.parquet" else data)

    monkeypatch.setattr(share.FolderTarget, "write", damage_index)
    with pytest.raises(StoreCorrupt, match="index.parquet differs from the source"):
        share.copy_store(store, tmp_path / "again.zarr")
    assert not (tmp_path / "again.zarr").exists()
    monkeypatch.setattr(share.FolderTarget, "write", real_write)
    assert share.copy_store(store, tmp_path / "again.zarr").skipped > 0  # the rerun fixes it
    assert files_of(tmp_path / "again.zarr") == files_of(store)


def test_copy_of_a_damaged_store_is_refused_and_not_published(store, tmp_path):
    source = serve(store, tmp_path, "damaged.zarr")
    shard = sorted((source / "states" / "c").rglob("*"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    at_source = "fail their checksums at the source"
    one_error_line(run_cli("cache", "copy", source, tmp_path / "out.zarr"), at_source, "nothing was published")
    assert not (tmp_path / "out.zarr").exists()
    one_error_line(run_cli("cache", "pack", source, tmp_path / "out.zip"), at_source)
    assert not (tmp_path / "out.zip").exists()


# --- safe to open -------------------------------------------------------------------------------

def plant(store: Path, www: Path, name: str, edit) -> Path:
    """A copy of `store` whose states metadata (consolidated and per-array) went through `edit`."""
    copy = serve(store, www, name)
    root = json.loads((copy / "zarr.json").read_text())
    edit(root["consolidated_metadata"]["metadata"]["states"], root)
    (copy / "zarr.json").write_text(json.dumps(root))
    array = json.loads((copy / "states" / "zarr.json").read_text())
    edit(array, root)
    (copy / "states" / "zarr.json").write_text(json.dumps(array))
    return copy


def _pickle_inside_shards(array, root):
    array["codecs"][0]["configuration"]["codecs"].append({"name": "numcodecs.pickle",
                                                          "configuration": {"protocol": 5}})


def _pickle_instead_of_shards(array, root):
    array["codecs"] = [{"name": "numcodecs.pickle", "configuration": {"protocol": 5}}]


def _object_dtype(array, root):
    array["data_type"] = "|O"


def _string_dtype(array, root):
    array["data_type"] = "string"
    array["fill_value"] = ""


def _garbled_grid(array, root):
    array["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": "all"}}


def _future_format(array, root):
    root["attributes"]["ser"]["format_version"] = 99


@pytest.mark.parametrize("edit,expected", [
    (_pickle_inside_shards, "refusing unknown codec(s) numcodecs.pickle"),
    (_pickle_instead_of_shards, "refusing unknown codec(s) numcodecs.pickle"),
    (_object_dtype, "refusing states of data type \"|O\""),
    (_string_dtype, "refusing states of data type \"string\""),
    (_garbled_grid, "cannot be opened"),
    (_future_format, "store format version 99 is not supported"),
])
def test_unsafe_or_incompatible_store_refused_before_decoding(edit, expected, store, www, server, tmp_path):
    name = f"planted-{edit.__name__.strip('_')}.zarr"
    local = plant(store, www, name, edit)
    url = f"{server.url}/{name}"
    mark = server.mark()
    for command in ("info", "verify"):
        one_error_line(run_cli("cache", command, url), expected)
        one_error_line(run_cli("cache", command, local), expected)
    # nothing past zarr.json was fetched: no index, no shard, nothing decoded
    assert {r["path"] for r in server.requests_since(mark)} == {f"/{name}/zarr.json"}
    one_error_line(run_cli("cache", "copy", url, tmp_path / "copy.zarr"), expected)
    assert not (tmp_path / "copy.zarr").exists() and not (tmp_path / "copy.zarr.partial").exists()


def _zip_with(store: Path, out: Path, member: zipfile.ZipInfo | str, data: bytes) -> Path:
    import warnings

    with zipfile.ZipFile(out, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicate name is planted on purpose
        for name, content in files_of(store).items():
            archive.writestr(name, content)
        archive.writestr(member, data)
    return out


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("member,expected", [
    ("../x", "refusing zip member '../x' (absolute or '..' path)"),
    ("states/../../x", "refusing zip member 'states/../../x' (absolute or '..' path)"),
    ("/abs/x", "refusing zip member '/abs/x' (absolute or '..' path)"),
    (_symlink("states/c/99/0"), "refusing zip member 'states/c/99/0' (symbolic link)"),
    ("zarr.json", "refusing zip with member 'zarr.json' twice"),
])
def test_unsafe_zip_refused(member, expected, store, tmp_path):
    archive = _zip_with(store, tmp_path / "bad.zip", member, b"/etc/passwd")
    for command in ("info", "verify"):
        one_error_line(run_cli("cache", command, archive), expected)
    one_error_line(run_cli("cache", "copy", archive, tmp_path / "out.zarr"), expected)
    with pytest.raises(Exception, match="refusing"):
        open_cache(archive)


# --- benchmark: `.venv/bin/python -m pytest -m bench -s tests/test_sharing.py` ------------------

def synthetic_store(path: Path, *, hours: float, hidden: int = 768, seed: int = 0) -> Path:
    """A float16 store shaped like wav2vec2-base states (hidden 768, 50 frames/s, utterances of
    2-8 s, default ~16 MiB shards), filled with unit-variance noise (compresses about as little
    as real hidden states do). No model is run."""
    import numpy as np

    from cachegen.store import FORMAT, FORMAT_VERSION, StoreWriter, default_shard_frames

    if (path / "zarr.json").exists():
        return path
    rng = np.random.default_rng(seed)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "float16",
            "hidden_size": hidden, "chunk_frames": 64, "frame_rate": 50.0, "layers": 9,
            "shard_frames": default_shard_frames(hidden, "float16", 64)}
    writer = StoreWriter(path, meta)
    seconds, total = [], 0.0
    while total < hours * 3600:
        seconds.append(float(rng.uniform(2, 8)))
        total += seconds[-1]
    for i, length in enumerate(seconds):
        states = rng.standard_normal((int(length * 50), hidden), dtype=np.float32).astype(np.float16)
        writer.add({"id": f"u{i:06d}", "seconds": length, "source_rate": 16000, "audio_sha256": ""}, states)
    writer.flush()
    writer.finalize(table=None, extra_meta={"complete": True})
    writer.close()
    return path


def timed_pass(location: str, *, cache_dir=None, seed: int = 0) -> tuple[float, int]:
    """Seconds to open `location` and read every utterance once in shuffled order; bytes read."""
    import random
    import time

    started = time.perf_counter()
    with open_cache(location, cache_dir=cache_dir) as reader:
        order = list(reader.ids)
        random.Random(seed).shuffle(order)
        nbytes = sum(reader[uid].nbytes for uid in order)
    return time.perf_counter() - started, nbytes


@pytest.mark.bench
def test_bench_remote_reading(tmp_path_factory):
    import os
    import platform

    from cachegen.share import copy_store, pack_store

    work = Path(os.environ.get("SER_BENCH_DIR") or tmp_path_factory.mktemp("bench"))
    hours = float(os.environ.get("SER_BENCH_HOURS", "1"))
    store = synthetic_store(work / "www" / "bench.zarr", hours=hours)
    packed = work / "bench.zip"
    if not packed.exists():
        pack_store(store, packed)
    with open_cache(store) as reader:
        utterances, audio_hours = len(reader), sum(reader.index.column("seconds").to_pylist()) / 3600
        stored = reader.nbytes()

    def evict(folder: Path):
        for file in [folder] if folder.is_file() else [p for p in folder.rglob("*") if p.is_file()]:
            fd = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    server = StaticServer(work / "www")
    url = f"{server.url}/bench.zarr"
    cache_dir = work / "cache"

    def cold_cache():
        shutil.rmtree(cache_dir, ignore_errors=True)
        return url

    passes = {  # name: (prepare, then read with or without cache_dir)
        "local folder, page cache dropped": (lambda: evict(store) or str(store), None),
        "local folder, warm": (lambda: str(store), None),
        "local zip (`ser cache pack`), page cache dropped": (lambda: evict(packed) or str(packed), None),
        "HTTP 127.0.0.1, ranged reads, no cache": (lambda: url, None),
        "HTTP 127.0.0.1, --cache-dir cold (first epoch)": (cold_cache, cache_dir),
        "HTTP 127.0.0.1, --cache-dir warm (later epochs)": (lambda: url, cache_dir),
    }
    rounds = int(os.environ.get("SER_BENCH_ROUNDS", "3"))
    times = {name: [] for name in passes}
    copies = []
    try:
        for _ in range(rounds):  # interleaved, so that load from other processes hits all alike
            for name, (prepare, cache) in passes.items():
                seconds, nbytes = timed_pass(prepare(), cache_dir=cache)
                times[name].append(seconds)
            shutil.rmtree(work / "copy.zarr", ignore_errors=True)
            copies.append(copy_store(url, work / "copy.zarr"))  # fetch, then verify every checksum
            shutil.rmtree(work / "copy.zarr")
    finally:
        server.stop()
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    print(f"\n{utterances} utterances, {audio_hours:.2f} h of audio, {stored / 2**20:.0f} MiB stored "
          f"(float16, hidden 768); {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
          f"median of {rounds} interleaved rounds (min-max in brackets)")
    print("| source | pass (s) | utterances/s | MiB/s decoded | audio h/s |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        seconds = median(values)
        print(f"| {name} | {seconds:.1f} ({min(values):.1f}-{max(values):.1f}) | {utterances / seconds:.0f} "
              f"| {nbytes / 2**20 / seconds:.0f} | {audio_hours / seconds:.2f} |")
    copy = sorted(copies, key=lambda c: c.seconds)[len(copies) // 2]
    print(f"`ser cache copy` of it from HTTP 127.0.0.1 to a local folder, verification included: "
          f"{copy.seconds:.1f} s ({copy.bytes / 2**20 / copy.seconds:.0f} MiB/s)")


def test_training_from_http_and_zip_equals_training_from_disk(store, www, server, tmp_path):
    """Teammates train from a shared store over HTTP or from a zip: the same run as from disk."""
    from safetensors.torch import load_file

    from headtrain import EvaluateConfig, TrainConfig, evaluate, train

    before = set(files_of(store).items())
    serve(store, www, "train.zarr")
    zipped = tmp_path / "s.zip"
    assert run_cli("cache", "pack", store, zipped).exit_code == 0
    sources = {"disk": str(store), "http": f"{server.url}/train.zarr", "zip": str(zipped)}
    runs = {}
    for name, location in sources.items():
        out = tmp_path / name
        train(TrainConfig(out=str(out), from_cache=location, top_layers=2, epochs=1, batch_size=4,
                          dropout=0.0, targets=("activation",), progress=False, workers=1,
                          cache_dir=str(tmp_path / "cache") if name == "http" else None))
        runs[name] = load_file(str(out / "model.safetensors"))
        metrics = evaluate(EvaluateConfig(run=str(out), out=str(out / "test"), from_cache=location))
        assert "activation" in metrics
    for name in ("http", "zip"):
        assert runs[name].keys() == runs["disk"].keys()
        for key in runs["disk"]:
            assert torch.equal(runs[name][key], runs["disk"][key]), (name, key)
    assert set(files_of(store).items()) == before  # nothing was written into the source


def test_training_refuses_an_incompatible_format_version(store, www, server, tmp_path):
    def future(array, root):
        if "attributes" in root and "ser" in root["attributes"]:
            root["attributes"]["ser"]["format_version"] = 99

    location = plant(store, www, "future-train.zarr", future)
    result = run_cli("train", "--from-cache", f"{server.url}/{location.name}", "--out", tmp_path / "r",
                     "--top-layers", 2)
    one_error_line(result, "format version 99")
