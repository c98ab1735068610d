"""Batches for training and evaluation, from a store (states) or from audio.

The batch plan depends only on the seed, the epoch and the utterance lengths in frames, so the
same seed gives the same batches from a cache or from audio. Reading runs in background
threads, a few batches ahead of the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

log = logging.getLogger(__name__)

# numpy dtype of loaded states -> the batch's torch dtype (uint16: bfloat16 bits)
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "uint16": torch.bfloat16,
                "int8": torch.int8}
BUCKET_BATCHES = 32  # batches per sorting bucket of `length` batching


class Batching(str, Enum):
    """How training utterances are grouped into batches (`--batching`).

    RANDOM: every batch is a random sample of the training split, so a per-batch CCC loss sees
        the spread of the targets (docs/training.md: measured against LENGTH).
    LENGTH: shuffled, sorted by length within buckets of BUCKET_BATCHES batches: less padding,
        but where duration follows the targets (speaking rate drives both) each batch holds
        nearly one target value and the CCC loss learns much worse.
    """

    RANDOM = "random"
    LENGTH = "length"


@dataclass
class Batch:
    ids: list[str]
    inputs: object  # (B, T, D) states, a list of (S_i,) waveforms, or (B, layers, D) pooled means
    mask: torch.Tensor | None  # (B, T) bool for states; None for audio (the model derives it) and pooled means
    targets: torch.Tensor | None  # (B, targets), standardised
    scales: torch.Tensor | None = None  # (B, T, 1) float32 per-frame scales of int8 inputs

    def to(self, device) -> "Batch":
        """Move to `device`; states travel as stored (float16 from a float16 store: half the
        bytes of float32; int8 with its scales: a quarter) and become float32 there. From
        pinned memory (collate's `pin`) the copies are asynchronous on CUDA (untested on CUDA:
        no GPU in our CI)."""
        if isinstance(self.inputs, list):
            self.inputs = [w.to(device) for w in self.inputs]
        else:
            self.inputs = self.inputs.to(device, non_blocking=True).float()
            if self.scales is not None:
                self.inputs *= self.scales.to(device, non_blocking=True)
                self.scales = None
        self.mask = None if self.mask is None else self.mask.to(device, non_blocking=True)
        self.targets = None if self.targets is None else self.targets.to(device, non_blocking=True)
        return self


def plan_batches(lengths: list[int], *, batch_size: int, seed: int, epoch: int,
                 shuffle: bool = True, batching: Batching | str = Batching.RANDOM) -> list[list[int]]:
    """Index batches for one epoch, fixed by the seed, the epoch and the lengths alone (so a
    store and the audio give the same batches).

    Args:
        shuffle: False for evaluation: sorted by length, no randomness (nothing is learnt).
        batching: RANDOM (a shuffle cut into batches) or LENGTH (see `Batching`).
    """
    order = np.arange(len(lengths))
    lengths = np.asarray(lengths)
    if not shuffle:
        order = order[np.argsort(lengths, kind="stable")]
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(order)
    if Batching(batching) is Batching.RANDOM:
        return _training_batches(order, batch_size)
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = order[start:start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += _training_batches(chunk, batch_size)
    return [batches[i] for i in rng.permutation(len(batches))]


def _training_batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    """`order` cut into batches; a last batch of one joins the one before it (a CCC loss over
    one utterance has no gradient, yet the optimizer would still step)."""
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()
        batches[-1] += last
    return batches


def crop_start(seed: int, epoch: int, index: int, frames: int, max_frames: int) -> int:
    """Where a random crop of `max_frames` starts: fixed by seed, epoch and utterance."""
    if not max_frames or frames <= max_frames:
        return 0
    return int(np.random.default_rng([seed, epoch, index]).integers(0, frames - max_frames + 1))


# `ser train` holds a store's states in memory after their first read (no --preload given)
# when they take at most this much, and at most a quarter of the memory available
PRELOAD_BUDGET = 4 * 2**30


def memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def keep_in_memory(preload: bool | None, memory_bytes: int, *, what: str) -> bool:
    """`preload` as given, or (None) whether `memory_bytes` fit PRELOAD_BUDGET and a quarter of
    the memory available."""
    if preload is not None:
        return preload
    available = memory_available()
    budget = min(PRELOAD_BUDGET, available // 4 if available else PRELOAD_BUDGET)
    if memory_bytes <= budget:
        log.info("keeping the store's %s in memory after their first read (%.0f MiB; budget %.0f MiB)",
                 what, memory_bytes / 2**20, budget / 2**20)
        return True
    return False


class CacheSource:
    """Hidden states from a store; lengths from its index (no data read).

    `load` gives the stored rows as numpy arrays (float16, float32, bfloat16 bits, or int8
    values followed by their scale's bytes); `collate` pads them into one tensor of that
    dtype (int8: plus a scales tensor), and `Batch.to` makes float32 of them on the device.
    With `preload`, each utterance is kept in memory after its first read (the first epoch
    reads the store, later ones do not); None decides by size (PRELOAD_BUDGET).
    """

    kind = "states"

    def __init__(self, reader, *, preload: bool | None = False):
        from cachegen.store import COMPACT_DTYPES, storage_width

        self.reader = reader
        self.dtype = np.dtype(COMPACT_DTYPES[reader.dtype])
        frames = sum(reader.frames(uid) for uid in reader.ids)
        width = storage_width(reader.meta.get("hidden_size", 0), reader.dtype)
        self.memory_bytes = frames * width * self.dtype.itemsize
        self.preload = keep_in_memory(preload, self.memory_bytes, what="states")
        self._memory: dict[str, np.ndarray] = {}

    def length(self, uid: str) -> int:
        return self.reader.frames(uid)

    def load(self, uid: str, crop: tuple[int, int] | None = None) -> np.ndarray:
        states = self._memory.get(uid)
        if states is None:
            states = self.reader.read_raw(uid)
            if self.preload:  # a private copy: the read may be a view of a mapped shard
                states = self._memory[uid] = np.array(states)
        if crop:
            states = states[crop[0]:crop[0] + crop[1]]
        return states


class PooledSource:
    """Each utterance's pooled means of `layers` (weighted-sum's input): (layers, D) float32
    rows of a store built with --pooled-layers; lengths from its index. No frame is read.

    The reader checks each row against its checksum; a row that passes it but holds NaN/Inf,
    or nothing at all (zeros: the row of no utterance), is refused here, naming the store and
    the utterance: a store built elsewhere is never trained on silently wrong.
    """

    kind = "pooled"

    def __init__(self, reader, layers: tuple[int, ...] | None = None, *, preload: bool | None = False):
        """`layers`: the pooled layers to read, in order (None: every one the store holds).

        Raises:
            StoreMismatch: the store holds no pooled statistics, or not those of `layers`.
        """
        from cachegen.errors import StoreMismatch

        stored = list(reader.pooled_layers)
        if not stored:
            raise StoreMismatch(f"{reader.location}: holds no pooled statistics, which --strategy "
                                "weighted-sum trains on; rebuild it with `ser cache build ... "
                                "--pooled-layers all` (the frame states are kept, only layers run again)")
        layers = tuple(stored) if layers is None else tuple(layers)
        missing = [n for n in layers if n not in stored]
        if missing:
            raise StoreMismatch(f"{reader.location}: holds pooled layers {stored}, not layer(s) "
                                f"{missing} that the run mixes; use a store built with "
                                f"--pooled-layers {','.join(map(str, layers))} (or all)")
        self.reader, self.layers = reader, layers
        self.slots = [stored.index(n) for n in layers]
        self.memory_bytes = len(reader.ids) * len(layers) * reader.meta["hidden_size"] * 4
        self.preload = keep_in_memory(preload, self.memory_bytes, what="pooled means")
        self._memory: dict[str, np.ndarray] = {}

    def length(self, uid: str) -> int:
        return self.reader.frames(uid)

    def load(self, uid: str, crop: tuple[int, int] | None = None) -> np.ndarray:
        """(layers, D) float32 means; `crop` does not apply (frames are already pooled)."""
        from cachegen.errors import StoreCorrupt

        means = self._memory.get(uid)
        if means is not None:
            return means
        stats = self.reader.pooled(uid)  # (stored layers, 2, D), checksum checked
        if not np.isfinite(stats).all():
            raise StoreCorrupt(f"{self.reader.location}: pooled statistics of '{uid}' hold NaN or "
                               "Inf; rebuild the store (its checksum matches, so it was written so)")
        if not stats.any():
            raise StoreCorrupt(f"{self.reader.location}: pooled statistics of '{uid}' are all 0, "
                               "the row of no utterance; run `ser cache verify` and rebuild the store")
        means = np.ascontiguousarray(stats[self.slots, 0])
        if self.preload:
            self._memory[uid] = means
        return means


class AudioSource:
    """Normalised 16 kHz waveforms decoded from files; lengths from headers (no decoding).

    Files whose header cannot be read or that are shorter than the model's receptive field
    (no frame) are in `unusable` (id -> why), as a build would skip them."""

    kind = "audio"

    def __init__(self, paths: dict[str, str], model, feature_extractor):
        import soundfile as sf

        from cachegen.encoder import audio_frames, receptive_field

        self.paths = paths
        self.feature_extractor = feature_extractor
        self.stride = int(np.prod(model.config.conv_stride))
        self.receptive_field = receptive_field(model.config)

        def frames(path: str) -> int | str:
            try:
                info = sf.info(path)
            except Exception as err:  # libsndfile raises several types; the reason is enough
                return f"{path}: cannot be read ({str(err).strip().splitlines()[0]})"
            count = audio_frames(model, info.frames, info.samplerate) if info.samplerate > 0 else 0
            return count if count > 0 else (
                f"{path}: {info.frames} samples at {info.samplerate} Hz, shorter than the model's "
                f"receptive field ({self.receptive_field} samples at 16 kHz)")

        with ThreadPoolExecutor(max_workers=16) as pool:  # headers only; a shared disk is slow
            found = dict(zip(paths, pool.map(frames, paths.values())))
        self._lengths = {uid: n for uid, n in found.items() if isinstance(n, int)}
        self.unusable = {uid: why for uid, why in found.items() if isinstance(why, str)}

    def length(self, uid: str) -> int:
        return self._lengths[uid]

    def load(self, uid: str, crop: tuple[int, int] | None = None) -> torch.Tensor:
        from cachegen.audio import SAMPLE_RATE, load_audio

        samples, _, _ = load_audio(self.paths[uid])
        if crop:  # the samples behind frames [start, start + count)
            start, count = crop
            samples = samples[start * self.stride:(start + count - 1) * self.stride + self.receptive_field]
        values = self.feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
        return torch.from_numpy(values.astype(np.float32))


def collate(source, ids: list[str], items: list, targets, *, pin: bool = False) -> Batch:
    """One batch: waveforms as a list; states zero-padded into one (B, T, D) tensor of their
    stored dtype (int8: and a (B, T, 1) scales tensor; in pinned memory with `pin`, for asynchronous copies to a GPU) and a
    (B, T) mask of real frames."""
    target_tensor = None if targets is None else torch.as_tensor(targets, dtype=torch.float32)
    if source.kind == "audio":
        return Batch(ids=ids, inputs=items, mask=None, targets=target_tensor)
    if source.kind == "pooled":  # (B, layers, D): nothing to pad
        means = torch.from_numpy(np.stack(items))
        if pin:
            means, target_tensor = means.pin_memory(), None if target_tensor is None else target_tensor.pin_memory()
        return Batch(ids=ids, inputs=means, mask=None, targets=target_tensor)
    from cachegen.store import int8_parts

    lengths = torch.tensor([len(item) for item in items])
    frames, dtype = int(lengths.max()), TORCH_DTYPES[items[0].dtype.name]
    scaled = dtype == torch.int8  # int8 rows end with their scale's 4 bytes
    width = items[0].shape[1] - (4 if scaled else 0)
    states = torch.empty((len(items), frames, width), dtype=dtype, pin_memory=pin)
    scales = torch.empty((len(items), frames, 1), dtype=torch.float32, pin_memory=pin) if scaled else None
    # numpy has no bfloat16: its bits are copied as int16
    target = (states.view(torch.int16) if dtype == torch.bfloat16 else states).numpy()
    for i, item in enumerate(items):  # one copy from the store's bytes; only padding is zeroed
        n = len(item)
        if scaled:
            values, frame_scales = int8_parts(item)
            target[i, :n] = values
            scales.numpy()[i, :n] = frame_scales
            scales.numpy()[i, n:] = 0
        else:
            target[i, :n] = item.view(target.dtype)
        target[i, n:] = 0
    mask = torch.arange(frames)[None, :] < lengths[:, None]
    if pin:
        mask, target_tensor = mask.pin_memory(), None if target_tensor is None else target_tensor.pin_memory()
    return Batch(ids=ids, inputs=states, mask=mask, targets=target_tensor, scales=scales)


def iterate_batches(source, ids: list[str], targets: np.ndarray | None, plan: list[list[int]], *,
                    seed: int = 0, epoch: int = 0, max_frames: int | None = None,
                    workers: int = 2, ahead: int = 4, pin: bool = False) -> Iterator[Batch]:
    """Yield the planned batches in order, reading up to `ahead` batches in the background
    (`pin`: states in pinned memory, for a CUDA device)."""

    def read(batch: list[int]) -> Batch:
        items = []
        for index in batch:
            uid = ids[index]
            frames = source.length(uid)
            start = crop_start(seed, epoch, index, frames, max_frames or 0)
            crop = (start, max_frames) if max_frames and frames > max_frames else None
            items.append(source.load(uid, crop))
        return collate(source, [ids[i] for i in batch], items,
                       None if targets is None else targets[batch], pin=pin)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(read, b) for b in plan[:ahead]]
        for i in range(len(plan)):
            if i + ahead < len(plan):
                pending.append(pool.submit(read, plan[i + ahead]))
            yield pending[i].result()
            pending[i] = None
