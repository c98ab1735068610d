"""`ser train --strategy weighted-sum`: SUPERB's frozen-model baseline from a store's pooled
means (issue 17): a normal run, exact on pooled means, equal to the whole model on audio."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from headtrain import train
from helpers import build_pooled, one_error_line, quick, read_csv, run_cli, transformers_states

LAYERS = [0, 1, 2, 3, 4]  # hidden_states of the 4-layer tiny model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def ws_options(**overrides):
    options = dict(strategy="weighted-sum", targets=("carried",), epochs=8, batch_size=8,
                   head_lr=2e-2, lr=0.0)
    options.update(overrides)
    return options


@pytest.fixture(scope="module")
def ws_run(probe_corpus, tmp_path_factory):
    _, store, labels = probe_corpus
    out = tmp_path_factory.mktemp("runs") / "ws"
    result = train(quick(out=str(out), from_cache=store, labels=labels, **ws_options()))
    return out, result


def test_weighted_sum_learns_the_layers_that_carry_the_target_and_beats_a_constant(ws_run):
    from headtrain.metrics import ccc

    out, result = ws_run
    report = json.load(open(out / "layer_weights.json"))
    weights = report["layer_weights"]
    assert list(weights) == [str(n) for n in LAYERS]
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
    # away from uniform (0.2 each), onto the layers that still see the audio
    assert min(weights[k] for k in "012") > max(weights["3"], weights["4"]) + 0.03
    assert weights["3"] + weights["4"] < 0.36
    assert report["heaviest_layer"] in (0, 1, 2)
    assert report["epoch"] == result.best_epoch
    assert open(out / "layer_weights.png", "rb").read(4) == b"\x89PNG"
    # the run's dev CCC beats a constant predictor (the train mean for every utterance: CCC 0)
    dev = json.load(open(out / "metrics.json"))["dev"]["carried"]["ccc"]
    assert ccc(np.full(9, 0.3), np.linspace(-1, 1, 9)) == pytest.approx(0.0, abs=1e-12)
    assert dev > 0.5
    # and each epoch's weights are logged
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 8 and all(sum(r["layer_weights"].values()) == pytest.approx(1.0) for r in log)
    assert log[-1]["layer_weights"] != log[0]["layer_weights"]


def test_run_is_a_normal_run_directory_with_its_spec(ws_run, blind_top):
    from headtrain.run import load_run

    out, _ = ws_run
    info = json.load(open(out / "config.json"))
    spec = info["model_spec"]
    assert spec["strategy"] == "weighted-sum" and spec["pooled_layers"] == LAYERS
    assert spec["top_layers"] == 0 and spec["cache_layer"] == 0
    for name in ("model.safetensors", "log.jsonl", "curves.png", "checkpoint/state.json", "metrics.json"):
        assert (out / name).is_file(), name
    # only the layer weights and the head learnt: nothing of the base model is in the run
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == {"head.layer_logits", "head.dense.weight", "head.dense.bias",
                            "head.out.weight", "head.out.bias"}
    assert tensors["head.layer_logits"].shape == (5,)
    assert info["trainable_parameters"] == 5 + 32 * 32 + 32 + 32 + 1
    run = load_run(out, from_audio=False)
    assert run.model.backbone is None  # from pooled rows, no layer of the model is held


def test_resumed_run_ends_like_an_uninterrupted_one(probe_corpus, tmp_path, monkeypatch):
    import headtrain.plots

    _, store, labels = probe_corpus
    options = ws_options(epochs=3)
    train(quick(out=str(tmp_path / "whole"), from_cache=store, labels=labels, **options))
    real, calls = headtrain.plots.plot_curves, {"n": 0}

    def plot_then_stop(history, path):  # a kill right after epoch 1's checkpoint
        real(history, path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(headtrain.plots, "plot_curves", plot_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(quick(out=str(tmp_path / "cut"), from_cache=store, labels=labels, **options))
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    result = run_cli("train", "--resume", tmp_path / "cut", "--no-progress")
    assert result.exit_code == 0, result.stderr
    cut, whole = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("cut", "whole"))
    assert cut.keys() == whole.keys() and all(torch.equal(cut[k], whole[k]) for k in cut)
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "cut" / "log.jsonl")] == [1, 2, 3]
    assert (json.load(open(tmp_path / "cut" / "layer_weights.json"))
            == json.load(open(tmp_path / "whole" / "layer_weights.json")))


def test_weighted_sum_of_pooled_means_is_exact(blind_top, probe_corpus):
    """Mean pooling is linear: the head on the weighted sum of the layers' means equals the head
    on the mean of the frame-level weighted sum of layers (transformers' own hidden states)."""
    from headtrain.upper import Head, WeightedSumHead

    manifest, _, _ = probe_corpus
    torch.manual_seed(0)
    head = WeightedSumHead(5, 32, 2, dropout=0.0).eval()
    with torch.no_grad():
        head.layer_logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1, -0.5]))
        plain = Head(32, 2, dropout=0.0).eval()
        plain.load_state_dict({k: v for k, v in head.state_dict().items() if k != "layer_logits"})
        weights = torch.softmax(head.layer_logits, 0).double()
        for states in list(transformers_states(blind_top, manifest).values())[:5]:
            frames = torch.from_numpy(np.stack(states)).double()  # (layers, T, D)
            mixed_frames = (weights[:, None, None] * frames).sum(0)[None].float()  # (1, T, D)
            mask = torch.ones(1, mixed_frames.shape[1], dtype=torch.bool)
            means = frames.mean(1)[None].float()  # (1, layers, D)
            np.testing.assert_allclose(head(means).numpy(), plain(mixed_frames, mask).numpy(),
                                       rtol=1e-5, atol=1e-6)


def head_by_hand(tensors: dict, info: dict, means: np.ndarray) -> np.ndarray:
    """The run's network written out from its tensors: softmax-weighted sum of the layers'
    means -> tanh(dense) -> out, on the label scale. means: (layers, D)."""
    t = {k: v.double().numpy() for k, v in tensors.items()}
    logits = t["head.layer_logits"]
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    hidden = np.tanh((weights @ means) @ t["head.dense.weight"].T + t["head.dense.bias"])
    z = hidden @ t["head.out.weight"].T + t["head.out.bias"]
    return z * np.array(info["label_std"]) + np.array(info["label_mean"])


def test_predict_on_audio_equals_evaluate_from_the_store_and_transformers(ws_run, probe_corpus, blind_top, tmp_path):
    manifest, store, labels = probe_corpus
    out, _ = ws_run
    result = run_cli("evaluate", out, "--from-cache", store, "--labels", labels, "--split", "test",
                     "--out", tmp_path / "e")
    assert result.exit_code == 0, result.stderr
    result = run_cli("predict", out, "--manifest", manifest, "--split", "test", "--batch-size", 3,
                     "--out", tmp_path / "p.csv", "--no-progress")
    assert result.exit_code == 0, result.stderr
    from_store = {r["id"]: float(r["carried_pred"]) for r in read_csv(tmp_path / "e" / "predictions.csv")}
    from_audio = {r["id"]: float(r["carried_pred"]) for r in read_csv(tmp_path / "p.csv")}
    assert sorted(from_store) == sorted(from_audio) and len(from_store) == 9
    spread = np.ptp(list(from_store.values()))
    assert spread > 0  # the predictions differ between utterances
    tensors, info = load_file(str(out / "model.safetensors")), json.load(open(out / "config.json"))
    reference = transformers_states(blind_top, manifest)
    for uid, value in from_audio.items():
        # float32 store and float32 audio: the same up to float32 rounding (CSV keeps 6 digits)
        assert value == pytest.approx(from_store[uid], rel=1e-4, abs=1e-4 * spread)
        means = np.stack([reference[uid][n].astype(np.float64).mean(0) for n in LAYERS])
        assert value == pytest.approx(head_by_hand(tensors, info, means)[0], rel=1e-4, abs=1e-4 * spread)
    # an export predicts the same from audio, with the layer weights in its head
    assert run_cli("export", out, "--out", tmp_path / "x").exit_code == 0
    head = json.load(open(tmp_path / "x" / "ser_head.json"))
    assert head["model_spec"]["pooled_layers"] == LAYERS and "softmax(layer_logits)" in head["head"]
    result = run_cli("predict", tmp_path / "x", "--manifest", manifest, "--split", "test",
                     "--out", tmp_path / "x.csv", "--no-progress")
    assert result.exit_code == 0, result.stderr
    exported = {r["id"]: float(r["carried_pred"]) for r in read_csv(tmp_path / "x.csv")}
    assert exported == pytest.approx(from_audio, rel=1e-5)
    # docs/export.md's snippet: transformers and torch alone
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from cachegen.audio import load_audio

    model = Wav2Vec2Model.from_pretrained(tmp_path / "x").eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(tmp_path / "x")
    head = load_file(str(tmp_path / "x" / "head.safetensors"))
    meta = json.load(open(tmp_path / "x" / "ser_head.json"))
    uid = sorted(from_audio)[0]
    samples, _, _ = load_audio(manifest.rsplit("/", 1)[0] + f"/wav/{uid}.wav")
    with torch.no_grad():
        values = fe(samples, sampling_rate=16000, return_tensors="pt").input_values
        states = model(values, output_hidden_states=True).hidden_states
        means = torch.stack([states[i].mean(1) for i in meta["model_spec"]["pooled_layers"]], 1)
        pooled = (torch.softmax(head["layer_logits"], 0)[None, :, None] * means).sum(1)
        hidden = torch.tanh(pooled @ head["dense.weight"].T + head["dense.bias"])
        z = hidden @ head["out.weight"].T + head["out.bias"]
    pred = z[0].numpy() * np.array(meta["label_std"]) + np.array(meta["label_mean"])
    assert pred[0] == pytest.approx(from_audio[uid], rel=1e-4, abs=1e-4 * spread)


@pytest.mark.parametrize("variant,dtype", [("tiny_model", "float16"), ("stable_model", "float32")])
def test_both_norm_variants_predict_from_audio_what_they_evaluate_from_the_store(variant, dtype, corpus,
                                                                              tmp_path, request):
    """Group-norm and stable-layer-norm models, any store dtype (pooled rows are float32), audio
    at 16, 22.05 and 8 kHz, stereo: predict on audio == evaluate from the store == the head on
    transformers' own hidden_states."""
    model_dir = request.getfixturevalue(variant)
    store = build_pooled(corpus, model_dir, tmp_path / "s.zarr", dtype=dtype, layers=1)
    run = tmp_path / "r"
    train(quick(out=str(run), from_cache=store, **ws_options(targets=("activation", "valence"), epochs=1)))
    assert run_cli("evaluate", run, "--from-cache", store, "--split", "train", "--out", tmp_path / "e").exit_code == 0
    result = run_cli("predict", run, "--manifest", corpus, "--split", "train", "--batch-size", 4,
                     "--out", tmp_path / "p.csv", "--no-progress")
    assert result.exit_code == 0, result.stderr
    from_store = {r["id"]: r for r in read_csv(tmp_path / "e" / "predictions.csv")}
    from_audio = {r["id"]: r for r in read_csv(tmp_path / "p.csv")}
    assert sorted(from_store) == sorted(from_audio) and len(from_audio) > 10
    tensors, info = load_file(str(run / "model.safetensors")), json.load(open(run / "config.json"))
    reference = transformers_states(model_dir, corpus)
    for uid, row in from_audio.items():
        means = np.stack([reference[uid][n].astype(np.float64).mean(0) for n in LAYERS])
        expected = head_by_hand(tensors, info, means)
        for j, target in enumerate(("activation", "valence")):
            value = float(row[f"{target}_pred"])
            assert value == pytest.approx(float(from_store[uid][f"{target}_pred"]), rel=1e-4, abs=1e-4)
            assert value == pytest.approx(expected[j], rel=1e-4, abs=1e-4)


def test_store_without_pooled_layers_and_wrong_options_are_one_line_errors(built_store, corpus, probe_corpus,
                                                                           blind_top, ws_run, tmp_path):
    args = ["--strategy", "weighted-sum", "--targets", "activation", "--epochs", 1, "--no-progress"]
    one_error_line(run_cli("train", "--from-cache", built_store, *args, "--out", tmp_path / "a"),
                   built_store, "holds no pooled statistics", "--pooled-layers all")
    assert not (tmp_path / "a").exists()
    one_error_line(run_cli("train", "--manifest", corpus, *args, "--out", tmp_path / "b"),
                   "--strategy weighted-sum needs --from-cache STORE")
    one_error_line(run_cli("train", "--from-cache", built_store, *args, "--max-frames", 20,
                           "--out", tmp_path / "c"), "--max-frames 20", "pooled means")
    typo = run_cli("train", "--from-cache", built_store, "--strategy", "weighted", "--out", tmp_path / "d")
    assert typo.exit_code == 2 and "'weighted-sum'" in typo.stderr  # click lists the strategies
    out, _ = ws_run
    plain = build_pooled(probe_corpus[0], blind_top, tmp_path / "plain.zarr", pooled_layers=None)
    one_error_line(run_cli("evaluate", out, "--from-cache", plain, "--labels", probe_corpus[2],
                           "--out", tmp_path / "e"), plain, "holds no pooled statistics")
    one_error_line(run_cli("analyze", "change", out, "--out", tmp_path / "f"), "trains no layer")
    one_error_line(run_cli("bench", "--manifest", corpus, "--strategies", "cached,weighted-sum"),
                   "--strategies weighted-sum")


def copy_store(store, to):
    shutil.copytree(store, to)
    return to


def rewrite_pooled_row(store, uid, change, *, keep_checksum=False):
    """Write `change(row)` as `uid`'s pooled row with a matching checksum, as a hostile or buggy
    builder would (only the values are wrong), or under the old checksum."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    from cachegen.store import checksum

    group = zarr.open_group(str(store), mode="r+")
    meta = group.attrs["ser"]
    index = pq.read_table(store / "index.parquet")
    rows = index.to_pylist()
    row = next(r for r in rows if r["id"] == uid)
    slot = row["start"] // meta["chunk_frames"]
    values = np.array(group["pooled"][slot], dtype=np.float32)
    values = change(values)
    group["pooled"][slot] = values
    if not keep_checksum:
        row["pooled_crc32"] = checksum(values, meta.get("checksum", "crc32"))
    pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), store / "index.parquet")


@pytest.mark.parametrize("case", ["nan", "zeros", "checksum", "deleted", "width", "layers"])
def test_hostile_pooled_rows_are_refused_never_trained_on(case, probe_corpus, tmp_path):
    from cachegen import open_cache

    _, store, labels = probe_corpus
    copy = copy_store(store, tmp_path / "s.zarr")
    uid = sorted(open_cache(store).ids)[3]
    expected = {"nan": f"pooled statistics of '{uid}' hold NaN", "zeros": f"pooled statistics of '{uid}' are all 0",
                "checksum": f"pooled statistics of '{uid}' fail their checksum",
                "deleted": "fail their checksum",
                "width": "'pooled' array is missing or not", "layers": "field 'pooled_layers' is"}[case]
    if case == "nan":
        rewrite_pooled_row(copy, uid, lambda v: np.where(np.arange(v.size) == 40, np.nan, v).astype(np.float32))
    elif case == "zeros":
        rewrite_pooled_row(copy, uid, np.zeros_like)
    elif case == "deleted":  # a pooled shard gone: its rows read as zeros, never trained on
        for shard in (copy / "pooled" / "c").rglob("*"):
            if shard.is_file():
                shard.unlink()
    else:
        root = json.loads((copy / "zarr.json").read_text())
        metadata = root["consolidated_metadata"]["metadata"]
        if case == "checksum":  # other values under the old checksum (a damaged or missing chunk)
            rewrite_pooled_row(copy, uid, lambda v: v * 1.5, keep_checksum=True)
        elif case == "width":
            metadata["pooled"]["shape"] = [metadata["pooled"]["shape"][0], 7]
        else:
            root["attributes"]["ser"]["pooled_layers"] = [0, 0, 9]
        (copy / "zarr.json").write_text(json.dumps(root))
    result = run_cli("train", "--from-cache", copy, "--labels", labels, "--strategy", "weighted-sum",
                     "--targets", "carried", "--epochs", 1, "--batch-size", 8, "--no-progress",
                     "--out", tmp_path / "r")
    one_error_line(result, str(copy), expected)
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_a_store_without_the_runs_layers_cannot_evaluate_it(ws_run, probe_corpus, blind_top, tmp_path):
    manifest, _, labels = probe_corpus
    partial = build_pooled(manifest, blind_top, tmp_path / "p02.zarr", pooled_layers="0,2")
    out, _ = ws_run
    one_error_line(run_cli("evaluate", out, "--from-cache", partial, "--labels", labels, "--out",
                           tmp_path / "e"), partial, "not layer(s) [1, 3, 4]", "--pooled-layers 0,1,2,3,4")
    # and a run trained on such a store mixes just those layers
    run = tmp_path / "r"
    train(quick(out=str(run), from_cache=partial, labels=labels, **ws_options(epochs=1)))
    assert list(json.load(open(run / "layer_weights.json"))["layer_weights"]) == ["0", "2"]
    assert run_cli("evaluate", run, "--from-cache", partial, "--labels", labels,
                   "--out", tmp_path / "e2").exit_code == 0


def test_sweep_compares_the_weighted_sum_baseline_with_cached_runs_from_one_store(probe_corpus, tmp_path):
    _, store, labels = probe_corpus
    result = run_cli("sweep", "--from-cache", store, "--labels", labels, "--targets", "carried",
                     "--strategy", "cached,weighted-sum", "--top-layers", 1, "--epochs", 1,
                     "--batch-size", 8, "--out", tmp_path / "s", "--no-progress")
    assert result.exit_code == 0, result.stderr
    rows = read_csv(tmp_path / "s" / "summary.csv")
    assert sorted(r["strategy"] for r in rows) == ["cached", "weighted-sum"]
    runs = {json.load(open(p))["model_spec"]["strategy"]: p.parent
            for p in (tmp_path / "s" / "runs").glob("*/config.json")}
    assert (runs["weighted-sum"] / "layer_weights.json").is_file()
    assert not (runs["cached"] / "layer_weights.json").exists()


def test_folds_train_and_test_the_weighted_sum_on_each_left_out_group(probe_corpus, tmp_path):
    _, store, labels = probe_corpus
    result = run_cli("sweep", "--from-cache", store, "--labels", labels, "--targets", "carried",
                     "--strategy", "weighted-sum", "--folds", "speaker", "--epochs", 1,
                     "--batch-size", 8, "--out", tmp_path / "f", "--no-progress")
    assert result.exit_code == 0, result.stderr
    tests = sorted((tmp_path / "f" / "runs").glob("*/test/metrics.json"))
    assert len(tests) == 6  # one per speaker, each tested on its left-out group
    for path in tests:
        assert "carried" in json.load(open(path))


def test_spec_json_of_other_strategies_is_unchanged_and_weighted_sum_round_trips():
    from headtrain.spec import ModelSpec, Strategy

    cached = ModelSpec(model_id="m", model_sha256="0" * 64, strategy=Strategy.CACHED, cache_layer=2,
                       top_layers=2, targets=("a",))
    assert "pooled_layers" not in cached.to_json()  # runs of the other strategies: as before
    assert ModelSpec.from_json(cached.to_json(), where="x") == cached
    weighted = ModelSpec(model_id="m", model_sha256="0" * 64, strategy=Strategy.WEIGHTED_SUM,
                         cache_layer=0, top_layers=0, targets=("a",), pooled_layers=(0, 3, 4))
    assert weighted.to_json()["pooled_layers"] == [0, 3, 4]
    assert ModelSpec.from_json(weighted.to_json(), where="x") == weighted


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(pooled_layers=[0, 0, 1]), "model_spec.pooled_layers is [0, 0, 1], expected distinct"),
    (lambda s: s.update(pooled_layers="all"), "model_spec.pooled_layers is 'all', expected distinct"),
    (lambda s: s.update(pooled_layers=[0, 9]), "pooled_layers [0, 9] do not fit a base model of 4 layers"),
    (lambda s: s.update(pooled_layers=[0, 1, 2]), "tensor 'head.layer_logits' has shape (5,), the model expects (3,)"),
    (lambda s: s.pop("pooled_layers"), "strategy weighted-sum needs the layers it mixes"),
    (lambda s: s.update(top_layers=2), "out of range for strategy weighted-sum"),
    (lambda s: s.update(strategy="cached"), "strategy cached mixes no layers"),
])
def test_damaged_weighted_sum_spec_is_refused_in_one_line(edit, message, ws_run, probe_corpus, tmp_path):
    _, store, labels = probe_corpus
    damaged = tmp_path / "run"
    shutil.copytree(ws_run[0], damaged)
    info = json.loads((damaged / "config.json").read_text())
    edit(info["model_spec"])
    (damaged / "config.json").write_text(json.dumps(info))
    one_error_line(run_cli("evaluate", damaged, "--from-cache", store, "--labels", labels,
                           "--out", tmp_path / "e"), message)


def test_categorical_and_dimensional_targets_train_together(probe_corpus, tmp_path):
    _, store, labels = probe_corpus
    out = tmp_path / "r"
    result = train(quick(out=str(out), from_cache=store, labels=labels,
                         **ws_options(targets=("carried", "speaker"), epochs=1)))
    assert set(result.best_dev["speaker"]) >= {"uar", "macro_f1", "confusion"}
    evaluated = run_cli("evaluate", out, "--from-cache", store, "--labels", labels, "--out", tmp_path / "e")
    assert evaluated.exit_code == 0, evaluated.stderr
    rows = read_csv(tmp_path / "e" / "predictions.csv")
    assert {r["speaker_pred"] for r in rows} <= {f"spk{i}" for i in range(6)}
