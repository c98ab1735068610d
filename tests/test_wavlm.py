"""WavLM through the family table (cachegen.encoder.FAMILIES): cached states equal transformers'
WavLMModel, a cached epoch equals partial finetuning on audio, LoRA, export and bench work;
every family's LoRA targets really act."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cachegen import open_cache
from cachegen.audio import load_audio
from cachegen.build import BuildConfig, build_cache
from cachegen.encoder import FAMILIES
from cachegen.manifest import load_manifest
from cachegen.testing import save_model, tiny_family_config
from conftest import run_cli
from headtrain import PredictConfig, TrainConfig, export, predict, train

TARGETS = ("activation", "valence")


@pytest.fixture(scope="module", params=["post", "stable"])
def wavlm(request, tmp_path_factory):
    """Tiny random WavLM, base-plus variant (post-layer-norm, group-norm convolutions) and large
    variant (stable layer norm, layer-norm convolutions)."""
    config = tiny_family_config("wavlm", stable_layer_norm=request.param == "stable")
    return str(save_model(tmp_path_factory.mktemp(f"wavlm-{request.param}"), config, seed=4))


def reference_states(model_dir, manifest):
    """transformers alone: each utterance on its own, eval mode, every layer's states."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMModel

    model = WavLMModel.from_pretrained(model_dir).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    out = {}
    for u in load_manifest(manifest).utterances:
        samples, _, _ = load_audio(u.path)
        with torch.no_grad():
            values = fe(samples, sampling_rate=16000, return_tensors="pt").input_values
            out[u.id] = [h[0].numpy() for h in model(values, output_hidden_states=True).hidden_states]
    return out


def max_relative_error(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("batch_size", [1, 5])
def test_wavlm_store_equals_transformers_for_every_layer(wavlm, batch_size, corpus, tmp_path):
    reference = reference_states(wavlm, corpus)
    for layer in range(0, 5):
        out = tmp_path / f"l{layer}.zarr"
        build_cache(BuildConfig(manifest=corpus, out=str(out), model=wavlm, layers=layer, dtype="float32",
                                batch_size=batch_size, progress=False))
        reader = open_cache(out)
        assert reader.meta["model_type"] == "wavlm"
        assert sorted(reader.ids) == sorted(reference)
        for uid, states in reference.items():
            got = reader[uid]
            assert got.dtype == np.float32 and got.shape == states[layer].shape
            assert max_relative_error(got, states[layer]) < 1e-4, (layer, uid)


def quick(**overrides):
    options = dict(targets=TARGETS, top_layers=2, epochs=1, batch_size=4, dropout=0.0, warmup=0.0,
                   seed=3, lr=1e-3, head_lr=1e-3, progress=False, workers=1)
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def wavlm_store(wavlm, corpus, tmp_path_factory):
    """float32 store of layer 2: layer 0, which holds the relative position embedding, is not
    part of a model trained from it."""
    out = str(tmp_path_factory.mktemp("wavlm-store") / "s.zarr")
    build_cache(BuildConfig(manifest=corpus, out=out, model=wavlm, layers=2, dtype="float32",
                            batch_size=4, progress=False))
    return out


def test_wavlm_cached_epoch_equals_partial_finetuning_on_audio(wavlm, wavlm_store, corpus, tmp_path):
    train(quick(out=str(tmp_path / "cached"), from_cache=wavlm_store))
    train(quick(out=str(tmp_path / "partial"), manifest=corpus, model=wavlm, strategy="partial"))
    cached = load_file(str(tmp_path / "cached" / "model.safetensors"))
    audio = load_file(str(tmp_path / "partial" / "model.safetensors"))
    assert cached.keys() == audio.keys()
    assert {k.split(".")[2] for k in cached if k.startswith("encoder.layers.")} == {"2", "3"}
    base = load_file(f"{wavlm}/model.safetensors")
    moved = 0
    for name in cached:
        assert torch.abs(cached[name] - audio[name]).max() < 1e-4, name
        moved += name in base and not torch.equal(base[name], cached[name])
    assert moved > 10  # the top layers really trained
    losses = [[json.loads(line)["train_loss"] for line in open(tmp_path / run / "log.jsonl")]
              for run in ("cached", "partial")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_wavlm_lora_trains_exports_and_the_export_runs_in_transformers_alone(wavlm, wavlm_store, corpus,
                                                                              tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, WavLMModel

    run_dir = tmp_path / "run"
    train(quick(out=str(run_dir), from_cache=wavlm_store, strategy="lora", lr=1e-2))
    tensors = load_file(str(run_dir / "model.safetensors"))
    adapted = {n.split(".lora_")[0].split(".")[-1] for n in tensors if ".lora_" in n}
    assert adapted == set(FAMILIES["wavlm"].lora_targets)
    predict(PredictConfig(run=str(run_dir), out=str(tmp_path / "run.csv"), manifest=corpus, split="test"))
    exported = export(str(run_dir), str(tmp_path / "export"))
    predict(PredictConfig(run=str(exported), out=str(tmp_path / "exp.csv"), manifest=corpus, split="test"))
    with open(tmp_path / "run.csv") as a, open(tmp_path / "exp.csv") as b:
        from_run, from_export = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert len(from_run) == len(from_export) > 0
    for a, b in zip(from_run, from_export):
        for target in TARGETS:
            assert float(a[f"{target}_pred"]) == pytest.approx(float(b[f"{target}_pred"]), abs=1e-4)
    model = WavLMModel.from_pretrained(exported).eval()  # transformers and torch alone
    fe = Wav2Vec2FeatureExtractor.from_pretrained(exported)
    head = load_file(str(exported / "head.safetensors"))
    meta = json.load(open(exported / "ser_head.json"))
    samples, _, _ = load_audio(corpus.rsplit("/", 1)[0] + f"/wav/{from_run[0]['id']}.wav")
    with torch.no_grad():
        values = fe(samples, sampling_rate=16000, return_tensors="pt").input_values
        pooled = model(values).last_hidden_state.mean(1)
        z = torch.tanh(pooled @ head["dense.weight"].T + head["dense.bias"]) @ head["out.weight"].T + head["out.bias"]
    pred = z[0].numpy() * np.array(meta["label_std"]) + np.array(meta["label_mean"])
    assert pred == pytest.approx([float(from_run[0][f"{t}_pred"]) for t in TARGETS], abs=1e-4)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_lora_target_of_every_family_changes_the_output(model_type, tmp_path):
    """An adapter on a projection the family never calls (WavLM's attention reads q/k/v/out
    weights directly) would train nothing: each listed target must move the prediction."""
    from cachegen.encoder import load_model
    from headtrain.upper import EmotionModel

    torch.manual_seed(0)
    model_dir = save_model(tmp_path / model_type, tiny_family_config(model_type))
    model = EmotionModel(load_model(str(model_dir)).model, strategy="lora", cache_layer=0, top_layers=2,
                         targets=1, dropout=0.0, from_audio=True).eval()
    audio = [torch.randn(9000), torch.randn(6000)]
    with torch.no_grad():
        before = model(audio)
        for target in FAMILIES[model_type].lora_targets:
            adapters = [m for n, m in model.named_modules() if n.endswith(f"{target}.lora_B.default")]
            assert len(adapters) == 2, target  # one per trained layer
            for adapter in adapters:
                adapter.weight.normal_()
            assert not torch.allclose(model(audio), before, atol=1e-6), target
            for adapter in adapters:
                adapter.weight.zero_()
            assert torch.equal(model(audio), before)


def test_bench_runs_wavlm(corpus, tmp_path):
    model_dir = save_model(tmp_path / "wavlm", tiny_family_config("wavlm"))
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--manifest", corpus, "--model", model_dir, "--layers", 2, "--top-layers", 2,
                     "--strategies", "partial,cached,lora", "--batch-size", 4, "--steps", 1,
                     "--warmup-steps", 0, "--json", out)
    assert result.exit_code == 0, result.output
    results = {r["strategy"]: r for r in json.loads(out.read_text())["results"]}
    assert list(results) == ["partial", "cached", "lora"]
    assert results["cached"]["trainable_parameters"] == results["partial"]["trainable_parameters"]
    assert all(r["utterances_per_second"] > 0 for r in results.values())


def test_stable_layer_norm_hubert_store_equals_transformers(corpus, tmp_path):
    """HuBERT large's variant (stable layer norm, layer-norm convolutions), batched."""
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    model_dir = save_model(tmp_path / "hubert", tiny_family_config("hubert", stable_layer_norm=True))
    model = HubertModel.from_pretrained(model_dir).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    build_cache(BuildConfig(manifest=corpus, out=str(tmp_path / "h.zarr"), model=str(model_dir), layers=3,
                            dtype="float32", batch_size=5, progress=False))
    reader = open_cache(tmp_path / "h.zarr")
    for u in load_manifest(corpus).utterances:
        samples, _, _ = load_audio(u.path)
        with torch.no_grad():
            values = fe(samples, sampling_rate=16000, return_tensors="pt").input_values
            expected = model(values, output_hidden_states=True).hidden_states[3][0].numpy()
        assert max_relative_error(reader[u.id], expected) < 1e-4, u.id
