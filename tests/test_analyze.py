"""`ser analyze`: linear CKA, weight change, the recommended L (issue 17)."""

import csv
import json

import numpy as np
import pytest
import torch

from headtrain import train
from headtrain.analyze import ChangeConfig, analyze_change, linear_cka, recommend_cache_layer, LinearCKA
from helpers import build_pooled, quick, run_cli, transformers_states

TARGETS = ("activation", "valence", "dominance")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def hsic_cka(x, y):
    """CKA from Gram matrices and the centring matrix (Kornblith et al., eq. 2), an independent
    formula: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, L = Y Y^T."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_))


# --- CKA ---------------------------------------------------------------------------------------

def test_cka_of_a_representation_with_itself_and_a_rotation_is_one_noise_lowers_it():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 50.0  # correlated, far from 0
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 3.0 * x @ rotation + 7.0) == pytest.approx(1.0, abs=1e-9)
    previous = 1.0
    for scale in (0.3, 1.0, 3.0):
        noisy = linear_cka(x, x + scale * rng.normal(size=x.shape) * x.std())
        assert noisy < previous - 0.01
        previous = noisy
    assert linear_cka(x, rng.normal(size=(300, 16))) < 0.2


def test_cka_added_in_batches_equals_an_independent_formula():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 8)) * np.linspace(0.1, 10, 8) + 1000.0  # large constant component
    y = np.tanh(x[:, :6] @ rng.normal(size=(6, 5)) / 1000.0) + rng.normal(size=(120, 5)) * 0.1
    cka = LinearCKA()
    for start in range(0, 120, 25):
        cka.add(torch.from_numpy(x[start:start + 25]), torch.from_numpy(y[start:start + 25]))
    assert cka.value() == pytest.approx(hsic_cka(x, y), rel=1e-7)
    assert np.isnan(linear_cka(np.ones((10, 3)), x[:10, :3]))  # a constant representation


def test_recommended_layer_is_the_highest_below_which_all_stay_under_the_threshold():
    # layers 0..6; the largest change of layers 1..6 is 0.8, so the cut is 0.5 * 0.8 = 0.4
    change = [0.9, 0.05, 0.1, 0.39, 0.5, 0.2, 0.8]
    assert recommend_cache_layer(change, 0.5) == (3, pytest.approx(0.4))
    assert recommend_cache_layer(change, 0.1)[0] == 1  # cut 0.08: layer 2 (0.1) counts as changed
    assert recommend_cache_layer([0.0, 0.1, 0.2, 0.3], 1.0)[0] == 2  # at least one layer trains
    assert recommend_cache_layer([0.0, 0.0, 0.0, 0.0], 0.5)[0] == 0  # nothing moved: no evidence


# --- ser analyze change on real runs -------------------------------------------------------------

@pytest.fixture(scope="module")
def partial_run(tiny_model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "partial"
    train(quick(out=str(out), manifest=corpus, model=tiny_model, strategy="partial", top_layers=2))
    return str(out)


def test_weight_change_is_zero_for_frozen_layers_and_positive_for_trained(partial_run, tmp_path):
    result = analyze_change(ChangeConfig(run=partial_run, out=str(tmp_path / "a"), utterances=6),
                            progress=False)
    rows = result["layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["weight_change"] for r in rows[:3]] == [0.0, 0.0, 0.0]  # K = 2 of 4: frozen
    assert all(r["weight_change"] > 1e-4 for r in rows[3:])
    # the same frozen layers on the same audio: identical states, CKA 1; trained ones moved
    assert all(r["cka"] == pytest.approx(1.0, abs=1e-6) for r in rows[:3])
    assert all(r["cka"] < 1.0 - 1e-6 for r in rows[3:])
    assert result["recommended_layers"] >= 2 and not result["trained_all_layers"]  # 1, 2 unmoved
    written = list(csv.DictReader(open(tmp_path / "a" / "change.csv")))
    assert [float(r["weight_change"]) for r in written] == pytest.approx([r["weight_change"] for r in rows], rel=1e-5)
    assert json.load(open(tmp_path / "a" / "change.json"))["threshold"] == 0.5
    assert open(tmp_path / "a" / "change.png", "rb").read(4) == b"\x89PNG"


def test_full_run_changes_every_layer_and_the_cli_names_l_and_threshold(tiny_model, corpus, tmp_path):
    run = tmp_path / "full"
    train(quick(out=str(run), manifest=corpus, model=tiny_model, strategy="full"))
    result = run_cli("analyze", "change", run, "--out", tmp_path / "change", "--utterances", 2,
                     "--threshold", 0.3, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "recommended --layers" in result.output and "0.3 x the largest change" in result.output
    info = json.load(open(tmp_path / "change" / "change.json"))
    assert info["trained_all_layers"] and info["utterances"] == 2 and info["metric"] == "representation"
    assert all(r["weight_change"] > 0 for r in info["layers"])  # projection, pos conv, every layer
    # the recommendation follows the rule from the written numbers
    changes = [r["representation_change"] for r in info["layers"]]
    cut = 0.3 * max(changes[1:])
    expected = 0
    while expected + 1 < 4 and changes[expected + 1] < cut:
        expected += 1
    assert info["recommended_layers"] == expected and info["cut"] == pytest.approx(cut)
    weights_only = run_cli("analyze", "change", run, "--out", tmp_path / "w", "--utterances", 0)
    assert weights_only.exit_code == 0 and "relative weight change" in weights_only.output
    assert all(r["cka"] is None for r in json.load(open(tmp_path / "w" / "change.json"))["layers"])


def test_cka_from_the_store_equals_cka_from_audio(built_store, corpus, tmp_path):
    run = tmp_path / "cached"
    train(quick(out=str(run), from_cache=built_store))  # layer 2 of 4 cached, K = 2
    from_store = analyze_change(ChangeConfig(run=str(run), out=str(tmp_path / "s"), utterances=4),
                                progress=False)
    from_audio = analyze_change(ChangeConfig(run=str(run), out=str(tmp_path / "m"), utterances=4,
                                             manifest=corpus), progress=False)
    assert from_store["inputs"] == built_store and from_audio["inputs"] == corpus
    assert [r["cka"] for r in from_store["layers"]] == pytest.approx(
        [r["cka"] for r in from_audio["layers"]], abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--threshold", "0"], "--threshold 0.0"),
    (["--metric", "representation", "--utterances", "0"], "--metric representation needs"),
    (["--split", "nosuch"], "no utterances of split 'nosuch'"),
])
def test_bad_options_are_one_line_errors(partial_run, tmp_path, args, message):
    result = run_cli("analyze", "change", partial_run, "--out", tmp_path / "x", "--no-progress", *args)
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output


def test_analysis_never_writes_into_a_run_or_reads_a_non_run(partial_run, tmp_path):
    into_run = run_cli("analyze", "change", partial_run, "--out", partial_run)
    assert into_run.exit_code == 1 and "run directory" in into_run.stderr
    (tmp_path / "empty").mkdir()
    not_a_run = run_cli("analyze", "change", tmp_path / "empty", "--out", tmp_path / "o")
    assert not_a_run.exit_code == 1 and "not a ser run" in not_a_run.stderr


# --- pooled statistics in the store (ser cache build --pooled-layers) ------------------------------

@pytest.fixture(scope="module")
def pooled_store(tiny_model, corpus, tmp_path_factory):
    return build_pooled(corpus, tiny_model, tmp_path_factory.mktemp("pooled") / "p.zarr")


@pytest.mark.parametrize("variant", ["tiny_model", "stable_model"])
def test_pooled_statistics_equal_numpy_of_stored_states_and_of_transformers(variant, corpus, tmp_path, request):
    from cachegen import open_cache

    model_dir = request.getfixturevalue(variant)
    store = build_pooled(corpus, model_dir, tmp_path / "p.zarr", layers=4 if variant == "stable_model" else 2)
    reader = open_cache(store)
    layer = reader.meta["layers"]
    assert reader.pooled_layers == [0, 1, 2, 3, 4]
    reference = transformers_states(model_dir, corpus)
    for uid in reader.ids:
        pooled = reader.pooled(uid)  # (layers, 2, hidden)
        assert pooled.shape == (5, 2, 32) and pooled.dtype == np.float32
        stored = reader[uid].astype(np.float64)
        np.testing.assert_allclose(pooled[layer, 0], stored.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pooled[layer, 1], stored.std(0), rtol=1e-5, atol=1e-6)
        for index, states in enumerate(reference[uid]):
            scale = np.abs(states).max()
            assert np.abs(pooled[index, 0] - states.mean(0)).max() < 1e-4 * scale, (uid, index)
            assert np.abs(pooled[index, 1] - states.std(0)).max() < 1e-4 * scale, (uid, index)


def test_pooled_store_reads_with_zarr_and_pyarrow_alone(pooled_store):
    import pyarrow.parquet as pq
    import zarr
    import zlib

    from cachegen import open_cache

    group = zarr.open_group(zarr.storage.LocalStore(pooled_store, read_only=True), mode="r",
                            use_consolidated=True)
    meta = group.attrs["ser"]
    index = pq.read_table(f"{pooled_store}/index.parquet").to_pylist()
    reader = open_cache(pooled_store)
    for row in index:
        raw = group["pooled"][row["start"] // meta["chunk_frames"]]
        import google_crc32c  # installed with zarr; version 2 stores use CRC-32C

        crc = google_crc32c.value if meta.get("checksum") == "crc32c" else zlib.crc32
        assert crc(raw.astype("<f4").tobytes()) == row["pooled_crc32"]
        values = raw.reshape(len(meta["pooled_layers"]), 2, meta["hidden_size"])
        np.testing.assert_array_equal(values, reader.pooled(row["id"]))
    assert group["pooled"].shape[0] == -(-max(r["start"] + r["frames"] for r in index) // meta["chunk_frames"])
    info = run_cli("cache", "info", pooled_store)
    assert info.exit_code == 0 and "mean and std of layers 0, 1, 2, 3, 4" in info.output


def test_pooled_build_resumes_keeping_committed_rows_and_is_refused_on_a_plain_store(tiny_model, corpus, tmp_path, pooled_store):
    import pyarrow.csv as pacsv

    from cachegen import open_cache

    table = pacsv.read_csv(corpus)
    half = tmp_path / "half.csv"
    pacsv.write_csv(table.slice(0, 10), half)
    resumed = tmp_path / "r.zarr"
    build_pooled(half, tiny_model, resumed, audio_root=str(tmp_path.parent / "corpus0"))
    first = {uid: open_cache(resumed).pooled(uid).tobytes() for uid in open_cache(resumed).ids}
    result = run_cli("cache", "build", corpus, "--model", tiny_model, "--layers", 2, "--dtype", "float32",
                     "--batch-size", 3, "--pooled-layers", "all", "--out", resumed, "--no-progress")
    assert result.exit_code == 0 and "10 were already cached" in result.output
    whole, again = open_cache(pooled_store), open_cache(resumed)
    assert sorted(whole.ids) == sorted(again.ids)
    for uid in whole.ids:  # other batches than the whole build: equal up to float rounding
        np.testing.assert_allclose(again.pooled(uid), whole.pooled(uid), rtol=1e-5, atol=1e-6)
    assert {uid: again.pooled(uid).tobytes() for uid in first} == first  # kept, not recomputed
    assert run_cli("cache", "verify", resumed).exit_code == 0
    plain = tmp_path / "plain.zarr"
    assert run_cli("cache", "build", corpus, "--model", tiny_model, "--layers", 2, "--out", plain,
                   "--no-progress").exit_code == 0
    refused = run_cli("cache", "build", corpus, "--model", tiny_model, "--layers", 2, "--out", plain,
                      "--pooled-layers", "all", "--no-progress")
    assert refused.exit_code == 1 and "pooled_layers: store has None" in refused.stderr
    with pytest.raises(Exception, match="no pooled statistics"):
        open_cache(plain).pooled(open_cache(plain).ids[0])


def test_damaged_pooled_chunk_is_found_by_verify_and_the_copy_carries_pooled(pooled_store, tmp_path):
    import shutil

    from cachegen import open_cache
    from cachegen.errors import StoreCorrupt

    packed = tmp_path / "p.zip"
    assert run_cli("cache", "pack", pooled_store, packed).exit_code == 0
    zipped, original = open_cache(packed), open_cache(pooled_store)
    for uid in original.ids:
        assert zipped.pooled(uid).tobytes() == original.pooled(uid).tobytes()
    damaged = tmp_path / "d.zarr"
    shutil.copytree(pooled_store, damaged)
    shard = damaged / "pooled" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first utterance's row, size unchanged
    shard.write_bytes(bytes(data))
    result = run_cli("cache", "verify", damaged)
    assert result.exit_code == 1 and "pooled statistics of" in result.stderr
    reader = open_cache(damaged)
    first = min(reader.ids, key=lambda uid: reader._rows[uid][0])
    with pytest.raises(StoreCorrupt, match=first):
        reader.pooled(first)


@pytest.mark.parametrize("value, message", [("9", "layers must lie in 0..4"), ("two", "expected 'all'")])
def test_bad_pooled_layers_are_one_line_errors(tiny_model, corpus, tmp_path, value, message):
    result = run_cli("cache", "build", corpus, "--model", tiny_model, "--layers", 2, "--out",
                     tmp_path / "s.zarr", "--pooled-layers", value, "--no-progress")
    assert result.exit_code == 1 and message in result.stderr and "--pooled-layers" in result.stderr
    assert not (tmp_path / "s.zarr").exists()


# --- ser analyze probe -----------------------------------------------------------------------------

def test_ridge_probe_ranks_the_layers_that_carry_the_target_first():
    from headtrain.analyze import ridge_probe
    from headtrain.metrics import ccc

    rng = np.random.default_rng(0)
    n, layers, width = 80, 6, 20
    target = rng.normal(size=n)
    features = rng.normal(size=(n, layers, width))
    for layer, strength in ((2, 2.0), (4, 0.8)):  # only layers 2 and 4 carry the target
        features[:, layer, :3] += strength * target[:, None] * rng.normal(size=3)
    train, dev = slice(0, 60), slice(60, n)
    scores = [ccc(ridge_probe(features[train, k], target[train, None], features[dev, k])[:, 0], target[dev])
              for k in range(layers)]
    assert sorted(range(layers), key=lambda k: -scores[k])[:2] == [2, 4]
    assert scores[2] > 0.8 and max(scores[k] for k in (0, 1, 3, 5)) < 0.4
    constant = ridge_probe(np.ones((60, 4)), target[train, None], np.ones((20, 4)))
    assert np.allclose(constant, target[train].mean())  # no signal: the train mean


def test_probe_on_a_corpus_where_only_lower_layers_carry_the_target_ranks_them_first(probe_corpus, blind_top, tmp_path):
    manifest, store, labels = probe_corpus
    result = run_cli("analyze", "probe", store, "--labels", labels, "--targets", "carried",
                     "--out", tmp_path / "s", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "suggested --top-layers" in result.output
    info = json.load(open(tmp_path / "s" / "probe.json"))
    scores = {r["layer"]: r["carried_ccc"] for r in info["layers"]}
    assert set(sorted(scores, key=lambda k: -scores[k])[:3]) == {0, 1, 2}
    assert min(scores[k] for k in (0, 1, 2)) > max(scores[3], scores[4]) + 0.3
    assert scores[1] > 0.8 and info["best_layer"] in (0, 1, 2)
    assert info["suggested_top_layers"] == 4 - info["best_layer"]
    assert open(tmp_path / "s" / "probe.png", "rb").read(4) == b"\x89PNG"
    # from the audio with the model, no store: the same statistics, the same scores
    from_audio = run_cli("analyze", "probe", manifest, "--model", blind_top, "--labels", labels,
                         "--targets", "carried", "--out", tmp_path / "m", "--no-progress")
    assert from_audio.exit_code == 0, from_audio.output
    again = {r["layer"]: r["carried_ccc"] for r in json.load(open(tmp_path / "m" / "probe.json"))["layers"]}
    assert [again[k] for k in (0, 1, 2)] == pytest.approx([scores[k] for k in (0, 1, 2)], abs=1e-3)


def test_weighted_sum_of_layers_learns_to_weight_the_informative_layer():
    from headtrain.analyze import ProbeConfig, train_weighted_sum

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    n, layers, width = 120, 5, 8
    target = rng.normal(size=(n, 1))
    means = rng.normal(size=(n, layers, width))
    means[:, 3] = target * rng.normal(size=width) + 0.05 * rng.normal(size=(n, width))  # only layer 3
    result = train_weighted_sum(means[:90], target[:90], means[90:], target[90:], ["t"],
                                layers=list(range(layers)),
                                config=ProbeConfig(source="x", out="y", epochs=300, lr=1e-2))
    weights = result["layer_weights"]
    assert max(weights, key=weights.get) == "3" and sum(weights.values()) == pytest.approx(1.0)
    assert result["dev"]["t"] > 0.8


def test_probe_weighted_sum_cli_and_refusals(probe_corpus, built_store, tmp_path):
    manifest, store, labels = probe_corpus
    result = run_cli("analyze", "probe", store, "--labels", labels, "--targets", "carried,activation",
                     "--weighted-sum", "--epochs", 50, "--out", tmp_path / "w", "--no-progress")
    assert result.exit_code == 0 and "weighted sum of layers" in result.output
    info = json.load(open(tmp_path / "w" / "probe.json"))
    assert set(info["weighted_sum"]["layer_weights"]) == {"0", "1", "2", "3", "4"}
    assert set(info["weighted_sum"]["dev"]) == {"carried", "activation"}
    plain = run_cli("analyze", "probe", built_store, "--out", tmp_path / "x")
    assert plain.exit_code == 1 and "--pooled-layers all" in plain.stderr
    unknown = run_cli("analyze", "probe", store, "--targets", "nosuch", "--out", tmp_path / "y")
    assert unknown.exit_code == 1 and "nosuch" in unknown.stderr
    into_store = run_cli("analyze", "probe", store, "--labels", labels, "--targets", "carried", "--out", store)
    assert into_store.exit_code == 1 and "holds a ser run or store" in into_store.stderr


def test_store_claiming_pooled_statistics_it_lacks_is_refused(pooled_store, tmp_path):
    import shutil

    from cachegen import open_cache
    from cachegen.errors import StoreCorrupt

    for name, edit in (("missing", lambda c: c.pop("pooled")),
                       ("short", lambda c: c["pooled"].update(shape=[c["pooled"]["shape"][0], 7]))):
        copy = tmp_path / f"{name}.zarr"
        shutil.copytree(pooled_store, copy)
        root = json.loads((copy / "zarr.json").read_text())
        edit(root["consolidated_metadata"]["metadata"])
        (copy / "zarr.json").write_text(json.dumps(root))
        with pytest.raises(StoreCorrupt, match="'pooled' array is missing or not"):
            open_cache(copy)
