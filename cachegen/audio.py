"""Decode audio files to 16 kHz mono float32: soundfile (libsndfile) to decode, soxr to resample."""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16000
MAX_CHANNELS = 1024  # libsndfile's limit
# chunks the fast WAV path steps over (libsndfile stops at others it does not know, and parses
# some it knows in ways a malformed one can fail): a file with any other goes to libsndfile
PLAIN_WAV_CHUNKS = {b"fmt ", b"fact", b"LIST", b"JUNK", b"data"}


def load_audio(path: str, *, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int, str]:
    """Decode `path`, mix down to mono and resample to `sample_rate`.

    Returns:
        (float32 samples as libsndfile decodes them: integer PCM in [-1, 1), float files as
        stored; the file's own sample rate; sha256 of the file bytes)

    Raises:
        AudioError: the file is empty, cannot be decoded, or holds NaN/Inf samples.
    """
    import soundfile as sf
    import soxr

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > HEADER_FIRST_BYTES:
                check_header(path, f)
                f.seek(0)
            data = f.read()
    except OSError as err:
        raise AudioError(f"{path}: cannot read: {err.strerror}") from None
    if not data:
        raise AudioError(f"{path}: file is empty (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    plain = plain_pcm16_wav(data)
    if plain is not None:
        # libsndfile's float conversion of 16-bit PCM is x / 32768 (exact in float32), done in a
        # scalar loop behind Python read callbacks that hold the GIL: numpy gives the same values
        # at several times the speed (docs/benchmarks.md, "Feeding a GPU")
        pcm, source_rate = plain
        samples = np.multiply(pcm, np.float32(1 / 32768), dtype=np.float32)
    else:
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                samples = read_all(f)
                source_rate = f.samplerate
        except Exception as err:  # libsndfile raises several types for corrupt input
            raise decode_error(path, err) from None
        if not np.isfinite(samples).all():
            raise AudioError(f"{path}: contains NaN or Inf samples")
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32), int(source_rate), digest


# a file larger than this is read whole (for its hash and decoding) only once libsndfile reads
# its header: a large file that is not audio (a video, an archive) is refused unread
HEADER_FIRST_BYTES = 64 * 2**20


def check_header(path: str, f) -> None:
    import soundfile as sf

    try:
        sf.info(f)
    except Exception as err:
        raise decode_error(path, err) from None


def decode_error(path: str, err: Exception) -> AudioError:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    reason = re.sub(r"^Error opening .*?: ", "", lines[0])
    return AudioError(f"{path}: cannot decode: {reason}")


# frames per read of a file libsndfile cannot seek in
BLOCK_FRAMES = 1 << 16


def read_all(f) -> np.ndarray:
    """Every frame of an open soundfile.SoundFile as float32 (frames, channels). libsndfile
    cannot seek in some codecs (GSM 6.10 in WAV), and soundfile then needs a frame count:
    such a file is read block by block until it ends, whatever its header says."""
    if f.seekable():
        return f.read(dtype="float32", always_2d=True)
    blocks = []
    while True:
        blocks.append(f.read(BLOCK_FRAMES, dtype="float32", always_2d=True))
        if blocks[-1].shape[0] < BLOCK_FRAMES:
            return np.concatenate(blocks)


def audio_seconds(path: str) -> float:
    """Duration from the file header, without decoding (0.0 if the header is unreadable)."""
    import soundfile as sf

    try:
        info = sf.info(path)
        return info.frames / info.samplerate
    except Exception:
        return 0.0


def plain_pcm16_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """(int16 samples (frames, channels), sample rate) of a plain 16-bit PCM WAV file: RIFF,
    format tag 1, block align 2 x channels, only the chunks of PLAIN_WAV_CHUNKS, each up to the
    data chunk whole and inside the RIFF size. None for anything else, which libsndfile
    decodes: the fast path of `load_audio` takes only files whose samples it reads exactly as
    libsndfile does."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    end = min(len(data), int.from_bytes(data[4:8], "little") + 8)
    position, fmt = 12, None
    while position + 8 <= end:
        chunk, size = data[position:position + 4], int.from_bytes(data[position + 4:position + 8], "little")
        body = position + 8
        if body + size > end or chunk not in PLAIN_WAV_CHUNKS:
            return None
        if chunk == b"fmt ":
            if fmt is not None or size < 16:
                return None
            fmt = struct.unpack_from("<HHIIHH", data, body)  # tag, channels, rate, bytes/s, align, bits
        elif chunk == b"data":
            if fmt is None:
                return None
            tag, channels, rate, _, align, bits = fmt
            if (tag != 1 or bits != 16 or not 1 <= channels <= MAX_CHANNELS or align != 2 * channels
                    or not 1 <= rate < 2**31):  # libsndfile holds the rate in a signed int
                return None
            frames = size // align
            return np.frombuffer(data, "<i2", count=frames * channels, offset=body).reshape(frames, channels), rate
        position = body + size + (size & 1)  # chunks are padded to an even size
    return None
