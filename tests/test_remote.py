"""Remote reads against a misbehaving HTTP server on 127.0.0.1: stalls and 5xx answers are
tried again a bounded number of times, then refused in one line naming the URL; short bodies
are fetched again and never kept in --cache-dir (reliability item 16)."""

import shutil
import threading

import pytest

from cachegen import open_cache
from cachegen.build import BuildConfig, build_cache
from cachegen.errors import StoreError
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
    """Run `call` in a thread; fail (instead of hanging the suite) if it never returns."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", call(*args)), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the read hangs"
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
