"""WavLM through the family table (cachegen.encoder.FAMILIES): cached states equal transformers'
WavLMModel, a cached epoch equals partial finetuning on audio, LoRA, export and bench work;
every family's LoRA targets really act."""

import csv
import functools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cachegen.audio import load_audio
from cachegen.build import BuildConfig, build_cache
from cachegen.encoder import FAMILIES
from cachegen.testing import save_model, tiny_family_config
import helpers
from helpers import assert_same_training, build_every_layer, run_cli
from headtrain import PredictConfig, export, predict, train

TARGETS = ("activation", "valence")
quick = functools.partial(helpers.quick, targets=TARGETS)


@pytest.fixture(scope="module", params=["post", "stable"])
def wavlm(request, tmp_path_factory):
    """Tiny random WavLM, base-plus variant (post-layer-norm, group-norm convolutions) and large
    variant (stable layer norm, layer-norm convolutions)."""
    config = tiny_family_config("wavlm", stable_layer_norm=request.param == "stable")
    return str(save_model(tmp_path_factory.mktemp(f"wavlm-{request.param}"), config, seed=4))


@pytest.mark.parametrize("batch_size", [1, 5])
def test_wavlm_store_equals_transformers_for_every_layer(wavlm, batch_size, corpus, tmp_path):
    readers = build_every_layer(wavlm, corpus, tmp_path, batch_size=batch_size)
    assert all(reader.meta["model_type"] == "wavlm" for reader in readers)


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
    assert_same_training(tmp_path / "cached", tmp_path / "partial", wavlm, top_layers={"2", "3"})


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
