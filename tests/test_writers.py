"""Who may write or delete a store: --overwrite deletes only ser stores, one build at a time
holds a store, a killed build's lock is taken over (reliability items 13, 14)."""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachegen import open_cache
from cachegen.build import BuildConfig, build_cache
from cachegen.errors import StoreError
from cachegen.lock import STORE_LOCK, BuildLock, region_lock
from cachegen.testing import synth_corpus
from helpers import run_cli

ROOT = Path(__file__).parents[1]
SER = [sys.executable, "-c", "from cli import main; main()"]


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def build(manifest, model, out, *extra):
    return run_cli("cache", "build", manifest, "--model", model, "--layers", 1, "--out", out,
                   "--no-progress", *extra)


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("ser: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return str(synth_corpus(tmp_path_factory.mktemp("small"), utterances=4, seconds=(0.5, 0.8)))


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(tiny_model, small, tmp_path):
    corpus = small
    precious = tmp_path / "work"
    shutil.copytree(Path(corpus).parent, precious)  # a folder of audio, a manifest ...
    (precious / "notes.txt").write_text("three months of notes")
    before = tree(precious)
    one_line_error(build(corpus, tiny_model, precious, "--overwrite"), str(precious),
                   "not a ser store", "notes.txt")
    assert tree(precious) == before
    # a store someone put notes into is not only a store any more: refused too
    store = tmp_path / "s.zarr"
    assert build(corpus, tiny_model, store).exit_code == 0
    (store / "notes.txt").write_text("mine")
    kept = tree(store)
    one_line_error(build(corpus, tiny_model, store, "--overwrite", "--layers", 2), "notes.txt")
    assert tree(store) == kept
    # a plain ser store is overwritten
    (store / "notes.txt").unlink()
    assert build(corpus, tiny_model, store, "--overwrite", "--layers", 2).exit_code == 0
    assert open_cache(store).meta["layers"] == 2


def test_out_that_is_a_file_or_garbage_store_is_one_line(tiny_model, small, tmp_path):
    corpus = small
    file = tmp_path / "f.zarr"
    file.write_text("x")
    result = build(corpus, tiny_model, file)  # click refuses it (usage error, exit 2)
    assert result.exit_code == 2 and "is a file" in result.output
    with pytest.raises(StoreError, match="is a file"):  # and so does the Python API
        build_cache(BuildConfig(manifest=corpus, out=str(file), model=tiny_model, layers=1,
                                progress=False))
    assert file.read_text() == "x"
    garbage = tmp_path / "g.zarr"
    garbage.mkdir()
    (garbage / "zarr.json").write_bytes(b"\x00{not json")
    for extra in ((), ("--overwrite",)):
        one_line_error(build(corpus, tiny_model, garbage, *extra), str(garbage))
    assert (garbage / "zarr.json").read_bytes() == b"\x00{not json"
    foreign = tmp_path / "z.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                   "attributes": {}}))
    one_line_error(build(corpus, tiny_model, foreign), "not a ser store")


def test_second_build_is_refused_naming_the_first(tiny_model, tmp_path):
    first = synth_corpus(tmp_path / "a", utterances=40, seconds=(0.5, 1.0))
    second = synth_corpus(tmp_path / "b", utterances=8, seconds=(0.5, 1.0), seed=5)
    second.write_text(second.read_text().replace("utt", "other"))
    for wav in (second.parent / "wav").iterdir():
        wav.rename(wav.with_name(wav.name.replace("utt", "other")))
    out = tmp_path / "s.zarr"
    args = ["cache", "build", first, "--model", tiny_model, "--layers", 1, "--batch-size", 1,
            "--workers", 1, "--shard-frames", 64, "--no-progress", "--out", out]
    proc = subprocess.Popen(SER + [str(a) for a in args], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "_building").glob("shard-*.parquet"))) < 2:
        time.sleep(0.01)
    assert proc.poll() is None, "the first build must still be running"
    for manifest in (first, second):  # same or another manifest
        result = build(manifest, tiny_model, out, "--shard-frames", 64)
        one_line_error(result, "being built by another process", f"pid {proc.pid}", "cache build")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert len(open_cache(out)) == 40  # nothing of the first build was lost
    # once it is done, a manifest that lacks the store's utterances would replace the table that
    # everyone trains on: refused, the store untouched; one that extends it adds its rows
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    one_line_error(build(second, tiny_model, out, "--shard-frames", 64),
                   f"holds 40 cached utterance(s) that {second} does not list (utt0000, ", "--overwrite")
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    both = tmp_path / "both.csv"
    rows = [line.replace(",wav/", f",{m.parent.name}/wav/") for m in (first, second)
            for line in m.read_text().splitlines()[1:]]
    both.write_text("\n".join([first.read_text().splitlines()[0], *rows]) + "\n")
    result = build(both, tiny_model, out, "--shard-frames", 64)
    assert result.exit_code == 0 and "40 were already cached" in result.output, result.output
    reader = open_cache(out)
    assert len(reader) == 48 and sorted(reader.table.column("id").to_pylist()) == sorted(reader.ids)
    assert run_cli("cache", "verify", out).exit_code == 0


def test_parts_share_a_store_but_not_a_region(tmp_path):
    out = tmp_path / "s.zarr"
    part_one = [BuildLock(out, shared=True), BuildLock(out, region_lock(0))]
    part_two = [BuildLock(out, shared=True), BuildLock(out, region_lock(1))]  # side by side: fine
    with pytest.raises(StoreError, match=f"being built by another process .*pid {os.getpid()}"):
        BuildLock(out, region_lock(0))  # part 1 started twice
    with pytest.raises(StoreError, match="being built by another process .*pid"):
        BuildLock(out)  # the final step (or a plain build) while parts run
    for lock in part_one + part_two:
        lock.release()
    whole = BuildLock(out)
    with pytest.raises(StoreError, match="being built"):
        BuildLock(out, shared=True)  # a part while a plain build runs
    whole.release()
    assert not (out / STORE_LOCK).exists()  # a build that ends leaves no lock file
    BuildLock(out).release()


def test_lock_file_removed_while_being_taken_is_not_shared(tmp_path, monkeypatch):
    """The holder removes the lock file as it releases; one who opened the old file just then
    must not hold a lock on a file nobody else sees."""
    import cachegen.lock as lock_module

    out = tmp_path / "s.zarr"
    first = BuildLock(out)
    real_flock, raced = lock_module.fcntl.flock, {}

    def flock(fd, operation):
        if not raced:
            raced["once"] = True
            first.release()
        return real_flock(fd, operation)

    monkeypatch.setattr(lock_module.fcntl, "flock", flock)
    second = BuildLock(out)
    monkeypatch.setattr(lock_module.fcntl, "flock", real_flock)
    assert raced and (out / STORE_LOCK).exists()
    with pytest.raises(StoreError, match="being built"):
        BuildLock(out)  # the second holds the lock on the file that is there
    second.release()


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only for this process: by its modes, or, for root (whom modes do not stop),
    by a read-only bind mount; skipped where neither is possible."""
    folders = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    if os.geteuid() != 0:
        for path in folders:
            path.chmod(0o555)
        try:
            yield
        finally:
            for path in folders:
                path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", folder],
                                     capture_output=True).returncode:
        if mounted:
            subprocess.run(["umount", folder])
        pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


def test_read_only_out_is_one_line(tiny_model, small, tmp_path):
    corpus = small
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        one_line_error(build(corpus, tiny_model, parent / "s.zarr"), str(parent))
    store = tmp_path / "done.zarr"
    assert build(corpus, tiny_model, store).exit_code == 0
    before = tree(store)
    with read_only(store):
        one_line_error(build(corpus, tiny_model, store), str(store))
        one_line_error(build(corpus, tiny_model, store, "--overwrite", "--layers", 2), str(store))
    assert tree(store) == before


def test_a_file_is_written_into_a_folder_that_cannot_be_read(tmp_path, monkeypatch):
    """The folder's fsync after the rename needs to open the folder; a folder one may write but
    not read (mode -wx) must still get the file, and no error."""
    import cachegen.store as store

    real = os.open

    def folders_unreadable(path, flags, *args, **kwargs):
        if os.path.isdir(path) and flags == os.O_RDONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", folders_unreadable)
    store.write_atomic(tmp_path / "f.json", b"{}")
    monkeypatch.undo()
    assert (tmp_path / "f.json").read_bytes() == b"{}" and os.listdir(tmp_path) == ["f.json"]
