"""The ModelSpec in a run's config.json rebuilds the trained network; runs written before it
existed still load; an export records how it trained instead of claiming `full`."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from headtrain import EvaluateConfig, TrainConfig, evaluate, export, train
from headtrain.spec import ModelSpec, Strategy


@pytest.fixture(scope="module")
def lora_run(built_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "run"
    train(TrainConfig(out=str(out), from_cache=built_store, strategy="lora", targets=("activation",),
                      top_layers=1, epochs=1, batch_size=6, progress=False, workers=1, lora_rank=4,
                      lora_alpha=8, lr=1e-2))
    return out


def test_run_config_holds_the_spec_it_was_trained_with(lora_run, built_store):
    info = json.loads((lora_run / "config.json").read_text())
    spec = ModelSpec.from_json(info["model_spec"], where="test")
    meta = json.loads((Path(built_store) / "zarr.json").read_text())["attributes"]["ser"]
    assert spec.strategy is Strategy.LORA and spec.cache_layer == meta["layers"] == 2
    assert (spec.top_layers, spec.targets, spec.lora_rank, spec.lora_alpha) == (1, ("activation",), 4, 8)
    assert spec.model_sha256 == meta["model_sha256"]


def test_run_without_a_spec_still_evaluates_the_same(lora_run, built_store, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(lora_run, old)
    info = json.loads((old / "config.json").read_text())
    del info["model_spec"]  # as `ser train` wrote it before the spec existed
    (old / "config.json").write_text(json.dumps(info))
    new_metrics = evaluate(EvaluateConfig(run=str(lora_run), out=str(tmp_path / "new"), from_cache=built_store,
                                          split="dev"))
    old_metrics = evaluate(EvaluateConfig(run=str(old), out=str(tmp_path / "old"), from_cache=built_store,
                                          split="dev"))
    assert old_metrics == new_metrics


def test_export_records_how_it_trained(lora_run, built_store, tmp_path):
    exported = export(str(lora_run), str(tmp_path / "export"))
    head = json.loads((exported / "ser_head.json").read_text())
    run_spec = json.loads((lora_run / "config.json").read_text())["model_spec"]
    assert head["strategy"] == "lora" and head["model_spec"] == run_spec and head["lora_merged"] is True
    # the merged export has no adapters left, and cannot be fed from a store
    from headtrain.run import load_run
    rebuilt = load_run(exported, from_audio=True)
    assert not any("lora_" in name for name in rebuilt.model.state_dict())
    result = run_cli("evaluate", exported, "--from-cache", built_store, "--out", tmp_path / "e")
    assert result.exit_code == 1 and "an export holds the whole network" in result.stderr


@pytest.mark.parametrize("field,value,message", [
    ("strategy", "bogus", "model_spec.strategy 'bogus': choose one of cached, partial, full, lora"),
    ("top_layers", "2", "model_spec.top_layers is '2', expected int"),
    ("top_layers", 99, "top_layers 99 does not fit a base model of 4 layers"),
    ("targets", [], "model_spec.targets must name at least one label column"),
])
def test_damaged_spec_is_refused_in_one_line(field, value, message, lora_run, built_store, tmp_path):
    damaged = tmp_path / "run"
    shutil.copytree(lora_run, damaged)
    info = json.loads((damaged / "config.json").read_text())
    info["model_spec"][field] = value
    (damaged / "config.json").write_text(json.dumps(info))
    result = run_cli("evaluate", damaged, "--from-cache", built_store, "--out", tmp_path / "e", "--split", "dev")
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
