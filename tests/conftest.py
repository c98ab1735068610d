"""Shared fixtures: tiny random Wav2Vec2 models and a small synthetic corpus (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from cachegen.testing import save_tiny_model, synth_corpus  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for a test (2 shared cores), restored after it: the thread count changes
    float results, and other tests compare in-process results, and shared fixtures, with
    subprocesses that use torch's default (fixtures of wider scope are set up before this one,
    at the default). A module uses it for all its tests with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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



@pytest.fixture(scope="session")
def blind_top(tiny_model, tmp_path_factory):
    """The tiny model with transformer layer 3's first layer norm scaled to 0: from layer 3 on,
    every frame of every utterance is the same vector; layers 0..2 still see the audio."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    model = Wav2Vec2Model.from_pretrained(tiny_model)
    with torch.no_grad():
        model.encoder.layers[2].layer_norm.weight.zero_()
    out = tmp_path_factory.mktemp("blind") / "model"
    model.save_pretrained(out)
    Wav2Vec2FeatureExtractor.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def probe_corpus(blind_top, tmp_path_factory):
    """(manifest, store, labels): 60 short utterances, a float32 store of `blind_top` with pooled
    statistics of every layer, and labels (id, split, speaker, carried, activation) whose
    'carried' is a linear function of layer 1's pooled mean (read-only in tests)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from cachegen import open_cache
    from helpers import build_pooled

    root = tmp_path_factory.mktemp("probe")
    manifest = synth_corpus(root / "c", utterances=60, seconds=(0.5, 1.0))
    store = build_pooled(manifest, blind_top, root / "p.zarr", batch_size=8)
    reader = open_cache(store)
    direction = np.random.default_rng(5).normal(size=32)
    carried = {uid: float(reader.pooled(uid)[1, 0] @ direction) for uid in reader.ids}
    table = pacsv.read_csv(manifest)
    table = table.append_column("carried", pa.array([carried[uid] for uid in table.column("id").to_pylist()]))
    labels = root / "labels.csv"
    pacsv.write_csv(table.select(["id", "split", "speaker", "carried", "activation"]), labels)
    return str(manifest), store, str(labels)
