"""Tracking through accelerate's trackers (issue 16): tensorboard event files hold, per epoch,
the training loss, dev metrics and learning rate of log.jsonl."""

import json

import pytest

from helpers import run_cli


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(folder.rglob("events.out.tfevents*"))
    assert events, f"no event file under {folder}"
    values = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return values


def test_tensorboard_events_hold_each_epochs_loss_metrics_and_lr(built_store, tmp_path):
    result = run_cli("train", "--from-cache", built_store, "--out", tmp_path / "r", "--epochs", 2,
                     "--top-layers", 1, "--targets", "activation,valence", "--batch-size", 4,
                     "--log-with", "tensorboard", "--no-progress")
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    logged = scalars(tmp_path / "r" / "ser")
    assert [s for s, _ in logged["train/loss"]] == [1, 2]
    assert [v for _, v in logged["train/loss"]] == pytest.approx([r["train_loss"] for r in log], rel=1e-6)
    assert [v for _, v in logged["dev/score"]] == pytest.approx([r["dev_score"] for r in log], rel=1e-6)
    assert [v for _, v in logged["dev/valence/ccc"]] == pytest.approx(
        [r["dev"]["valence"]["ccc"] for r in log], rel=1e-6)
    assert [v for _, v in logged["lr"]] == pytest.approx([r["lr"] for r in log], rel=1e-6)


def test_sweep_runs_each_write_their_events(built_store, tmp_path):
    result = run_cli("sweep", "--from-cache", built_store, "--out", tmp_path / "s", "--seeds", "0,1",
                     "--epochs", 1, "--top-layers", 1, "--targets", "activation", "--batch-size", 8,
                     "--log-with", "tensorboard", "--no-progress")
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        assert [s for s, _ in scalars(tmp_path / "s" / "runs" / f"seed={seed}" / "ser")["dev/score"]] == [1]


@pytest.mark.parametrize("tracker,message", [
    ("tensorbored", "--log-with 'tensorbored': choose one of"),
    ("dvclive", "--log-with dvclive: its package is not installed"),  # not a dependency of ser
])
def test_unknown_or_uninstalled_trackers_are_refused(tracker, message, built_store, tmp_path):
    result = run_cli("train", "--from-cache", built_store, "--out", tmp_path / "r", "--epochs", 1,
                     "--log-with", tracker)
    assert result.exit_code == 1 and message in result.stderr
    assert not (tmp_path / "r").exists()


def test_tensorboard_not_installed_says_what_to_install(built_store, tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    result = run_cli("train", "--from-cache", built_store, "--out", tmp_path / "r", "--epochs", 1,
                     "--log-with", "tensorboard")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "ser: error: --log-with tensorboard: its package is not installed; pip install 'ser[tensorboard]'"]
    assert not (tmp_path / "r").exists()
