"""Every strategy of the paper's comparison trains, evaluates and predicts (issue 5)."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from headtrain import EvaluateConfig, PredictConfig, TrainConfig, evaluate, export, predict, train
from cachegen.encoder import FAMILIES


def config(**overrides):
    options = dict(targets=("activation", "valence"), top_layers=2, epochs=1, batch_size=6,
                   dropout=0.1, seed=1, progress=False, workers=1)
    options.update(overrides)
    return TrainConfig(**options)


@pytest.mark.parametrize("strategy,source", [("full", "audio"), ("lora", "audio"), ("lora", "cache")])
def test_strategy_trains_evaluates_predicts_exports(strategy, source, built_store, tiny_model, corpus, tmp_path):
    inputs = {"from_cache": built_store} if source == "cache" else {"manifest": corpus, "model": tiny_model}
    run_dir = tmp_path / "run"
    result = train(config(out=str(run_dir), strategy=strategy, **inputs))
    tensors = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    if strategy == "lora":
        adapted = {n.split(".lora_")[0].split(".")[-1] for n in tensors if ".lora_" in n}
        assert adapted == set(FAMILIES["wav2vec2"].lora_targets)
        assert {n.split(".")[2] for n in tensors if ".lora_" in n} == {"2", "3"}
        assert not any(n.endswith("q_proj.base_layer.weight") for n in tensors)  # frozen weights stay out
    if strategy == "full":
        assert {n.split(".")[2] for n in tensors if n.startswith("encoder.layers.")} == {"0", "1", "2", "3"}
        assert any(n.startswith("feature_projection.") for n in tensors)
        assert not any(n.startswith("feature_extractor.") for n in tensors)  # CNN stays frozen
    assert 0 < result.trainable_parameters < result.total_parameters
    evaluation = {"from_cache": built_store} if source == "cache" else {"manifest": corpus}
    metrics = evaluate(EvaluateConfig(run=str(run_dir), out=str(tmp_path / "eval"), split="test", **evaluation))
    assert set(metrics) == {"activation", "valence"}
    predict(PredictConfig(run=str(run_dir), out=str(tmp_path / "p.csv"), manifest=corpus, split="test"))
    with open(tmp_path / "eval" / "predictions.csv") as f:
        evaluated = {r["id"]: r for r in csv.DictReader(f)}
    with open(tmp_path / "p.csv") as f:
        predicted = list(csv.DictReader(f))
    assert len(predicted) == len(evaluated)
    for row in predicted:  # float32 store vs audio: the same numbers
        assert float(row["activation_pred"]) == pytest.approx(float(evaluated[row["id"]]["activation_pred"]), abs=1e-3)
    exported = export(str(run_dir), str(tmp_path / "export"))
    predict(PredictConfig(run=str(exported), out=str(tmp_path / "x.csv"), manifest=corpus, split="test"))
    with open(tmp_path / "x.csv") as f:
        for a, b in zip(predicted, csv.DictReader(f)):
            assert float(a["valence_pred"]) == pytest.approx(float(b["valence_pred"]), abs=1e-4)
    assert json.load(open(tmp_path / "export" / "ser_head.json"))["targets"] == ["activation", "valence"]


def test_full_run_cannot_be_fed_from_a_cache(built_store, tiny_model, corpus, tmp_path):
    from cachegen.errors import ConfigError

    train(config(out=str(tmp_path / "run"), strategy="full", manifest=corpus, model=tiny_model))
    with pytest.raises(ConfigError, match="evaluate it from audio"):
        evaluate(EvaluateConfig(run=str(tmp_path / "run"), out=str(tmp_path / "e"), from_cache=built_store))


def test_trainable_parameter_counts_follow_the_strategy(built_store, tiny_model, corpus, tmp_path):
    counts = {}
    for strategy, inputs in (("full", {"manifest": corpus, "model": tiny_model}),
                             ("partial", {"manifest": corpus, "model": tiny_model}),
                             ("cached", {"from_cache": built_store}),
                             ("lora", {"from_cache": built_store})):
        result = train(config(out=str(tmp_path / strategy), strategy=strategy, **inputs))
        counts[strategy] = result.trainable_parameters
        assert result.total_parameters == counts.setdefault("total", result.total_parameters)
    assert counts["partial"] == counts["cached"]
    assert counts["lora"] < counts["cached"] < counts["full"] < counts["total"]
