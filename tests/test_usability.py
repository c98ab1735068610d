"""What users expect of any tool (issue 16): --version, --threads, versions in a run, HTTP after
a plain install, evaluate naming a store's splits, plots that show the best epoch, n and split."""

import json
from importlib.metadata import requires, version

import numpy as np
import pytest
import torch

from helpers import run_cli


@pytest.fixture(scope="module")
def short_run(built_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "short"
    threads = torch.get_num_threads()
    result = run_cli("train", "--from-cache", built_store, "--out", out, "--epochs", 3,
                     "--top-layers", 1, "--targets", "activation,valence", "--batch-size", 4,
                     "--no-progress", "--threads", 1)
    torch.set_num_threads(threads)  # --threads is process-wide: later tests keep the default
    assert result.exit_code == 0, result.output
    return out


def test_version_prints_the_installed_version():
    result = run_cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"ser {version('ser')}"


def test_threads_sets_torch_threads_and_rejects_zero(short_run, built_store, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = run_cli("evaluate", short_run, "--from-cache", built_store, "--out", tmp_path / "e",
                         "--threads", 1)
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    result = run_cli("evaluate", short_run, "--from-cache", built_store, "--out", tmp_path / "e",
                     "--threads", 0)
    assert result.exit_code == 2 and "--threads" in result.output


def test_run_records_library_versions(short_run):
    import transformers
    import zarr

    info = json.loads((short_run / "config.json").read_text())
    assert info["versions"]["ser"] == version("ser")
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["transformers"] == transformers.__version__
    assert info["versions"]["zarr"] == zarr.__version__


def test_http_reading_needs_no_extra():
    """A plain `pip install ser` brings fsspec's HTTP backend (README's install has no extra)."""
    plain = [r for r in requires("ser") if "extra ==" not in r]
    assert any(r.startswith("aiohttp") for r in plain)
    assert any(r.startswith("fsspec") for r in plain)


def test_evaluate_on_a_missing_split_names_the_splits_the_store_has(short_run, built_store, tmp_path):
    result = run_cli("evaluate", short_run, "--from-cache", built_store, "--split", "test1",
                     "--out", tmp_path / "e")
    assert result.exit_code == 1
    assert "split 'test1' has no rows (splits found: dev, test, train)" in result.stderr
    assert not (tmp_path / "e" / "metrics.json").exists()
    result = run_cli("evaluate", short_run, "--from-cache", built_store, "--split", "dev",
                     "--out", tmp_path / "dev")
    assert result.exit_code == 0, result.output
    assert {r for r in (tmp_path / "dev" / "predictions.csv").read_text().split()[1:]
            if r.split(",")[1] != "dev"} == set()


def test_curves_mark_the_best_epoch_with_integer_ticks(short_run):
    from headtrain.plots import curves_figure

    history = [json.loads(line) for line in open(short_run / "log.jsonl")]
    best = json.loads((short_run / "metrics.json").read_text())["best_epoch"]
    assert (short_run / "curves.png").stat().st_size > 0
    fig = curves_figure(history)  # the best epoch read from the history
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        marks = [line for line in ax.get_lines() if line.get_label() == f"best epoch {best}"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [best, best]


def test_scatter_names_split_and_count():
    from headtrain.plots import scatter_figure

    rng = np.random.default_rng(0)
    true = rng.uniform(1, 7, (37, 2))
    metrics = {"activation": {"ccc": 0.5}, "valence": {"ccc": 0.25}}
    fig = scatter_figure(true + 0.1, true, ["activation", "valence"], metrics, split="test1")
    assert fig._suptitle.get_text() == "split 'test1', n = 37"
    assert [ax.get_title() for ax in fig.axes] == ["activation: CCC 0.500", "valence: CCC 0.250"]
