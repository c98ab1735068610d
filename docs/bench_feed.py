"""Feeding a GPU from a store: reads, training batches, compression and int8, before and after.

Run from the repository root (a few minutes on 2 CPU cores):

    .venv/bin/python docs/bench_feed.py --workdir /tmp/ser-feed --before 8b1aa49

Every number of docs/benchmarks.md "Feeding a GPU" comes from this one run. `--before REF`
also measures the code of git commit REF (extracted with `git archive` into the work
directory) on the same states, in alternation with this checkout, so that before and after
are side by side. Each code version runs in a subprocess of its own (`worker`), which writes
its own store of the same states with its own writer and defaults, then measures:

- raw: copying each utterance's float16 bytes out of one memory-mapped .npy file (the
  ceiling: what the machine can copy), in the same process, interleaved with the reads;
- reads: `reader[uid]` for every utterance in shuffled order, page cache warm, and
  `np.array(reader[uid])` (a private copy), each utterance's raw copy and reads timed back to
  back; two threads (each its half of the ids, over at least 4,000 reads) against one thread,
  measured right after; medians of `--repeats`;
- batches: `iterate_batches(CacheSource(reader), ...)` (2 workers, batch size 16, shuffled
  length-bucketed plan), the batches as training gets them before `Batch.to(device)`;
- (this checkout only) each `--compression`: store bytes against raw float16, write
  throughput, one-thread reads; int8: bytes against float16, read speed, and the error
  against the float32 states in units of the documented bound (max |x| of the frame / 254);
- (this checkout only) the build without its forward pass: `build_cache` (2 decoding
  threads, float16, default compression) over synthetic audio (`--build-utterances` files of
  3-11 s, 16 kHz, and again half 16 kHz, half 44.1 kHz), with the lower stack replaced by a
  stand-in returning states of the right shape; x real time of the build's loop.

`--only build --before REF[,REF2]` measures just the build: each REF's code and this checkout's, one
subprocess per build and corpus, alternating for `--repeats` rounds (best of each), then each
step of this checkout's build alone on one thread (x real time per CPU second: what limits
the build when the cores are not shared).

States: layer-9 states of the wav2vec2-base architecture with random weights for a few
synthetic utterances, stretched to `--hours` of 3-11 s utterances with 1 % noise
(docs/bench_store.py's corpus). torch runs 1 thread; the machine's 2 cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def states_file(workdir: Path, hours: float, seed: int) -> Path:
    """The corpus as one .npz of float32 states (id order), computed once per work directory."""
    path = workdir / f"corpus-{hours:g}h-{seed}.npz"
    if not path.exists():
        sys.path.insert(0, str(HERE))
        from bench_store import base_states, synthetic_corpus

        sources = [s.astype(np.float32) for s in base_states(workdir, seed=seed)]
        corpus = synthetic_corpus(sources, hours=hours, seed=seed)
        # the float32 states behind each float16 utterance (for the int8 error)
        np.savez(path, **{u.id: u.states.astype(np.float32) for u in corpus})
    return path


def rate(fn, ids, *, threads: int = 1) -> float:
    """Utterances per second of `fn(uid)` over `ids`, split across `threads` threads."""
    parts = [ids[k::threads] for k in range(threads)]
    workers = [threading.Thread(target=lambda part: [fn(uid) for uid in part], args=(part,)) for part in parts]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(ids) / (time.perf_counter() - started)


def thread_scaling(location: str, *, rounds: int = 6) -> None:
    """Two threads against one (each its half of at least 4,000 reads, in store order), in a
    process that does nothing else: `reader[uid]`; the CRC-32C of the same mapped bytes alone;
    a bare sum over them (what the memory delivers, no per-read Python). The first round warms."""
    import crc32c

    from cachegen import open_cache

    reader = open_cache(location)
    ids = list(reader.ids)
    ids = ids * max(1, -(-4000 // len(ids)))
    views = {uid: reader.read_raw(uid) for uid in reader.ids}
    for label, fn in (("reader[uid]", reader.__getitem__),
                      ("CRC-32C alone", lambda uid: crc32c.crc32c(views[uid])),
                      ("bare sum", lambda uid: np.add.reduce(views[uid].view(np.uint8).view(np.uint64)))):
        ratios = [rate(fn, ids, threads=2) / rate(fn, ids) for _ in range(rounds)][1:]
        print(f"{label}: 2 threads / 1 thread {min(ratios):.2f}x-{max(ratios):.2f}x "
              f"(median {np.median(ratios):.2f}x over {len(ratios)} rounds of {len(ids)} reads)")


def write(path: Path, states: dict, *, dtype: str = "float16", **options) -> float:
    """Write a store of `states` with the code's StoreWriter; returns seconds."""
    import shutil

    import torch

    from cachegen import store

    shutil.rmtree(path, ignore_errors=True)
    # each code's default inner chunk: 256 frames before, 32 uncompressed / 256 compressed after
    chunk = 32 if options.get("compression") == "none" else 256
    # the fields every reader checks (a store of the wav2vec2-base architecture at layer 9)
    meta = {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "dtype": dtype,
            "hidden_size": 768, "chunk_frames": chunk, "layers": 9, "frame_rate": 50.0,
            "model_id": "wav2vec2-base-architecture", "model_sha256": "0" * 64,
            "model_type": "wav2vec2", "num_hidden_layers": 12, "sample_rate": 16000,
            "shard_frames": store.default_shard_frames(768, dtype, chunk), **options}
    started = time.perf_counter()
    writer = store.StoreWriter(path, meta)
    for uid, values in states.items():
        writer.add({"id": uid, "seconds": len(values) / 50, "source_rate": 16000, "audio_sha256": ""},
                   store.to_storage(torch.from_numpy(values), dtype))
    writer.flush()
    writer.finalize(table=None, extra_meta={"complete": True})
    writer.close()
    seconds = time.perf_counter() - started
    # write back the dirty pages now: the kernel's writeback would otherwise share the cores
    # with the reads measured next (it halved the two-thread read rate on 2 idle cores)
    os.sync()
    return seconds


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "states").rglob("*") if f.is_file())


def worker(args) -> None:
    """Measure the code on sys.path (this checkout, or the --before one) and print JSON."""
    import torch

    torch.set_num_threads(1)
    from cachegen import open_cache, store
    from headtrain.data import CacheSource, iterate_batches, plan_batches

    workdir = Path(args.workdir)
    if args.only == "build":
        from cachegen import build

        out = {"code": args.label, "build": build_side(args, workdir)}
        if hasattr(build, "normalise") and args.parts:  # this checkout's steps, one by one
            out["parts"] = build_parts(args, workdir)
        print(json.dumps(out))
        return
    with np.load(args.states) as saved:
        states = {k: saved[k] for k in saved.files}
    half = {k: v.astype(np.float16) for k, v in states.items()}
    raw_mib = sum(v.nbytes for v in half.values()) / 2**20
    new = hasattr(store, "COMPRESSIONS")
    # the raw ceiling: one .npy of every utterance, memory-mapped
    flat = workdir / f"raw-{Path(args.states).stem}.npy"
    if not flat.exists():
        np.save(flat, np.concatenate(list(half.values())))
    mapped = np.load(flat, mmap_mode="r")
    spans, cursor = {}, 0
    for uid, values in half.items():
        spans[uid] = (cursor, cursor + len(values))
        cursor += len(values)
    ids = list(states)
    order = [ids[i] for i in np.random.default_rng(args.seed).permutation(len(ids))]

    def raw_copy(uid):
        start, end = spans[uid]
        return np.array(mapped[start:end])

    out = {"code": args.label, "utterances": len(ids), "raw_mib": raw_mib}
    location = workdir / f"store-{args.label.split()[0]}.zarr"  # before / after
    seconds = write(location, states, **({"compression": "none", "checksum": "crc32c"} if new else {}))
    out["write_mib_s"] = raw_mib / seconds
    reader = open_cache(location)
    reader_copy = lambda uid: np.array(reader[uid])  # noqa: E731
    for fn in (raw_copy, reader.__getitem__, reader_copy):
        rate(fn, order)  # warm: page cache, maps, indexes
    rows = {"raw_1": [], "read_1": [], "read_2": [], "raw_2": [], "read_copy_1": []}
    clock = time.perf_counter
    for _ in range(args.repeats):  # medians of repeats: other people's jobs share the cores
        # one thread: the three reads of each utterance back to back, so that a burst of load
        # elsewhere hits all three alike
        spent = {"raw_1": 0.0, "read_1": 0.0, "read_copy_1": 0.0}
        for uid in order:
            for key, fn in (("raw_1", raw_copy), ("read_1", reader.__getitem__), ("read_copy_1", reader_copy)):
                started = clock()
                fn(uid)
                spent[key] += clock() - started
        for key, seconds in spent.items():
            rows[key].append(len(order) / seconds)
        # thread ratios over at least 4,000 reads: one pass of a few hundred takes ~10 ms on an
        # idle machine, too short against thread start-up and the GIL's 5 ms switch interval
        passes = order * max(1, -(-4000 // len(order)))
        rows["read_2"].append(rate(reader.__getitem__, passes, threads=2) / rate(reader.__getitem__, passes))
        rows["raw_2"].append(rate(raw_copy, passes, threads=2) / rate(raw_copy, passes))
    out.update({k: float(np.median(v)) for k, v in rows.items()})
    source = CacheSource(reader) if not new else CacheSource(reader, preload=False)
    lengths = [reader.frames(uid) for uid in ids]
    batch_rates = []
    for epoch in range(args.repeats + 1):
        plan = plan_batches(lengths, batch_size=16, seed=args.seed, epoch=epoch)
        started = time.perf_counter()
        count = sum(len(b.ids) for b in iterate_batches(source, ids, None, plan, workers=2))
        batch_rates.append(count / (time.perf_counter() - started))
    out["batches"] = max(batch_rates[1:])
    reader.close()
    if new:
        out["compression"] = {}
        for name in store.COMPRESSIONS:
            path = workdir / f"store-{name}.zarr"
            seconds = write(path, states, compression=name, checksum="crc32c")
            with open_cache(path) as r:
                rate(r.__getitem__, order)
                read = max(rate(r.__getitem__, order) for _ in range(args.repeats))
            out["compression"][name] = {"bytes_vs_raw": store_bytes(path) / 2**20 / raw_mib,
                                        "write_mib_s": raw_mib / seconds, "read_1": read}
        path = workdir / "store-int8.zarr"
        seconds = write(path, states, dtype="int8", compression="none", checksum="crc32c")
        with open_cache(path) as r:
            rate(r.__getitem__, order)
            read = max(rate(r.__getitem__, order) for _ in range(args.repeats))
            worst, mean_error, scale = 0.0, [], []
            for uid in ids:
                error = np.abs(r[uid] - states[uid])
                bound = np.abs(states[uid]).max(axis=1, keepdims=True) / 254
                worst = max(worst, float((error / bound).max()))
                mean_error.append(float(error.mean()))
                scale.append(float(np.abs(states[uid]).mean()))
        out["int8"] = {"bytes_vs_float16": store_bytes(path) / store_bytes(workdir / "store-none.zarr"),
                       "write_mib_s": raw_mib / seconds, "read_1": read,
                       "worst_error_in_bounds": worst,
                       "mean_error_vs_mean_abs": float(np.mean(mean_error) / np.mean(scale))}
    if new:
        out["build"] = build_side(args, workdir)
    print(json.dumps(out))


class StandInForward:
    """The lower stack replaced by states of the right shape: a fresh copy of a window of a
    fixed bank of noise per utterance, in the dtype the lower stack hands over after a GPU
    forward (`cachegen.encoder.to_host`: float16 for float16 stores, cast on the device; code
    before that change passes no dtype and gets float32, as its `.float().cpu()` did), so the
    build's every other step runs as it would on a GPU that costs nothing."""

    def __init__(self, model, layers: int, *, device: str = "cpu", dtype: str = "float32"):
        self.convs, self.offset = list(zip(model.config.conv_kernel, model.config.conv_stride)), 0
        handed = np.float16 if dtype == "float16" else np.float32
        self.bank = np.random.default_rng(0).standard_normal(
            (8192, model.config.hidden_size), dtype=np.float32).astype(handed)

    def __call__(self, waveforms):
        import torch

        out = []
        counts = np.array([len(w) for w in waveforms])
        for kernel, stride in self.convs:  # the feature encoder's output lengths, as transformers computes them
            counts = (counts - kernel) // stride + 1
        for n in counts.tolist():
            self.offset = (self.offset + 997) % (len(self.bank) // 2)  # other values each time
            window = self.bank[self.offset:self.offset + n]
            out.append(torch.from_numpy(window.copy() if len(window) == n
                                        else np.resize(self.bank, (n, self.bank.shape[1]))))
        return out


BUILD_RATES = {"16 kHz": (16000,), "16+44.1 kHz": (16000, 44100)}


def build_corpus(args, workdir: Path, rates: tuple[int, ...]) -> Path:
    from cachegen.testing import synth_corpus

    corpus = workdir / f"build-audio-{'-'.join(map(str, rates))}-{args.build_utterances}"
    if not (corpus / "manifest.csv").exists():
        synth_corpus(corpus, utterances=args.build_utterances, seconds=(3, 11), seed=args.seed,
                     sample_rates=rates)
    return corpus / "manifest.csv"


def build_side(args, workdir: Path) -> dict:
    """`build_cache` with the forward replaced by StandInForward: x real time of the loop
    (decode, resample, normalise, convert, checksum, compress, write, commit, finalise), and
    the CPU seconds the process spent in it (both cores count)."""
    import torch

    torch.set_num_threads(1)
    import cachegen.encoder
    from cachegen.build import BuildConfig, build_cache
    from cachegen.testing import base_config, save_model

    model = workdir / "base-model"
    if not (model / "config.json").exists():
        save_model(model, base_config(), seed=args.seed)
    cachegen.encoder.LowerStack = StandInForward  # build_cache imports it at call time
    out = {}
    for name, rates in BUILD_RATES.items():
        manifest = build_corpus(args, workdir, rates)
        best = None
        for _ in range(args.repeats):
            cpu = time.process_time()
            summary = build_cache(BuildConfig(manifest=str(manifest), out=str(workdir / "build.zarr"),
                                              model=str(model), layers=9, batch_size=8, overwrite=True,
                                              progress=False, workers=2, device="cpu"))
            x = summary.audio_hours * 3600 / summary.seconds
            if best is None or x > best[0]:
                best = x, time.process_time() - cpu
        out[name] = {"x_real_time": best[0], "cpu_seconds": best[1],
                     "audio_seconds": summary.audio_hours * 3600}
    return out


def build_parts(args, workdir: Path) -> dict:
    """Each step of the build alone, one thread, over the same files: x real time per CPU
    second (process time), so that a step's cost does not depend on the load of the moment."""
    import hashlib
    import shutil

    import soxr
    import torch

    torch.set_num_threads(1)
    from cachegen import store
    from cachegen.audio import load_audio
    from cachegen.build import normalise
    from cachegen.encoder import load_model
    from cachegen.manifest import load_manifest

    loaded = load_model(str(workdir / "base-model"))
    out = {}
    for name, rates in BUILD_RATES.items():
        paths = [u.path for u in load_manifest(str(build_corpus(args, workdir, rates))).utterances]
        steps, cost = {}, {}

        def step(label, fn, items):
            spent = []
            for _ in range(args.repeats):  # the least CPU time: other jobs inflate it, never shrink it
                started = time.process_time()
                result = [fn(x) for x in items]
                spent.append(time.process_time() - started)
            cost[label] = min(spent)
            return result

        datas = step("read the file", lambda p: Path(p).read_bytes(), paths)
        step("sha256 of the file", lambda d: hashlib.sha256(d).hexdigest(), datas)
        decoded = [load_audio(p) for p in paths]  # warm
        decoded = step("decode + resample (load_audio, includes the two above)", load_audio, paths)
        seconds = sum(len(d[0]) for d in decoded) / 16000
        native = [soxr.resample(d[0], 16000, d[1], quality="HQ") for d in decoded if d[1] != 16000]
        if native:
            step("of which resample to 16 kHz (soxr HQ)",
                 lambda x: soxr.resample(x[1], x[0], 16000, quality="HQ"),
                 [(d[1], x) for d, x in zip([d for d in decoded if d[1] != 16000], native)])
        normalised = step("normalise", lambda d: normalise(loaded.feature_extractor, d[0]), decoded)
        forward = StandInForward(loaded.model, 9, dtype="float16")
        states = step("stand-in forward (a float16 copy: cast on the device)", lambda w: forward([w])[0], normalised)
        half = step("to the storage dtype (to_storage; float16 already)", lambda s: store.to_storage(s, "float16"), states)
        step("checksum (CRC-32C)", lambda h: store.checksum(h), half)
        path = workdir / "parts.zarr"
        meta = {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "dtype": "float16",
                "hidden_size": 768, "chunk_frames": 32, "compression": "none", "checksum": "crc32c",
                "shard_frames": store.default_shard_frames(768, "float16", 32), "layers": 9}
        spent = []
        for _ in range(args.repeats):
            shutil.rmtree(path, ignore_errors=True)
            writer = store.StoreWriter(path, meta)
            started = time.process_time()
            for k, h in enumerate(half):
                writer.add({"id": f"u{k}", "seconds": 1.0, "source_rate": 16000, "audio_sha256": ""}, h)
            writer.flush()
            writer.wait()
            spent.append(time.process_time() - started)
            writer.close()
        cost["write shards + commit records (StoreWriter, incl. its checksum)"] = min(spent)
        steps = {label: seconds / spent for label, spent in cost.items() if spent > 0}
        out[name] = {"x_real_time_per_cpu_second": steps, "audio_seconds": seconds}
    return out


def run_code(label: str, code: Path, args, states: Path | None, *, repeats: int | None = None,
             parts: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(HERE / "bench_feed.py"), "--workdir", args.workdir, "--repeats",
               str(repeats or args.repeats), "--seed", str(args.seed), "--build-utterances",
               str(args.build_utterances), *(["--only", args.only] if args.only else []),
               *(["--parts"] if parts else []), "worker", "--label", label,
               "--states", str(states or "")]
    done = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = ["| measure | " + " | ".join(r["code"] for r in results) + " |",
             "|---|" + "---|" * len(results)]

    def row(name, fn):
        lines.append(f"| {name} | " + " | ".join(fn(r) for r in results) + " |")

    row("raw memmap copy, 1 thread (utt/s)", lambda r: f"{r['raw_1']:,.0f}")
    row("`reader[uid]`, 1 thread (utt/s)", lambda r: f"{r['read_1']:,.0f}")
    row("`reader[uid]` / raw copy", lambda r: f"**{r['read_1'] / r['raw_1']:.2f}**")
    row("`np.array(reader[uid])` / raw copy", lambda r: f"{r['read_copy_1'] / r['raw_1']:.2f}")
    row("2 threads / 1 thread, reader (each measured right after the other)", lambda r: f"**{r['read_2']:.2f}x**")
    row("2 threads / 1 thread, raw copy", lambda r: f"{r['raw_2']:.2f}x")
    row("training batches, 2 workers (utt/s)", lambda r: f"**{r['batches']:,.0f}**")
    row("store write, float16 (MiB/s raw)", lambda r: f"{r['write_mib_s']:,.0f}")
    text = "\n".join(lines)
    after = results[-1]
    if "compression" in after:
        text += "\n\n| compression | bytes vs raw float16 | write MiB/s | `reader[uid]` 1 thread (utt/s) |\n|---|---|---|---|\n"
        text += "\n".join(f"| {name} | {c['bytes_vs_raw']:.3f} | {c['write_mib_s']:,.0f} | {c['read_1']:,.0f} |"
                          for name, c in after["compression"].items())
        q = after["int8"]
        text += (f"\n| int8 (none) | {q['bytes_vs_float16']:.3f} of float16 | {q['write_mib_s']:,.0f} | "
                 f"{q['read_1']:,.0f} |\n\nint8 error against the float32 states: worst "
                 f"{q['worst_error_in_bounds']:.3f} of the bound (max |x| of the frame / 254); mean "
                 f"|error| {q['mean_error_vs_mean_abs']:.4f} of mean |x|.")
    if "build" in after:
        text += ("\n\n| build with a stand-in forward, audio at | x real time |\n|---|---|\n"
                 + "\n".join(f"| {name} ({b['audio_seconds'] / 60:.0f} min) | **{b['x_real_time']:,.0f}x** |"
                             for name, b in after["build"].items()))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--hours", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-utterances", type=int, default=300,
                        help="synthetic audio files (3-11 s) for the build measurement")
    commands = parser.add_subparsers(dest="command")
    scaling = commands.add_parser("threads", help="two threads against one on a store alone, in "
                                                   "store order: reader[uid], its CRC alone, a bare sum")
    scaling.add_argument("store")
    work = commands.add_parser("worker", help="(internal) measure the code on PYTHONPATH")
    work.add_argument("--label", required=True)
    work.add_argument("--states", required=True)
    parser.add_argument("--before", default=None,
                        help="git commit(s) to measure as 'before' (comma-separated; the first is "
                             "the one 'after / before' divides by)")
    parser.add_argument("--only", choices=["build"], default=None,
                        help="measure only the build with a stand-in forward: each code version "
                             "--repeats times, alternating (best of each), then each step alone")
    parser.add_argument("--parts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "threads":
        thread_scaling(args.store)
        return
    if args.command == "worker":
        worker(args)
        return
    load = os.getloadavg()[0]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    codes = []
    for ref in (args.before or "").split(","):
        if not ref:
            continue
        before = workdir / f"code-{ref}"
        if not before.exists():
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        codes.append((f"before ({ref})", before))
    codes.append(("after (this checkout)", ROOT))
    if args.only == "build":
        build_only(args, codes, load)
        return
    states = states_file(workdir, args.hours, args.seed)
    results = [run_code(label, code, args, states) for label, code in codes]
    (workdir / "bench_feed.json").write_text(json.dumps(results, indent=2))
    print(f"{results[-1]['utterances']} utterances of 3-11 s, {results[-1]['raw_mib']:.0f} MiB float16; "
          f"medians (batches, compression, build: best) of {args.repeats}; page cache warm; "
          f"1-minute load average at the start {load:.1f}\n")
    print(table(results))


def build_only(args, codes: list, load: float) -> None:
    """Before and after in alternation (one build per subprocess and corpus, `--repeats`
    rounds), the best of each; then the steps of this checkout one by one."""
    rounds = []
    for _ in range(args.repeats):
        rounds.append([run_code(label, code, args, None, repeats=1) for label, code in codes])
    loads = os.getloadavg()
    parts = run_code(codes[-1][0], codes[-1][1], args, None, repeats=1, parts=True)["parts"]
    results = {"load_average_start": load, "load_average_end": list(loads), "rounds": rounds, "parts": parts}
    (Path(args.workdir) / "bench_feed_build.json").write_text(json.dumps(results, indent=2))
    print(f"1-minute load average {load:.1f} at the start, {loads[0]:.1f} at the end; best of "
          f"{args.repeats} alternating rounds\n")
    print("| audio | " + " | ".join(label for label, _ in codes) + " | after / before |")
    print("|---|" + "---|" * len(codes) + "---|")
    for name in BUILD_RATES:
        best = [max(r[k]["build"][name]["x_real_time"] for r in rounds) for k in range(len(codes))]
        seconds = rounds[0][-1]["build"][name]["audio_seconds"]
        cells = " | ".join(f"{x:,.0f}x" for x in best)
        print(f"| {name} ({seconds / 60:.0f} min, {args.build_utterances} files) | {cells} | "
              f"{best[-1] / best[0]:.1f}x |")
    for name, part in parts.items():
        steps = part["x_real_time_per_cpu_second"]
        print(f"\n{name}: each step alone, x real time per CPU second (one thread)\n")
        print("| step | x real time |\n|---|---|")
        for label, x in steps.items():
            print(f"| {label} | {x:,.0f}x |")
        chain = [x for label, x in steps.items() if not label.startswith(("read", "sha256", "of which", "checksum"))]
        print(f"| **all steps, one core** | {1 / sum(1 / x for x in chain):,.0f}x |")


if __name__ == "__main__":
    main()
