"""Categorical targets from the same store (issue 16): a classification head with
cross-entropy, UAR / macro-F1 / accuracy, a confusion matrix, multi-task with dimensional
targets, class weights and class maps (IEMOCAP's 4 classes)."""

import csv
import json

import numpy as np
import pytest
import torch

from headtrain import EvaluateConfig, evaluate, train
from headtrain.metrics import class_metrics
from helpers import quick as quick_base, read_csv, run_cli

# Three classes a listener tells apart: (pitch Hz, syllables/s, brightness 0..1, loudness).
# The feature extractor normalises each utterance's level, so loudness alone would not do.
VOICES = {"calm": (95.0, 2.5, 0.1, 0.15), "happy": (180.0, 4.5, 0.9, 0.45),
          "angry": (290.0, 7.0, 0.5, 0.8)}


def class_corpus(folder, *, utterances=72, seed=0):
    """Synthetic speech whose class sets pitch and loudness; an `activation` label follows
    loudness. Splits 60/20/20 by position."""
    import soundfile as sf

    from cachegen.testing import synth_utterance

    rng = np.random.default_rng(seed)
    (folder / "wav").mkdir(parents=True)
    rows = []
    names = list(VOICES)
    for i in range(utterances):
        emotion = names[i % 3]
        pitch, rate, brightness, loudness = VOICES[emotion]
        audio = synth_utterance(rng, seconds=rng.uniform(0.6, 1.2), sample_rate=16000,
                                pitch=pitch * rng.uniform(0.92, 1.08), rate=rate * rng.uniform(0.9, 1.1),
                                loudness=loudness * rng.uniform(0.8, 1.2),
                                brightness=float(np.clip(brightness + rng.normal(0, 0.05), 0, 1)))
        sf.write(folder / "wav" / f"u{i:03d}.wav", audio, 16000, subtype="PCM_16")
        split = "train" if i % 10 < 6 else ("dev" if i % 10 < 8 else "test")
        rows.append({"id": f"u{i:03d}", "path": f"wav/u{i:03d}.wav", "split": split,
                     "session": str(1 + i % 4), "emotion": emotion,
                     "activation": round(1 + 6 * loudness + rng.normal(0, 0.3), 3)})
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "manifest.csv", rows


@pytest.fixture(scope="module")
def class_store(tiny_model, tmp_path_factory):
    from cachegen.build import BuildConfig, build_cache

    folder = tmp_path_factory.mktemp("classes")
    manifest, rows = class_corpus(folder)
    store = folder / "store.zarr"
    build_cache(BuildConfig(manifest=str(manifest), out=str(store), model=tiny_model, layers=2,
                            dtype="float32", progress=False))
    return str(store), rows


def quick(**overrides):
    return quick_base(**{"top_layers": 1, "batch_size": 6, "seed": 0, "lr": 5e-5, **overrides})


def test_uar_macro_f1_and_accuracy_equal_hand_computed_values():
    # confusion (rows true a, b, c; columns predicted): a [2 1 0], b [0 1 1], c [0 0 1]
    true = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 2, 2])
    m = class_metrics(pred, true, ("a", "b", "c"))
    # recalls 2/3, 1/2, 1/1; precisions 1, 1/2, 1/2; F1 0.8, 0.5, 2/3
    assert m["uar"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # a class never true but predicted counts in macro-F1 (F1 0), not in UAR
    m = class_metrics(np.array([0, 1]), np.array([0, 0]), ("a", "b"))
    assert m["uar"] == pytest.approx(0.5) and m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    # a class in neither counts in neither
    m = class_metrics(np.array([0, 1]), np.array([0, 1]), ("a", "b", "c"))
    assert m["uar"] == 1.0 and m["macro_f1"] == 1.0


def test_a_learnable_class_task_reaches_uar_0_6(class_store, tmp_path):
    store, rows = class_store
    result = train(quick(out=str(tmp_path / "run"), from_cache=store, targets=("emotion",),
                         top_layers=2, epochs=4, lr=1e-3, head_lr=1e-2))
    dev = result.best_dev["emotion"]
    assert dev["uar"] > 0.6  # chance is 1/3; a tiny random-init model, 43 training utterances
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["model_spec"]["classes"] == {"emotion": ["angry", "calm", "happy"]}  # sorted: train's classes
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert result.best_epoch == 1 + int(np.argmax([r["dev_score"] for r in log]))
    assert all(r["dev_score"] == r["dev"]["emotion"]["uar"] for r in log)

    metrics = evaluate(EvaluateConfig(run=str(tmp_path / "run"), out=str(tmp_path / "test"),
                                      from_cache=store, split="test"))
    written = read_csv(tmp_path / "test" / "predictions.csv")
    truth = {r["id"]: r["emotion"] for r in rows if r["split"] == "test"}
    assert {r["id"]: r["emotion"] for r in written} == truth
    # recount from the CSV, independently of the metrics code
    classes = sorted(VOICES)
    recalls = [np.mean([r["emotion_pred"] == c for r in written if r["emotion"] == c]) for c in classes]
    assert metrics["emotion"]["uar"] == pytest.approx(np.mean(recalls))
    assert metrics["emotion"]["accuracy"] == pytest.approx(
        np.mean([r["emotion"] == r["emotion_pred"] for r in written]))
    assert (tmp_path / "test" / "confusion_emotion.png").stat().st_size > 0
    assert not (tmp_path / "test" / "scatter.png").exists()  # nothing dimensional to scatter


def test_dimensional_and_categorical_train_one_multitask_head(class_store, tmp_path):
    store, rows = class_store
    result = run_cli("train", "--from-cache", store, "--out", tmp_path / "mt", "--targets",
                     "activation,emotion", "--loss-weights", "1,0.5", "--class-weights", "balanced",
                     "--epochs", 2, "--batch-size", 6, "--top-layers", 1, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "CCC activation" in result.output and "UAR emotion" in result.output
    info = json.loads((tmp_path / "mt" / "config.json").read_text())
    assert info["config"]["loss_weights"] == [1.0, 0.5]
    from safetensors.torch import load_file
    head = load_file(str(tmp_path / "mt" / "model.safetensors"))
    assert head["head.out.weight"].shape[0] == 1 + 3  # one output for activation, three logits
    best = json.loads((tmp_path / "mt" / "metrics.json").read_text())["dev"]
    assert set(best["activation"]) >= {"ccc", "pearson", "mse"}
    assert set(best["emotion"]) >= {"uar", "macro_f1", "accuracy", "confusion"}

    result = run_cli("evaluate", tmp_path / "mt", "--from-cache", store, "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert "emotion: UAR" in result.output and "activation: CCC" in result.output
    written = read_csv(tmp_path / "e" / "predictions.csv")
    assert set(written[0]) == {"id", "split", "activation", "activation_pred", "emotion", "emotion_pred"}
    assert {r["emotion_pred"] for r in written} <= set(VOICES)
    assert (tmp_path / "e" / "scatter.png").exists() and (tmp_path / "e" / "confusion_emotion.png").exists()


def test_multitask_loss_is_the_weighted_mean_of_ccc_and_cross_entropy():
    from headtrain.metrics import ccc_loss
    from headtrain.targets import Target, multitask_loss

    targets = [Target("activation"), Target("emotion", classes=("a", "b", "c"))]
    torch.manual_seed(0)
    pred = torch.randn(8, 4)
    true = torch.stack([torch.randn(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0.])], 1)
    weights = np.array([0.5, 1.0, 2.0])
    loss = multitask_loss(targets, dimensional=ccc_loss, weights=[1.0, 3.0],
                          class_weights={"emotion": weights})(pred, true)
    logp = torch.log_softmax(pred[:, 1:], 1)
    labels = true[:, 1].long()
    w = torch.tensor(weights, dtype=torch.float32)[labels]
    cross_entropy = -(w * logp[torch.arange(8), labels]).sum() / w.sum()
    assert loss.item() == pytest.approx((ccc_loss(pred[:, :1], true[:, :1]).item()
                                         + 3 * cross_entropy.item()) / 4, rel=1e-5)


def test_balanced_class_weights_are_inverse_frequency():
    from headtrain.targets import Target, class_weights

    weights = class_weights(Target("emotion", classes=("a", "b", "c")), np.array([0] * 6 + [1] * 2 + [2] * 2))
    assert weights == pytest.approx([10 / (3 * 6), 10 / (3 * 2), 10 / (3 * 2)])


def test_iemocap4_counts_excited_as_happy_and_leaves_other_classes_out(class_store, tmp_path):
    store, rows = class_store
    relabel = {"calm": "neutral", "angry": "angry"}
    labels = []
    for i, r in enumerate(rows):
        emotion = relabel.get(r["emotion"]) or ("excited" if i % 2 else "happy")
        if i % 9 == 0:
            emotion = "frustrated"  # not one of the four
        if i % 13 == 0:
            emotion = "sad"
        labels.append({"id": r["id"], "split": r["split"], "emotion": emotion})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "split", "emotion"])
        writer.writeheader()
        writer.writerows(labels)
    result = run_cli("train", "--from-cache", store, "--labels", tmp_path / "labels.csv", "--out",
                     tmp_path / "r", "--targets", "emotion", "--classes", "iemocap4", "--epochs", 1,
                     "--batch-size", 6, "--top-layers", 1, "--no-progress")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert info["model_spec"]["classes"] == {"emotion": ["neutral", "happy", "angry", "sad"]}
    kept = [r for r in labels if r["emotion"] != "frustrated"]
    assert info["train_utterances"] == sum(r["split"] == "train" for r in kept)
    result = run_cli("evaluate", tmp_path / "r", "--from-cache", store, "--labels", tmp_path / "labels.csv",
                     "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    written = {r["id"]: r["emotion"] for r in read_csv(tmp_path / "e" / "predictions.csv")}
    expected = {r["id"]: ("happy" if r["emotion"] == "excited" else r["emotion"])
                for r in kept if r["split"] == "test"}
    assert written == expected


@pytest.mark.parametrize("args,message", [
    (["--targets", "activation,emotion", "--loss-weights", "1"],
     "--loss-weights 1: give one weight per target (2 targets)"),
    (["--targets", "emotion", "--loss-weights", "-1"], "--loss-weights -1"),
    (["--targets", "emotion", "--classes", "happy"], "at least two classes"),
    (["--targets", "activation", "--classes", "iemocap4"], "--classes needs one categorical target"),
    (["--targets", "emotion", "--class-weights", "balanced", "--classes", "calm,happy,angry,sad"],
     "class(es) sad of 'emotion' have no training rows"),
    (["--targets", "split"], "--targets split: id, path and split are not labels"),
])
def test_bad_categorical_options_are_refused_in_one_line(args, message, class_store, tmp_path):
    store, _ = class_store
    result = run_cli("train", "--from-cache", store, "--out", tmp_path / "r", "--epochs", 1,
                     "--top-layers", 1, *args)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output + result.stderr
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_a_dev_class_unseen_in_training_is_named(class_store, tmp_path):
    store, rows = class_store
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "split", "emotion"])
        for r in rows:
            odd = r["split"] == "dev" and r["id"] == "u006"
            writer.writerow([r["id"], r["split"], "bored" if odd else r["emotion"]])
    result = run_cli("train", "--from-cache", store, "--labels", tmp_path / "labels.csv", "--out",
                     tmp_path / "r", "--targets", "emotion", "--epochs", 1, "--top-layers", 1)
    assert result.exit_code == 1
    assert "'emotion' is not one of the classes angry, calm, happy for 1 row(s): u006=bored" in result.stderr


def write_labels(path, rows, emotion):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "split", "emotion"])
        for r in rows:
            writer.writerow([r["id"], r["split"], emotion(r)])


def test_a_blank_class_is_named_by_row(class_store, tmp_path):
    store, rows = class_store
    write_labels(tmp_path / "labels.csv", rows, lambda r: "" if r["id"] == "u001" else r["emotion"])
    result = run_cli("train", "--from-cache", store, "--labels", tmp_path / "labels.csv", "--out",
                     tmp_path / "r", "--targets", "emotion", "--epochs", 1, "--top-layers", 1)
    assert result.exit_code == 1
    error, = [line for line in result.stderr.splitlines() if line.startswith("ser: error:")]
    assert error.endswith("labels.csv: 'emotion' is blank for 1 row(s): u001")


@pytest.mark.parametrize("args,message", [
    (["--loss-weights", "nan,1"], "--loss-weights nan,1: weights must be finite"),
    (["--loss-weights", "0,0"], "not all 0"),
    (["--loss-weights", "1,x"], "expected numbers such as 1,0.5"),
    (["--class-weights", "inverse"], "'inverse' is not one of 'none', 'balanced'"),
])
def test_bad_weights_are_refused(args, message, class_store, tmp_path):
    store, _ = class_store
    result = run_cli("train", "--from-cache", store, "--out", tmp_path / "r", "--epochs", 1,
                     "--top-layers", 1, "--targets", "activation,emotion", *args)
    assert result.exit_code in (1, 2) and message in result.output + result.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def class_run(class_store, tmp_path_factory):
    store, _ = class_store
    run = tmp_path_factory.mktemp("class_run") / "r"
    train(quick(out=str(run), from_cache=store, targets=("activation", "emotion"),
                classes="calm,happy+angry"))
    return run


@pytest.mark.parametrize("edit,message", [
    (lambda i: i["model_spec"].update(classes={"emotion": ["calm"]}), "model_spec.classes must map"),
    (lambda i: i["model_spec"].update(classes={"valence": ["a", "b"]}), "model_spec.classes must map"),
    (lambda i: i.update(class_map={"calm": "sad"}), "field 'class_map' must map"),
])
def test_an_edited_class_record_is_refused(edit, message, class_run, class_store, tmp_path):
    import shutil

    store, _ = class_store
    run = tmp_path / "r"
    shutil.copytree(class_run, run)
    info = json.loads((run / "config.json").read_text())
    assert info["class_map"] == {"calm": "calm", "happy": "happy", "angry": "happy"}
    edit(info)
    (run / "config.json").write_text(json.dumps(info))
    result = run_cli("evaluate", run, "--from-cache", store, "--out", tmp_path / "e")
    assert result.exit_code == 1
    error, = [line for line in result.stderr.splitlines() if line.startswith("ser: error:")]
    assert message in error and "config.json" in error
