"""Long utterances among short ones: batches are planned by padded audio (a long file runs
alone), audio past --max-seconds is skipped and named, and a batch that runs out of memory is
retried one utterance at a time; the rest is cached either way (reliability item 18)."""

import numpy as np
import pytest
import soundfile as sf

from cachegen import open_cache
from cachegen.build import SECONDS_PER_SLOT, batches_in_order
from cachegen.manifest import Utterance
from cachegen.testing import synth_corpus
from helpers import run_cli


def test_batches_are_planned_by_padded_audio():
    lengths = {f"s{i}": 1.0 + i / 10 for i in range(10)} | {"mid": 45.0, "long": 600.0, "huge": 3600.0}
    utterances = [Utterance(id=uid, path=f"{uid}.wav", row=i) for i, uid in enumerate(lengths)]
    batches = batches_in_order(utterances, lengths, 4)
    assert sorted(u.id for b in batches for u in b) == sorted(lengths)  # nothing lost
    for batch in batches:
        longest = max(lengths[u.id] for u in batch)
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * longest <= 4 * SECONDS_PER_SLOT
    alone = {b[0].id for b in batches if len(b) == 1}
    assert {"long", "huge"} <= alone
    assert [len(b) for b in batches if b[0].id.startswith("s")][:2] == [4, 4]  # short ones: full batches


@pytest.fixture
def mixed(tmp_path):
    manifest = synth_corpus(tmp_path / "c", utterances=6, seconds=(0.5, 0.9))
    rng = np.random.default_rng(1)
    for uid, seconds in (("long", 45), ("huge", 130)):
        sf.write(tmp_path / "c" / "wav" / f"{uid}.wav",
                 (0.2 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000,
                 subtype="PCM_16")
    manifest.write_text(manifest.read_text() + "long,wav/long.wav,train,spk0,3,3,3\n"
                        "huge,wav/huge.wav,train,spk1,3,3,3\n")
    return manifest


def test_audio_past_max_seconds_is_skipped_and_named(tiny_model, mixed, tmp_path):
    out = tmp_path / "s.zarr"
    result = run_cli("cache", "build", mixed, "--model", tiny_model, "--layers", 1, "--out", out,
                     "--batch-size", 4, "--max-seconds", 60, "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
    assert "skipped huge:" in result.stderr and "--max-seconds 60" in result.stderr
    reader = open_cache(out)
    assert sorted(reader.ids) == sorted([f"utt{i:04d}" for i in range(6)] + ["long"])
    assert reader.frames("long") == pytest.approx(45 * 50, abs=2)
    assert [f["id"] for f in reader.meta["failures"]] == ["huge"]
    result = run_cli("cache", "build", mixed, "--model", tiny_model, "--layers", 1, "--out", out,
                     "--batch-size", 4, "--max-seconds", 0, "--no-progress")  # no limit: cached too
    assert result.exit_code == 0 and "Cached 1 utterances" in result.output
    assert open_cache(out).frames("huge") == pytest.approx(130 * 50, abs=2)


def test_batch_out_of_memory_is_retried_one_by_one(tiny_model, mixed, tmp_path, monkeypatch):
    from cachegen.encoder import LowerStack

    real_call = LowerStack.__call__

    def limited(self, waveforms):  # a device that holds 40 s of padded audio at once
        if len(waveforms) * max(len(w) for w in waveforms) > 40 * 16000:
            raise RuntimeError("CUDA out of memory. Tried to allocate 14.00 GiB")
        return real_call(self, waveforms)

    monkeypatch.setattr(LowerStack, "__call__", limited)
    out = tmp_path / "s.zarr"
    result = run_cli("cache", "build", mixed, "--model", tiny_model, "--layers", 1, "--out", out,
                     "--batch-size", 8, "--max-seconds", 0, "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
    assert "skipped long: " in result.stderr and "out of memory" in result.stderr
    assert "skipped huge: " in result.stderr
    assert sorted(open_cache(out).ids) == [f"utt{i:04d}" for i in range(6)]
