"""Invariant 1: cached states equal transformers' own hidden_states[L], whatever L, the norm
variant and the batch size."""

import numpy as np
import pytest
import torch

from cachegen import open_cache
from cachegen.build import BuildConfig, build_cache
from helpers import build_every_layer, max_relative_error, run_cli, transformers_states


@pytest.mark.parametrize("variant", ["tiny_model", "stable_model"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_float32_store_equals_transformers_for_every_layer(variant, batch_size, corpus, tmp_path, request):
    build_every_layer(request.getfixturevalue(variant), corpus, tmp_path, batch_size=batch_size)


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
        rounded = torch.tensor(reference).to(torch_dtype).float().numpy()
        assert np.abs(got.astype(np.float32) - rounded).max() <= tolerance * np.abs(reference).max()
        assert max_relative_error(got.astype(np.float32), reference) < tolerance


@pytest.mark.parametrize("stable_layer_norm,batch_size", [(False, 4), (True, 5)])
def test_hubert_store_equals_transformers(stable_layer_norm, batch_size, corpus, tmp_path):
    """HuBERT base's variant and large's (stable layer norm, layer-norm convolutions), batched."""
    from cachegen.testing import save_model, tiny_family_config

    model_dir = str(save_model(tmp_path / "hubert", tiny_family_config("hubert", stable_layer_norm=stable_layer_norm)))
    build_cache(BuildConfig(manifest=corpus, out=str(tmp_path / "h.zarr"), model=model_dir, layers=3,
                            dtype="float32", batch_size=batch_size, progress=False))
    reader = open_cache(tmp_path / "h.zarr")
    assert reader.meta["model_type"] == "hubert"
    for uid, states in transformers_states(model_dir, corpus).items():
        assert max_relative_error(reader[uid], states[3]) < 1e-4, uid


def test_unsupported_model_type_is_refused_in_one_line(corpus, tmp_path):
    from transformers import SEWConfig

    from cachegen.testing import save_model

    # WavLM and data2vec-audio, refused here before they had rows in cachegen.encoder.FAMILIES, are supported now
    model_dir = save_model(tmp_path / "sew", SEWConfig(hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=64))
    result = run_cli("cache", "build", corpus, "--model", model_dir, "--layers", 1, "--out", tmp_path / "s")
    assert result.exit_code == 1 and "of type 'sew'; supported: wav2vec2, hubert, wavlm, data2vec-audio" in result.stderr


@pytest.mark.parametrize("model_type", ["wav2vec2", "wavlm", "data2vec-audio"])
def test_model_with_an_adapter_is_refused_in_one_line(model_type, corpus, tmp_path):
    """transformers runs the adapter after the last layer; ser's stores and exports do not, so
    such a checkpoint is refused rather than cached as something it does not compute."""
    from cachegen.testing import save_model, tiny_family_config

    config = tiny_family_config(model_type)
    config.add_adapter = True
    model_dir = save_model(tmp_path / "adapter", config)
    result = run_cli("cache", "build", corpus, "--model", model_dir, "--layers", 1, "--out", tmp_path / "s")
    assert result.exit_code == 1 and "has an adapter after its encoder" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "s").exists()


def test_int8_store_is_within_its_bound_of_transformers(tiny_model, corpus, tmp_path):
    """int8 (per-frame scales): every value within max |x| of its frame / 254 of transformers'
    own float32 hidden_states[L] (plus float32 noise of the batched forward)."""
    out = tmp_path / "int8.zarr"
    build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=2, dtype="int8",
                            batch_size=4, progress=False))
    reader = open_cache(out)
    assert reader.meta["dtype"] == "int8"
    for uid, expected in ((uid, states[2]) for uid, states in transformers_states(tiny_model, corpus).items()):
        got = reader[uid]
        assert got.dtype == np.float32 and got.shape == expected.shape
        bound = np.abs(expected).max(axis=1, keepdims=True) / 254
        assert (np.abs(got - expected) <= bound * 1.001 + 1e-5).all(), uid
