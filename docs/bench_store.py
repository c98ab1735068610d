"""Benchmarks of the store: its layout against the alternatives (`layout`), and the cost of
building it compared with the bare lower-stack forward pass (`build`).

Run from the repository root, one at a time (a few minutes each on 2 CPU cores):

    .venv/bin/python docs/bench_store.py --workdir /tmp/ser-bench layout --hours 1
    .venv/bin/python docs/bench_store.py --workdir /tmp/ser-bench build

(docs/benchmarks.md ran them under `nice -n -10` because the machine was shared.) Each prints
a markdown table (docs/benchmarks.md records them) and saves the numbers as JSON in the work
directory. Everything is synthetic and offline: the wav2vec2-base architecture with random
weights (cachegen.testing.base_config) and speech-like audio from cachegen.testing.synth_corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")

HIDDEN = 768  # wav2vec2-base
LAYERS = 9  # the default cached layer
CHUNK_FRAMES = 64  # the store's inner chunk
BLOCK_FRAMES = 8192  # write unit of the unsharded layouts: a multiple of every chunk size tried
SAMPLE_RATE = 16000


def frames_of(seconds: float) -> int:
    """Frames wav2vec2 yields for `seconds` of 16 kHz audio (400-sample field, 320 stride)."""
    return (int(seconds * SAMPLE_RATE) - 400) // 320 + 1


def evict(files: list[Path]) -> None:
    """Drop `files` from the page cache, so the next read comes from disk (no root needed)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


# ---------------------------------------------------------------------------------------------
# Layout benchmark: the same utterances written in each layout, then read back.
# ---------------------------------------------------------------------------------------------

def base_states(workdir: Path, *, sources: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Layer-9 states of the wav2vec2-base architecture (random weights) for a few synthetic
    utterances of 3-11 s, computed once and kept in `workdir`."""
    cache = workdir / f"base-layer{LAYERS}-states.npz"
    if cache.exists():
        with np.load(cache) as saved:
            return [saved[k] for k in sorted(saved.files)]
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from cachegen.audio import load_audio
    from cachegen.encoder import LowerStack
    from cachegen.manifest import load_manifest
    from cachegen.testing import base_config, synth_corpus

    torch.manual_seed(seed)
    model = Wav2Vec2Model(base_config()).eval()
    lower = LowerStack(model, LAYERS)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True)
    manifest = synth_corpus(workdir / "source-audio", utterances=sources, seconds=(3, 11), seed=seed)
    states = []
    for utterance in load_manifest(str(manifest)).utterances:
        samples, _, _ = load_audio(utterance.path)
        values = extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
        states.append(lower([values])[0].numpy())
    np.savez(cache, **{f"s{i}": s for i, s in enumerate(states)})
    return states


@dataclass
class Utterance:
    id: str
    seconds: float
    states: np.ndarray  # (frames, HIDDEN) float16


def synthetic_corpus(sources: list[np.ndarray], *, hours: float, seed: int = 0) -> list[Utterance]:
    """Utterances of 3-11 s filling `hours` of audio: windows of the real states `sources`
    (wrapped around), each value scaled by (1 + 1% Gaussian noise) so that no two utterances
    share bytes and the low mantissa bits are as noisy as computed states."""
    rng = np.random.default_rng(seed)
    corpus, total = [], 0.0
    while total < hours * 3600:
        seconds = float(rng.uniform(3, 11))
        frames = frames_of(seconds)
        source = sources[len(corpus) % len(sources)]
        rows = (rng.integers(source.shape[0]) + np.arange(frames)) % source.shape[0]
        noise = 1 + 0.01 * rng.standard_normal((frames, HIDDEN), dtype=np.float32)
        corpus.append(Utterance(f"utt{len(corpus):05d}", seconds,
                                (source[rows] * noise).astype(np.float16)))
        total += seconds
    return corpus


def blosc():
    import zarr

    return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]


class Layout:
    """One way to store the corpus: `write` it to a folder, `open` a folder for reading."""
    name: str
    description: str

    def write(self, path: Path, corpus: list[Utterance]) -> None:
        raise NotImplementedError

    def open(self, path: Path) -> Callable[[str], np.ndarray]:
        """Open the store once; return a function reading one utterance by id."""
        raise NotImplementedError


class FramesArray(Layout):
    """One (frames, hidden) array and an offsets index (index.parquet: id, start, frames).

    Sharded: utterances start on an inner chunk and never cross a shard, and whole shards are
    written at once (as cachegen.store.StoreWriter does). Plain chunks: utterances are packed
    back to back and written in blocks of BLOCK_FRAMES.
    """

    def __init__(self, name: str, description: str, *, chunk: int, shard: int | None = None):
        self.name, self.description, self.chunk, self.shard = name, description, chunk, shard

    def place(self, corpus: list[Utterance]) -> list[int]:
        starts, cursor = [], 0
        for utterance in corpus:
            frames = utterance.states.shape[0]
            if self.shard:
                frames = -(-frames // self.chunk) * self.chunk
                if cursor % self.shard + frames > self.shard and frames <= self.shard:
                    cursor = -(-cursor // self.shard) * self.shard
            starts.append(cursor)
            cursor += frames
        return starts

    def write(self, path: Path, corpus: list[Utterance]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import zarr

        starts = self.place(corpus)
        block = self.shard or BLOCK_FRAMES
        end = starts[-1] + corpus[-1].states.shape[0]
        capacity = -(-end // block) * block
        group = zarr.open_group(str(path), mode="w")
        states = group.create_array(
            "states", shape=(capacity, HIDDEN), dtype="float16", chunks=(self.chunk, HIDDEN),
            shards=(self.shard, HIDDEN) if self.shard else None, compressors=blosc(), fill_value=0)
        buffer, current = np.zeros((block, HIDDEN), np.float16), 0
        for utterance, start in zip(corpus, starts):
            row, frames = 0, utterance.states.shape[0]
            while row < frames:  # an unsharded utterance may straddle two blocks
                if (start + row) // block != current:
                    states[current * block:(current + 1) * block] = buffer
                    buffer[:], current = 0, (start + row) // block
                offset = start + row - current * block
                take = min(frames - row, block - offset)
                buffer[offset:offset + take] = utterance.states[row:row + take]
                row += take
        states[current * block:(current + 1) * block] = buffer
        index = pa.table({"id": [u.id for u in corpus], "start": starts,
                          "frames": [u.states.shape[0] for u in corpus]})
        pq.write_table(index, path / "index.parquet")
        zarr.consolidate_metadata(str(path))

    def open(self, path: Path) -> Callable[[str], np.ndarray]:
        import pyarrow.parquet as pq
        import zarr

        states = zarr.open_group(str(path), mode="r", use_consolidated=True)["states"]
        index = pq.read_table(path / "index.parquet").to_pydict()
        rows = dict(zip(index["id"], zip(index["start"], index["frames"])))

        def read(uid: str) -> np.ndarray:
            start, frames = rows[uid]
            return states[start:start + frames]
        return read


class ArrayPerUtterance(Layout):
    name = "c: array per utterance"
    description = "one zarr array per utterance, one chunk each, consolidated metadata"

    def write(self, path: Path, corpus: list[Utterance]) -> None:
        import zarr

        group = zarr.open_group(str(path), mode="w")
        for utterance in corpus:
            array = group.create_array(utterance.id, shape=utterance.states.shape, dtype="float16",
                                       chunks=utterance.states.shape, compressors=blosc(),
                                       fill_value=0)
            array[:] = utterance.states
        zarr.consolidate_metadata(str(path))

    def open(self, path: Path) -> Callable[[str], np.ndarray]:
        import zarr

        group = zarr.open_group(str(path), mode="r", use_consolidated=True)
        arrays = {name: array for name, array in group.arrays()}
        return lambda uid: arrays[uid][:]


class SerStore(Layout):
    name = "a': ser StoreWriter/CacheReader"
    description = "layout (a) through ser's own writer and reader (crc32 per utterance, commit records)"

    def write(self, path: Path, corpus: list[Utterance]) -> None:
        from cachegen.store import FORMAT, FORMAT_VERSION, StoreWriter, default_shard_frames

        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "float16",
                "hidden_size": HIDDEN, "chunk_frames": CHUNK_FRAMES,
                "shard_frames": default_shard_frames(HIDDEN, "float16", CHUNK_FRAMES)}
        writer = StoreWriter(path, meta)
        for utterance in corpus:
            writer.add({"id": utterance.id, "seconds": utterance.seconds, "source_rate": SAMPLE_RATE,
                        "audio_sha256": ""}, utterance.states)
        writer.flush()
        writer.finalize(table=None, extra_meta={"complete": True})
        writer.close()

    def open(self, path: Path) -> Callable[[str], np.ndarray]:
        from cachegen import open_cache

        return open_cache(path).__getitem__


def layouts(names: list[str] | None) -> list[Layout]:
    from cachegen.store import default_shard_frames

    shard = default_shard_frames(HIDDEN, "float16", CHUNK_FRAMES)
    mib = shard * HIDDEN * 2 / 2**20
    every = [
        FramesArray("a: sharded (current)", f"one array, shards of {shard} frames ({mib:g} MiB raw), "
                    f"inner chunks of {CHUNK_FRAMES} frames, utterances aligned",
                    chunk=CHUNK_FRAMES, shard=shard),
        SerStore(),
        *(FramesArray(f"a{n}: sharded, inner chunks {c}", f"as (a) with inner chunks of {c} frames",
                      chunk=c, shard=shard) for n, c in ((2, 256), (3, 512))),
        *(FramesArray(f"b: plain chunks {c}", f"one array, unsharded chunks of {c} frames "
                      f"({c * HIDDEN * 2 / 2**20:g} MiB raw), utterances packed", chunk=c)
          for c in (64, 1024, 8192)),
        ArrayPerUtterance(),
    ]
    return [layout for layout in every if not names or layout.name.split(":")[0] in names]


def measure(layout: Layout, corpus: list[Utterance], root: Path, *, reads: int, seed: int) -> dict:
    path = root / re.sub(r"\W+", "-", layout.name).strip("-")
    shutil.rmtree(path, ignore_errors=True)
    hours = sum(u.seconds for u in corpus) / 3600
    raw = sum(u.states.nbytes for u in corpus)

    started = time.perf_counter()
    layout.write(path, corpus)
    os.sync()  # durable: many small files cost their metadata too
    write_s = time.perf_counter() - started
    files = [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    allocated = sum(f.stat().st_blocks * 512 for f in files)

    evict(files)
    started = time.perf_counter()
    read = layout.open(path)
    open_s = time.perf_counter() - started
    for utterance in corpus:  # correctness, untimed (also warms the page cache)
        assert np.array_equal(read(utterance.id), utterance.states), (layout.name, utterance.id)

    rng = np.random.default_rng(seed)
    sample = [corpus[i].id for i in rng.integers(len(corpus), size=reads)]
    warm = []
    for uid in sample:
        started = time.perf_counter()
        read(uid)
        warm.append(time.perf_counter() - started)
    cold = []
    for uid in sample:
        evict(files)
        started = time.perf_counter()
        read(uid)
        cold.append(time.perf_counter() - started)

    order = [corpus[i].id for i in rng.permutation(len(corpus))]
    epoch = {}
    for cache in ("cold", "warm"):
        if cache == "cold":
            evict(files)
        started = time.perf_counter()
        for uid in order:
            read(uid)
        epoch[cache] = time.perf_counter() - started
    shutil.rmtree(path)
    mib = 2**20
    return {
        "layout": layout.name, "description": layout.description,
        "files": len(files), "files_per_hour": len(files) / hours,
        "mib_per_hour": size / hours / mib, "allocated_mib_per_hour": allocated / hours / mib,
        "vs_raw": size / raw,
        "write_mib_s": raw / write_s / mib, "write_x_realtime": hours * 3600 / write_s,
        "open_ms": 1e3 * open_s,
        "warm_mean_ms": 1e3 * float(np.mean(warm)), "warm_p95_ms": 1e3 * float(np.percentile(warm, 95)),
        "cold_mean_ms": 1e3 * float(np.mean(cold)), "cold_p95_ms": 1e3 * float(np.percentile(cold, 95)),
        "epoch_cold_mib_s": raw / epoch["cold"] / mib, "epoch_cold_utt_s": len(corpus) / epoch["cold"],
        "epoch_warm_mib_s": raw / epoch["warm"] / mib, "epoch_warm_utt_s": len(corpus) / epoch["warm"],
    }


def layout_table(results: list[dict]) -> str:
    lines = [
        "| layout | files / audio h | MiB / audio h (vs raw fp16) | write MiB/s (x real time) | "
        "open ms | random read ms, page cache: mean / p95 | random read ms, cold: mean / p95 | "
        "shuffled epoch MiB/s (utt/s), cold | shuffled epoch MiB/s (utt/s), page cache |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['layout']} | {r['files_per_hour']:.0f} | {r['mib_per_hour']:.0f} ({r['vs_raw']:.2f}) | "
            f"{r['write_mib_s']:.0f} ({r['write_x_realtime']:.0f}x) | {r['open_ms']:.0f} | "
            f"{r['warm_mean_ms']:.2f} / {r['warm_p95_ms']:.2f} | {r['cold_mean_ms']:.2f} / {r['cold_p95_ms']:.2f} | "
            f"{r['epoch_cold_mib_s']:.0f} ({r['epoch_cold_utt_s']:.0f}) | "
            f"{r['epoch_warm_mib_s']:.0f} ({r['epoch_warm_utt_s']:.0f}) |")
    return "\n".join(lines)


def bench_layout(args) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sources = base_states(workdir, seed=args.seed)
    print(f"source states: {len(sources)} utterances, {sum(s.shape[0] for s in sources)} frames, "
          f"|x| mean {np.mean([np.abs(s).mean() for s in sources]):.2f}, max "
          f"{max(np.abs(s).max() for s in sources):.1f} ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    corpus = synthetic_corpus(sources, hours=args.hours, seed=args.seed)
    hours = sum(u.seconds for u in corpus) / 3600
    raw = sum(u.states.nbytes for u in corpus)
    print(f"corpus: {len(corpus)} utterances, {hours:.3f} h, {raw / 2**20:.0f} MiB raw float16",
          file=sys.stderr)
    for layout in layouts(args.layouts):  # untimed warm-up: imports, thread pools, first calls
        measure(layout, corpus[:3], workdir / "warm-up", reads=3, seed=args.seed)
    chosen = layouts(args.layouts)
    repeats: list[list[dict]] = [[] for _ in chosen]
    for n in range(args.repeats):  # round robin, so that a burst of load elsewhere hits every layout
        for layout, runs in zip(chosen, repeats):
            started = time.perf_counter()
            runs.append(measure(layout, corpus, workdir / "stores", reads=args.reads, seed=args.seed + n))
            print(f"repeat {n + 1}, {layout.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    results = [{key: float(np.median([r[key] for r in runs])) if isinstance(value, (int, float)) else value
                for key, value in runs[0].items()} for runs in repeats]
    report = {"machine": machine(), "utterances": len(corpus), "hours": hours,
              "raw_mib": raw / 2**20, "reads": args.reads, "median": results, "repeats": repeats}
    (workdir / "layout.json").write_text(json.dumps(report, indent=1))
    print(f"{len(corpus)} utterances, {hours:.3f} h of audio, {raw / 2**20:.0f} MiB raw float16; "
          f"{args.reads} random reads; median of {args.repeats} repeats; {machine()}\n")
    print(layout_table(results))
    print()
    for r in results:
        print(f"- {r['layout']}: {r['description']}")


# ---------------------------------------------------------------------------------------------
# Build benchmark: the bare forward pass against the whole `build_cache`, on the same audio.
# ---------------------------------------------------------------------------------------------

@dataclass
class BuildRun:
    forward_s: float  # (i) LowerStack over decoded, normalised audio in memory, same batches
    build_loop_s: float  # (ii) build_cache's own clock: decode, forward, convert, write, commit, finalise
    build_call_s: float  # (ii) the whole call, also manifest checks, model load and hash, header scan
    forward_cpu_s: float  # CPU seconds of this process (all threads) during (i) ...
    build_call_cpu_s: float  # ... and during the whole (ii) call
    load_before: float  # 1-minute load average before the pair: other processes skew the times


def bench_build(args) -> None:
    from cachegen.audio import audio_seconds
    from cachegen.build import BuildConfig, batches_in_order, build_cache, decode
    from cachegen.encoder import LowerStack
    from cachegen.manifest import load_manifest
    from cachegen.encoder import load_model
    from cachegen.reader import open_cache
    from cachegen.store import FORMAT, FORMAT_VERSION, StoreWriter, to_storage
    from cachegen.testing import base_config, save_model, synth_corpus

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "wav2vec2-base-random"
    if not (model_dir / "config.json").exists():
        save_model(model_dir, base_config(), seed=args.seed)
    manifest_path = synth_corpus(workdir / "build-corpus", utterances=args.utterances,
                                 seconds=(3, 8), seed=args.seed, sample_rates=(16000, 44100))
    manifest = load_manifest(str(manifest_path))
    utterances = manifest.utterances

    loaded = load_model(str(model_dir))  # the first load also pays for imports: timed again below
    started = time.perf_counter()
    seconds = {u.id: audio_seconds(u.path) for u in utterances}
    header_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = {u.id: decode(u, loaded.feature_extractor, loaded.receptive_field) for u in utterances}
    decode_s = time.perf_counter() - started
    audio = {uid: samples for uid, (samples, _) in decoded.items()}
    batches = batches_in_order(utterances, seconds, args.batch_size)
    lower = LowerStack(loaded.model, args.layers, device="cpu")
    lower([audio[utterances[0].id][:SAMPLE_RATE]])  # warm-up: first-call allocations

    def forward() -> tuple[float, float, list]:
        started, cpu = time.perf_counter(), time.process_time()
        states = [s for batch in batches for s in lower([audio[u.id] for u in batch])]
        return time.perf_counter() - started, time.process_time() - cpu, states

    out = workdir / "build-store.zarr"
    config = BuildConfig(manifest=str(manifest_path), out=str(out), model=str(model_dir),
                         layers=args.layers, batch_size=args.batch_size, device="cpu",
                         overwrite=True, progress=False, shard_frames=args.shard_frames)

    def build() -> tuple[float, float, object]:
        started, cpu = time.perf_counter(), time.process_time()
        summary = build_cache(config)
        return time.perf_counter() - started, time.process_time() - cpu, summary

    runs, summary, states = [], None, None
    for repeat in range(args.repeats):  # side by side, in alternating order against drift
        load = os.getloadavg()[0]
        if repeat % 2 == 0:
            forward_s, forward_cpu, states = forward()
            call_s, call_cpu, summary = build()
        else:
            call_s, call_cpu, summary = build()
            forward_s, forward_cpu, states = forward()
        runs.append(BuildRun(forward_s, summary.seconds, call_s, forward_cpu, call_cpu, load))
        print(f"run {repeat + 1}: {runs[-1]}", file=sys.stderr)
    assert summary.cached == len(utterances) and not summary.failed

    # Where the extra time can go: each step alone, serially, on one thread of this process.
    started = time.perf_counter()
    load_model(str(model_dir))
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    stored = [to_storage(s, "float16") for s in states]
    convert_s = time.perf_counter() - started
    probe = workdir / "write-probe.zarr"
    shutil.rmtree(probe, ignore_errors=True)
    meta = dict(open_cache(out).meta)
    started = time.perf_counter()
    writer = StoreWriter(probe, {**meta, "format": FORMAT, "format_version": FORMAT_VERSION})
    for utterance, array in zip([u for b in batches for u in b], stored):
        writer.add({"id": utterance.id, **decoded[utterance.id][1]}, array)
    writer.flush()
    writer.finalize(table=manifest.table, extra_meta={})
    writer.close()
    write_s = time.perf_counter() - started
    shutil.rmtree(probe)

    audio_s = sum(info["seconds"] for _, info in decoded.values())
    frames = sum(s.shape[0] for s in states)
    store_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    raw_bytes = frames * loaded.hidden_size * 2
    hour = 3600 / audio_s
    forward_best = min(r.forward_s for r in runs)
    loop_best = min(r.build_loop_s for r in runs)
    call_best = min(r.build_call_s for r in runs)
    report = {
        "machine": machine(), "utterances": len(utterances), "audio_seconds": audio_s,
        "frames": frames, "layers": args.layers, "batch_size": args.batch_size,
        "runs": [asdict(r) for r in runs],
        "ratio_loop": forward_best / loop_best, "ratio_call": forward_best / call_best,
        "ratio_cpu": min(r.forward_cpu_s for r in runs) / min(r.build_call_cpu_s for r in runs),
        "median_paired_ratio_loop": float(np.median([r.forward_s / r.build_loop_s for r in runs])),
        "median_paired_ratio_call": float(np.median([r.forward_s / r.build_call_s for r in runs])),
        "median_paired_ratio_cpu": float(np.median([r.forward_cpu_s / r.build_call_cpu_s for r in runs])),
        "store_bytes": store_bytes, "raw_bytes": raw_bytes,
        "store_mib_per_hour": store_bytes * hour / 2**20, "raw_mib_per_hour": raw_bytes * hour / 2**20,
        "steps_s": {"model load + weights sha256": load_s, "header scan (audio_seconds)": header_s,
                    "decode + resample + normalise": decode_s, "float32 -> float16": convert_s,
                    "compress + write + commit + finalise (StoreWriter)": write_s},
    }
    (workdir / "build.json").write_text(json.dumps(report, indent=1))

    print(f"{len(utterances)} utterances, {audio_s:.1f} s of audio (half 16 kHz, half 44.1 kHz), "
          f"{frames} frames; wav2vec2-base architecture (random weights), layers {args.layers}, "
          f"batch size {args.batch_size}, float16 store; {machine()}\n")
    print("| run | load avg before | (i) bare forward s (x real time) | (ii) build_cache loop s "
          "(x real time) | (ii) whole call s | throughput ratio (ii)/(i), loop | ratio, whole call | "
          "ratio of CPU seconds (i)/(ii), whole call |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in enumerate(runs, 1):
        print(f"| {n} | {r.load_before:.2f} | {r.forward_s:.1f} ({audio_s / r.forward_s:.2f}x) | "
              f"{r.build_loop_s:.1f} ({audio_s / r.build_loop_s:.2f}x) | {r.build_call_s:.1f} | "
              f"{r.forward_s / r.build_loop_s:.2f} | {r.forward_s / r.build_call_s:.2f} | "
              f"{r.forward_cpu_s / r.build_call_cpu_s:.2f} |")
    print(f"| best of {len(runs)} | | {forward_best:.1f} | {loop_best:.1f} | {call_best:.1f} | "
          f"{report['ratio_loop']:.2f} | {report['ratio_call']:.2f} | {report['ratio_cpu']:.2f} |")
    print(f"| median of the paired ratios | | | | | {report['median_paired_ratio_loop']:.2f} | "
          f"{report['median_paired_ratio_call']:.2f} | {report['median_paired_ratio_cpu']:.2f} |")
    print(f"\nstore: {store_bytes / 2**20:.2f} MiB for {audio_s:.1f} s = "
          f"{report['store_mib_per_hour']:.0f} MiB per audio hour; raw float16 "
          f"(frames x {loaded.hidden_size} x 2 bytes) {report['raw_mib_per_hour']:.0f} MiB per audio "
          f"hour; ratio {store_bytes / raw_bytes:.3f}\n")
    print("| step, alone and serial | seconds | share of the bare forward |")
    print("|---|---|---|")
    for step, s in report["steps_s"].items():
        print(f"| {step} | {s:.2f} | {s / forward_best:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/ser-bench", help="Scratch folder (kept between runs).")
    parser.add_argument("--seed", type=int, default=0)
    commands = parser.add_subparsers(dest="command", required=True)
    layout = commands.add_parser("layout", help="Compare store layouts on ~1 h of base-model states.")
    layout.add_argument("--hours", type=float, default=1.0, help="Audio hours to store.")
    layout.add_argument("--reads", type=int, default=300, help="Random single-utterance reads.")
    layout.add_argument("--repeats", type=int, default=3, help="Whole measurements; the median is shown.")
    layout.add_argument("--layouts", nargs="*", help="Subset by letter: a a' a2 a3 b c (default: all).")
    layout.set_defaults(run=bench_layout)
    build = commands.add_parser("build", help="Cache build against the bare forward pass.")
    build.add_argument("--utterances", type=int, default=18, help="3-8 s each (~100 s in all).")
    build.add_argument("--layers", type=int, default=LAYERS)
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--repeats", type=int, default=5)
    build.add_argument("--shard-frames", type=int, default=None,
                       help="Store layout (default: the build's, ~16 MiB shards).")
    build.set_defaults(run=bench_build)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
