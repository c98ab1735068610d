"""Shared fixtures: tiny random Wav2Vec2 models and a small synthetic corpus (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from cachegen.testing import save_tiny_model, synth_corpus  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Group-norm encoder, post-layer-norm transformer (the base models' variant), 4 layers."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def stable_model(tmp_path_factory):
    """Layer-norm encoder, stable-layer-norm transformer (the large models' variant)."""
    return str(save_tiny_model(tmp_path_factory.mktemp("stable-model"), stable_layer_norm=True))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """24 utterances at 16, 22.05 and 8 kHz, every third one stereo; returns the manifest path."""
    return str(synth_corpus(tmp_path_factory.mktemp("corpus"), utterances=24,
                            sample_rates=(16000, 22050, 8000), stereo_every=3))


@pytest.fixture(scope="session")
def built_store(tmp_path_factory, tiny_model, corpus):
    """A float32 store of layer 2 of the tiny model over the corpus (read-only in tests)."""
    from cachegen.build import BuildConfig, build_cache

    out = str(tmp_path_factory.mktemp("stores") / "f32.zarr")
    summary = build_cache(BuildConfig(manifest=corpus, out=out, model=tiny_model, layers=2,
                                      dtype="float32", batch_size=4, progress=False))
    assert not summary.failed
    return out

