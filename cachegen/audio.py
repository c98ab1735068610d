"""Decode audio files to 16 kHz mono float32: soundfile (libsndfile) to decode, soxr to resample."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16000


def load_audio(path: str, *, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int, str]:
    """Decode `path`, mix down to mono and resample to `sample_rate`.

    Returns:
        (samples as float32 in [-1, 1], the file's own sample rate, sha256 of the file bytes)

    Raises:
        AudioError: the file is empty, cannot be decoded, or holds NaN/Inf samples.
    """
    import soundfile as sf
    import soxr

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise AudioError(f"{path}: cannot read: {err.strerror}") from None
    if not data:
        raise AudioError(f"{path}: file is empty (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if (f.format, f.subtype) == ("WAV", "PCM_16"):
                # libsndfile's own float conversion of 16-bit PCM is x / 32768 (exact in float32),
                # done in a scalar loop at half numpy's speed: the same values, measured in
                # docs/benchmarks.md ("Feeding a GPU")
                samples = f.read(dtype="int16", always_2d=True).astype(np.float32)
                samples *= np.float32(1 / 32768)
            else:
                samples = f.read(dtype="float32", always_2d=True)
            source_rate = f.samplerate
    except Exception as err:  # libsndfile raises several types for corrupt input
        reason = re.sub(r"^Error opening .*?: ", "", str(err).strip().splitlines()[0])
        raise AudioError(f"{path}: cannot decode: {reason}") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"{path}: contains NaN or Inf samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32), int(source_rate), digest


def audio_seconds(path: str) -> float:
    """Duration from the file header, without decoding (0.0 if the header is unreadable)."""
    import soundfile as sf

    try:
        info = sf.info(path)
        return info.frames / info.samplerate
    except Exception:
        return 0.0
