"""Library code leaves the process as it found it: no warning filters added, no logging level
or progress-bar setting changed, no umask touched, no matplotlib backend chosen."""

import os
import stat
import sys
import warnings

import numpy as np


def test_building_loading_reading_and_plotting_change_no_process_settings(tiny_model, corpus, tmp_path):
    from transformers.utils import logging as hf_logging

    from cachegen import open_cache
    from cachegen.build import BuildConfig, build_cache
    from cachegen.encoder import load_model
    from headtrain.plots import plot_curves, plot_scatter

    filters, level = list(warnings.filters), hf_logging.get_verbosity()
    bars, had_pyplot = hf_logging.is_progress_bar_enabled(), "matplotlib.pyplot" in sys.modules
    load_model(tiny_model)
    build_cache(BuildConfig(manifest=corpus, out=str(tmp_path / "s.zarr"), model=tiny_model, layers=1,
                            dtype="float32", batch_size=8, progress=False))
    reader = open_cache(tmp_path / "s.zarr")
    assert reader[reader.ids[0]].shape[1] == 32
    plot_scatter(np.ones((3, 1)), np.arange(3.0)[:, None], ["activation"], {"activation": {"ccc": 0.5}},
                 str(tmp_path / "s.png"), split="test")
    plot_curves([{"epoch": 1, "train_loss": 1.0, "dev": {"activation": {"ccc": 0.1}}, "dev_mean_ccc": 0.1}],
                str(tmp_path / "c.png"))
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG" == (tmp_path / "c.png").read_bytes()[:4]
    assert warnings.filters == filters
    assert hf_logging.get_verbosity() == level and hf_logging.is_progress_bar_enabled() == bars
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_atomic_writes_follow_the_umask_of_the_moment(tmp_path):
    from cachegen.store import write_atomic

    previous = os.umask(0o027)  # set after cachegen.store was imported: must still apply
    try:
        write_atomic(tmp_path / "a", b"x")
        assert os.umask(0o027) == 0o027  # reading it did not change it
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640
