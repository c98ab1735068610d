"""data2vec-audio through the family table (cachegen.encoder.FAMILIES). Its positional
convolution is a stack of layers, so transformers' batched forward lets padding into the last
real frames of shorter utterances; ser's reference is each utterance run alone, which it gives
whatever the batch. Utterances of very different lengths share one batch here."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cachegen import open_cache
from cachegen.audio import load_audio
from cachegen.build import BuildConfig, batches_in_order, build_cache
from cachegen.encoder import FAMILIES
from cachegen.manifest import load_manifest
from cachegen.testing import save_model, synth_corpus, tiny_family_config
import helpers
from helpers import (assert_same_training, build_every_layer, max_relative_error, read_csv, run_cli,
                     transformers_states)
from headtrain import EvaluateConfig, PredictConfig, evaluate, export, predict, train

TARGETS = ("activation", "valence")
UTTERANCES = 20  # 14 train, 3 dev, 3 test

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def quick(**overrides):
    return helpers.quick(targets=TARGETS, **overrides)


@pytest.fixture(scope="module")
def d2v(tmp_path_factory):
    """Tiny random data2vec-audio: 5 positional convolution layers of kernel 19, as the base model."""
    config = tiny_family_config("data2vec-audio")
    assert config.conv_pos_kernel_size == 19 and config.num_conv_pos_embeddings == 5
    return str(save_model(tmp_path_factory.mktemp("d2v"), config, seed=5))


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """20 utterances of 0.25..3 s (12..150 frames) at 16 and 22.05 kHz: a build with
    --batch-size 20 runs them all in one batch."""
    manifest = synth_corpus(tmp_path_factory.mktemp("spread"), utterances=UTTERANCES, seed=7,
                            seconds=(0.25, 3.0), sample_rates=(16000, 22050))
    return str(manifest)


def seconds_of(manifest: str) -> dict[str, float]:
    out = {}
    for u in load_manifest(manifest).utterances:
        samples, _, _ = load_audio(u.path)
        out[u.id] = len(samples) / 16000
    return out


@pytest.fixture(scope="module")
def d2v_store(d2v, spread, tmp_path_factory):
    """float32 store of layer 2, every layer's pooled statistics, all utterances in one batch."""
    out = str(tmp_path_factory.mktemp("d2v-store") / "s.zarr")
    build_cache(BuildConfig(manifest=spread, out=out, model=d2v, layers=2, dtype="float32",
                            batch_size=UTTERANCES, pooled_layers="all", progress=False))
    return out


def test_one_batch_holds_very_different_lengths_and_transformers_batched_differs_there(d2v, spread):
    """The premise of the tests below: one build batch, lengths 5x apart, and transformers' own
    batched forward (attention mask given) is not what the utterance gives alone."""
    from transformers import AutoModel

    seconds = seconds_of(spread)
    utterances = load_manifest(spread).utterances
    assert len(batches_in_order(utterances, seconds, UTTERANCES)) == 1
    assert max(seconds.values()) > 5 * min(seconds.values())
    short, long = min(seconds, key=seconds.get), max(seconds, key=seconds.get)
    reference = transformers_states(d2v, spread)
    model = AutoModel.from_pretrained(d2v).eval()
    waves = [torch.from_numpy(reference_input(d2v, spread, uid)) for uid in (short, long)]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    attention = (torch.arange(batch.shape[1])[None] < torch.tensor([len(w) for w in waves])[:, None]).long()
    with torch.no_grad():
        batched = model(batch, attention_mask=attention, output_hidden_states=True).hidden_states
    frames = reference[short][0].shape[0]
    assert max_relative_error(batched[0][0, :frames].numpy(), reference[short][0]) > 1e-2


def reference_input(model_dir: str, manifest: str, uid: str) -> np.ndarray:
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    path = next(u.path for u in load_manifest(manifest).utterances if u.id == uid)
    samples, _, _ = load_audio(path)
    return fe(samples, sampling_rate=16000, return_tensors="np").input_values[0].astype(np.float32)


def test_store_equals_transformers_on_each_utterance_alone_for_every_layer(d2v, spread, tmp_path):
    """Fails without the padding fix in cachegen.encoder.positional (relative error ~1 on the
    short utterances of the batch)."""
    readers = build_every_layer(d2v, spread, tmp_path, batch_size=UTTERANCES)
    assert all(r.meta["model_type"] == "data2vec-audio" and not r.meta["do_stable_layer_norm"] for r in readers)


@pytest.mark.parametrize("kernel", [19, 4])
def test_every_batch_gives_each_utterance_its_states_alone(kernel, tmp_path):
    """The shortest possible utterance (one frame: 400 samples), one sample more, and long ones,
    in either order, with the base model's odd kernel and an even one (transformers drops the
    convolution's last output frame): embed + run_layers give transformers' states of each
    utterance alone, at every layer."""
    from transformers import AutoModel

    from cachegen.encoder import embed, load_model, run_layers

    config = tiny_family_config("data2vec-audio")
    config.conv_pos_kernel_size = kernel
    model_dir = save_model(tmp_path / "m", config, seed=2)
    ours = load_model(str(model_dir)).model
    theirs = AutoModel.from_pretrained(model_dir).eval()
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in (400, 401, 4000, 48000)]
    for batch in (waves, waves[::-1]):
        with torch.no_grad():
            hidden, mask = embed(ours, batch)
            states = [hidden]
            for layer in ours.encoder.layers:
                states.append(run_layers(ours, [layer], states[-1], mask))
            for i, wave in enumerate(batch):
                alone = theirs(wave[None], output_hidden_states=True).hidden_states
                frames = int(mask[i].sum())
                assert frames == alone[0].shape[1]
                for index, reference in enumerate(alone):
                    got = states[index][i, :frames].numpy()
                    assert max_relative_error(got, reference[0].numpy()) < 1e-4, (len(wave), index)


def test_pooled_statistics_equal_transformers_on_each_utterance_alone(d2v_store, d2v, spread):
    reader = open_cache(d2v_store)
    assert reader.pooled_layers == [0, 1, 2, 3, 4]
    reference = transformers_states(d2v, spread)
    for uid in reader.ids:
        pooled = reader.pooled(uid)  # (layers, 2, hidden)
        for index, states in enumerate(reference[uid]):
            scale = np.abs(states).max()
            assert np.abs(pooled[index, 0] - states.mean(0)).max() < 1e-4 * scale, (uid, index)
            assert np.abs(pooled[index, 1] - states.std(0)).max() < 1e-4 * scale, (uid, index)


def test_cached_epoch_equals_partial_finetuning_on_audio(d2v, d2v_store, spread, tmp_path):
    """Batches of 8 utterances of mixed lengths: the padding of each batch reaches the top layers."""
    train(quick(out=str(tmp_path / "cached"), from_cache=d2v_store, batch_size=8))
    train(quick(out=str(tmp_path / "partial"), manifest=spread, model=d2v, strategy="partial",
                batch_size=8))
    assert_same_training(tmp_path / "cached", tmp_path / "partial", d2v, top_layers={"2", "3"})


@pytest.mark.parametrize("strategy", ["cached", "lora"])
def test_predict_on_audio_equals_evaluate_from_the_store(strategy, d2v_store, spread, tmp_path):
    run_dir = tmp_path / "run"
    train(quick(out=str(run_dir), from_cache=d2v_store, strategy=strategy, lr=1e-2))
    if strategy == "lora":
        tensors = load_file(str(run_dir / "model.safetensors"))
        adapted = {n.split(".lora_")[0].split(".")[-1] for n in tensors if ".lora_" in n}
        assert adapted == set(FAMILIES["data2vec-audio"].lora_targets)
    evaluate(EvaluateConfig(run=str(run_dir), out=str(tmp_path / "eval"), from_cache=d2v_store, split="train",
                            batch_size=UTTERANCES))
    predict(PredictConfig(run=str(run_dir), out=str(tmp_path / "p.csv"), manifest=spread, split="train",
                          batch_size=UTTERANCES, progress=False))
    from_store = {r["id"]: r for r in read_csv(tmp_path / "eval" / "predictions.csv")}
    from_audio = {r["id"]: r for r in read_csv(tmp_path / "p.csv")}
    assert from_store.keys() == from_audio.keys() and len(from_store) == 14
    for uid, row in from_store.items():
        for target in TARGETS:
            assert float(from_audio[uid][f"{target}_pred"]) == pytest.approx(float(row[f"{target}_pred"]),
                                                                             abs=1e-4), (uid, target)


def test_full_finetuning_exports_a_model_that_transformers_runs_alone_as_ser_predicts(d2v, spread, tmp_path):
    """--strategy full trains the positional convolution too; predictions from a batch of every
    length equal transformers' Data2VecAudioModel on each utterance alone; `ser analyze change`
    places the positional convolution at hidden_states[0]."""
    from transformers import Data2VecAudioModel

    run_dir = tmp_path / "full"
    train(quick(out=str(run_dir), manifest=spread, model=d2v, strategy="full", batch_size=8, lr=1e-2))
    exported = export(str(run_dir), str(tmp_path / "export"))
    predict(PredictConfig(run=str(exported), out=str(tmp_path / "p.csv"), manifest=spread,
                          batch_size=UTTERANCES, progress=False))
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == UTTERANCES
    model = Data2VecAudioModel.from_pretrained(exported).eval()  # transformers and torch alone
    head = load_file(str(exported / "head.safetensors"))
    meta = json.load(open(exported / "ser_head.json"))
    base = load_file(f"{d2v}/model.safetensors")
    assert not torch.equal(model.encoder.pos_conv_embed.layers[2].conv.bias, base["encoder.pos_conv_embed.layers.2.conv.bias"])
    for row in rows:
        values = torch.from_numpy(reference_input(str(exported), spread, row["id"]))[None]
        with torch.no_grad():
            pooled = model(values).last_hidden_state.mean(1)
            z = torch.tanh(pooled @ head["dense.weight"].T + head["dense.bias"]) @ head["out.weight"].T + head["out.bias"]
        pred = z[0].numpy() * np.array(meta["label_std"]) + np.array(meta["label_mean"])
        assert pred == pytest.approx([float(row[f"{t}_pred"]) for t in TARGETS], abs=1e-4), row["id"]
    result = run_cli("analyze", "change", run_dir, "--out", tmp_path / "change", "--utterances", 3,
                     "--no-progress")
    assert result.exit_code == 0, result.output
    layers = json.load(open(tmp_path / "change" / "change.json"))["layers"]
    assert layers[0]["weight_change"] > 0 and layers[0]["cka"] is not None


def test_data2vec_has_no_large_variant_in_test_configs():
    with pytest.raises(ValueError, match="no stable-layer-norm"):
        tiny_family_config("data2vec-audio", stable_layer_norm=True)


def test_cli_builds_and_bench_runs_data2vec(d2v, spread, tmp_path):
    out = tmp_path / "cli.zarr"
    result = run_cli("cache", "build", spread, "--out", out, "--model", d2v, "--layers", 2,
                     "--dtype", "float16", "--batch-size", 8, "--no-progress")
    assert result.exit_code == 0, result.output
    assert open_cache(out).meta["model_type"] == "data2vec-audio"
    bench = tmp_path / "bench.json"
    result = run_cli("bench", "--manifest", spread, "--model", d2v, "--layers", 2, "--top-layers", 2,
                     "--strategies", "partial,cached,lora", "--batch-size", 4, "--steps", 1,
                     "--warmup-steps", 0, "--json", bench)
    assert result.exit_code == 0, result.output
    assert [r["strategy"] for r in json.loads(bench.read_text())["results"]] == ["partial", "cached", "lora"]
