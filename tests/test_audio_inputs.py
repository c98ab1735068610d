"""Audio and manifests as users bring them (checklist item 8 of docs/design.md): every format
and encoding the installed libsndfile decodes reads as libsndfile reads it; what cannot be
cached right (states that are not finite, manifest columns with no text form) is one named
line, never a traceback or a store holding NaN."""

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from cachegen import open_cache
from cachegen.audio import load_audio
from helpers import one_error_line, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tone(rate: int, seconds: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.sin(2 * np.pi * 1330 * t)


# (file name, write options, sample rate, channels)
FILES = [
    ("u8.wav", {"subtype": "PCM_U8"}, 11025, 1),
    ("i24.wav", {"subtype": "PCM_24"}, 32000, 1),
    ("i32.wav", {"subtype": "PCM_32"}, 96000, 1),
    ("f64.wav", {"subtype": "DOUBLE"}, 22050, 1),
    ("six.wav", {"subtype": "FLOAT"}, 48000, 6),
    ("ulaw.wav", {"subtype": "ULAW"}, 8000, 1),
    ("gsm.wav", {"subtype": "GSM610"}, 8000, 1),  # libsndfile cannot seek in it
    ("x.ogg", {}, 44100, 2),
    ("x.mp3", {}, 44100, 1),
    ("flac-named.wav", {"format": "FLAC"}, 16000, 1),  # a wrong extension: the bytes decide
]


@pytest.mark.parametrize("name,options,rate,channels", FILES)
def test_every_decodable_format_reads_as_libsndfile_reads_it(name, options, rate, channels, tmp_path):
    if name.endswith(".mp3") and "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile decodes no MP3")
    signal = np.stack([tone(rate) * (c + 1) / channels for c in range(channels)], axis=1)
    path = tmp_path / name
    sf.write(path, signal, rate, **options)
    expected, source_rate = sf.read(path, dtype="float32", always_2d=True)  # soundfile alone
    expected = soxr.resample(expected.mean(axis=1), source_rate, 16000, quality="HQ")
    samples, got_rate, _ = load_audio(str(path))
    assert got_rate == rate and samples.dtype == np.float32
    np.testing.assert_array_equal(samples, expected.astype(np.float32))


def without_normalisation(model_dir: str, tmp_path) -> str:
    """A copy of `model_dir` whose feature extractor does not normalise (as hubert-base's)."""
    copy = tmp_path / "raw-model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").write_text(json.dumps({**config, "do_normalize": False}))
    return str(copy)


def test_states_that_are_not_finite_are_skipped_and_named(tiny_model, tmp_path):
    """Float audio far outside [-1, 1]: normalised, it is cached like any other; past float32's
    sums it is named before the model runs; without normalisation the model's states overflow,
    and that utterance is skipped and named, never cached as NaN that verify would pass."""
    sf.write(tmp_path / "ok.wav", tone(16000), 16000)
    sf.write(tmp_path / "loud.wav", tone(16000) * 1000, 16000, subtype="FLOAT")
    sf.write(tmp_path / "huge.wav", tone(16000) * 3e38, 16000, subtype="FLOAT")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nok,ok.wav\nloud,loud.wav\nhuge,huge.wav\n")

    normalised = run_cli("cache", "build", manifest, "--model", tiny_model, "--layers", 2,
                         "--out", tmp_path / "n.zarr", "--no-progress")
    assert normalised.exit_code == 1 and "RuntimeWarning" not in normalised.stderr
    assert "skipped huge: " in normalised.stderr and "too large to normalise" in normalised.stderr
    assert sorted(open_cache(tmp_path / "n.zarr").ids) == ["loud", "ok"]

    raw = run_cli("cache", "build", manifest, "--model", without_normalisation(tiny_model, tmp_path),
                  "--layers", 2, "--out", tmp_path / "r.zarr", "--no-progress")
    assert raw.exit_code == 1, raw.output
    assert "skipped huge: " in raw.stderr and "NaN or Inf" in raw.stderr
    reader = open_cache(tmp_path / "r.zarr")
    assert sorted(reader.ids) == ["loud", "ok"]
    assert [f["id"] for f in reader.meta["failures"]] == ["huge"]
    assert all(np.isfinite(reader[uid]).all() for uid in reader.ids)


@pytest.mark.parametrize("column,values,expected", [
    ("tags", pa.array([[1, 2]]), "column 'tags' holds list"),
    ("where", pa.array([{"x": 1}]), "column 'where' holds struct"),
    ("id", pa.array([b"\xff"], pa.binary()), "column 'id' cannot be read as text"),
])
def test_parquet_column_without_a_text_form_is_one_line(column, values, expected, tiny_model, tmp_path):
    sf.write(tmp_path / "a.wav", tone(16000), 16000)
    columns = {"id": pa.array(["a"]), "path": pa.array(["a.wav"]), column: values}
    pq.write_table(pa.table(columns), tmp_path / "m.parquet")
    result = run_cli("cache", "build", tmp_path / "m.parquet", "--model", tiny_model,
                     "--out", tmp_path / "s.zarr")
    one_error_line(result, "m.parquet", expected)
    assert not (tmp_path / "s.zarr").exists()


def test_a_folder_named_like_audio_is_named_as_a_folder(tiny_model, tmp_path):
    (tmp_path / "x.wav").mkdir()
    (tmp_path / "m.csv").write_text("id,path\nx,x.wav\n")
    result = run_cli("cache", "build", tmp_path / "m.csv", "--model", tiny_model, "--out", tmp_path / "s.zarr")
    one_error_line(result, "row 2: x.wav is a folder")


def test_verify_names_states_that_are_not_finite(tiny_model, tmp_path, monkeypatch):
    """A store whose NaN states match their checksums (written by a build that did not check
    them): verify names the utterance, --repair forgets it, and the same build then skips and
    names it instead of caching it again."""
    import cachegen.build as build

    sf.write(tmp_path / "ok.wav", tone(16000), 16000)
    sf.write(tmp_path / "huge.wav", tone(16000) * 3e38, 16000, subtype="FLOAT")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nok,ok.wav\nhuge,huge.wav\n")
    model = without_normalisation(tiny_model, tmp_path)
    args = ["cache", "build", manifest, "--model", model, "--layers", 2, "--out", tmp_path / "s.zarr",
            "--no-progress"]
    with monkeypatch.context() as patch:
        patch.setattr(build, "finite_only", lambda states, stats, good, *rest: (states, stats, good))
        assert run_cli(*args).exit_code == 0
    assert not np.isfinite(open_cache(tmp_path / "s.zarr")["huge"]).all()
    verify = run_cli("cache", "verify", tmp_path / "s.zarr")
    assert verify.exit_code == 1 and "'huge' holds NaN or Inf values" in verify.stderr
    assert run_cli("cache", "verify", tmp_path / "s.zarr", "--repair").exit_code == 0
    assert open_cache(tmp_path / "s.zarr").ids == ["ok"]
    rebuilt = run_cli(*args)
    assert rebuilt.exit_code == 1 and "skipped huge: " in rebuilt.stderr
    assert run_cli("cache", "verify", tmp_path / "s.zarr").exit_code == 0


def test_a_large_file_that_is_not_audio_is_refused_unread(tmp_path, monkeypatch):
    """A manifest row pointing at a video or an archive must not make the build hold the whole
    file in memory before saying it is not audio."""
    import tracemalloc

    import cachegen.audio as audio
    from cachegen.errors import AudioError

    monkeypatch.setattr(audio, "HEADER_FIRST_BYTES", 4096)
    video = tmp_path / "talk.wav"  # named like audio, as a folder recipe would pick it up
    with open(video, "wb") as f:
        f.write(b"\x00\x00\x00\x20ftypisom" + bytes(range(256)) * 64)
        f.truncate(24 * 2**20)
    wav = tmp_path / "real.wav"
    sf.write(wav, tone(16000, 1.0), 16000, subtype="PCM_24")  # larger than the threshold too
    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match=f"{video}: cannot decode"):
            load_audio(str(video))
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
    samples, rate, digest = load_audio(str(wav))
    assert rate == 16000 and np.allclose(samples, sf.read(wav, dtype="float32")[0], atol=0)
    assert digest == hashlib.sha256(wav.read_bytes()).hexdigest()
