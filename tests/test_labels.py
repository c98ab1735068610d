"""Labels tables users bring to `ser train --labels` and `ser evaluate --labels`: each trains
correctly or is refused in one line naming the file and the row, column or value."""

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import one_error_line, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ["--top-layers", 1, "--epochs", 1, "--batch-size", 4, "--workers", 1, "--no-progress"]


@pytest.fixture(scope="module")
def rows(built_store):
    from cachegen import open_cache

    table = open_cache(built_store).table
    return table.select(["id", "split", "activation", "valence"]).to_pylist()


def write(path, rows, columns=("id", "split", "activation", "valence")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def changed(rows, **values):
    """`rows` with the columns in `values` set to f(row) for every row."""
    return [{**r, **{k: f(r) for k, f in values.items()}} for r in rows]


def first_of(split):
    return lambda rows: next(r for r in rows if r["split"] == split)


def train_on(store, labels, out):
    return run_cli("train", "--from-cache", store, "--labels", labels, "--targets", "activation,valence",
                   *QUICK, "--out", out)


@pytest.mark.parametrize("case,parts", [
    ("decimal comma", ["'valence'", "decimal comma", "e.g. '"]),  # was read as a class column
    ("header only", ["has a header but no rows"]),
    ("blank column", ["valence are blank in every row"]),
    ("train id in test", ["duplicate id(s) utt0000 (train, test)"]),  # a training utterance tested
    ("blank id", ["1 row(s) with a blank id"]),  # was a TypeError traceback
    ("one dev utterance", ["'dev' split", "CCC is 0 whatever the model predicts"]),
    ("constant train", ["'activation' is 4 for every one of the", "'train' split", "nothing to learn"]),
    ("spaces around ids", ["not in the store: 'utt0000 '"]),
])
def test_a_labels_table_that_cannot_train_correctly_is_refused_in_one_line(case, parts, rows, built_store,
                                                                          tmp_path):
    labels = tmp_path / "labels.csv"
    dev = [r for r in rows if r["split"] == "dev"]
    write(labels, {
        "decimal comma": changed(rows, valence=lambda r: f"{r['valence']:.3f}".replace(".", ",")),
        "header only": [],
        "blank column": changed(rows, valence=lambda r: ""),
        "train id in test": rows + [{**rows[0], "split": "test"}],
        "blank id": rows + [{**rows[1], "id": ""}],
        "one dev utterance": [r for r in rows if r["split"] != "dev"] + dev[:1],
        "constant train": changed(rows, activation=lambda r: 4 if r["split"] == "train" else r["activation"]),
        "spaces around ids": changed(rows, id=lambda r: r["id"] + " "),
    }[case])
    assert rows[0]["split"] == "train" and len(dev) > 1  # the premises
    one_error_line(train_on(built_store, labels, tmp_path / "r"), str(labels), *parts)
    assert not (tmp_path / "r").exists()


def test_a_nested_parquet_column_is_named(rows, built_store, tmp_path):
    labels = tmp_path / "labels.parquet"
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.append_column("tags", pa.array([[1, 2]] * table.num_rows)), labels)
    one_error_line(train_on(built_store, labels, tmp_path / "r"), str(labels), "'tags'", "drop that column")


def test_bom_crlf_quotes_extra_columns_and_other_scales_train_like_the_plain_table(rows, built_store,
                                                                                   tmp_path):
    """A table written by Excel (byte order mark, CRLF, every field quoted, an extra column with a
    comma in it) and labels on a 0..1 scale train the same network as the plain 1..7 table:
    labels are standardised with the training split's mean and std."""
    import json

    plain = write(tmp_path / "plain.csv", rows)
    excel = tmp_path / "excel.csv"
    lines = ['"id","split","activation","valence","note"'] + [
        f'"{r["id"]}","{r["split"]}","{(r["activation"] - 1) / 6!r}","{r["valence"]!r}","a, b"' for r in rows]
    excel.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    for name, labels in (("plain", plain), ("excel", excel)):
        assert train_on(built_store, labels, tmp_path / name).exit_code == 0
    scores = [json.loads((tmp_path / name / "metrics.json").read_text())["dev"] for name in ("plain", "excel")]
    for target in ("activation", "valence"):
        assert scores[0][target]["ccc"] == pytest.approx(scores[1][target]["ccc"], abs=1e-5)


def test_evaluate_refuses_a_training_utterance_in_the_test_split_and_warns_on_one_utterance(
        rows, built_store, tmp_path):
    labels = write(tmp_path / "labels.csv", rows)
    assert train_on(built_store, labels, tmp_path / "r").exit_code == 0
    leaked = write(tmp_path / "leaked.csv", rows + [{**rows[0], "split": "test"}])
    result = run_cli("evaluate", tmp_path / "r", "--from-cache", built_store, "--labels", leaked,
                     "--split", "test", "--out", tmp_path / "e")
    one_error_line(result, str(leaked), "duplicate id(s) utt0000 (train, test)")
    one = write(tmp_path / "one.csv", [r for r in rows if r["split"] != "test"] +
                [next(r for r in rows if r["split"] == "test")])
    result = run_cli("evaluate", tmp_path / "r", "--from-cache", built_store, "--labels", one,
                     "--split", "test", "--out", tmp_path / "e")
    assert result.exit_code == 0
    assert "'activation' is" in result.stderr and "CCC and Pearson are 0 whatever the predictions" in result.stderr
