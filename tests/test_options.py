"""Training, evaluation and prediction options and labels are checked before any work (issue 11)."""

import numpy as np
import pytest

from helpers import build_pooled, one_error_line, run_cli


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


# --- every command's options, walked with hostile values (issue: option review) -------------

@pytest.mark.parametrize("args,message", [
    (["train", "--from-cache", "{store}", "--top-layers", "2", "--seed", "-1", "--out", "{out}"],
     "--seed -1: must be in 0..4294967295"),
    (["train", "--from-cache", "{store}", "--top-layers", "2", "--seed", str(2**32), "--out", "{out}"],
     "--seed 4294967296: must be in 0..4294967295"),
    (["sweep", "--from-cache", "{store}", "--seeds", "0,-1", "--out", "{out}"], "--seed -1: must be in"),
    (["analyze", "probe", "{store}", "--seed", "-1", "--out", "{out}"], "--seed -1: must be in"),
    (["analyze", "probe", "{store}", "--lr", "inf", "--out", "{out}"], "--lr inf: must be a finite number above 0"),
    (["train", "--from-cache", "{store}", "--top-layers", "2", "--log-with", "", "--out", "{out}"],
     "--log-with '': choose one of"),
    (["bench", "--manifest", "{corpus}", "--strategies", ",", "--json", "{out}"],
     "--strategies: name at least one of"),
    (["bench", "--manifest", "{corpus}", "--strategies", "cached,partial,cached", "--json", "{out}"],
     "--strategies cached,partial,cached: cached named twice"),
    (["bench", "--manifest", "{corpus}", "--layers", "-1", "--json", "{out}"], "--layers -1: must be 0 or more"),
    (["bench", "--manifest", "{corpus}", "--warmup-steps", "-1", "--json", "{out}"],
     "--warmup-steps -1: must be at least 0"),
    (["cache", "build", "{corpus}", "--workers", str(10**6), "--out", "{out}"], "--workers 1000000: must be in 0..256"),
    (["cache", "build", "{corpus}", "--device", "", "--out", "{out}"], "--device '': not a device"),
    (["cache", "build", "{corpus}", "--pooled-layers", ",", "--out", "{out}"],
     "--pooled-layers ',': expected 'all' or layer numbers such as 0,6,12"),
])
def test_out_of_range_and_empty_values_are_one_line_errors(args, message, built_store, corpus, tmp_path):
    """Values that ended in a library's traceback (numpy's seed range, accelerate's tracker
    name), ran nothing (an empty strategy list) or were silently changed (decoding threads
    without bound, an empty device meaning the default) are refused before any work."""
    result = run_cli(*[a.format(store=built_store, corpus=corpus, out=tmp_path / "o") for a in args])
    one_error_line(result, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,option", [
    (["cache", "copy", "{store}", ""], "DST"),
    (["cache", "build", "{corpus}", "--out", " "], "--out"),
    (["evaluate", "{tmp}", "--from-cache", "{store}", "--out", ""], "--out"),
    (["export", "{tmp}", "--out", ""], "--out"),
    (["train", "--from-cache", "{store}", "--out", " "], "--out"),
    (["analyze", "probe", "{store}", "--out", ""], "--out"),
    (["prepare", "folder", "{tmp}", "--out", ""], "--out"),
    (["cache", "copy", "{store}", "{tmp}/c", "--jobs", "0"], "--jobs"),
    (["evaluate", "{tmp}", "--from-cache", "{store}", "--out", "{tmp}/o", "--threads", str(10**20)], "--threads"),
])
def test_empty_output_names_and_impossible_counts_are_usage_errors(args, option, built_store, corpus, tmp_path,
                                                                  monkeypatch):
    """An empty --out (an unset shell variable) wrote into the current folder; --jobs 0 was
    taken as 1; --threads 10**20 overflowed in torch."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = run_cli(*[a.format(store=built_store, corpus=corpus, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(cwd.iterdir()) == [] and not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_training_whose_weights_overflow_stops_with_one_line(built_store, tmp_path):
    """A finite loss can step the weights to Inf (a huge learning rate); that was a ValueError
    from the checkpoint writer."""
    result = run_cli("train", "--from-cache", built_store, "--top-layers", 2, "--epochs", 1, "--lr", "1e308",
                     "--out", tmp_path / "r", "--no-progress")
    line = one_error_line(result, "the weights became NaN/Inf in epoch 1", "lower --lr")
    assert "encoder.layers." in line
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_predict_never_writes_over_its_manifest(corpus, tmp_path):
    import shutil

    manifest = tmp_path / "m.csv"
    shutil.copy(corpus, manifest)
    before = manifest.read_bytes()
    result = run_cli("predict", tmp_path, "--manifest", manifest, "--out", manifest)
    one_error_line(result, f"--out {manifest}: that is --manifest itself")
    assert manifest.read_bytes() == before


def test_sweep_refused_before_any_run_leaves_no_folder_and_the_fix_runs(built_store, tmp_path):
    """A sweep whose first run is refused (a target the store lacks) left sweep.json behind,
    and that refused the corrected command as 'another sweep'."""
    out = tmp_path / "s"
    args = ["sweep", "--from-cache", built_store, "--top-layers", "1,2", "--epochs", 1, "--out", out, "--no-progress"]
    one_error_line(run_cli(*args, "--targets", "activation,bogus"), "no label column(s) bogus")
    assert not out.exists()
    result = run_cli(*args, "--targets", "activation")
    assert result.exit_code == 0, result.output
    assert (out / "summary.csv").is_file()
    one_error_line(run_cli(*args[:-3], "--out", "/proc/ser-no/such", "--no-progress"),
                   "/proc/ser-no/such: cannot be written")


@pytest.mark.parametrize("command", ["probe", "bench"])
def test_unwritable_report_is_one_line(command, tiny_model, corpus, tmp_path):
    """analyze and bench made their output folder unguarded: a traceback at the end of the work."""
    if command == "probe":
        args = ["analyze", "probe", build_pooled(corpus, tiny_model, tmp_path / "p.zarr"), "--out", "/proc/ser-no/such", "--no-progress"]
    else:
        args = ["bench", "--manifest", corpus, "--model", tiny_model, "--layers", 2, "--top-layers", 1,
                "--strategies", "cached", "--steps", 1, "--warmup-steps", 0, "--batch-size", 2,
                "--json", "/proc/ser-no/such.json"]
    one_error_line(run_cli(*args), "/proc/ser-no/such", "cannot be written")


# --- an output that is an input is refused, nothing written --------------------------------

def _snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("command", ["train", "sweep", "evaluate", "export"])
def test_no_command_writes_into_a_store(command, built_store, tmp_path):
    """train and sweep wrote their run files and summaries into a store's folder."""
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(built_store, store)
    before = _snapshot(store)
    run = tmp_path / "run"
    run.mkdir()
    args = {"train": ["train", "--from-cache", store, "--top-layers", 2, "--epochs", 1],
            "sweep": ["sweep", "--from-cache", store, "--top-layers", "1,2", "--epochs", 1],
            "evaluate": ["evaluate", run, "--from-cache", store],
            "export": ["export", run]}[command]
    one_error_line(run_cli(*args, "--out", store), f"--out {store}: holds a store (zarr.json)")
    assert _snapshot(store) == before


def test_sweep_never_writes_into_a_run(built_store, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--from-cache", built_store, "--top-layers", 2, "--epochs", 1, "--out", run,
                   "--no-progress").exit_code == 0
    before = _snapshot(run)
    result = run_cli("sweep", "--from-cache", built_store, "--top-layers", "1,2", "--epochs", 1, "--out", run)
    one_error_line(result, f"--out {run}: would write into the files of the training run")
    assert _snapshot(run) == before


@pytest.mark.parametrize("command", ["copy", "pack"])
def test_a_store_is_never_copied_into_itself(command, built_store, tmp_path):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(built_store, store)
    before = _snapshot(store)
    inside = store / ("sub.zarr" if command == "copy" else "s.zip")
    one_error_line(run_cli("cache", command, store, inside), f"{inside} is inside the source store {store}")
    assert _snapshot(store) == before


def test_prepare_never_writes_over_the_labels_it_reads(tmp_path):
    import soundfile as sf

    root = tmp_path / "clips"
    root.mkdir()
    sf.write(root / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,activation\na,3\n")
    result = run_cli("prepare", "folder", root, "--labels", labels, "--out", labels)
    one_error_line(result, f"--out {labels}: that is {labels}, which this command reads")
    assert labels.read_text() == "id,activation\na,3\n"


# --- an option nothing reads is refused, not silently ignored --------------------------------

@pytest.mark.parametrize("args,message", [
    (["--from-cache", "{store}", "--top-layers", "2", "--lora-rank", "4"],
     "--lora-rank 4: --strategy cached does not use it; drop it"),
    (["--from-cache", "{store}", "--top-layers", "2", "--lora-alpha", "32"],
     "--lora-alpha 32: --strategy cached does not use it"),
    (["--from-cache", "{store}", "--top-layers", "2", "--audio-root", "{tmp}"],
     "--audio-root {tmp}: resolves a manifest's audio paths, and a store's states need none"),
    (["--from-cache", "{store}", "--top-layers", "2", "--class-weights", "balanced"],
     "--class-weights balanced: weighs the classes of a categorical target"),
])
def test_an_option_the_training_never_reads_is_refused(args, message, built_store, corpus, tiny_model, tmp_path):
    values = dict(store=built_store, corpus=corpus, model=tiny_model, tmp=tmp_path)
    result = run_cli("train", *[a.format(**values) for a in args], "--epochs", 1, "--out", tmp_path / "r")
    one_error_line(result, message.format(**values))
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_an_audio_root_a_store_does_not_read(built_store, tmp_path):
    result = run_cli("evaluate", tmp_path, "--from-cache", built_store, "--audio-root", tmp_path, "--out", tmp_path / "e")
    one_error_line(result, f"--audio-root {tmp_path}: resolves a manifest's audio paths")


def test_sweep_applies_a_shared_strategy_option_only_to_the_runs_that_read_it(built_store, tmp_path):
    """--lora-rank 4 shared by --strategy cached,lora is LoRA's; the cached run keeps the default."""
    import json

    out = tmp_path / "s"
    result = run_cli("sweep", "--from-cache", built_store, "--strategy", "cached,lora", "--top-layers", 1,
                     "--lora-rank", 4, "--epochs", 1, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    saved = {p.parent.name: json.loads(p.read_text())["config"] for p in (out / "runs").glob("*/config.json")}
    ranks = {config["strategy"]: config["lora_rank"] for config in saved.values()}
    assert ranks == {"cached": 8, "lora": 4}
    result = run_cli("sweep", "--from-cache", built_store, "--strategy", "cached", "--lora-rank", "4,8",
                     "--top-layers", 1, "--epochs", 1, "--out", tmp_path / "s2")
    one_error_line(result, "--lora-rank 4: --strategy cached does not use it")
