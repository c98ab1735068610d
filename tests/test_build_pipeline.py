"""The build's pipeline: decoding ahead on threads, storing on a thread of its own behind a
bounded queue, shard files written without zarr's pipeline but byte for byte as zarr writes
them, and resumption after a kill at each hand-over between the stages."""

import io
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cachegen import open_cache
from cachegen.build import BuildConfig, WriteStage, build_cache, normalise
from cachegen.store import FORMAT, FORMAT_VERSION, StoreWriter, committed_count
from cachegen.testing import synth_corpus
from helpers import run_cli


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def write_store(path: Path, utterances: dict, *, dtype: str, through_zarr: bool) -> dict:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype, "hidden_size": 8,
            "chunk_frames": 4, "shard_frames": 16, "layers": 1, "frame_rate": 50.0,
            "compression": "none", "checksum": "crc32c", "model_id": "m", "model_sha256": "0" * 64,
            "model_type": "wav2vec2", "num_hidden_layers": 2, "sample_rate": 16000}
    writer = StoreWriter(path, meta)
    assert writer.plain  # the layout ser writes itself
    writer.plain = not through_zarr
    for uid, values in utterances.items():
        writer.add({"id": uid, "seconds": 1.0, "source_rate": 16000, "audio_sha256": ""}, values)
    writer.flush()
    writer.wait()
    states = {p: b for p, b in tree(path).items() if p.startswith("states/c/")}
    writer.finalize(table=None, extra_meta={"complete": True})
    writer.close()
    return states


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8", "bfloat16"])
def test_shard_files_are_byte_for_byte_what_zarr_writes(dtype, tmp_path):
    """Zarr's own sharding codec is the reference: every shard file, including inner chunks of
    zeros (left out), -0.0 (kept: zarr compares bit patterns), a shard holding only zeros (no
    file) and an utterance longer than a shard."""
    numpy_dtype = {"bfloat16": np.uint16}.get(dtype, np.int8 if dtype == "int8" else dtype)
    rng = np.random.default_rng(0)
    width = 8 + (4 if dtype == "int8" else 0)
    values = lambda n: (rng.standard_normal((n, width)) * 50).astype(numpy_dtype)  # noqa: E731
    utterances = {"a": values(7), "zeros-chunk": np.concatenate([values(3), np.zeros((6, width), numpy_dtype),
                                                                  values(2)]),
                  "all-zero": np.zeros((14, width), numpy_dtype), "long": values(37), "b": values(4)}
    if dtype in ("float16", "float32"):
        utterances["minus-zero"] = np.full((4, width), -0.0, numpy_dtype)
    ours = write_store(tmp_path / "ours", utterances, dtype=dtype, through_zarr=False)
    zarrs = write_store(tmp_path / "zarr", utterances, dtype=dtype, through_zarr=True)
    assert ours == zarrs and len(ours) >= 4
    with open_cache(tmp_path / "ours") as reader:
        for uid, stored in utterances.items():
            assert np.array_equal(reader.read_raw(uid), stored)


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("do_normalize", [True, False])
def test_normalise_equals_the_feature_extractor(mask, do_normalize):
    """Bit for bit, over lengths from one sample up and levels from near silence to far
    beyond [-1, 1], with and without an offset, and 16-bit quantised samples."""
    from transformers import Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=mask)
    rng = np.random.default_rng(1)
    for n in (1, 2, 401, 23456, 160001):
        for scale, offset in ((1e-4, 0.0), (0.2, 0.05), (1.0, -0.3), (300.0, 7.0)):
            samples = (rng.standard_normal(n) * scale + offset).astype(np.float32)
            if scale == 1.0:
                samples = np.rint(samples.clip(-1, 1) * 32767) / np.float32(32768)
            expected = extractor(samples, sampling_rate=16000, return_tensors="np").input_values[0]
            got = normalise(extractor, samples)
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), (n, scale)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("cut", [0, 7])
def test_16_bit_wav_decodes_to_libsndfiles_own_floats(channels, cut, tmp_path):
    """Through the fast path, and (a data chunk cut short) through libsndfile."""
    from cachegen.audio import load_audio, plain_pcm16_wav

    pcm = np.random.default_rng(2).integers(-2**15, 2**15, size=(8000, channels)).astype(np.int16)
    pcm[:2] = [[-2**15] * channels, [2**15 - 1] * channels]  # the extremes
    path = tmp_path / "x.wav"
    sf.write(path, pcm, 16000, subtype="PCM_16")
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    assert (plain_pcm16_wav(path.read_bytes()) is None) == bool(cut)
    reference = sf.read(io.BytesIO(path.read_bytes()), dtype="float32", always_2d=True)[0]
    reference = reference.mean(axis=1) if channels > 1 else reference[:, 0]
    samples, rate, _ = load_audio(str(path))
    assert rate == 16000 and samples.tobytes() == np.ascontiguousarray(reference, np.float32).tobytes()


def wav_bytes(pcm: np.ndarray, *, rate: int = 16000, chunks: tuple = ()) -> bytes:
    """A 16-bit PCM WAV file written by hand, with extra `(id, payload)` chunks before the data."""
    import struct

    channels = pcm.shape[1]
    body = b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * 2 * channels, 2 * channels, 16)
    for cid, payload in chunks:
        body += cid + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)
    data = pcm.astype("<i2").tobytes()
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def libsndfile(data: bytes):
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            return f.read(dtype="float32", always_2d=True), f.samplerate
    except Exception:  # libsndfile raises several types for corrupt input
        return None


def test_fast_wav_path_reads_exactly_what_libsndfile_reads_or_leaves_the_file_to_it():
    """`plain_pcm16_wav` takes plain 16-bit PCM WAV (what soundfile and most tools write, with
    LIST/JUNK/fact chunks, odd-sized chunks padded) and leaves everything else to libsndfile.
    Thousands of files with damaged headers (bytes overwritten or bit-flipped in the first 80
    bytes, some cut short): whenever the fast path takes one, libsndfile opens it too and
    reads the same samples at the same rate."""
    from cachegen.audio import plain_pcm16_wav

    rng = np.random.default_rng(0)
    pcm = rng.integers(-2**15, 2**15, size=(999, 2)).astype(np.int16)
    bases = [wav_bytes(pcm[:, :1]), wav_bytes(pcm, rate=44100),
             wav_bytes(pcm[:, :1], chunks=[(b"LIST", b"INFOISFT\3\0\0\0ab\0"), (b"JUNK", b"123"),
                                          (b"fact", b"\xe7\3\0\0")])]
    for subtype, fmt in (("PCM_16", "WAV"), ("PCM_16", "WAVEX"), ("PCM_24", "WAV"), ("FLOAT", "WAV")):
        sink = io.BytesIO()
        sf.write(sink, pcm, 22050, subtype=subtype, format=fmt)
        bases.append(sink.getvalue())
    taken = [plain_pcm16_wav(b) is not None for b in bases]
    assert taken == [True, True, True, True, False, False, False]  # WAVEX/24-bit/float: libsndfile
    assert plain_pcm16_wav(bases[0][:-10]) is None  # a data chunk cut short: libsndfile's rules
    assert plain_pcm16_wav(b"RIFX" + bases[0][4:]) is None
    checked = 0
    for trial in range(2400):
        damaged = bytearray(bases[trial % len(bases)])
        for _ in range(int(rng.integers(1, 4))):
            where = int(rng.integers(0, 80 if rng.random() < 0.7 else 12))
            if rng.random() < 0.5:
                damaged[where] = int(rng.integers(0, 256))
            else:
                damaged[where] ^= 1 << int(rng.integers(0, 8))
        if rng.random() < 0.2:
            damaged = damaged[:int(rng.integers(12, len(damaged)))]
        fast = plain_pcm16_wav(bytes(damaged))
        if fast is None:
            continue
        reference = libsndfile(bytes(damaged))
        assert reference is not None, bytes(damaged[:48]).hex()
        values = np.multiply(fast[0], np.float32(1 / 32768), dtype=np.float32)
        assert fast[1] == reference[1] and values.tobytes() == reference[0].tobytes()
        checked += 1
    assert checked > 200  # the fast path was exercised, not only refused


def test_write_stage_keeps_order_and_raises_a_batch_error_in_the_caller():
    stored = []

    def store_batch(number):
        if number == 5:
            raise OSError("disk gone")
        stored.append(number)

    stage = WriteStage(store_batch, depth=2)
    for number in range(5):
        stage.put(number)
    stage.close()
    assert stored == [0, 1, 2, 3, 4]
    stage = WriteStage(store_batch, depth=2)
    with pytest.raises(OSError, match="disk gone"):
        for number in range(5, 50):  # the error surfaces at a later put (or at close)
            stage.put(number)
        stage.close()
    stage.close(abort=True)
    assert stored == [0, 1, 2, 3, 4]  # nothing after the failed batch is stored


def test_build_holds_a_bounded_number_of_decoded_utterances(tiny_model, tmp_path, monkeypatch):
    """With storing stalled, decoding and the forward go on only until the stage's queue is
    full: at most (decoded ahead + one forward + the queue + the batch being stored) batches
    wait, however long the corpus. Without the bound the stall would see every file decoded."""
    import time

    import cachegen.build as build

    manifest = synth_corpus(tmp_path / "c", utterances=24, seconds=(0.5, 0.6))
    decoded, added, seen = [0], [0], []
    blocked = threading.Event()
    real_decode, real_add, real_put = build.decode, StoreWriter.add, WriteStage.put

    def counting_decode(*args, **kwargs):
        decoded[0] += 1
        return real_decode(*args, **kwargs)

    def put(self, *item):
        if self.queue.full():  # the building thread is about to wait for the storing one
            blocked.set()
        return real_put(self, *item)

    def stalled_add(self, *args, **kwargs):
        if added[0] == 0:
            deadline = time.monotonic() + 120  # only a safety net: either event ends the wait
            while not (blocked.is_set() or decoded[0] >= 24) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(decoded[0])
        added[0] += 1
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(build, "decode", counting_decode)
    monkeypatch.setattr(WriteStage, "put", put)
    monkeypatch.setattr(StoreWriter, "add", stalled_add)
    config = BuildConfig(manifest=str(manifest), out=str(tmp_path / "s.zarr"), model=tiny_model,
                         layers=1, batch_size=2, workers=2, progress=False)
    summary = build_cache(config)
    ahead = 2 + config.workers // config.batch_size
    assert summary.cached == 24 and blocked.is_set()
    assert seen[0] <= (ahead + 1 + 2 + 1) * config.batch_size < 24


KILLER = """
import os, sys, torch
torch.set_num_threads(1)
import cachegen.build as build, cachegen.store as store
from cachegen.build import BuildConfig, build_cache
point, count = sys.argv[1], int(sys.argv[2])
calls = [0]
def die_at(n):
    calls[0] += 1
    if calls[0] == n:
        os._exit(9)  # no cleanup, no flush: as a SIGKILL
if point == "add":  # mid-batch, in the storing thread, with a shard maybe being written
    real_add = store.StoreWriter.add
    def add(self, *a, **k):
        die_at(count)
        return real_add(self, *a, **k)
    store.StoreWriter.add = add
else:  # "commit": a shard file written, its commit record not yet
    real_atomic = store.write_atomic
    def write_atomic(path, data):
        if path.parent.name == "_building":
            die_at(count)
        return real_atomic(path, data)
    store.write_atomic = write_atomic
build_cache(BuildConfig(manifest=sys.argv[3], out=sys.argv[4], model=sys.argv[5], layers=2,
                        batch_size=3, shard_frames=64, chunk_frames=32, progress=False))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("pipeline")
    manifest = synth_corpus(folder / "c", utterances=18, seconds=(0.5, 1.3))
    out = folder / "whole.zarr"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process: the same bytes
    try:
        build_cache(BuildConfig(manifest=str(manifest), out=str(out), model=tiny_model, layers=2,
                                batch_size=3, shard_frames=64, chunk_frames=32, progress=False))
    finally:
        torch.set_num_threads(threads)
    with open_cache(out) as reader:
        return manifest, {uid: np.array(reader[uid]) for uid in reader.ids}


@pytest.mark.parametrize("point", ["add", "commit"])
def test_kill_between_stages_loses_nothing_committed_and_resumes_to_the_same_states(
        point, uninterrupted, tiny_model, tmp_path):
    import torch

    manifest, whole = uninterrupted
    out = tmp_path / "killed.zarr"
    done = subprocess.run([sys.executable, "-c", KILLER, point, "7", str(manifest), str(out), tiny_model],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    committed = committed_count(out)
    assert 0 < committed < len(whole)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = build_cache(BuildConfig(manifest=str(manifest), out=str(out), model=tiny_model, layers=2,
                                          batch_size=3, shard_frames=64, chunk_frames=32, progress=False))
    finally:
        torch.set_num_threads(threads)
    assert summary.already == committed and summary.cached == len(whole) - committed
    with open_cache(out) as reader:
        assert sorted(reader.ids) == sorted(whole)
        for uid, states in whole.items():
            assert np.array_equal(reader[uid], states), uid
    assert run_cli("cache", "verify", out).exit_code == 0



@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_states_cast_before_the_host_copy_store_the_same_bytes(dtype, tiny_model):
    """The lower stack casts 16-bit states on the device (half the bytes to copy, nothing to
    convert on the host): the stored values are exactly those of casting float32 on the host."""
    import torch

    from cachegen.encoder import LowerStack, load_model
    from cachegen.pooled import PooledStack
    from cachegen.store import to_storage

    loaded = load_model(tiny_model)
    waves = [np.random.default_rng(n).standard_normal(n).astype(np.float32) for n in (4000, 6100)]
    plain = LowerStack(loaded.model, 2)(waves)
    cast = LowerStack(loaded.model, 2, dtype=dtype)(waves)
    pooled_cast = PooledStack(loaded.model, 2, (1, 2), dtype=dtype)(waves)[0]
    for p, c, pc in zip(plain, cast, pooled_cast):
        assert p.dtype == torch.float32 and c.dtype == pc.dtype == getattr(torch, dtype)
        assert to_storage(c, dtype).tobytes() == to_storage(p, dtype).tobytes() == to_storage(pc, dtype).tobytes()


@pytest.mark.parametrize("cores,processes,expected", [(1, None, 2), (2, None, 2), (6, None, 6), (64, None, 8),
                                                      (16, "4", 4), (16, "16", 2), (16, "junk", 8)])
def test_default_decoding_threads_follow_the_cores(monkeypatch, cores, processes, expected):
    """One decoding thread per usable core (2 to 8), the node's cores shared among the
    processes of a multi-GPU launch."""
    import os

    from cachegen.build import decoding_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert decoding_threads() == expected


def test_build_without_workers_decodes_on_the_default_threads(monkeypatch, tiny_model, corpus, tmp_path):
    import cachegen.build as build

    sizes = []

    class Recording(build.ThreadPoolExecutor):
        def __init__(self, max_workers=None, **kw):
            sizes.append(max_workers)
            super().__init__(max_workers=max_workers, **kw)

    monkeypatch.setattr(build, "decoding_threads", lambda: 5)
    monkeypatch.setattr(build, "ThreadPoolExecutor", Recording)
    build_cache(BuildConfig(manifest=corpus, out=str(tmp_path / "s.zarr"), model=tiny_model, layers=1,
                            progress=False))
    assert 5 in sizes
