"""Helpers shared by the test modules (fixtures live in conftest.py; helpers are imported from
here, so that no test module imports conftest)."""

import csv
import functools
import json

import numpy as np
import pytest
import torch


def run_cli(*args):
    """Run `ser ARGS` in-process; returns the click Result (exit_code, output, stderr)."""
    from click.testing import CliRunner

    from cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def one_error_line(result, *parts) -> str:
    """A command that failed with exit status 1 and one `ser: error:` line (no traceback)
    holding every one of `parts`; returns that line."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("ser: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == lines[0], result.stderr  # nothing after it
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def build_pooled(manifest, model, out, **options) -> str:
    """A float32 store at layer 2 with pooled statistics of every layer (`options` on top of
    BuildConfig's); returns its path."""
    from cachegen.build import BuildConfig, build_cache

    settings = dict(manifest=str(manifest), out=str(out), model=model, layers=2, dtype="float32",
                    batch_size=3, pooled_layers="all", progress=False)
    settings.update(options)
    summary = build_cache(BuildConfig(**settings))
    assert not summary.failed
    return str(out)


def max_relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference, relative to the largest magnitude of the reference `b`."""
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def assert_store_equals(reader, reference: dict[str, list[np.ndarray]], layer: int) -> None:
    """A float32 store holds exactly the utterances of `reference` (`transformers_states`), each
    equal to its `layer` states (relative error < 1e-4)."""
    assert sorted(reader.ids) == sorted(reference)
    for uid, states in reference.items():
        got = reader[uid]
        assert got.dtype == np.float32 and got.shape == states[layer].shape
        assert max_relative_error(got, states[layer]) < 1e-4, (layer, uid)


def build_every_layer(model_dir, manifest, tmp_path, *, batch_size: int) -> list:
    """Float32 stores of `manifest` at every layer L = 0..4, each checked against transformers
    run on each utterance alone (`assert_store_equals`); returns their readers, L in order."""
    from cachegen import open_cache
    from cachegen.build import BuildConfig, build_cache

    reference = transformers_states(model_dir, manifest)
    readers = []
    for layer in range(0, 5):
        out = tmp_path / f"l{layer}.zarr"
        build_cache(BuildConfig(manifest=str(manifest), out=str(out), model=model_dir, layers=layer,
                                dtype="float32", batch_size=batch_size, progress=False))
        readers.append(open_cache(out))
        assert_store_equals(readers[-1], reference, layer)
    return readers


def quick(**overrides):
    """TrainConfig for tests: one epoch, no dropout, no warm-up, a fixed seed (deterministic and
    small); `overrides` on top."""
    from headtrain import TrainConfig

    options = dict(targets=("activation", "valence", "dominance"), top_layers=2, epochs=1, batch_size=4,
                   dropout=0.0, warmup=0.0, seed=3, lr=1e-3, head_lr=1e-3, progress=False, workers=1)
    options.update(overrides)
    return TrainConfig(**options)


@functools.lru_cache(maxsize=4)
def transformers_states(model_dir: str, manifest: str) -> dict[str, list[np.ndarray]]:
    """transformers alone (AutoModel: the family's own class): each utterance run on its own,
    eval mode; {id: every layer's hidden states}."""
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    from cachegen.audio import load_audio
    from cachegen.manifest import load_manifest

    model = AutoModel.from_pretrained(model_dir).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    out = {}
    for u in load_manifest(manifest).utterances:
        samples, _, _ = load_audio(u.path)
        values = fe(samples, sampling_rate=16000, return_tensors="pt").input_values
        with torch.no_grad():
            states = model(values, output_hidden_states=True).hidden_states
        out[u.id] = [h[0].numpy() for h in states]
    return out


def assert_same_training(cached_run, audio_run, base_model, *, top_layers: set[str]) -> None:
    """Two run directories (one trained from a store, one on audio) hold the same weights
    (< 1e-4), their top layers (`top_layers`, as index strings) really moved away from
    `base_model`'s, and their per-epoch training losses agree (< 1e-5)."""
    from safetensors.torch import load_file

    cached = load_file(f"{cached_run}/model.safetensors")
    audio = load_file(f"{audio_run}/model.safetensors")
    assert cached.keys() == audio.keys()
    assert {k.split(".")[2] for k in cached if k.startswith("encoder.layers.")} == top_layers
    base = load_file(f"{base_model}/model.safetensors")
    moved = 0
    for name in cached:
        assert torch.abs(cached[name] - audio[name]).max() < 1e-4, name
        moved += name in base and not torch.equal(base[name], cached[name])
    assert moved > 10  # the top layers really trained
    losses = [[json.loads(line)["train_loss"] for line in open(f"{run}/log.jsonl")]
              for run in (cached_run, audio_run)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
