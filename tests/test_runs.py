"""A run directory is never silently overwritten or mixed; resuming continues the same
training (issue 11; RELIABILITY item 21)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from headtrain import TrainConfig, train
from helpers import one_error_line, run_cli

OPTIONS = ["--top-layers", 2, "--batch-size", 4, "--lr", "1e-3", "--head-lr", "1e-3", "--dropout", 0,
           "--warmup", 0, "--seed", 3, "--targets", "activation,valence", "--workers", 1, "--no-progress"]


def quick(out, store, **overrides):
    options = dict(out=str(out), from_cache=store, targets=("activation", "valence"), top_layers=2,
                   batch_size=4, lr=1e-3, head_lr=1e-3, dropout=0.0, warmup=0.0, seed=3,
                   progress=False, workers=1, epochs=1)
    options.update(overrides)
    return TrainConfig(**options)


def interrupt_after(monkeypatch, epochs: int) -> None:
    """Make training stop like a kill right after the checkpoint of epoch `epochs`."""
    import headtrain.plots

    real, calls = headtrain.plots.plot_curves, {"n": 0}

    def plot_then_stop(history, path):
        real(history, path)
        calls["n"] += 1
        if calls["n"] == epochs:
            raise KeyboardInterrupt

    monkeypatch.setattr(headtrain.plots, "plot_curves", plot_then_stop)


def checkpoint_model(run):
    tensors = load_file(str(run / "checkpoint" / "state.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_of(run):
    return [json.loads(line) for line in open(run / "log.jsonl")]


@pytest.fixture(scope="module")
def finished_run(built_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    train(quick(out, built_store))
    return out


def test_train_into_a_run_refuses_unless_resume_or_overwrite(finished_run, built_store, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("mine")
    (run / "test").mkdir()
    (run / "test" / "metrics.json").write_text("{}")  # what `ser evaluate --out RUN/test` wrote
    before = (run / "model.safetensors").read_bytes()
    result = run_cli("train", "--from-cache", built_store, "--out", run, *OPTIONS, "--epochs", 1)
    assert result.exit_code == 1
    assert f"--out {run} already holds a run; pass --resume {run} to continue it, or --overwrite" \
        in result.stderr and result.stderr.count("\n") == 1
    assert (run / "model.safetensors").read_bytes() == before

    result = run_cli("train", "--from-cache", built_store, "--out", run, *OPTIONS, "--epochs", 2,
                     "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert [r["epoch"] for r in log_of(run)] == [1, 2]
    assert json.load(open(run / "config.json"))["config"]["epochs"] == 2
    assert (run / "notes.txt").read_text() == "mine" and (run / "test" / "metrics.json").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "log.jsonl", "checkpoint"])
def test_train_never_touches_files_it_did_not_write(name, built_store, tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / name).write_text('{"model_type": "bert"}')
    for extra in ([], ["--overwrite"]):
        result = run_cli("train", "--from-cache", built_store, "--out", folder, *OPTIONS, *extra)
        assert result.exit_code == 1
        assert f"--out {folder}: holds {name}, which `ser train` did not write" in result.stderr
        assert (folder / name).read_text() == '{"model_type": "bert"}'
        assert sorted(p.name for p in folder.iterdir()) == [name]


def test_export_evaluate_and_predict_refuse_a_run_directorys_own_files(finished_run, built_store,
                                                                       corpus, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    audio = corpus.replace("manifest.csv", "wav/utt0001.wav")
    run_files = "would write into the files of the training run in"
    for args, message in ((["export", run, "--out", run], run_files),
                          (["evaluate", run, "--from-cache", built_store, "--split", "dev", "--out", run], run_files),
                          (["evaluate", run, "--from-cache", built_store, "--split", "dev", "--out",
                            run / "checkpoint"], run_files),
                          (["predict", run, audio, "--out", run / "config.json"], "name a .csv or .parquet file"),
                          (["predict", run, audio, "--out", run / "log.jsonl"], "name a .csv or .parquet file")):
        result = run_cli(*args)
        assert result.exit_code == 1, args
        assert message in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    # a folder of its own inside the run is fine (README: evaluate --out runs/k3/test1)
    result = run_cli("evaluate", run, "--from-cache", built_store, "--split", "dev", "--out", run / "dev")
    assert result.exit_code == 0, result.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files


def test_evaluate_predict_and_export_warn_about_an_unfinished_run(finished_run, built_store, corpus,
                                                                  tmp_path):
    """A run without metrics.json (still training, or stopped) is used at its best epoch so
    far, with a warning naming it; a finished run gives none."""
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    audio = corpus.replace("manifest.csv", "wav/utt0001.wav")
    commands = (["evaluate", run, "--from-cache", built_store, "--split", "dev", "--out", tmp_path / "e"],
                ["predict", run, audio, "--out", tmp_path / "p.csv"], ["export", run, "--out", tmp_path / "x"])
    for args in commands:
        result = run_cli(*args)
        assert result.exit_code == 0 and "has not finished training" not in result.stderr, result.stderr
    (run / "metrics.json").unlink()
    for args in commands:
        result = run_cli(*args[:-1], tmp_path / "again" / args[-1].name)
        assert result.exit_code == 0, result.stderr
        assert f"{run} has not finished training (no metrics.json)" in result.stderr, result.stderr


@pytest.mark.usefixtures("one_thread")
def test_a_second_evaluation_or_export_into_a_folder_being_written_is_refused(finished_run, built_store,
                                                                             tmp_path, monkeypatch):
    import headtrain.evaluate
    import headtrain.plots

    out, others = tmp_path / "e", []
    evaluate = ["evaluate", finished_run, "--from-cache", built_store, "--out", out]
    real = headtrain.plots.plot_scatter

    def plot_then_write_again(*args, **kwargs):  # while the first evaluation holds the folder
        real(*args, **kwargs)
        if not others:
            others.append(run_cli(*evaluate, "--split", "test"))
            others.append(run_cli("export", finished_run, "--out", out))

    monkeypatch.setattr(headtrain.plots, "plot_scatter", plot_then_write_again)
    assert run_cli(*evaluate, "--split", "dev").exit_code == 0
    monkeypatch.undo()
    for other in others:
        one_error_line(other, str(out), "being written by another process")
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    assert rows and all(",dev," in row for row in rows)  # the first evaluation's, alone
    assert not (out / "config.json").exists() and not (out / ".ser-writing.lock").exists()
    assert run_cli(*evaluate, "--split", "test").exit_code == 0  # free again


@pytest.mark.usefixtures("one_thread")
def test_an_evaluation_never_leaves_an_earlier_ones_files_beside_its_own(finished_run, built_store,
                                                                        tmp_path, monkeypatch):
    import errno

    import headtrain.plots

    out = tmp_path / "e"
    evaluate = ["evaluate", finished_run, "--from-cache", built_store, "--out", out]
    assert run_cli(*evaluate, "--split", "dev").exit_code == 0
    (out / "confusion_emotion.png").write_bytes(b"an earlier evaluation's plot")
    (out / "notes.txt").write_text("mine")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(headtrain.plots, "plot_scatter", full_disk)
    failed = run_cli(*evaluate, "--split", "test")
    one_error_line(failed, "scatter.png")
    # no metrics.json: the folder no longer claims a finished evaluation of dev next to test's rows
    assert not (out / "metrics.json").exists() and not (out / "confusion_emotion.png").exists()
    assert all(",test," in row for row in (out / "predictions.csv").read_text().splitlines()[1:])
    monkeypatch.undo()
    assert run_cli(*evaluate, "--split", "test").exit_code == 0
    assert json.loads((out / "metrics.json").read_text()) and (out / "notes.txt").read_text() == "mine"


def test_export_refuses_a_folder_holding_another_model(finished_run, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    result = run_cli("export", finished_run, "--out", folder)
    assert result.exit_code == 1 and "holds config.json, which `ser export` did not write" in result.stderr
    assert (folder / "config.json").read_text() == '{"model_type": "bert"}'
    assert run_cli("export", finished_run, "--out", tmp_path / "e").exit_code == 0
    assert run_cli("export", finished_run, "--out", tmp_path / "e").exit_code == 0  # a new export replaces one


def test_resume_alone_continues_with_the_saved_options(built_store, tmp_path, monkeypatch):
    args = ["train", "--from-cache", built_store, *OPTIONS, "--epochs", 3, "--select", "valence"]
    assert run_cli(*args, "--out", tmp_path / "whole").exit_code == 0
    interrupt_after(monkeypatch, 1)
    assert run_cli(*args, "--out", tmp_path / "cut").exit_code == 130
    monkeypatch.undo()
    assert [r["epoch"] for r in log_of(tmp_path / "cut")] == [1]
    result = run_cli("train", "--resume", tmp_path / "cut", "--no-progress", "--workers", 2)
    assert result.exit_code == 0, result.stderr
    assert [r["epoch"] for r in log_of(tmp_path / "cut")] == [1, 2, 3]
    assert same_tensors(checkpoint_model(tmp_path / "cut"), checkpoint_model(tmp_path / "whole"))
    assert same_tensors(load_file(str(tmp_path / "cut" / "model.safetensors")),
                        load_file(str(tmp_path / "whole" / "model.safetensors")))


@pytest.mark.parametrize("args,message", [
    (["--lr", "0.5"], "the run used --lr 0.001, this command 0.5"),
    (["--targets", "activation"], "the run used --targets activation,valence, this command activation"),
    (["--batching", "length"], "the run used --batching 'random', this command 'length'"),
    (["--epochs", "4"], "the run used --epochs 1, this command 4"),
])
def test_resume_refuses_an_option_that_differs(args, message, finished_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    result = run_cli("train", "--resume", run, *args)
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    same = run_cli("train", "--resume", run, "--lr", "1e-3", "--no-progress")  # agreeing is fine
    assert same.exit_code == 0, same.stderr


def test_resume_refuses_other_labels_or_store(finished_run, built_store, tiny_model, corpus, tmp_path):
    from cachegen import open_cache
    from cachegen.build import BuildConfig, build_cache

    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    table = open_cache(built_store).table.to_pydict()
    labels = tmp_path / "labels.csv"
    labels.write_text("id,split,activation,valence\n" + "".join(
        f"{u},{s},{a + (0.5 if i == 0 else 0)},{v}\n"
        for i, (u, s, a, v) in enumerate(zip(table["id"], table["split"], table["activation"], table["valence"]))))
    result = run_cli("train", "--resume", run, "--labels", labels)
    assert result.exit_code == 1
    assert "the labels differ from those the run trained on (field labels_sha256)" in result.stderr

    half = tmp_path / "f16.zarr"
    build_cache(BuildConfig(manifest=corpus, out=str(half), model=tiny_model, layers=2, dtype="float16",
                            progress=False))
    result = run_cli("train", "--resume", run, "--from-cache", half)
    assert result.exit_code == 1
    assert "the store differs from the one the run trained on (field store.dtype)" in result.stderr
    assert [r["epoch"] for r in log_of(run)] == [1]


def test_resume_refuses_other_model_weights(tiny_model, corpus, tmp_path):
    from cachegen.testing import save_tiny_model

    other = save_tiny_model(tmp_path / "other", seed=7)
    args = ["train", "--manifest", corpus, "--model", tiny_model, *OPTIONS, "--epochs", 1]
    assert run_cli(*args, "--out", tmp_path / "r").exit_code == 0
    result = run_cli("train", "--resume", tmp_path / "r", "--model", other)
    assert result.exit_code == 1
    assert "the model weights differ from those the run trained on (field model_sha256)" in result.stderr


def test_resumed_run_with_early_stop_ends_like_an_uninterrupted_one(built_store, tmp_path, monkeypatch):
    config = dict(epochs=8, early_stop=1, lr=5e-2, head_lr=5e-2)  # noisy: dev CCC soon falls back
    whole = train(quick(tmp_path / "whole", built_store, **config))
    stopped_at = len(whole.history)
    assert stopped_at < 8 and whole.history[-1]["epochs_without_gain"] == 1  # the premise: it stopped early

    interrupt_after(monkeypatch, stopped_at)  # killed after the last checkpoint, before stopping
    with pytest.raises(KeyboardInterrupt):
        train(quick(tmp_path / "cut", built_store, **config))
    monkeypatch.undo()
    resumed = train(quick(tmp_path / "cut", built_store, resume=True, **config))
    assert [r["epoch"] for r in resumed.history] == [r["epoch"] for r in whole.history]
    assert same_tensors(checkpoint_model(tmp_path / "cut"), checkpoint_model(tmp_path / "whole"))
    assert same_tensors(load_file(str(tmp_path / "cut" / "model.safetensors")),
                        load_file(str(tmp_path / "whole" / "model.safetensors")))
    assert resumed.best_epoch == whole.best_epoch


@pytest.mark.usefixtures("one_thread")
def test_a_second_training_into_a_folder_being_trained_is_refused(built_store, tmp_path, monkeypatch):
    import headtrain.plots

    run, others = tmp_path / "r", []
    real = headtrain.plots.plot_curves

    def plot_then_train_again(history, path):  # while the first training holds the folder
        real(history, path)
        if not others:
            others.append(run_cli("train", "--from-cache", built_store, *OPTIONS, "--epochs", 1,
                                  "--seed", 9, "--out", run))
            others.append(run_cli("train", "--resume", run, "--no-progress"))

    monkeypatch.setattr(headtrain.plots, "plot_curves", plot_then_train_again)
    train(quick(run, built_store, epochs=2))
    monkeypatch.undo()
    for other in others:
        one_error_line(other, str(run), "another process")
    assert [r["epoch"] for r in log_of(run)] == [1, 2]  # the first training's, whole and alone
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 3
    assert not (run / ".ser-writing.lock").exists()  # released when it ended
    assert run_cli("train", "--resume", run, "--no-progress").exit_code == 0  # free again


@pytest.mark.usefixtures("one_thread")
def test_resume_of_a_run_stopped_before_its_first_epoch_ended_trains_it_from_the_start(
        built_store, tmp_path, monkeypatch):
    import headtrain.loop

    args = ["train", "--from-cache", built_store, *OPTIONS, "--epochs", 2]
    assert run_cli(*args, "--out", tmp_path / "whole").exit_code == 0

    def killed(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(headtrain.loop, "train_step", killed)
    assert run_cli(*args, "--out", tmp_path / "cut").exit_code == 130
    monkeypatch.undo()
    assert (tmp_path / "cut" / "config.json").exists() and not (tmp_path / "cut" / "checkpoint").exists()
    assert "--resume" in run_cli(*args, "--out", tmp_path / "cut").stderr  # what the refusal offers works:
    result = run_cli("train", "--resume", tmp_path / "cut", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert [r["epoch"] for r in log_of(tmp_path / "cut")] == [1, 2]
    assert same_tensors(load_file(str(tmp_path / "cut" / "model.safetensors")),
                        load_file(str(tmp_path / "whole" / "model.safetensors")))
