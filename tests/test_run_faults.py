"""Faults around runs: read-only and full disks for train, evaluate, export and predict; a
hand-edited or cut config.json, state.json or weights file; pickles where safetensors belong
(issue 12, run side; RELIABILITY items 6, 19 and 20)."""

import builtins
import errno
import io
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from headtrain import TrainConfig, train
from helpers import one_error_line, run_cli

QUICK = ["--top-layers", 2, "--batch-size", 4, "--targets", "activation,valence", "--workers", 1,
         "--no-progress"]


@pytest.fixture(scope="module")
def finished_run(built_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    train(TrainConfig(out=str(out), from_cache=built_store, targets=("activation", "valence"), top_layers=2,
                      batch_size=4, epochs=1, progress=False, workers=1))
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def refuse_writes(monkeypatch, folder, code):
    """Every write under `folder` fails with `code` (EROFS: a read-only mount; ENOSPC: a full
    disk), at the system-call wrappers Python and its libraries use. Root ignores chmod, so
    the fault is injected instead."""
    folder = os.path.realpath(folder)
    real = {"open": os.open, "mkdir": os.mkdir, "builtins": builtins.open}

    def inside(path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        resolved = os.path.realpath(os.fsdecode(path))
        return resolved == folder or resolved.startswith(folder + os.sep)

    def fail(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            fail(path)
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if code == errno.EROFS and inside(path):
            fail(path)
        return real["mkdir"](path, mode, dir_fd=dir_fd)

    def open_file(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            fail(file)
        return real["builtins"](file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_file)
    monkeypatch.setattr(io, "open", open_file)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "Read-only file system"),
                                         (errno.ENOSPC, "No space left on device")])
@pytest.mark.parametrize("command", ["train", "evaluate", "export", "predict"])
def test_unwritable_output_is_one_line_and_leaves_nothing_looking_whole(
        command, code, reason, run, built_store, corpus, tmp_path, monkeypatch):
    place = tmp_path / "place"
    place.mkdir()
    audio = corpus.replace("manifest.csv", "wav/utt0001.wav")
    args = {"train": ["train", "--from-cache", built_store, *QUICK, "--epochs", 1, "--out", place / "r"],
            "evaluate": ["evaluate", run, "--from-cache", built_store, "--split", "dev", "--out", place / "e"],
            "export": ["export", run, "--out", place / "x"],
            "predict": ["predict", run, audio, "--out", place / "p.csv"]}[command]
    refuse_writes(monkeypatch, place, code)
    one_error_line(run_cli(*args), str(place), f"cannot be written ({reason})")
    monkeypatch.undo()
    left = files_under(place)
    # a full disk may leave an empty folder or a run without an epoch: never a file that looks whole
    assert not [f for f in left if f.endswith(("metrics.json", "ser_head.json", ".csv", "model.safetensors"))], left


def test_disk_full_mid_training_keeps_the_last_epoch_and_resumes(built_store, tmp_path, monkeypatch):
    import headtrain.plots

    real_plot = headtrain.plots.plot_curves

    def plot_then_fill_the_disk(history, path):
        real_plot(history, path)
        if len(history) == 1:
            def full(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(os, "fsync", full)

    monkeypatch.setattr(headtrain.plots, "plot_curves", plot_then_fill_the_disk)
    out = tmp_path / "r"
    result = run_cli("train", "--from-cache", built_store, *QUICK, "--epochs", 3, "--out", out)
    one_error_line(result, f"{out}: cannot be written (No space left on device)",
                   f"`ser train --resume {out}` continues")
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()  # the run does not look finished
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == [1]
    assert json.load(open(out / "checkpoint" / "state.json"))["epoch"] == 1
    load_file(str(out / "model.safetensors"))  # whole
    result = run_cli("train", "--resume", out, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == [1, 2, 3]


def edit_json(path, change):
    data = json.load(open(path))
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change,field", [
    (lambda d: d.pop("label_std"), "field 'label_std' is missing"),
    (lambda d: d["label_mean"].pop(), "field 'label_mean' has 1 values for 2 targets"),
    (lambda d: d.update(targets="activation"), "field 'targets' is \"activation\", expected a non-empty list"),
    (lambda d: d.update(targets=["activation", "valence", "dominance"]), "field 'label_mean' has 2 values for 3 targets"),
    (lambda d: d.update(top_layers="2"), "field 'top_layers' is \"2\", expected an integer"),
    (lambda d: d.update(label_std=[1.0, 0.0]), "field 'label_std' is [1.0, 0.0], expected a list of positive numbers"),
    (lambda d: d.update(strategy="magic"), "field 'strategy' is \"magic\""),
    (lambda d: d.update(model_sha256=12), "field 'model_sha256' is 12, expected a sha256 hex digest"),
    (lambda d: d.update(cache_layer=-1), "field 'cache_layer' is -1"),
])
def test_edited_run_config_is_refused_naming_the_field(change, field, run, corpus, tmp_path):
    edit_json(run / "config.json", change)
    audio = corpus.replace("manifest.csv", "wav/utt0001.wav")
    one_error_line(run_cli("predict", run, audio, "--out", tmp_path / "p.csv"), f"{run / 'config.json'}:", field)
    assert not (tmp_path / "p.csv").exists()


def test_cut_run_config_and_weights_are_refused(run, corpus, tmp_path):
    audio = corpus.replace("manifest.csv", "wav/utt0001.wav")
    weights = run / "model.safetensors"
    tensors = load_file(str(weights))
    head = sorted(n for n in tensors if n.startswith("head."))[0]
    save_file({n: t for n, t in tensors.items() if n != head}, str(weights))
    one_error_line(run_cli("predict", run, audio, "--out", tmp_path / "p.csv"),
                   f"{weights}: tensor '{head}' is missing")
    save_file({**tensors, head: torch.zeros(3, *tensors[head].shape[1:])}, str(weights))
    one_error_line(run_cli("predict", run, audio, "--out", tmp_path / "p.csv"), f"{weights}: tensor '{head}' has shape")
    save_file(tensors, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    one_error_line(run_cli("predict", run, audio, "--out", tmp_path / "p.csv"), f"{weights}: not a safetensors file")
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[:len(text) // 2])
    one_error_line(run_cli("predict", run, audio, "--out", tmp_path / "p.csv"),
                   f"{run / 'config.json'}: not valid JSON")


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(epoch="1"), "field 'epoch' is \"1\", expected an integer"),
    (lambda d: d.pop("history"), "field 'history' is missing"),
    (lambda d: d.update(epoch=2), "field 'history' holds 1 epochs, 'epoch' says 2"),
    (lambda d: d["optimizer_param_groups"].pop(), "field 'optimizer_param_groups' does not match"),
    (lambda d: d["optimizer_param_groups"][0]["params"].pop(), "field 'optimizer_param_groups' does not match"),
    (lambda d: d.update(best={"epoch": 5, "dev": None, "mean": None}), "'epoch' says 1 (best 5)"),
    (lambda d: d.update(scheduler=[]), "field 'scheduler' is [], expected an object"),
])
def test_edited_checkpoint_state_is_refused_naming_the_field(change, message, run):
    state = run / "checkpoint" / "state.json"
    edit_json(state, change)
    one_error_line(run_cli("train", "--resume", run), f"{state}:", message)
    assert [json.loads(line)["epoch"] for line in open(run / "log.jsonl")] == [1]


def test_edited_or_cut_checkpoint_tensors_are_refused(run):
    path = run / "checkpoint" / "state.safetensors"
    tensors = load_file(str(path))
    moment = sorted(n for n in tensors if n.startswith("optimizer.") and n.endswith("exp_avg"))[0]
    save_file({**tensors, moment: torch.zeros(7)}, str(path))
    one_error_line(run_cli("train", "--resume", run), f"{path}: tensor '{moment}' does not fit")
    layer = sorted(n for n in tensors if n.startswith("model."))[0]
    save_file({n: t for n, t in tensors.items() if n != layer}, str(path))
    one_error_line(run_cli("train", "--resume", run), f"{path}: tensor '{layer[len('model.'):]}' is missing")
    save_file({n: t for n, t in tensors.items() if n != "rng.torch"}, str(path))
    one_error_line(run_cli("train", "--resume", run), f"{path}: tensor 'rng.torch' is missing")
    text = (run / "checkpoint" / "state.json").read_text()
    (run / "checkpoint" / "state.json").write_text(text[:-40])
    one_error_line(run_cli("train", "--resume", run), "state.json: not valid JSON")


def test_edited_saved_options_are_refused_on_resume(run):
    edit_json(run / "config.json", lambda d: d["config"].update(lr="fast"))
    one_error_line(run_cli("train", "--resume", run),
                   "field 'config.lr' is \"fast\", expected a finite number")
    edit_json(run / "config.json", lambda d: (d["config"].update(lr=0.001), d["config"].pop("batch_size")))
    one_error_line(run_cli("train", "--resume", run), "field 'config.batch_size' is missing")
    edit_json(run / "config.json", lambda d: d["config"].update(batch_size=4, turbo=True))
    one_error_line(run_cli("train", "--resume", run), "field 'config.turbo' is not an option")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_checkpoint_is_refused_and_never_unpickled(run, tmp_path):
    marker = tmp_path / "executed"
    path = run / "checkpoint" / "state.safetensors"
    torch.save({"model": Payload(marker)}, path)  # what torch.save of a checkpoint looks like
    one_error_line(run_cli("train", "--resume", run), f"{path}: not a safetensors file")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "head.safetensors"])
def test_pickled_exported_weights_are_refused_and_never_unpickled(name, run, corpus, tmp_path):
    export = tmp_path / "export"
    assert run_cli("export", run, "--out", export).exit_code == 0
    marker = tmp_path / "executed"
    (export / name).write_bytes(pickle.dumps(Payload(marker)))
    audio = corpus.replace("manifest.csv", "wav/utt0001.wav")
    one_error_line(run_cli("predict", export, audio, "--out", tmp_path / "p.csv"),
                   f"{export / name}: not a safetensors file")
    assert not marker.exists() and not (tmp_path / "p.csv").exists()
