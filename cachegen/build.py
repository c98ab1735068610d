"""`ser cache build`: decode, normalise, run the lower stack once, commit states to the store."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, audio_seconds, load_audio
from .errors import AudioError, ConfigError, StoreError, StoreMismatch
from .lock import BuildLock, is_lock_file, region_lock
from .manifest import Manifest, Utterance, load_manifest
from .encoder import DEFAULT_MODEL, LoadedModel, load_model
from .store import (COMPRESSIONS, FORMAT, FORMAT_VERSION, STORAGE_DTYPES, StoreWriter,
                    default_shard_frames, fingerprint_difference, is_store_folder, load_index,
                    read_meta, to_storage)

log = logging.getLogger(__name__)
MAX_WORKERS = 256  # decoding threads of a build


@dataclass(frozen=True)
class BuildConfig:
    """Options of `ser cache build`; checked by `validate` before any work starts."""
    manifest: str
    out: str
    model: str = DEFAULT_MODEL
    layers: int = 9
    dtype: str = "float16"
    batch_size: int = 8
    device: str | None = None  # default: cuda when available
    workers: int | None = None  # background decoding threads; None: decoding_threads()
    overwrite: bool = False
    audio_root: str | None = None
    # default: 32 uncompressed (alignment padding costs bytes), 256 compressed (measured in
    # docs/benchmarks.md); at most a shard
    chunk_frames: int | None = None
    shard_frames: int | None = None  # default: ~16 MiB shard files
    compression: str | None = None  # default: none (measured in docs/benchmarks.md); a store keeps its own
    part: tuple[int, int] | None = None  # (I, N), 1-based: one of N independent jobs
    pooled_layers: str | None = None  # "all" or "0,6,12": also store per-utterance mean/std
    max_seconds: float | None = 300.0  # longer audio is skipped and recorded; None: no limit
    progress: bool = True

    @property
    def resolved_chunk_frames(self) -> int:
        if self.chunk_frames:
            return self.chunk_frames
        default = 32 if (self.compression or "none") == "none" else 256
        return min(default, self.shard_frames) if self.shard_frames else default

    def validate(self) -> None:
        if self.part and not 1 <= self.part[0] <= self.part[1]:
            raise ConfigError(f"--part {self.part[0]}/{self.part[1]}: expected I/N with 1 <= I <= N")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ConfigError(f"--compression {self.compression!r}: choose one of {', '.join(COMPRESSIONS)}")
        if self.layers < 0:
            raise ConfigError(f"--layers {self.layers}: must be 0 or more")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.pooled_layers:
            from .pooled import parse_pooled_layers
            try:
                parse_pooled_layers(self.pooled_layers, 10**6)  # the range is checked with the model
            except ValueError as err:
                raise ConfigError(f"--pooled-layers {err}") from None
        if self.workers is not None and not 0 <= self.workers <= MAX_WORKERS:
            # each decodes a batch ahead of the model: 10**6 would hold the whole corpus in memory
            raise ConfigError(f"--workers {self.workers}: must be in 0..{MAX_WORKERS}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"--max-seconds {self.max_seconds}: must be more than 0 (0 on the "
                              "command line means no limit)")
        if self.shard_frames is not None and self.shard_frames < 1:
            raise ConfigError(f"--shard-frames {self.shard_frames}: must be at least 1 (leave it out "
                              "for the default, about 16 MiB per shard file)")
        if self.resolved_chunk_frames < 1 or (self.shard_frames is not None and (
                self.shard_frames % self.resolved_chunk_frames)):
            raise ConfigError(f"--shard-frames {self.shard_frames}: must be a multiple of "
                              f"chunk frames ({self.resolved_chunk_frames})")
        if self.device is not None:  # '' too: not a device
            from .device import resolve_device
            resolve_device(self.device)


@dataclass
class BuildSummary:
    store: str
    cached: int = 0  # utterances computed by this run
    already: int = 0  # utterances found committed
    failed: list[dict] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # cached before, audio changed, computed again
    audio_hours: float = 0.0
    seconds: float = 0.0
    store_bytes: int = 0
    total: int = 0
    part: tuple[int, int] | None = None
    main: bool = True  # False on the other processes of a multi-process build

    def text(self) -> str:
        rate = self.cached / self.seconds if self.seconds else 0.0
        hours_per_s = self.audio_hours * 3600 / self.seconds if self.seconds else 0.0
        parts = [f"Cached {self.cached} utterances ({self.audio_hours:.3f} h of audio) in "
                 f"{self.seconds:.1f} s ({rate:.1f} utt/s, {hours_per_s:.0f}x real time) into "
                 f"{self.store}"]
        if self.already:
            parts.append(f"{self.already} were already cached and were not recomputed")
        if self.changed:
            parts.append(f"{len(self.changed)} were computed again because their audio changed "
                         f"({', '.join(self.changed[:10])}{' ...' if len(self.changed) > 10 else ''})")
        parts.append(f"the store holds {self.total} utterances in {self.store_bytes / 2**20:.1f} MiB")
        if self.part:
            parts.append(f"part {self.part[0]}/{self.part[1]} is committed; once every part is done, "
                         "run the same command without --part to finalise the store")
        if self.failed:
            names = ", ".join(f["id"] for f in self.failed[:10])
            parts.append(f"{len(self.failed)} failed and were skipped ({names}"
                         f"{' ...' if len(self.failed) > 10 else ''}); see `ser cache info`, fix "
                         "or drop them, and rerun to retry only those")
        return "; ".join(parts) + "."


def store_meta(config: BuildConfig, loaded: LoadedModel, shard_frames: int) -> dict:
    cfg = loaded.config
    pooled = pooled_layers(config, loaded)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_id": loaded.model_id, "model_sha256": loaded.weights_sha256,
        "model_config_sha256": loaded.config_sha256,
        "model_type": cfg.model_type, "model_config": cfg.to_diff_dict(),
        "layers": config.layers, "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size, "do_stable_layer_norm": loaded.stable_layer_norm,
        "frame_rate": loaded.frame_rate, "sample_rate": SAMPLE_RATE,
        "preprocessing": loaded.preprocessing(), "dtype": config.dtype,
        "chunk_frames": config.resolved_chunk_frames, "shard_frames": shard_frames,
        "checksum": "crc32c", "compression": config.compression or "none",
        "versions": library_versions(),
        **({"pooled_layers": list(pooled)} if pooled else {}),  # absent: the key of older stores
    }


def pooled_layers(config: BuildConfig, loaded: LoadedModel) -> tuple[int, ...]:
    from .pooled import parse_pooled_layers
    try:
        return parse_pooled_layers(config.pooled_layers, loaded.num_layers)
    except ValueError as err:
        raise ConfigError(f"--pooled-layers {err} (model '{config.model}')") from None


def ser_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ser")
    except PackageNotFoundError:
        return "unknown"


def library_versions() -> dict[str, str]:
    """Versions of ser and the libraries that decide what a store or a run holds."""
    import numcodecs
    import torch
    import transformers
    import zarr

    return {"ser": ser_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "python": sys.version.split()[0]}


# Padded audio one batch may hold, per utterance of --batch-size: batches of short utterances
# are --batch-size long, longer ones get fewer, and one longer than the whole budget runs alone,
# so a batch never costs much more memory than --batch-size utterances of ~20 s.
SECONDS_PER_SLOT = 20.0


def batches_in_order(utterances: list[Utterance], seconds: dict[str, float], batch_size: int):
    """Length-sorted batches of at most `batch_size` utterances and `batch_size` x 20 s of
    padded audio (a long file alone), fixed by the manifest alone: a resumed build recomputes
    the same batches as an uninterrupted one, so its bytes are the same."""
    ordered = sorted(utterances, key=lambda u: (seconds[u.id], u.id))
    budget, batches = batch_size * SECONDS_PER_SLOT, []
    for utterance in ordered:  # each is the longest of its batch so far: padding is its length
        if batches and len(batches[-1]) < batch_size and (
                (len(batches[-1]) + 1) * seconds[utterance.id] <= budget):
            batches[-1].append(utterance)
        else:
            batches.append([utterance])
    return batches


def prepare_store(config: BuildConfig, meta: dict, manifest: Manifest, *, check_only: bool = False) -> None:
    """Check what is at --out before anything is written there: nothing, an empty folder, or
    a ser store built the same way from `manifest` or a manifest it extends. With --overwrite a
    ser store is emptied (under the build lock), and anything that is not one is refused, never
    deleted."""
    out = Path(config.out)
    if not out.exists():
        return
    if not out.is_dir():
        raise StoreError(f"{out}: is a file; --out must be a folder")
    contents = [p for p in out.iterdir() if not is_lock_file(p.name)]
    if not contents:
        return
    if config.overwrite:
        if not is_store_folder(out):
            names = ", ".join(sorted(p.name for p in contents)[:5])
            raise StoreError(f"{out}: is not a ser store (it holds {names}{' ...' if len(contents) > 5 else ''}); "
                             "--overwrite deletes only ser stores: choose another --out")
        if check_only:
            return
        for path in contents:  # the lock files stay: the lock is held on them
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        return
    existing = read_meta(out)
    if existing is None:
        raise StoreError(f"{out}: exists and is not a ser store; choose another --out")
    difference = fingerprint_difference(existing, meta)
    if difference:
        raise StoreMismatch(f"{out}: built differently ({difference}); pass --overwrite to "
                            "rebuild it, or choose another --out")
    if check_only:  # the rest reads the index: under the build lock (a build may be writing it)
        return
    # a store's utterances only grow: a manifest lacking some would replace the store's table,
    # and what teammates train on, with its own, leaving those utterances behind unlisted
    listed = {u.id for u in manifest.utterances}
    missing = sorted(uid for uid in load_index(out) if uid not in listed)
    if missing:
        named = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise StoreMismatch(f"{out}: holds {len(missing)} cached utterance(s) that {manifest.source} does "
                            f"not list ({named}); a store is only ever extended: build into another "
                            "--out, pass --overwrite to rebuild it from this manifest alone, or keep "
                            "it and train on fewer utterances with `ser train --labels`")


def take_locks(config: BuildConfig, rank: int, state) -> list[BuildLock]:
    """The locks this writer holds for the whole build: the store's, exclusively, for a build
    (taken by the main process of `accelerate launch` for all of them); shared by `--part` jobs,
    each also holding its own writer region's lock exclusively."""
    if config.part:
        return [BuildLock(config.out, shared=True), BuildLock(config.out, region_lock(rank))]
    if state is None or rank == 0:
        return [BuildLock(config.out)]
    return []


def decoding_threads() -> int:
    """The default number of decoding threads: one per core this process may use (shared with
    the other processes of a multi-GPU launch on the node, LOCAL_WORLD_SIZE), 2 to 8.
    Decoding (file read, sha256, numpy, soxr) runs without the GIL, and with a GPU forward
    the build's pace is the CPU side's (docs/benchmarks.md, "Feeding a GPU"): two threads
    on two cores measured there; more cores decode more."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    try:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    return max(2, min(8, cores // processes))


def decode(utterance: Utterance, feature_extractor, min_samples: int, max_seconds: float | None = None,
           *, header_seconds: float | None = None):
    """Decoded and normalised samples, or the AudioError that explains why not.
    `header_seconds`: the duration `audio_seconds` already read from the file's header."""
    try:
        if max_seconds:
            header = audio_seconds(utterance.path) if header_seconds is None else header_seconds
            if header > max_seconds:  # not even decoded
                raise too_long(utterance, header, max_seconds)
        stat = os.stat(utterance.path)  # before reading: a later change shows as a new mtime
        samples, source_rate, digest = load_audio(utterance.path)
        if max_seconds and samples.shape[0] > max_seconds * SAMPLE_RATE:  # its header understated it
            raise too_long(utterance, samples.shape[0] / SAMPLE_RATE, max_seconds)
        if samples.shape[0] < min_samples:
            raise AudioError(f"{utterance.path}: {samples.shape[0]} samples at 16 kHz, shorter than "
                             f"the model's receptive field ({min_samples} samples)")
        with np.errstate(over="ignore", invalid="ignore"):  # named below, not warned about
            normalised = normalise(feature_extractor, samples)
        if not np.isfinite(normalised).all():
            raise AudioError(f"{utterance.path}: samples too large to normalise in float32 (up to "
                             f"{float(np.abs(samples).max()):.3g})")
        return normalised.astype(np.float32, copy=False), {"source_rate": source_rate, "audio_sha256": digest,
                                               "seconds": samples.shape[0] / SAMPLE_RATE,
                                               "audio_bytes": stat.st_size,
                                               "audio_mtime_ns": stat.st_mtime_ns}
    except OSError as err:
        return AudioError(f"{utterance.path}: cannot read: {err.strerror}"), None
    except AudioError as err:
        return err, None


def normalise(feature_extractor, samples: np.ndarray) -> np.ndarray:
    """What the model's feature extractor makes of one utterance's 16 kHz float32 samples. For
    wav2vec2's own extractor (every supported family's), its normalisation is called directly:
    the same values without `__call__`'s batching and padding, which cost as much again."""
    from transformers import Wav2Vec2FeatureExtractor

    if type(feature_extractor) is not Wav2Vec2FeatureExtractor or feature_extractor.sampling_rate != SAMPLE_RATE:
        return feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
    if feature_extractor.do_normalize:
        return zero_mean_unit_var(samples)
    return samples


def zero_mean_unit_var(samples: np.ndarray) -> np.ndarray:
    """`Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm` of one float32 array, bit for bit
    (numpy's mean and var: float32 sums divided in float64, then rounded to float32), in five
    passes over the samples instead of seven."""
    n = samples.shape[0]
    mean = np.float32(np.float64(np.add.reduce(samples)) / n)
    out = np.subtract(samples, mean)
    var = np.float32(np.float64(np.add.reduce(np.square(out))) / n)
    out /= np.sqrt(var + np.float32(1e-7))
    return out


def too_long(utterance: Utterance, seconds: float, max_seconds: float) -> AudioError:
    return AudioError(f"{utterance.path}: {seconds:.0f} s long, more than --max-seconds {max_seconds:g} "
                      "(one utterance's memory grows with its length); pass a larger --max-seconds "
                      "(or 0 for no limit) where memory allows, or cut the file")


def audio_changed(utterance: Utterance, record: dict) -> bool:
    """Whether the audio of a committed utterance differs from what was cached: unchanged when
    its size and mtime are the recorded ones, otherwise decided by the sha256 of its bytes."""
    try:
        stat = os.stat(utterance.path)
        if (stat.st_size, stat.st_mtime_ns) == (record.get("audio_bytes"), record.get("audio_mtime_ns")):
            return False
        digest = hashlib.sha256()
        with open(utterance.path, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
    except OSError:
        return True  # unreadable now: computing it again records why
    return digest.hexdigest() != record.get("audio_sha256")


def changed_audio(utterances: list[Utterance], committed: dict[str, dict]) -> list[Utterance]:
    """The committed utterances whose audio changed since it was cached (files read in parallel)."""
    cached = [u for u in utterances if u.id in committed]
    with ThreadPoolExecutor(max_workers=8) as pool:
        flags = list(pool.map(lambda u: audio_changed(u, committed[u.id]), cached))
    return [u for u, changed in zip(cached, flags) if changed]


def writers(config: BuildConfig):
    """(this writer, number of writers, accelerate state or None): a --part, a process of
    `accelerate launch`, or the only one."""
    import os

    if config.part:
        return config.part[0] - 1, config.part[1], None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, state
    return 0, 1, None


def assign(batches: list[list[Utterance]], seconds: dict[str, float], count: int) -> list[list[int]]:
    """Batch numbers per writer, balanced by audio duration (longest first, to the least
    loaded writer); fixed by the manifest, so a rerun gives every writer the same work."""
    loads, work = [0.0] * count, [[] for _ in range(count)]
    durations = [sum(seconds[u.id] for u in b) for b in batches]
    for number in sorted(range(len(batches)), key=lambda n: (-durations[n], n)):
        target = min(range(count), key=lambda w: (loads[w], w))
        loads[target] += durations[number]
        work[target].append(number)
    return [sorted(numbers) for numbers in work]


def build_cache(config: BuildConfig) -> BuildSummary:
    """Build (or resume) a store of layer-`config.layers` states for every manifest row.

    Runs as one process, as every process of `accelerate launch` (each caches its share of
    the utterances into its own shard files; the main process finalises once all are done),
    or as one `--part I/N` of independent jobs (finalised by a later run without --part).

    Raises:
        ManifestError, ModelError, ConfigError, StoreMismatch: before any compute.
        StoreError: when writing fails (e.g. disk full); what was committed stays readable.

    Failed audio does not raise: it is listed in the summary (and the store's metadata).
    """
    config.validate()
    rank, world, state = writers(config)
    if world > 1 and config.overwrite:
        raise ConfigError("--overwrite with several writers would let each delete the others' "
                          "work: delete the store first, or overwrite it with a single process")
    main = rank == 0 and config.part is None
    manifest = load_manifest(config.manifest, audio_root=config.audio_root)
    loaded = load_model(config.model)
    if config.layers > loaded.num_layers:
        raise ConfigError(f"--layers {config.layers}: model '{config.model}' has only "
                          f"{loaded.num_layers} transformer layers")
    shard_frames = config.shard_frames or default_shard_frames(loaded.hidden_size, config.dtype,
                                                               config.resolved_chunk_frames)
    meta = store_meta(config, loaded, shard_frames)
    prepare_store(config, meta, manifest, check_only=True)  # refused before a lock file is left there
    locks = take_locks(config, rank, state)
    try:
        return _build(config, manifest, loaded, meta, rank=rank, world=world, state=state, main=main)
    except OSError as err:  # a read-only or vanished --out, anywhere before the write loop
        raise StoreError(f"{config.out}: cannot write ({err.strerror or err}); choose a writable "
                         "--out") from None
    finally:
        for lock in locks:
            lock.release()


def _build(config: BuildConfig, manifest, loaded: LoadedModel, meta: dict, *, rank: int, world: int,
           state, main: bool) -> BuildSummary:
    """The build itself, run under the locks `build_cache` holds."""
    import torch
    from tqdm import tqdm

    from .encoder import LowerStack
    from .pooled import PooledStack
    from .store import committed_count

    prepare_store(config, meta, manifest)
    existing = read_meta(config.out) if Path(config.out).exists() else None
    if existing:  # resuming: keep the layout and the creation date
        if config.shard_frames and config.shard_frames != existing["shard_frames"]:
            log.warning("%s: keeping the store's %d frames per shard (--shard-frames %d applies "
                        "to new stores)", config.out, existing["shard_frames"], config.shard_frames)
        kept = existing.get("compression", "zstd")
        if config.compression and config.compression != kept:
            log.warning("%s: keeping the store's compression %s (--compression %s applies to new "
                        "stores)", config.out, kept, config.compression)
        meta.update(shard_frames=existing["shard_frames"], chunk_frames=existing["chunk_frames"],
                    compression=kept, created=existing.get("created"))
    else:
        meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if state is not None and not main:
        state.wait_for_everyone()  # the main process creates the store first
    writer = StoreWriter(config.out, meta, writer=rank)
    changed = changed_audio(manifest.utterances, writer.committed) if state is None or main else []
    if changed:
        named = ", ".join(f"{u.id} ({u.path})" for u in changed[:10]) + (" ..." if len(changed) > 10 else "")
        if config.part:  # other parts may be writing: only the lock's sole holder may retire records
            writer.close()
            raise StoreError(f"{config.out}: the audio of {len(changed)} cached utterance(s) changed "
                             f"since they were cached: {named}; run the same command without --part "
                             "to compute them again")
        log.warning("the audio of %d cached utterance(s) changed since they were cached; computing "
                    "them again: %s", len(changed), named)
        writer.retire({u.id for u in changed})
    if state is not None and main:
        state.wait_for_everyone()
    summary = BuildSummary(store=str(config.out), already=sum(
        u.id in writer.committed for u in manifest.utterances), changed=[u.id for u in changed])
    with ThreadPoolExecutor(max_workers=16) as pool:
        seconds = dict(zip([u.id for u in manifest.utterances],
                           pool.map(audio_seconds, [u.path for u in manifest.utterances])))
    every = batches_in_order(manifest.utterances, seconds, config.batch_size)
    todo_all = sum(u.id not in writer.committed for u in manifest.utterances)
    batches = [every[n] for n in assign(every, seconds, world)[rank]
               if any(u.id not in writer.committed for u in every[n])]
    device = config.device or (str(state.device) if state is not None else
                               ("cuda" if torch.cuda.is_available() else "cpu"))
    pooled = tuple(meta.get("pooled_layers", ()))
    lower = (PooledStack(loaded.model, config.layers, pooled, device=device, dtype=config.dtype) if pooled
             else LowerStack(loaded.model, config.layers, device=device, dtype=config.dtype))
    todo = sum(u.id not in writer.committed for b in batches for u in b)
    shown = config.progress and (main or config.part is not None)
    bar = tqdm(total=todo_all if state is not None else todo, unit="utt", desc="caching",
               disable=not shown, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    building_at_start, polled = committed_count(Path(config.out)), 0.0
    started = time.perf_counter()
    workers = decoding_threads() if config.workers is None else config.workers
    decoder = ThreadPoolExecutor(max_workers=max(1, workers))
    fe, min_samples = loaded.feature_extractor, loaded.receptive_field

    def store_batch(items: list, states: list, stats: list) -> None:
        for (utterance, info), hidden, stat in zip(items, states, stats):
            if utterance.id in writer.committed:
                continue
            writer.add({"id": utterance.id, **info}, to_storage(hidden, config.dtype), stat)
            summary.cached += 1
            summary.audio_hours += info["seconds"] / 3600
            bar.update(1)
            bar.set_postfix(hours=f"{summary.audio_hours:.2f}", refresh=False)

    stage = WriteStage(store_batch)
    try:
        ahead = 2 + workers // max(1, config.batch_size)
        def submit(batch: list[Utterance]) -> list:
            return [decoder.submit(decode, u, fe, min_samples, config.max_seconds,
                                   header_seconds=seconds[u.id]) for u in batch]

        futures = [submit(b) for b in batches[:ahead]]
        for i, batch in enumerate(batches):
            if i + ahead < len(batches):
                futures.append(submit(batches[i + ahead]))
            results = [f.result() for f in futures[i]]
            futures[i] = None
            good = []
            for utterance, (samples, info) in zip(batch, results):
                if info is None:
                    if utterance.id not in writer.committed:
                        summary.failed.append({"id": utterance.id, "path": utterance.path,
                                               "error": str(samples)})
                        log.warning("skipped %s: %s", utterance.id, samples)
                        bar.update(1)
                    continue
                good.append((utterance, samples, info))
            if good:
                states, stats, good = run_lower(lower, good, summary, writer, pooled=bool(pooled))
                states, stats, good = finite_only(states, stats, good, summary, writer, config)
                stage.put([(utterance, info) for utterance, _, info in good], states, stats)
            if state is not None and shown and time.perf_counter() - polled > 1:
                # one bar for all processes: their commits, counted from record names
                polled = time.perf_counter()
                others = committed_count(Path(config.out)) - building_at_start - summary.cached
                bar.n = min(todo_all, summary.cached + len(summary.failed) + max(0, others))
                bar.refresh()
        stage.close()
        writer.flush()
        writer.wait()
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise StoreError(f"{config.out}: disk full while writing; what was committed is kept "
                             "- free space and rerun the same command to resume") from None
        raise StoreError(f"{config.out}: cannot write: {err}") from None
    finally:
        stage.close(abort=True)  # after an error: what it holds is uncommitted, a rerun redoes it
        decoder.shutdown(wait=False, cancel_futures=True)
        if state is not None:
            bar.n = todo_all
        bar.close()
        if state is None and config.part is None:
            _finalize(writer, manifest, summary, config, after_error=sys.exc_info()[1] is not None)
        elif state is None:
            writer.close()
    if state is not None:
        from accelerate.utils import gather_object

        state.wait_for_everyone()
        shares = gather_object([(summary.cached, summary.audio_hours, summary.failed)])
        summary.cached = sum(s[0] for s in shares)
        summary.audio_hours = sum(s[1] for s in shares)
        summary.failed = [f for s in shares for f in s[2]]
        if main:
            _finalize(writer, manifest, summary, config)
        else:
            writer.close()
        state.wait_for_everyone()
    summary.seconds = time.perf_counter() - started
    summary.total = len(load_index(Path(config.out)))
    summary.store_bytes = sum(f.stat().st_size for f in Path(config.out).rglob("*") if f.is_file())
    summary.part = config.part
    summary.main = main or config.part is not None
    return summary


class WriteStage:
    """Conversion to the storage dtype, checksums and writes on a thread of their own, fed batch
    by batch through a bounded queue: the forward pass of the next batch runs while this one is
    stored, and at most `depth` computed batches wait (memory stays bounded). Batches are stored
    in the order they are put, so a store's bytes do not depend on the timing."""

    def __init__(self, store_batch, *, depth: int = 2):
        self.store_batch = store_batch
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.aborted = False
        self.thread = threading.Thread(target=self._run, name="ser-store", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None and not self.aborted:
                try:
                    self.store_batch(*item)
                except BaseException as err:  # raised in the building thread by put / close
                    self.error = err

    def put(self, *item) -> None:
        """Queue a batch (blocks while `depth` wait); raises the error of an earlier batch."""
        self._raise()
        self.queue.put(item)

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            self.aborted = True
            raise error

    def close(self, *, abort: bool = False) -> None:
        """Store what is queued (or, with `abort`, drop it) and stop; raises a batch's error."""
        if self.thread.is_alive():
            self.aborted = self.aborted or abort
            self.queue.put(None)
            self.thread.join()
        if not abort:
            self._raise()


def out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "memory" in str(err).lower()
        and ("out of" in str(err).lower() or "not enough" in str(err).lower()))


def run_lower(lower, good: list, summary: BuildSummary, writer: StoreWriter, *, pooled: bool):
    """(states, pooled statistics or Nones, the items they belong to) of a batch; when it runs
    out of memory, its utterances one at a time, and one that still does not fit is skipped
    and recorded (the rest of the build goes on)."""
    def run(items):
        out = lower([samples for _, samples, _ in items])
        return out if pooled else (out, [None] * len(items))

    try:
        return (*run(good), good)
    except (RuntimeError, MemoryError) as err:
        if not (isinstance(err, MemoryError) or out_of_memory(err)):
            raise
    import torch

    if torch.cuda.is_available():  # untested on CUDA: give the failed batch's memory back
        torch.cuda.empty_cache()
    states, stats, kept = [], [], []
    for item in good:
        utterance, samples, _ = item
        try:
            one, stat = run([item])
            states += list(one)
            stats += list(stat)
            kept.append(item)
        except (RuntimeError, MemoryError) as err:
            if not (isinstance(err, MemoryError) or out_of_memory(err)):
                raise
            if utterance.id not in writer.committed:
                message = (f"{utterance.path}: out of memory for {samples.shape[0] / SAMPLE_RATE:.0f} s "
                           "of audio; lower --max-seconds to skip such files up front, or use a "
                           "device with more memory")
                summary.failed.append({"id": utterance.id, "path": utterance.path, "error": message})
                log.warning("skipped %s: %s", utterance.id, message)
    return states, stats, kept


def finite_only(states: list, stats: list, good: list, summary: BuildSummary, writer: StoreWriter,
                config: BuildConfig):
    """`run_lower`'s (states, statistics, items), less the utterances whose states or pooled
    statistics hold NaN or Inf: each is skipped and recorded, never cached (its checksum would
    match, and training would read NaN)."""
    import torch

    kept = ([], [], [])
    for hidden, stat, item in zip(states, stats, good):
        if bool(torch.isfinite(hidden).all()) and (stat is None or np.isfinite(stat).all()):
            for part, value in zip(kept, (hidden, stat, item)):
                part.append(value)
            continue
        utterance, samples, _ = item
        if utterance.id not in writer.committed:
            dtype = str(hidden.dtype).removeprefix("torch.")
            message = (f"{utterance.path}: the model's layer-{config.layers} states of this audio hold "
                       f"NaN or Inf in {dtype} (its normalised samples reach "
                       f"{float(np.abs(samples).max()):.3g}); "
                       "check the audio's level, and use --dtype float32 if 16 bits overflowed")
            summary.failed.append({"id": utterance.id, "path": utterance.path, "error": message})
            log.warning("skipped %s: %s", utterance.id, message)
    return kept


def _finalize(writer: StoreWriter, manifest, summary: BuildSummary, config: BuildConfig, *,
              after_error: bool = False) -> None:
    """Make everything committed visible to readers. After an error this is best effort (the
    first error is the one to report); otherwise a failure here fails the build.

    Raises:
        StoreError: finalising failed (and no earlier error is on its way).
    """
    try:
        missing = [u.id for u in manifest.utterances if u.id not in writer.committed]
        writer.finalize(table=manifest.table, extra_meta={
            "failures": summary.failed, "complete": not missing,
            "utterances": len(writer.committed),
            "audio_hours": sum(r["seconds"] for r in writer.committed.values()) / 3600,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "manifest": Path(config.manifest).name,
        })
    except Exception as err:
        if not after_error:
            raise StoreError(f"{config.out}: could not finalise the store ({type(err).__name__}: "
                             f"{err}); what was committed is kept - rerun the same command to "
                             "finish") from None
        log.warning("could not finalise %s (%s); rerun the same command to finish", config.out, err)
    finally:
        writer.close()
