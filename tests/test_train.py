"""Training from a cache and from audio, evaluation, prediction, export (issue 4; RELIABILITY
items 10 and 12)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cachegen.errors import ManifestError
from headtrain import EvaluateConfig, PredictConfig, TrainConfig, evaluate, predict, train
from headtrain.metrics import ccc, ccc_loss, pearson
from helpers import assert_same_training, quick, read_csv, run_cli

TARGETS = ("activation", "valence", "dominance")


@pytest.fixture(scope="module")
def cached_run(built_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cached"
    result = train(quick(out=str(out), from_cache=built_store, epochs=2))
    return str(out), result


def test_cached_training_equals_partial_finetuning_on_audio(cached_run, built_store, tiny_model, corpus, tmp_path):
    partial = tmp_path / "partial"
    train(quick(out=str(partial), manifest=corpus, model=tiny_model, strategy="partial", epochs=2))
    assert_same_training(cached_run[0], partial, tiny_model, top_layers={"2", "3"})


def test_run_directory_explains_itself(cached_run, built_store):
    run_dir, result = cached_run
    info = json.load(open(f"{run_dir}/config.json"))
    meta = json.load(open(f"{built_store}/zarr.json"))["attributes"]["ser"]
    assert info["model_sha256"] == meta["model_sha256"] and info["cache_layer"] == 2
    assert info["top_layers"] == 2 and info["targets"] == list(TARGETS)
    assert len(info["label_mean"]) == 3 and all(s > 0 for s in info["label_std"])
    assert info["config"]["seed"] == 3 and info["store"]["layers"] == 2
    log = [json.loads(line) for line in open(f"{run_dir}/log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2]
    for record in log:
        assert record["seconds"] > 0 and record["utterances_per_second"] > 0
        assert set(record["dev"]) == set(TARGETS)
    assert open(f"{run_dir}/curves.png", "rb").read(4) == b"\x89PNG"
    tensors = load_file(f"{run_dir}/model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == result.trainable_parameters
    assert result.trainable_parameters < result.total_parameters / 2


def test_evaluate_reproduces_best_dev_and_predict_agrees(cached_run, built_store, corpus, tmp_path):
    run_dir, result = cached_run
    metrics = evaluate(EvaluateConfig(run=run_dir, out=str(tmp_path / "dev"), from_cache=built_store,
                                      split="dev"))
    for target in TARGETS:  # checkpoint round trip: the saved weights give the logged dev CCC
        assert metrics[target]["ccc"] == pytest.approx(result.best_dev[target]["ccc"], abs=1e-6)
    rows = read_csv(tmp_path / "dev" / "predictions.csv")
    assert list(rows[0]) == ["id", "split", "activation", "activation_pred", "valence", "valence_pred",
                             "dominance", "dominance_pred"]
    assert open(tmp_path / "dev" / "scatter.png", "rb").read(4) == b"\x89PNG"
    assert json.load(open(tmp_path / "dev" / "metrics.json"))["valence"]["mse"] >= 0
    predict(PredictConfig(run=run_dir, out=str(tmp_path / "p.csv"), manifest=corpus, split="dev"))
    predicted = {r["id"]: r for r in read_csv(tmp_path / "p.csv")}
    assert predicted.keys() == {r["id"] for r in rows}
    for row in rows:
        for target in TARGETS:
            assert float(predicted[row["id"]][f"{target}_pred"]) == pytest.approx(
                float(row[f"{target}_pred"]), abs=1e-3)
            assert predicted[row["id"]][target] == row[target]


def test_predict_on_bare_audio_files(cached_run, corpus, tmp_path):
    folder = corpus.rsplit("/", 1)[0]
    result = run_cli("predict", cached_run[0], f"{folder}/wav/utt0001.wav", f"{folder}/wav/utt0002.wav",
                     "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "p.csv")
    assert [r["id"] for r in rows] == ["utt0001", "utt0002"]
    assert list(rows[0]) == ["id", "path", "activation_pred", "valence_pred", "dominance_pred"]
    assert rows[0]["path"] == f"{folder}/wav/utt0001.wav"


def test_export_is_self_contained_and_matches_transformers_alone(cached_run, corpus, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from cachegen.audio import load_audio

    export_dir = tmp_path / "export"
    assert run_cli("export", cached_run[0], "--out", export_dir).exit_code == 0
    predict(PredictConfig(run=cached_run[0], out=str(tmp_path / "run.csv"), manifest=corpus, split="test"))
    predict(PredictConfig(run=str(export_dir), out=str(tmp_path / "exp.csv"), manifest=corpus, split="test"))
    from_run, from_export = read_csv(tmp_path / "run.csv"), read_csv(tmp_path / "exp.csv")
    for a, b in zip(from_run, from_export):
        for target in TARGETS:
            assert float(a[f"{target}_pred"]) == pytest.approx(float(b[f"{target}_pred"]), abs=1e-4)
    # docs/export.md's snippet: transformers and torch alone
    model = Wav2Vec2Model.from_pretrained(export_dir).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(export_dir)
    head = load_file(str(export_dir / "head.safetensors"))
    meta = json.load(open(export_dir / "ser_head.json"))
    path = corpus.rsplit("/", 1)[0] + f"/wav/{from_run[0]['id']}.wav"
    samples, _, _ = load_audio(path)
    with torch.no_grad():
        values = fe(samples, sampling_rate=16000, return_tensors="pt").input_values
        pooled = model(values).last_hidden_state.mean(1)
        hidden = torch.tanh(pooled @ head["dense.weight"].T + head["dense.bias"])
        z = hidden @ head["out.weight"].T + head["out.bias"]
    pred = z[0].numpy() * np.array(meta["label_std"]) + np.array(meta["label_mean"])
    assert pred == pytest.approx([float(from_run[0][f"{t}_pred"]) for t in TARGETS], abs=1e-4)


def test_training_learns_activation(tiny_model, tmp_path):
    from cachegen.build import BuildConfig, build_cache
    from cachegen.testing import synth_corpus

    manifest = synth_corpus(tmp_path / "c", utterances=160, seed=5)
    store = tmp_path / "s.zarr"
    build_cache(BuildConfig(manifest=str(manifest), out=str(store), model=tiny_model, layers=2,
                            progress=False))
    result = train(TrainConfig(out=str(tmp_path / "run"), from_cache=str(store), top_layers=2,
                               targets=("activation",), epochs=8, batch_size=8, lr=5e-4, head_lr=3e-3,
                               dropout=0.0, warmup=0.05, progress=False))
    # chance is 0; the synthetic labels follow pitch, rate and loudness
    assert result.best_dev["activation"]["ccc"] > 0.3


def test_store_from_other_weights_is_refused(built_store, tmp_path):
    from cachegen.testing import save_tiny_model
    other = save_tiny_model(tmp_path / "other", seed=7)
    result = run_cli("train", "--from-cache", built_store, "--model", other, "--out", tmp_path / "r",
                     "--epochs", 1)
    assert result.exit_code == 1
    assert "was built from weights sha256" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("args,message", [
    (["--top-layers", "3"], "--top-layers 3 is larger than the 2 layers above the cache"),
    (["--amp", "fp16"], "--amp fp16 needs a CUDA GPU"),
    (["--strategy", "partial"], "--strategy partial trains from audio"),
    (["--top-layers", "2", "--targets", "activation,happiness"], "no label column(s) happiness"),
    (["--top-layers", "2", "--dev-split", "validation"], "split 'validation' has no rows (splits found: dev, test, train)"),
])
def test_conflicting_options_refused_before_work(args, message, built_store, tmp_path):
    result = run_cli("train", "--from-cache", built_store, "--out", tmp_path / "r", *args)
    assert result.exit_code == 1 and message in result.stderr, result.stderr


def test_label_problems_reported_at_once_with_rows(built_store, tmp_path):
    from cachegen import open_cache
    ids = open_cache(built_store).table.to_pydict()
    lines = ["id,split,activation"]
    for uid, split in zip(ids["id"], ids["split"]):
        value = {"utt0000": "", "utt0001": "nan", "utt0002": "9.5"}.get(uid, "3.0")
        lines.append(f"{uid},{split},{value}")
    lines.append(f"{ids['id'][5]},{ids['split'][5]},2.0")  # duplicate id
    lines.append("ghost,train,4.0")  # not in the store
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as err:
        train(quick(out=str(tmp_path / "r"), from_cache=built_store, labels=str(labels),
                    targets=("activation",), label_range=(1, 7)))
    message = str(err.value)
    assert "duplicate id(s) utt0005" in message
    assert "'activation' is blank or NaN for 2 row(s): utt0000, utt0001" in message
    assert "'activation' outside [1, 7] for 1 row(s): utt0002=9.5" in message
    assert "1 id(s) not in the store: ghost" in message
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_nan_loss_steps_are_skipped_and_never_saved(built_store, tmp_path, monkeypatch):
    import headtrain.metrics as metrics

    real, calls = metrics.ccc_loss, {"n": 0}

    def sometimes_nan(pred, true):
        calls["n"] += 1
        loss = real(pred, true)
        return loss * float("nan") if calls["n"] % 2 else loss

    monkeypatch.setitem(metrics.LOSSES, "ccc", sometimes_nan)
    train(quick(out=str(tmp_path / "some"), from_cache=built_store))
    log = [json.loads(line) for line in open(tmp_path / "some" / "log.jsonl")]
    assert log[0]["skipped_steps"] > 0 and np.isfinite(log[0]["train_loss"])
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "some" / "model.safetensors")).values())

    monkeypatch.setitem(metrics.LOSSES, "ccc", lambda pred, true: real(pred, true) * float("nan"))
    result = run_cli("train", "--from-cache", built_store, "--out", tmp_path / "all", "--epochs", 3,
                     "--batch-size", 2, "--top-layers", 2, "--no-progress")
    assert result.exit_code == 1 and "loss was NaN/Inf for 20 steps in a row" in result.stderr
    kept = load_file(str(tmp_path / "all" / "model.safetensors"))  # the last good (untrained) one
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_ccc_matches_an_independent_formula():
    rng = np.random.default_rng(0)
    true = rng.normal(3, 1.2, 500)
    pred = 0.6 * true + rng.normal(0.5, 0.8, 500)
    r = np.corrcoef(pred, true)[0, 1]
    sp, st = np.std(pred), np.std(true)
    expected = 2 * r * sp * st / (sp ** 2 + st ** 2 + (pred.mean() - true.mean()) ** 2)
    assert ccc(pred, true) == pytest.approx(expected, rel=1e-9)
    assert pearson(pred, true) == pytest.approx(r, rel=1e-9)
    assert ccc(true, true) == pytest.approx(1.0)
    loss = ccc_loss(torch.tensor(np.stack([pred, true], 1)), torch.tensor(np.stack([true, true], 1)))
    assert loss.item() == pytest.approx(((1 - expected) + 0) / 2, rel=1e-5)


def test_train_cli_end_to_end(built_store, tmp_path):
    result = run_cli("train", "--from-cache", built_store, "--out", tmp_path / "r", "--epochs", 1,
                     "--top-layers", 1, "--targets", "activation", "--batch-size", 8, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "best epoch 1: dev CCC activation" in result.output
    result = run_cli("evaluate", tmp_path / "r", "--from-cache", built_store, "--out", tmp_path / "e")
    assert result.exit_code == 0 and "activation: CCC" in result.output
    assert {r["split"] for r in read_csv(tmp_path / "e" / "predictions.csv")} == {"test"}


def test_pickled_checkpoint_is_never_unpickled(cached_run, corpus, tmp_path):
    import pickle
    import shutil

    planted = tmp_path / "run"
    shutil.copytree(cached_run[0], planted)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (planted / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    result = run_cli("predict", planted, "--out", tmp_path / "p.csv",
                     corpus.replace("manifest.csv", "wav/utt0001.wav"))
    assert result.exit_code == 1 and "not a safetensors file" in result.stderr
    assert not marker.exists()


def test_training_from_a_damaged_store_stops_naming_the_utterance(built_store, tmp_path):
    import shutil

    copy = tmp_path / "damaged.zarr"
    shutil.copytree(built_store, copy)
    for shard in (copy / "states" / "c").rglob("*"):
        if shard.is_file():
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0x01
            shard.write_bytes(bytes(data))
    result = run_cli("train", "--from-cache", copy, "--top-layers", 2, "--out", tmp_path / "r", "--epochs", 1,
                     "--no-progress")
    assert result.exit_code == 1
    assert "fails its checksum" in result.stderr or "cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_utterances_the_build_skipped_are_left_out_of_training(tiny_model, corpus, tmp_path):
    from pathlib import Path

    folder = Path(corpus).parent
    lines = Path(corpus).read_text().splitlines()
    (tmp_path / "broken.wav").write_bytes(b"not audio at all")
    header = lines[0].split(",")
    broken = {"id": "broken", "path": str(tmp_path / "broken.wav"), "split": "train", "speaker": "spk9",
              "activation": "4", "valence": "4", "dominance": "4"}
    rows = [line.replace("wav/", f"{folder}/wav/", 1) for line in lines[1:]]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join([lines[0], *rows, ",".join(broken[c] for c in header)]) + "\n")
    store = tmp_path / "s.zarr"
    assert run_cli("cache", "build", manifest, "--model", tiny_model, "--layers", 2, "--out", store,
                   "--no-progress").exit_code == 1  # the broken file is reported
    result = run_cli("train", "--from-cache", store, "--top-layers", 2, "--out", tmp_path / "r",
                     "--epochs", 1, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert "leaving out 1 utterance(s) the cache build could not use: broken" in result.stderr
    info = json.load(open(tmp_path / "r" / "config.json"))
    assert info["train_utterances"] == sum(1 for r in rows if ",train," in r)


@pytest.mark.usefixtures("one_thread")
def test_cached_equals_partial_for_stable_layer_norm_with_dropout_and_a_frozen_layer_between(
        stable_model, corpus, tmp_path):
    """The large models' variant (final layer norm, trained with the top layers), dropout on
    (0.1 in the trained layers and the head: both paths draw the same masks, as frozen layers
    never drop out) and a frozen layer between the store (L = 1) and the K = 2 trained ones."""
    from cachegen.build import BuildConfig, build_cache

    store = tmp_path / "l1.zarr"
    build_cache(BuildConfig(manifest=corpus, out=str(store), model=stable_model, layers=1, dtype="float32",
                            batch_size=4, progress=False))
    options = dict(top_layers=2, dropout=0.1, epochs=2)
    train(quick(out=str(tmp_path / "cached"), from_cache=str(store), **options))
    train(quick(out=str(tmp_path / "partial"), manifest=corpus, model=stable_model, strategy="partial", **options))
    assert_same_training(tmp_path / "cached", tmp_path / "partial", stable_model, top_layers={"2", "3"})
    assert "encoder.layer_norm.weight" in load_file(str(tmp_path / "cached" / "model.safetensors"))
