"""Training, evaluation and prediction options and labels are checked before any work (issue 11)."""

import pytest

from helpers import run_cli


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1e-4"], "--lr -0.0001: must be a finite number, 0 or more"),
    (["--lr", "nan"], "--lr nan: must be a finite number, 0 or more"),
    (["--head-lr", "inf"], "--head-lr inf: must be a finite number, 0 or more"),
    (["--head-lr", "-0.001"], "--head-lr -0.001: must be a finite number, 0 or more"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be a finite number, 0 or more"),
    (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number, 0 or more"),
    (["--clip", "-1"], "--clip -1.0: must be a finite number, 0 or more"),
    (["--clip", "nan"], "--clip nan: must be a finite number, 0 or more"),
    (["--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
    (["--strategy", "lora", "--lora-alpha", "0"], "--lora-alpha 0: must be at least 1"),
    (["--device", "foo"], "--device 'foo': not a device; use cpu, cuda or cuda:N"),
    (["--device", "cuda:0"], "--device cuda:0: CUDA is not available on this machine"),
    (["--device", "meta"], "--device 'meta': ser runs on cpu, cuda or mps"),
    (["--early-stop", "0"], "--early-stop 0: must be at least 1"),
    (["--dropout", "nan"], "--dropout nan: must be in [0, 1)"),
    (["--warmup", "nan"], "a fraction of the steps, in [0, 1)"),
    (["--label-range", "1,inf"], "LOW and HIGH must be finite numbers"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
])
def test_bad_training_options_are_refused_before_any_work(args, message, built_store, tmp_path):
    result = run_cli("train", "--from-cache", built_store, "--top-layers", 2, "--out", tmp_path / "r", *args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "analyze change", "analyze probe", "bench"])
@pytest.mark.parametrize("device,message", [("foo", "--device 'foo': not a device"),
                                            ("cuda:3", "--device cuda:3: CUDA is not available")])
def test_bogus_device_is_refused_by_every_command_that_runs_a_model(command, device, message, built_store,
                                                                     corpus, tiny_model, tmp_path):
    args = {"evaluate": [tmp_path, "--from-cache", built_store, "--out", tmp_path / "o"],
            "predict": [tmp_path, "--manifest", corpus, "--out", tmp_path / "o.csv"],
            "analyze change": [tmp_path, "--out", tmp_path / "o"],
            "analyze probe": [corpus, "--model", tiny_model, "--out", tmp_path / "o"],
            "bench": ["--manifest", corpus, "--model", tiny_model, "--layers", 1, "--top-layers", 1]}[command]
    result = run_cli(*command.split(), *args, "--device", device)
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert result.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_infinite_and_overflowing_labels_are_refused_naming_the_rows(built_store, tmp_path):
    from cachegen import open_cache

    table = open_cache(built_store).table.to_pydict()
    bad = {"utt0000": "1e400", "utt0001": "-inf", "utt0002": "3e300"}
    labels = tmp_path / "labels.csv"
    labels.write_text("id,split,activation\n" + "".join(
        f"{u},{s},{bad.get(u, '3.5')}\n" for u, s in zip(table["id"], table["split"])))
    result = run_cli("train", "--from-cache", built_store, "--top-layers", 2, "--targets", "activation",
                     "--labels", labels, "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert "'activation' is infinite or beyond ±1e+15 for 3 row(s): utt0000=inf, utt0001=-inf, " \
           "utt0002=3e+300" in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["--device", "foo"], "--device 'foo': not a device; use cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device 'meta': ser runs on cpu, cuda or mps"),
    (["--shard-frames", "0"], "--shard-frames 0: must be at least 1"),
    (["--shard-frames", "-32"], "--shard-frames -32: must be at least 1"),
])
def test_bad_build_options_are_refused_before_any_work(args, message, tiny_model, corpus, tmp_path):
    result = run_cli("cache", "build", corpus, "--model", tiny_model, "--layers", 1, "--out", tmp_path / "s",
                     *args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "s").exists()
