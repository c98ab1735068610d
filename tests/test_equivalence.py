"""Invariant 1: cached states equal transformers' own hidden_states[L], whatever L, the norm
variant and the batch size."""

import functools

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from cachegen import open_cache
from cachegen.audio import load_audio
from cachegen.build import BuildConfig, build_cache
from cachegen.manifest import load_manifest


@functools.lru_cache(maxsize=4)
def all_reference_states(model_dir, manifest):
    """transformers alone: each utterance run on its own, eval mode; every layer's states."""
    model = Wav2Vec2Model.from_pretrained(model_dir).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    out = {}
    for u in load_manifest(manifest).utterances:
        samples, _, _ = load_audio(u.path)
        values = fe(samples, sampling_rate=16000, return_tensors="pt").input_values
        with torch.no_grad():
            states = model(values, output_hidden_states=True).hidden_states
        out[u.id] = [h[0].numpy() for h in states]
    return out


def reference_states(model_dir, manifest, layer):
    return {uid: states[layer] for uid, states in all_reference_states(model_dir, manifest).items()}


def max_relative_error(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("variant", ["tiny_model", "stable_model"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_float32_store_equals_transformers_for_every_layer(variant, batch_size, corpus, tmp_path, request):
    model_dir = request.getfixturevalue(variant)
    for layer in range(0, 5):
        out = tmp_path / f"l{layer}.zarr"
        build_cache(BuildConfig(manifest=corpus, out=str(out), model=model_dir, layers=layer,
                                dtype="float32", batch_size=batch_size, progress=False))
        reference = reference_states(model_dir, corpus, layer)
        reader = open_cache(out)
        assert sorted(reader.ids) == sorted(reference)
        for uid, expected in reference.items():
            got = reader[uid]
            assert got.dtype == np.float32 and got.shape == expected.shape
            assert max_relative_error(got, expected) < 1e-4, (variant, layer, uid)


def test_batch_size_does_not_change_states(tiny_model, corpus, tmp_path):
    stores = []
    for batch_size in (1, 7):
        out = tmp_path / f"b{batch_size}.zarr"
        build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=3,
                                dtype="float32", batch_size=batch_size, progress=False))
        stores.append(open_cache(out))
    one, many = stores
    for uid in one.ids:
        assert max_relative_error(many[uid], one[uid]) < 1e-5


@pytest.mark.parametrize("dtype,tolerance", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_low_precision_stores_differ_only_by_rounding(dtype, tolerance, tiny_model, corpus, built_store, tmp_path):
    out = tmp_path / f"{dtype}.zarr"
    build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=2, dtype=dtype,
                            batch_size=4, progress=False))
    exact, low = open_cache(built_store), open_cache(out)
    torch_dtype = getattr(torch, dtype)
    for uid in exact.ids:
        reference = exact[uid]
        got = low[uid]
        assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
        # the stored value is the reference rounded to the storage dtype (within one ulp:
        # float32 rounding of the reference itself may tip a value to the neighbour)
        rounded = torch.from_numpy(reference).to(torch_dtype).float().numpy()
        assert np.abs(got.astype(np.float32) - rounded).max() <= tolerance * np.abs(reference).max()
        assert max_relative_error(got.astype(np.float32), reference) < tolerance


def test_hubert_store_equals_transformers(corpus, tmp_path):
    from transformers import HubertModel

    from cachegen.testing import save_model, tiny_hubert_config

    model_dir = save_model(tmp_path / "hubert", tiny_hubert_config())
    model = HubertModel.from_pretrained(model_dir).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    build_cache(BuildConfig(manifest=corpus, out=str(tmp_path / "h.zarr"), model=str(model_dir), layers=3,
                            dtype="float32", batch_size=4, progress=False))
    reader = open_cache(tmp_path / "h.zarr")
    assert reader.meta["model_type"] == "hubert"
    for u in load_manifest(corpus).utterances[:8]:
        samples, _, _ = load_audio(u.path)
        with torch.no_grad():
            values = fe(samples, sampling_rate=16000, return_tensors="pt").input_values
            expected = model(values, output_hidden_states=True).hidden_states[3][0].numpy()
        assert max_relative_error(reader[u.id], expected) < 1e-4


def test_unsupported_model_type_is_refused_in_one_line(corpus, tmp_path):
    from transformers import SEWConfig

    from cachegen.testing import save_model
    from conftest import run_cli

    # WavLM, refused here before it had a row in cachegen.encoder.FAMILIES, is supported now
    model_dir = save_model(tmp_path / "sew", SEWConfig(hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=64))
    result = run_cli("cache", "build", corpus, "--model", model_dir, "--layers", 1, "--out", tmp_path / "s")
    assert result.exit_code == 1 and "of type 'sew'; supported: wav2vec2, hubert, wavlm" in result.stderr


def test_int8_store_is_within_its_bound_of_transformers(tiny_model, corpus, tmp_path):
    """int8 (per-frame scales): every value within max |x| of its frame / 254 of transformers'
    own float32 hidden_states[L] (plus float32 noise of the batched forward)."""
    out = tmp_path / "int8.zarr"
    build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=2, dtype="int8",
                            batch_size=4, progress=False))
    reader = open_cache(out)
    assert reader.meta["dtype"] == "int8"
    for uid, expected in reference_states(tiny_model, corpus, 2).items():
        got = reader[uid]
        assert got.dtype == np.float32 and got.shape == expected.shape
        bound = np.abs(expected).max(axis=1, keepdims=True) / 254
        assert (np.abs(got - expected) <= bound * 1.001 + 1e-5).all(), uid
