"""Training batches that suit the CCC loss, and how the best epoch is chosen (issue 11)."""

import json

import numpy as np
import pytest

from headtrain import TrainConfig, train
from helpers import run_cli


@pytest.fixture(scope="module")
def rate_store(tiny_model, tmp_path_factory):
    """A store of a corpus where speaking rate drives both activation and duration."""
    from cachegen.build import BuildConfig, build_cache
    from cachegen.testing import synth_rate_corpus

    folder = tmp_path_factory.mktemp("rate")
    manifest = synth_rate_corpus(folder / "corpus", utterances=160)
    store = folder / "s.zarr"
    build_cache(BuildConfig(manifest=str(manifest), out=str(store), model=tiny_model, layers=2,
                            dtype="float32", progress=False))
    return str(manifest), str(store)


def independent_random_plan(lengths, *, batch_size, seed, epoch, **_):
    """Random batches written here, not taken from headtrain: the reference to reach."""
    order = np.random.default_rng(1000 + 7 * seed + epoch).permutation(len(lengths))
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def test_default_batches_learn_as_well_as_random_batches(rate_store, tmp_path, monkeypatch, one_thread):
    import headtrain.data

    manifest, store = rate_store
    from cachegen import open_cache
    reader = open_cache(store)
    table = reader.table.to_pydict()
    train_rows = [(reader.frames(u), a) for u, a, s in zip(table["id"], table["activation"], table["split"])
                  if s == "train"]
    # the premise: duration and the target are strongly tied in this corpus
    assert np.corrcoef(np.array(train_rows).T)[0, 1] < -0.8

    def dev_ccc(name):
        scores = []
        for seed in (0, 1):
            result = train(TrainConfig(
                out=str(tmp_path / f"{name}-{seed}"), from_cache=store, top_layers=2,
                targets=("activation",), epochs=6, batch_size=8, lr=5e-4, head_lr=3e-3, dropout=0.0,
                warmup=0.05, seed=seed, progress=False, workers=1))
            scores.append(result.best_dev["activation"]["ccc"])
        return float(np.mean(scores))

    default = dev_ccc("default")
    monkeypatch.setattr(headtrain.data, "plan_batches", independent_random_plan)
    random = dev_ccc("random")
    assert random > 0.4  # the reference really learnt
    assert default > random - 0.05, (default, random)


def test_batches_are_the_same_from_the_store_and_from_the_audio(rate_store, tiny_model):
    from cachegen import open_cache
    from cachegen.manifest import load_manifest
    from cachegen.encoder import load_model
    from headtrain.data import AudioSource, Batching, CacheSource, plan_batches

    manifest, store = rate_store
    loaded = load_model(tiny_model)
    utterances = load_manifest(manifest).utterances
    audio = AudioSource({u.id: u.path for u in utterances}, loaded.model, loaded.feature_extractor)
    cache = CacheSource(open_cache(store))
    ids = [u.id for u in utterances]
    assert [audio.length(u) for u in ids] == [cache.length(u) for u in ids]
    for batching in Batching:
        plans = [plan_batches([s.length(u) for u in ids], batch_size=8, seed=4, epoch=2,
                              batching=batching) for s in (audio, cache)]
        assert plans[0] == plans[1]
        assert sorted(i for b in plans[0] for i in b) == list(range(len(ids)))


def test_length_batching_cuts_padding_and_random_batches_span_the_targets(rate_store):
    from cachegen import open_cache
    from headtrain.data import Batching, plan_batches

    reader = open_cache(rate_store[1])
    table = reader.table.to_pydict()
    lengths = np.array([reader.frames(u) for u in table["id"]])
    activation = np.array(table["activation"])

    def padding_and_spread(batching):
        plan = plan_batches(lengths.tolist(), batch_size=8, seed=0, epoch=0, batching=batching)
        padded = 1 - lengths.sum() / sum(len(b) * lengths[b].max() for b in plan)
        spread = np.mean([activation[b].std() for b in plan if len(b) > 1]) / activation.std()
        return padded, spread

    random_padding, random_spread = padding_and_spread(Batching.RANDOM)
    length_padding, length_spread = padding_and_spread(Batching.LENGTH)
    assert length_padding < random_padding / 2
    assert random_spread > 0.8 and length_spread < 0.5  # what the CCC loss gets to see


def test_select_chooses_the_best_epoch_by_one_target(built_store, tmp_path):
    result = run_cli("train", "--from-cache", built_store, "--out", tmp_path / "r", "--epochs", 3,
                     "--top-layers", 2, "--batch-size", 4, "--lr", "1e-3", "--select", "valence",
                     "--no-progress")
    assert result.exit_code == 0, result.stderr
    log = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    by_valence = max(log, key=lambda r: r["dev"]["valence"]["ccc"])["epoch"]
    info = json.load(open(tmp_path / "r" / "config.json"))
    assert info["best_epoch"] == by_valence and info["config"]["select"] == "valence"
    assert json.load(open(tmp_path / "r" / "metrics.json"))["best_epoch"] == by_valence


def test_select_must_name_a_target(built_store, tmp_path):
    result = run_cli("train", "--from-cache", built_store, "--out", tmp_path / "r", "--top-layers", 2,
                     "--targets", "activation,valence", "--select", "dominance")
    assert result.exit_code == 1
    assert "--select 'dominance': choose 'mean' or one of the targets (activation, valence)" in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("batching", ["random", "length"])
@pytest.mark.parametrize("count", [1, 2, 9, 17, 33, 35, 64, 65])
def test_training_plan_takes_every_utterance_once_and_never_a_batch_of_one(batching, count):
    """A CCC loss over a batch of one has no gradient while the optimizer still steps: a last
    batch of one joins the one before it, in each bucket of length batching too."""
    from headtrain.data import plan_batches

    lengths = list(np.random.default_rng(count).integers(50, 500, count))
    for epoch in range(3):
        plan = plan_batches(lengths, batch_size=8, seed=1, epoch=epoch, batching=batching)
        assert sorted(i for batch in plan for i in batch) == list(range(count))
        assert all(len(batch) > 1 for batch in plan) or count == 1
        assert max(len(batch) for batch in plan) <= 9
