"""Hostile or damaged input to build, copy, pack, info and verify: each is one `ser: error:`
line naming the file, field or value, a non-zero exit, and nothing partial left behind
(reliability items 19 and 20 for stores; the index sanity checks of `ser cache verify`)."""

import errno
import json
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cachegen import open_cache
from cachegen.errors import StoreCorrupt
from helpers import one_error_line, run_cli
from test_writers import read_only, tree


def edited_index(store, tmp_path, name, **rows):
    """A copy of `store` whose index rows {id: {column: value}} are changed."""
    copy = tmp_path / name
    shutil.copytree(store, copy)
    index = pq.read_table(copy / "index.parquet").to_pylist()
    for row in index:
        row.update(rows.get(row["id"], {}))
    pq.write_table(pa.Table.from_pylist(index, schema=pq.read_schema(copy / "index.parquet")),
                   copy / "index.parquet")
    return copy


def test_verify_names_every_impossible_index_row(built_store, tmp_path):
    reader = open_cache(built_store)
    ids = sorted(reader.ids, key=lambda u: reader.index.to_pylist()[reader.ids.index(u)]["start"])
    rows = {r["id"]: r for r in reader.index.to_pylist()}
    a, b, c, d, e, f = ids[:6]
    copy = edited_index(built_store, tmp_path, "bad.zarr", **{
        a: {"frames": -5},  # negative frames
        b: {"frames": 0},  # no frames
        c: {"seconds": rows[c]["seconds"] * 3},  # frames disagree with seconds x frame rate
        d: {"start": -64},  # a negative start
        e: {"start": rows[f]["start"]},  # overlaps the next one
        ids[-1]: {"start": reader.states.shape[0] + 64},  # beyond the array
    })
    result = run_cli("cache", "verify", copy)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    for uid, words in [(a, "-5 frames"), (b, "0 frames"), (c, "frames/s make about"),
                       (d, "before the array"), (ids[-1], "beyond the states array")]:
        assert any(f"'{uid}'" in line and words in line for line in lines), (uid, words, lines)
    assert any("overlaps" in line and (f"'{e}'" in line or f"'{f}'" in line) for line in lines)
    with pytest.raises(StoreCorrupt, match=f"'{a}' has an impossible index row"):
        open_cache(copy)[a]  # never an empty utterance for training
    assert run_cli("cache", "verify", built_store).exit_code == 0  # the intact store passes


def set_meta(store, tmp_path, name, change):
    copy = tmp_path / name
    shutil.copytree(store, copy)
    root = json.loads((copy / "zarr.json").read_text())
    change(root["attributes"]["ser"])
    (copy / "zarr.json").write_text(json.dumps(root))
    return copy


@pytest.mark.parametrize("field,change,expected", [
    ("model_id", lambda m: m.pop("model_id"), "lacks field 'model_id'"),
    ("layers", lambda m: m.pop("layers"), "lacks field 'layers'"),
    ("hidden_size", lambda m: m.update(hidden_size="32"), "field 'hidden_size' is \"32\""),
    ("chunk_frames", lambda m: m.update(chunk_frames=0), "field 'chunk_frames' is 0"),
    ("do_stable_layer_norm", lambda m: m.update(do_stable_layer_norm=0),
     "field 'do_stable_layer_norm' is 0, expected bool"),
    ("failures", lambda m: m.update(failures=3), "field 'failures' is 3, expected list"),
    ("failures", lambda m: m.update(failures=[{"id": 1}]), "field 'failures' is [{\"id\": 1}]"),
    ("versions", lambda m: m.update(versions=[]), "field 'versions' is [], expected dict"),
])
def test_store_metadata_with_missing_or_wrong_fields(field, change, expected, built_store, corpus,
                                                     tiny_model, tmp_path):
    copy = set_meta(built_store, tmp_path, "m.zarr", change)
    for command in (["cache", "info", copy], ["cache", "verify", copy],
                    ["cache", "build", corpus, "--model", tiny_model, "--layers", 2, "--dtype",
                     "float32", "--out", copy, "--no-progress"],
                    ["train", "--from-cache", copy, "--epochs", 1, "--out", tmp_path / "run", "--no-progress"]):
        one_error_line(run_cli(*command), str(copy), expected)


@pytest.mark.parametrize("table", ["index.parquet", "manifest.parquet"])
def test_damaged_table_is_one_line_even_when_pyarrow_says_more(table, built_store, tmp_path):
    """A zeroed page header: pyarrow's message spans lines, the command's error must not."""
    copy = tmp_path / "s.zarr"
    shutil.copytree(built_store, copy)
    data = bytearray((copy / table).read_bytes())
    data[4:44] = bytes(40)
    (copy / table).write_bytes(bytes(data))
    for command in ("info", "verify"):
        one_error_line(run_cli("cache", command, copy), str(copy), table)


def test_damaged_index_on_resume_is_one_line(built_store, corpus, tiny_model, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(built_store, copy)
    data = (copy / "index.parquet").read_bytes()
    (copy / "index.parquet").write_bytes(data[:len(data) // 2])
    before = tree(copy)
    one_error_line(run_cli("cache", "build", corpus, "--model", tiny_model, "--layers", 2, "--dtype",
                           "float32", "--out", copy, "--no-progress"), "index.parquet", "damaged")
    assert tree(copy) == before


def test_manifest_with_a_duplicate_column_or_no_rows(tiny_model, corpus, tmp_path):
    audio = ["--audio-root", Path(corpus).parent]
    folder = tmp_path
    twice = folder / "twice.csv"
    twice.write_text("id,path,activation,activation\nutt0000,wav/utt0000.wav,1,2\n")
    one_error_line(run_cli("cache", "build", twice, *audio, "--model", tiny_model, "--out", tmp_path / "a"),
                   str(twice), "'activation' appear more than once")
    pq.write_table(pa.table([pa.array(["utt0000"]), pa.array(["wav/utt0000.wav"]), pa.array(["x"])],
                            names=["id", "path", "id"]), folder / "twice.parquet")
    one_error_line(run_cli("cache", "build", folder / "twice.parquet", *audio, "--model", tiny_model,
                           "--out", tmp_path / "b"), "'id' appear more than once")
    empty = folder / "empty.csv"
    empty.write_text("id,path,split\n")
    one_error_line(run_cli("cache", "build", empty, *audio, "--model", tiny_model, "--out", tmp_path / "c"),
                   str(empty), "no rows")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_pickle_in_a_model_folder_is_never_unpickled(tiny_model, corpus, tmp_path):
    import pickle

    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    state = torch.nn.Linear(1, 1).state_dict()
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"state": state, "x": Payload()}))
    one_error_line(run_cli("cache", "build", corpus, "--model", folder, "--out", tmp_path / "s"),
                   str(folder), "pytorch_model.bin", "pickle")
    assert not marker.exists() and not (tmp_path / "s").exists()


def test_failed_finalisation_fails_the_build(tiny_model, corpus, tmp_path, monkeypatch):
    import cachegen.store as store

    def broken(self, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store.StoreWriter, "finalize", broken)
    out = tmp_path / "s.zarr"
    one_error_line(run_cli("cache", "build", corpus, "--model", tiny_model, "--layers", 1, "--out",
                           out, "--no-progress"), str(out), "could not finalise")


def test_copy_and_pack_into_a_read_only_folder(built_store, tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    with read_only(target):
        one_error_line(run_cli("cache", "copy", built_store, target / "c.zarr"), str(target))
        one_error_line(run_cli("cache", "pack", built_store, target / "p.zip"), str(target))
    assert list(target.iterdir()) == []


def test_disk_full_while_packing_leaves_no_zip(built_store, tmp_path, monkeypatch):
    real_write, calls = zipfile.ZipFile.write, {"n": 0}

    def filling_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", filling_disk)
    out = tmp_path / "s.zip"
    one_error_line(run_cli("cache", "pack", built_store, out), str(out), "No space left")
    assert not out.exists() and not Path(f"{out}.tmp").exists()
    monkeypatch.setattr(zipfile.ZipFile, "write", real_write)
    result = run_cli("cache", "pack", built_store, out)  # space freed: the same command finishes
    assert result.exit_code == 0 and run_cli("cache", "verify", out).exit_code == 0


def zipped(store, out, replace: dict, compress=zipfile.ZIP_STORED):
    """`store` zipped, with members in `replace` {name: bytes} swapped in (deflated)."""
    with zipfile.ZipFile(out, "w", compression=compress) as archive:
        for path in sorted(p for p in Path(store).rglob("*") if p.is_file()):
            name = path.relative_to(store).as_posix()
            data = replace.get(name, path.read_bytes())
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED
                             if name in replace else zipfile.ZIP_STORED)
    return out


def peak_memory(call):
    import tracemalloc

    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("member", ["states/c/0/0", "index.parquet"])
def test_zip_bomb_member_is_refused_before_inflating(member, built_store, tmp_path):
    from cachegen.errors import UnsafeInput

    bomb = zipped(built_store, tmp_path / "bomb.zip", {member: bytes(300 * 2**20)})
    assert bomb.stat().st_size < 2 * 2**20  # 300 MiB of zeros deflate to a few hundred KiB

    def read_all():
        with pytest.raises(UnsafeInput, match="refusing"):
            with open_cache(bomb) as reader:
                for uid in reader.ids:
                    reader.read_raw(uid)

    assert peak_memory(read_all) < 64 * 2**20
    one_error_line(run_cli("cache", "verify", bomb), "refusing", member.split("/")[-1])


def test_chunk_shape_bomb_is_refused_before_reading(built_store, tmp_path):
    copy = tmp_path / "huge-chunks.zarr"
    shutil.copytree(built_store, copy)
    root = json.loads((copy / "zarr.json").read_text())
    states = root["consolidated_metadata"]["metadata"]["states"]
    states["codecs"][0]["configuration"]["chunk_shape"] = [2**23, states["shape"][1]]
    (copy / "zarr.json").write_text(json.dumps(root))
    one_error_line(run_cli("cache", "verify", copy), "refusing states with", "chunk shape [8388608")
    # and consistent lies (metadata too) are refused by size
    root["attributes"]["ser"]["chunk_frames"] = 2**23
    root["attributes"]["ser"]["shard_frames"] = 2**23
    states["chunk_grid"]["configuration"]["chunk_shape"] = [2**23, states["shape"][1]]
    (copy / "zarr.json").write_text(json.dumps(root))
    one_error_line(run_cli("cache", "verify", copy), "refusing chunks of 1024 MiB")
