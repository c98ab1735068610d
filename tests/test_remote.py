"""Remote reads against a misbehaving HTTP server on 127.0.0.1: stalls and 5xx answers are
tried again a bounded number of times, then refused in one line naming the URL; short bodies
are fetched again and never kept in --cache-dir (reliability item 16)."""

import os
import shutil
import threading
from pathlib import Path

import pytest

from cachegen import open_cache
from cachegen.build import BuildConfig, build_cache
from cachegen.errors import StoreError, UnsafeInput
from cachegen.sources import FsspecSource
from helpers import one_error_line, run_cli
from faulty_http import FaultyServer


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, corpus):
    out = tmp_path_factory.mktemp("remote") / "www" / "s.zarr"
    build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=1,
                            shard_frames=256, chunk_frames=64, progress=False))
    return out


@pytest.fixture
def server(store):
    server = FaultyServer(store.parent)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Seconds instead of the defaults' half minute, so a stalled read fails fast."""
    monkeypatch.setattr(FsspecSource, "timeout", 1.0)
    monkeypatch.setattr(FsspecSource, "retries", 2)
    monkeypatch.setattr(FsspecSource, "backoff", 0.05)


def local_states(store):
    with open_cache(store) as reader:
        return {uid: reader.read_raw(uid).tobytes() for uid in reader.ids}


def bounded(call, *args):
    """Run `call` in a thread; fail (instead of hanging the suite) if it never returns. What it
    raises is raised here."""
    result = {}

    def run():
        try:
            result["value"] = call(*args)
        except BaseException as err:  # noqa: BLE001 -- handed to the test's thread
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the read hangs"
    if "error" in result:
        raise result["error"]
    return result["value"]


def shard_paths(store):
    return sorted("/s.zarr/" + p.relative_to(store).as_posix() for p in (store / "states" / "c").rglob("*")
                  if p.is_file())


def test_stalled_server_fails_in_bounded_time_naming_the_url(store, server):
    server.faults["*"] = ["stall"] * 50
    result = bounded(run_cli, "cache", "info", f"{server.url}/s.zarr")
    one_error_line(result, f"{server.url}/s.zarr/zarr.json", "after 3 tries")
    assert len(server.requests("/s.zarr/zarr.json")) == 3  # the first try and 2 retries, no more


def test_transient_5xx_is_tried_again(store, server):
    for path in ["/s.zarr/zarr.json", "/s.zarr/index.parquet", *shard_paths(store)[:2]]:
        server.faults[path] = ["503", "502"]
    with open_cache(f"{server.url}/s.zarr") as reader:
        assert {uid: reader.read_raw(uid).tobytes() for uid in reader.ids} == local_states(store)
    assert [r[2] for r in server.requests("/s.zarr/index.parquet")] == ["503", "502", "ok"]


def test_persistent_5xx_and_4xx_are_one_line(store, server):
    server.faults["/s.zarr/index.parquet"] = ["500"] * 50
    one_error_line(bounded(run_cli, "cache", "verify", f"{server.url}/s.zarr"),
                   f"{server.url}/s.zarr/index.parquet", "500", "after 3 tries")
    assert len(server.requests("/s.zarr/index.parquet")) == 3
    server.faults["/s.zarr/index.parquet"] = ["403"] * 50
    one_error_line(bounded(run_cli, "cache", "verify", f"{server.url}/s.zarr"),
                   f"{server.url}/s.zarr/index.parquet", "403")
    assert len(server.requests("/s.zarr/index.parquet")) == 4  # a 403 is not tried again


@pytest.mark.parametrize("fault", ["short", "short-honest"])
def test_short_bodies_are_fetched_again(fault, store, server):
    """'short': Content-Length promises more than is sent; 'short-honest': it says the short
    length. Ranged reads (no --cache-dir) and whole files (--cache-dir) both get the right bytes."""
    for path in ["/s.zarr/index.parquet", *shard_paths(store)]:
        server.faults[path] = [fault]
    with open_cache(f"{server.url}/s.zarr") as reader:
        assert {uid: reader.read_raw(uid).tobytes() for uid in reader.ids} == local_states(store)
    assert any(r[2] == fault for r in server.log)


def test_cut_off_download_is_never_kept_in_the_cache_dir(store, server, tmp_path):
    cache_dir = tmp_path / "cache"
    url = f"{server.url}/s.zarr"
    shards = shard_paths(store)
    server.faults[shards[0]] = ["short-honest"] * 50  # every try of this file is cut off
    server.faults["/s.zarr/index.parquet"] = ["short-honest"]  # once: the second try is whole
    with open_cache(url, cache_dir=cache_dir) as reader:
        for uid in reader.ids:
            try:
                reader.read_raw(uid)
            except StoreError:
                pass  # the utterances of the cut-off shard cannot be read this time
    kept = {p.relative_to(next(cache_dir.iterdir())).as_posix(): p.read_bytes()
            for p in cache_dir.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert "states/c/0/0" not in kept and "index.parquet" in kept
    for name, data in kept.items():  # whatever was kept is whole
        assert data == (store / name).read_bytes(), name
    server.faults.clear()  # the server recovers: nothing bad was kept, so everything reads
    with open_cache(url, cache_dir=cache_dir) as reader:
        assert {uid: reader.read_raw(uid).tobytes() for uid in reader.ids} == local_states(store)
    assert (next(cache_dir.iterdir()) / "states/c/0/0").read_bytes() == (store / "states/c/0/0").read_bytes()


# --- a hostile server: what it answers must never cost unbounded memory or time -----------------

def kept_files(cache_dir) -> dict:
    return {p.relative_to(cache_dir).as_posix().split("/", 1)[1]: p.read_bytes()
            for p in cache_dir.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_endless_bodies_are_cut_or_refused(store, server, tmp_path, monkeypatch):
    """A body without end (no Content-Length) answering a ranged read: the first bytes are what
    was asked for, the rest is never received; answering a whole read: refused past the size
    (a shard) or past the metadata limit (zarr.json); nothing of it is kept in --cache-dir."""
    from cachegen import sources

    monkeypatch.setattr(sources, "MAX_METADATA_BYTES", 2**20)  # a test-sized limit
    url, shards = f"{server.url}/s.zarr", shard_paths(store)
    for path in shards:
        server.faults[path] = ["endless"] * 50
    with open_cache(url) as reader:  # ranged reads answered with 200, the file, then zeros
        assert bounded(lambda: {uid: reader.read_raw(uid).tobytes() for uid in reader.ids}) == local_states(store)
    cache_dir = tmp_path / "cache"
    one_error_line(bounded(run_cli, "cache", "verify", url, "--cache-dir", cache_dir),
                   f"{url}/states/c/", "more than the")
    assert not any(name.startswith("states/c/") for name in kept_files(cache_dir))
    server.faults.clear()
    server.faults["/s.zarr/zarr.json"] = ["endless"] * 50
    one_error_line(bounded(run_cli, "cache", "info", url), f"{url}/zarr.json", f"more than the {2**20} bytes")
    assert [r[2] for r in server.requests("/s.zarr/zarr.json")][-2:] == ["ok", "endless"]  # not tried again


def test_a_size_the_server_lies_about_is_refused_before_reading(store, server, tmp_path):
    """HEAD says a shard holds a terabyte (and GET would send it): refused by the store's chunk
    shapes before a byte is fetched, with or without --cache-dir, and by `ser cache copy`."""
    url, shard = f"{server.url}/s.zarr", shard_paths(store)[0]
    server.head_sizes[shard] = 10**12
    server.faults[shard] = ["endless"] * 50
    for extra in ([], ["--cache-dir", tmp_path / "cache"]):
        one_error_line(bounded(run_cli, "cache", "verify", url, *extra), url, "refusing to read 1000000000000 bytes",
                       "states/c/0/0")
    one_error_line(bounded(run_cli, "cache", "copy", url, tmp_path / "copy"), "refusing to read 1000000000000")
    assert [r[2] for r in server.requests(shard) if r[0] == "GET"] == []
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("fault, expected", [("other-range", "answered 206 with Content-Range"),
                                             ("gzip", "Content-Encoding 'gzip'")])
def test_other_bytes_or_compressed_bytes_are_refused(fault, expected, store, server, tmp_path):
    """A 206 of other bytes than asked for, or a body compressed although ser asks for none
    (a decompression bomb is never inflated): one line naming the URL, not tried again."""
    url, shard = f"{server.url}/s.zarr", shard_paths(store)[0]
    server.faults[shard] = [fault] * 50
    line = one_error_line(bounded(run_cli, "cache", "verify", url), f"{server.url}{shard}: cannot read", expected)
    assert "tries" not in line
    server.faults.clear()
    server.faults["/s.zarr/index.parquet"] = ["gzip"] * 50
    cache_dir = tmp_path / "cache"
    one_error_line(bounded(run_cli, "cache", "verify", url, "--cache-dir", cache_dir),
                   f"{url}/index.parquet", "Content-Encoding 'gzip'")
    assert "index.parquet" not in kept_files(cache_dir)


@pytest.mark.parametrize("fault, expected", [("drip", "bytes/s"), ("drip-head", "no status and headers")])
def test_a_dripping_server_fails_in_bounded_time_naming_the_url(fault, expected, store, server):
    """A byte every 0.1 s keeps a socket's read timeout (1 s here) from ever firing: the body's
    rate, and the time to the headers, are bounded too."""
    server.faults["*"] = [fault] * 50
    one_error_line(bounded(run_cli, "cache", "info", f"{server.url}/s.zarr"),
                   f"{server.url}/s.zarr/zarr.json", expected, "after 3 tries")


@pytest.mark.parametrize("fault, expected", [("redirect-loop", "TooManyRedirects"),
                                             ("redirect-file", "file:///etc/passwd")])
def test_redirect_loops_and_redirects_to_other_schemes_are_refused(fault, expected, store, server):
    server.faults["/s.zarr/zarr.json"] = [fault] * 50
    line = one_error_line(bounded(run_cli, "cache", "info", f"{server.url}/s.zarr"),
                          f"{server.url}/s.zarr/zarr.json", expected)
    assert "tries" not in line  # the server would answer the same again


def test_pooled_shards_are_bounded_by_their_chunk_shapes_too(tiny_model, corpus, tmp_path):
    """The pooled statistics' chunk shapes must be the ones the metadata implies, and a range
    of a pooled shard larger than one chunk (an index pointing at a gigabyte, sent without end)
    is refused before it is fetched."""
    import json

    import numpy as np

    from cachegen.store import checksum
    from helpers import build_pooled

    www = tmp_path / "www"
    store = Path(build_pooled(corpus, tiny_model, www / "p.zarr", shard_frames=256, chunk_frames=64))
    shard = store / "pooled" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(4 * 16 + 4):-4]), "<u8").reshape(4, 2).copy()
    index[0, 1] = 2**30  # the first slot's chunk: a gigabyte
    data[-(4 * 16 + 4):] = index.tobytes() + checksum(index.view(np.uint8)).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    server = FaultyServer(www)
    try:
        server.faults["/p.zarr/pooled/c/0/0"] = ["endless"] * 50
        with open_cache(f"{server.url}/p.zarr") as reader:
            with pytest.raises(UnsafeInput, match="refusing to read 1073741824 bytes of 'pooled/c/0/0'"):
                bounded(lambda: [reader.pooled(uid) for uid in reader.ids])
        root = json.loads((store / "zarr.json").read_text())
        pooled = root["consolidated_metadata"]["metadata"]["pooled"]
        pooled["chunk_grid"]["configuration"]["chunk_shape"][0] = 2**20  # a chunk of 1.25 GiB
        pooled["codecs"][0]["configuration"]["chunk_shape"][0] = 2**20
        (store / "zarr.json").write_text(json.dumps(root))
        one_error_line(bounded(run_cli, "cache", "info", f"{server.url}/p.zarr"), "refusing pooled with",
                       "chunk shape [1048576")
    finally:
        server.stop()


# --- the local copy (--cache-dir): only what ser wrote, never two versions of a store mixed ------

@pytest.fixture(scope="module")
def rebuilt(store, tiny_model, corpus):
    """Another build of the same audio beside `store` (layer 2 instead of 1; same utterances,
    same shard layout): what the server holds after the store was rebuilt."""
    out = store.parent / "b.zarr"
    build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=2,
                            shard_frames=256, chunk_frames=64, progress=False))
    return out


def copy_folder(cache_dir):
    (folder,) = [p for p in cache_dir.iterdir()]
    return folder


def test_local_copy_reads_only_regular_files_it_wrote(store, rebuilt, server, tmp_path):
    """What is found in the local copy instead of ser's own files is never read or written
    through: a FIFO (a read would block forever), a link to another store's shard, a link to a
    folder outside, a shard of another build. The reads are right and the copy ends up whole."""
    url, cache_dir = f"{server.url}/s.zarr", tmp_path / "cache"
    with open_cache(url, cache_dir=cache_dir) as reader:
        [reader.read_raw(uid) for uid in reader.ids]
    folder, outside = copy_folder(cache_dir), tmp_path / "outside"
    outside.mkdir()
    shards = sorted(p.relative_to(folder).as_posix() for p in (folder / "states" / "c").rglob("*") if p.is_file())
    assert len(shards) >= 4
    os.unlink(folder / shards[0])
    os.mkfifo(folder / shards[0])
    (folder / shards[1]).unlink()
    (folder / shards[1]).symlink_to(rebuilt / shards[1])
    shutil.rmtree((folder / shards[2]).parent)
    (folder / shards[2]).parent.symlink_to(outside, target_is_directory=True)
    (folder / shards[3]).write_bytes((rebuilt / shards[3]).read_bytes())
    with open_cache(url, cache_dir=cache_dir) as reader:
        assert bounded(lambda: {uid: reader.read_raw(uid).tobytes() for uid in reader.ids}) == local_states(store)
    assert list(outside.iterdir()) == []
    kept = kept_files(cache_dir)
    assert set(shards) <= set(kept)
    for name, data in kept.items():
        assert data == (store / name).read_bytes(), name
    assert not any(p.is_symlink() for p in folder.rglob("*"))


def test_a_store_changed_on_the_server_is_never_read_mixed(store, rebuilt, server, tmp_path):
    """The server swaps in another build between two reads: while a reader opens (zarr.json of
    one build, the index of the other), or while it reads shards. Either is one line naming
    the URL and saying it changed; nothing of the mix stays in --cache-dir."""
    url, shards = f"{server.url}/s.zarr", shard_paths(store)
    for cache_dir in (None, tmp_path / "cache"):
        server.faults["/s.zarr/zarr.json"] = ["ok", "from:/b.zarr/zarr.json"]
        server.faults["/s.zarr/index.parquet"] = ["from:/b.zarr/index.parquet"]
        with pytest.raises(StoreError, match=f"{url} changed while it was being read"):
            open_cache(url, cache_dir=cache_dir)
        if cache_dir:
            assert kept_files(cache_dir) == {}
        server.faults.clear()
        with open_cache(url, cache_dir=cache_dir) as reader:  # opened on build s, then it changes
            reader.read_raw(reader.ids[0])
            server.faults["/s.zarr/zarr.json"] = ["from:/b.zarr/zarr.json"] * 50
            for path in shards:
                server.faults[path] = [f"from:/b.zarr/{path.removeprefix('/s.zarr/')}"] * 50
            with pytest.raises(StoreError, match=f"{url} changed while it was being read"):
                [reader.read_raw(uid) for uid in reader.ids]
        if cache_dir:
            assert kept_files(cache_dir) == {}
        server.faults.clear()


def test_a_local_copy_shared_with_a_reader_of_another_version_keeps_only_its_own(store, rebuilt, server, tmp_path):
    """Two processes share --cache-dir: one opened the store before it was rebuilt on the
    server, the other after. The first never writes its files beside the second's zarr.json
    (and its reads fail, named); the second reads right, and the copy holds only its build."""
    url, cache_dir, shards = f"{server.url}/s.zarr", tmp_path / "cache", shard_paths(store)
    old = open_cache(url, cache_dir=cache_dir)  # the first process, on build s
    rebuild = {"/s.zarr/" + name: [f"from:/b.zarr/{name}"] * 50
               for name in ["zarr.json", "index.parquet", "manifest.parquet"]}
    rebuild.update({path: [f"from:/b.zarr/{path.removeprefix('/s.zarr/')}"] * 50 for path in shards})
    server.faults.update(rebuild)
    with open_cache(url, cache_dir=cache_dir) as new:  # the second process, on the rebuilt store
        with pytest.raises(StoreError, match="changed while it was being read"):
            [old.read_raw(uid) for uid in old.ids]  # what it fetches now is of the other build
        with open_cache(rebuilt) as direct:
            assert {uid: new.read_raw(uid).tobytes() for uid in new.ids} == {
                uid: direct.read_raw(uid).tobytes() for uid in direct.ids}
    old.close()
    for name, data in kept_files(cache_dir).items():
        assert data == (rebuilt / name).read_bytes(), name


@pytest.mark.parametrize("name, expected", [("../../../outside", "cannot be opened"),
                                            ("x" * 5000, "with a name over 255 bytes")])
def test_names_from_the_server_never_leave_the_local_copy(name, expected, store, tmp_path):
    """zarr.json names an extra node whose files would lie outside the store, or whose name no
    disk holds: refused or named, in one line or as a problem, and nothing is written outside
    the local copy (the server's names only ever become paths under it)."""
    import json

    www = tmp_path / "www"
    shutil.copytree(store, www / "s.zarr")
    root = json.loads((www / "s.zarr" / "zarr.json").read_text())
    nodes = root["consolidated_metadata"]["metadata"]
    nodes[name] = {"node_type": "group", "zarr_format": 3, "attributes": {}}
    (www / "s.zarr" / "zarr.json").write_text(json.dumps(root))
    before = sorted(p for p in tmp_path.rglob("*"))
    server = FaultyServer(www)
    try:
        result = bounded(run_cli, "cache", "verify", f"{server.url}/s.zarr", "--cache-dir", tmp_path / "cache")
    finally:
        server.stop()
    assert result.exit_code == 1 and "Traceback" not in result.stderr and expected in result.output + result.stderr
    written = [p for p in tmp_path.rglob("*") if p not in before]
    assert all(p.is_relative_to(tmp_path / "cache") for p in written), written


def test_parquet_bombs_are_refused_before_decoding(store, tmp_path, monkeypatch):
    """A 4 KB index.parquet whose one 8 MiB string is referenced by 2000 rows (16 GB decoded),
    and one of a million rows of a run-length-encoded zero: refused unread, in one line,
    served over HTTP or from a folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cachegen import reader as reader_module

    www = tmp_path / "www"
    shutil.copytree(store, www / "s.zarr")
    ids = pa.DictionaryArray.from_arrays(pa.array([0] * 2000, pa.int32()), pa.array(["x" * 2**23]))
    pq.write_table(pa.table({"id": ids}), www / "s.zarr" / "index.parquet", store_schema=False,
                   compression="zstd")
    assert (www / "s.zarr" / "index.parquet").stat().st_size < 2**12
    server = FaultyServer(www)
    try:
        one_error_line(bounded(run_cli, "cache", "info", f"{server.url}/s.zarr"),
                       "refusing index.parquet: its values would take 16000 MiB decoded")
    finally:
        server.stop()
    monkeypatch.setattr(reader_module, "MAX_TABLE_BYTES", 2**20)  # a test-sized limit
    pq.write_table(pa.table({"start": pa.array([0] * 10**6, pa.int64())}), www / "s.zarr" / "index.parquet")
    one_error_line(run_cli("cache", "info", www / "s.zarr"), "refusing index.parquet: its values would take 8 MiB")
