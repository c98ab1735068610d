"""`ser sweep` (issue 16): every configuration x seed a normal run, a summary whose numbers
are the runs' own metrics, resumable without retraining; folds by a column where every
utterance is tested exactly once."""

import json

import numpy as np
import pytest

from cachegen.errors import ConfigError
from headtrain.sweep import SweepConfig, sweep
from helpers import read_csv, run_cli

FAST = {"targets": ("activation",), "epochs": 1, "batch_size": 8, "dropout": 0.0, "warmup": 0.0,
        "progress": False, "workers": 1}


def count_training(monkeypatch):
    import importlib

    module = importlib.import_module("headtrain.train")  # the package re-exports `train`
    calls, real = [], module.train

    def counting(config, **kwargs):
        calls.append(config)
        return real(config, **kwargs)

    monkeypatch.setattr(module, "train", counting)
    return calls


def test_summary_equals_the_runs_own_metrics_and_a_rerun_trains_nothing(built_store, tmp_path, monkeypatch):
    calls = count_training(monkeypatch)
    config = SweepConfig(out=str(tmp_path / "sw"), train={**FAST, "from_cache": built_store},
                         grid={"top_layers": [1, 2], "seed": [0, 1]})
    result = sweep(config)
    runs = sorted(p.name for p in (tmp_path / "sw" / "runs").iterdir())
    assert runs == sorted(f"top_layers={k}__seed={s}" for k in (1, 2) for s in (0, 1))
    assert len(calls) == 4
    rows = read_csv(tmp_path / "sw" / "summary.csv")
    assert len(rows) == 2
    for row in rows:
        ccc = [json.loads((tmp_path / "sw" / "runs" / f"top_layers={row['top_layers']}__seed={s}"
                           / "metrics.json").read_text())["dev"]["activation"]["ccc"] for s in (0, 1)]
        assert float(row["dev_activation_ccc_mean"]) == pytest.approx(np.mean(ccc), abs=1e-12)
        assert float(row["dev_activation_ccc_std"]) == pytest.approx(np.std(ccc, ddof=1), abs=1e-12)
        assert float(row["dev_score_mean"]) == pytest.approx(np.mean(ccc), abs=1e-12)
        assert row["runs"] == "2"
    means = [float(r["dev_score_mean"]) for r in rows]
    best = [r["best"] for r in rows]
    assert best.count("True") == 1 and means[best.index("True")] == max(means)
    markdown = (tmp_path / "sw" / "summary.md").read_text()
    best_row = rows[best.index("True")]
    assert f"| **{best_row['top_layers']}** |" in markdown and " ± " in markdown
    assert (tmp_path / "sw" / "summary.png").stat().st_size > 0
    assert result.summary[0]["best"]

    # a finished sweep is not trained again; an interrupted one trains only what is missing
    import shutil

    shutil.rmtree(tmp_path / "sw" / "runs" / "top_layers=2__seed=1")
    calls.clear()
    sweep(config)
    assert [c.out.rsplit("/", 1)[-1] for c in calls] == ["top_layers=2__seed=1"]
    calls.clear()
    sweep(config)
    assert calls == []

    # the same folder with other options or another grid is refused in one line, naming it
    changed = SweepConfig(out=config.out, train={**config.train, "epochs": 2}, grid=config.grid)
    with pytest.raises(ConfigError, match=r"holds a sweep with other options \(epochs: 1 before, 2 now\)"):
        sweep(changed)
    wider = SweepConfig(out=config.out, train=config.train, grid={**config.grid, "seed": [0, 1, 2]})
    with pytest.raises(ConfigError, match=r"holds a sweep with other grid \(seed: \[0, 1\] before, "
                                          r"\[0, 1, 2\] now\)") as error:
        sweep(wider)
    assert "\n" not in str(error.value) and calls == []
    # where and how fast may change: another worker count resumes the same sweep
    sweep(SweepConfig(out=config.out, train={**config.train, "workers": 0}, grid=config.grid))
    assert calls == []


def test_a_run_interrupted_after_an_epoch_resumes(built_store, tmp_path, monkeypatch):
    config = SweepConfig(out=str(tmp_path / "sw"), train={**FAST, "from_cache": built_store, "epochs": 2,
                                                          "top_layers": 1}, grid={"seed": [0]})
    sweep(config)
    run = tmp_path / "sw" / "runs" / "seed=0"
    finished = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()  # as if killed after the last checkpoint, before the end
    calls = count_training(monkeypatch)
    sweep(config)
    assert len(calls) == 1 and calls[0].resume
    assert json.loads((run / "metrics.json").read_text()) == finished


def test_sweep_cli_lists_and_toml_file(built_store, tmp_path):
    result = run_cli("sweep", "--from-cache", built_store, "--out", tmp_path / "a", "--seeds", "0,1",
                     "--lr", "1e-3", "--top-layers", 1, "--epochs", 1, "--targets", "activation,valence",
                     "--batch-size", 8, "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a" / "runs").iterdir()) == ["seed=0", "seed=1"]
    info = json.loads((tmp_path / "a" / "runs" / "seed=1" / "config.json").read_text())
    assert info["config"]["lr"] == 1e-3 and info["config"]["seed"] == 1
    assert info["targets"] == ["activation", "valence"]
    assert "best:" in result.output and "summary.md" in result.output

    (tmp_path / "sweep.toml").write_text(
        'targets = "activation"\nepochs = 1\nbatch-size = 8\nseeds = [0]\n"head_lr" = [1e-3, 3e-3]\n')
    result = run_cli("sweep", "--from-cache", built_store, "--out", tmp_path / "b", "--config",
                     tmp_path / "sweep.toml", "--top-layers", "1,2", "--no-progress")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "b" / "runs").iterdir())
    assert names == sorted(f"head_lr={h}__top_layers={k}__seed=0" for h in ("0.001", "0.003") for k in (1, 2))
    assert len(read_csv(tmp_path / "b" / "summary.csv")) == 4
    markdown = (tmp_path / "b" / "summary.md").read_text()
    assert "| 0.003 |" in markdown.replace("**", "") and "0.0030 " not in markdown  # values as given


@pytest.mark.parametrize("args,message", [
    (["--lr", "1e-3,fast"], "--lr: 'fast' is not a float"),
    (["--seeds", "0,0"], "sweep option 'seed': a value is given twice"),
    (["--top-layers", "1,9"], "--top-layers 9 is larger than"),
    (["--folds", "nothing"], "--folds nothing"),
])
def test_bad_sweeps_are_refused_before_training(args, message, built_store, tmp_path):
    result = run_cli("sweep", "--from-cache", built_store, "--out", tmp_path / "s", "--epochs", 1,
                     "--targets", "activation", "--no-progress", *args)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output + result.stderr
    assert not list((tmp_path / "s").glob("runs/*/model.safetensors"))


def test_folds_test_every_utterance_exactly_once(built_store, tmp_path):
    from cachegen import open_cache

    result = run_cli("sweep", "--from-cache", built_store, "--out", tmp_path / "f", "--folds", "speaker",
                     "--epochs", 1, "--top-layers", 1, "--targets", "activation", "--batch-size", 4,
                     "--no-progress")
    assert result.exit_code == 0, result.output
    assert "left-out folds' score" in result.output
    table = open_cache(built_store).table
    speakers = dict(zip(table.column("id").to_pylist(), table.column("speaker").to_pylist()))
    groups = sorted(set(speakers.values()))
    # the held-out groups and the dev rule are named in the output, sweep.json and summary.md
    named = "; ".join(f"test {g}, dev {groups[(i + 1) % len(groups)]}" for i, g in enumerate(groups))
    assert named in result.output
    saved = json.loads((tmp_path / "f" / "sweep.json").read_text())
    assert [(f["test"], f["dev"]) for f in saved["held_out"]] == [
        (g, groups[(i + 1) % len(groups)]) for i, g in enumerate(groups)]
    assert f"fold {groups[0]} tests {groups[0]}, dev {groups[1]}" in (tmp_path / "f" / "summary.md").read_text()
    tested = []
    for i, group in enumerate(groups):
        run = tmp_path / "f" / "runs" / f"seed=0__fold={group}"
        predictions = read_csv(run / "test" / "predictions.csv")
        assert {speakers[r["id"]] for r in predictions} == {group}
        info = json.loads((run / "config.json").read_text())
        dev = groups[(i + 1) % len(groups)]  # the stated rule: the next group is dev
        assert info["dev_utterances"] == sum(s == dev for s in speakers.values())
        assert info["train_utterances"] == sum(s not in (group, dev) for s in speakers.values())
        tested += [r["id"] for r in predictions]
    assert sorted(tested) == sorted(speakers)  # every utterance once, none twice
    row, = read_csv(tmp_path / "f" / "summary.csv")
    fold_ccc = [json.loads((tmp_path / "f" / "runs" / f"seed=0__fold={g}" / "test" / "metrics.json")
                           .read_text())["activation"]["ccc"] for g in groups]
    assert float(row["test_activation_ccc_mean"]) == pytest.approx(np.mean(fold_ccc), abs=1e-12)
    assert row["runs"] == str(len(groups))


def test_a_sweep_file_with_a_wrong_type_or_unknown_option_is_named(built_store, tmp_path):
    (tmp_path / "a.toml").write_text('epochs = "5"\n')
    result = run_cli("sweep", "--from-cache", built_store, "--out", tmp_path / "a", "--config", tmp_path / "a.toml")
    assert result.exit_code == 1 and "sweep option 'epochs': '5' is not a int" in result.stderr
    (tmp_path / "b.toml").write_text('top_layer = [1, 2]\n')
    result = run_cli("sweep", "--from-cache", built_store, "--out", tmp_path / "b", "--config", tmp_path / "b.toml")
    assert result.exit_code == 1 and "sweep option 'top_layer' is not a training option" in result.stderr
    (tmp_path / "c.toml").write_text('epochs = [1,\n')
    result = run_cli("sweep", "--from-cache", built_store, "--out", tmp_path / "c", "--config", tmp_path / "c.toml")
    assert result.exit_code == 1 and "not valid TOML" in result.stderr


def test_a_sweep_opens_the_store_once_and_preloaded_reads_each_utterance_once(built_store, tmp_path, monkeypatch):
    import cachegen

    opened, reads, real_open = [], [], cachegen.open_cache

    def counting_open(*args, **kwargs):
        reader = real_open(*args, **kwargs)
        opened.append(reader)
        real_read = reader.read_raw

        def read_raw(uid, *a, **k):
            reads.append(uid)
            return real_read(uid, *a, **k)

        reader.read_raw = read_raw
        return reader

    monkeypatch.setattr(cachegen, "open_cache", counting_open)
    sweep(SweepConfig(out=str(tmp_path / "sw"), folds="speaker",
                      train={**FAST, "from_cache": built_store, "top_layers": 1, "preload": True},
                      grid={"seed": [0, 1]}))
    assert len(opened) == 1  # 2 seeds x 3+ folds of training and evaluation, one store opened
    assert sorted(reads) == sorted(set(reads))  # and every utterance read from it once in all
    assert set(reads) == set(opened[0].ids)


def test_a_sweep_run_is_a_normal_run_directory(built_store, tmp_path):
    sweep(SweepConfig(out=str(tmp_path / "sw"), train={**FAST, "from_cache": built_store, "top_layers": 1},
                      grid={"seed": [3]}))
    run = tmp_path / "sw" / "runs" / "seed=3"
    result = run_cli("evaluate", run, "--from-cache", built_store, "--out", tmp_path / "e", "--split", "dev")
    assert result.exit_code == 0, result.output
    dev = json.loads((run / "metrics.json").read_text())["dev"]["activation"]["ccc"]
    # the best epoch's dev CCC, computed again by evaluate from the saved weights
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["activation"]["ccc"] == pytest.approx(dev, abs=1e-5)
    result = run_cli("export", run, "--out", tmp_path / "x")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "x" / "ser_head.json").read_text())["targets"] == ["activation"]


def test_a_run_stopped_before_its_first_epoch_starts_again(built_store, tmp_path, monkeypatch):
    config = SweepConfig(out=str(tmp_path / "sw"), train={**FAST, "from_cache": built_store, "top_layers": 1},
                         grid={"seed": [0]})
    sweep(config)
    run = tmp_path / "sw" / "runs" / "seed=0"
    for name in ("metrics.json", "model.safetensors"):
        (run / name).unlink()
    import shutil

    shutil.rmtree(run / "checkpoint")  # killed during epoch 1: config.json and log.jsonl only
    calls = count_training(monkeypatch)
    sweep(config)
    assert len(calls) == 1 and not calls[0].resume
    assert (run / "metrics.json").is_file() and (run / "model.safetensors").is_file()
