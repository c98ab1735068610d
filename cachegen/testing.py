"""Tiny random Wav2Vec2 models and a synthetic speech-like corpus, for the demo, tests and benchmarks.

Nothing here downloads anything: models are built from a config with random weights, and the
corpus is synthesised so that its labels follow its prosody (pitch, syllable rate, loudness,
brightness) and a model can actually learn them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def tiny_config(*, stable_layer_norm: bool = False, layers: int = 4, hidden: int = 32):
    """A Wav2Vec2 config with the base model's convolution geometry (320x stride, 400-sample
    receptive field, 50 frames/s) and a tiny transformer."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        conv_dim=(hidden,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=stable_layer_norm,
        feat_extract_norm="layer" if stable_layer_norm else "group",
    )


# Fields of `tiny_config` that mean something else in a family's config: left at that family's
# default. data2vec-audio's num_conv_pos_embeddings counts its positional convolution layers
# (5, each of kernel conv_pos_kernel_size 19, as in data2vec-audio-base), not a kernel width.
OTHER_MEANING = {"data2vec-audio": {"num_conv_pos_embeddings"}}


def tiny_family_config(model_type: str, *, stable_layer_norm: bool = False, layers: int = 4,
                       hidden: int = 32):
    """A config of any supported family (cachegen.encoder.FAMILIES) with the geometry of
    `tiny_config`: its fields, where the family has them with the same meaning.

    Raises:
        ValueError: `stable_layer_norm` for a family without that variant (data2vec-audio).
    """
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(model_type))
    fields = tiny_config(stable_layer_norm=stable_layer_norm, layers=layers, hidden=hidden).to_dict()
    keep = set(config_class().to_dict()) - {"model_type", "architectures", "transformers_version"}
    if stable_layer_norm and "do_stable_layer_norm" not in keep:
        raise ValueError(f"{model_type} has no stable-layer-norm (large) variant")
    keep -= OTHER_MEANING.get(model_type, set())
    return config_class(**{k: v for k, v in fields.items() if k in keep})


def tiny_hubert_config(*, layers: int = 4, hidden: int = 32):
    """A HuBERT config with the same geometry as `tiny_config`."""
    return tiny_family_config("hubert", layers=layers, hidden=hidden)


def base_config():
    """The wav2vec2-base architecture (random weights), for benchmarks."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config()  # the defaults are wav2vec2-base's geometry


def save_model(out_dir: str | Path, config, *, seed: int = 0) -> Path:
    """Save a randomly initialised encoder (Wav2Vec2Model, HubertModel, ... per `config`) and its
    feature-extractor config to `out_dir`."""
    import torch
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    from .encoder import per_utterance_features, quiet_transformers

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with quiet_transformers():
        model = AutoModel.from_config(config)
        model.save_pretrained(out_dir)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=not per_utterance_features(config),
    ).save_pretrained(out_dir)
    return out_dir


def save_tiny_model(out_dir: str | Path, *, stable_layer_norm: bool = False, layers: int = 4,
                    hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny random Wav2Vec2 (see `tiny_config`) to `out_dir` and return the path."""
    return save_model(out_dir, tiny_config(stable_layer_norm=stable_layer_norm, layers=layers,
                                           hidden=hidden), seed=seed)


def synth_utterance(rng: np.random.Generator, *, seconds: float, sample_rate: int, pitch: float,
                    rate: float, loudness: float, brightness: float) -> np.ndarray:
    """A voiced, syllabic, speech-like signal: harmonics of a gliding pitch under a syllable envelope."""
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = pitch * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    tilt = 2.5 - 2.0 * brightness  # brighter voices keep more energy in high harmonics
    harmonics = np.arange(1, 16)
    harmonics = harmonics[harmonics * pitch * 1.1 < sample_rate / 2]
    voice = sum(h ** -tilt * np.sin(h * phase) for h in harmonics)
    envelope = np.clip(np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3)), 0, None) ** 0.7
    signal = loudness * voice / np.abs(voice).max() * envelope
    signal += 0.003 * rng.standard_normal(n)
    return signal.astype(np.float32)


def synth_corpus(out_dir: str | Path, *, utterances: int = 60, seed: int = 0,
                 seconds: tuple[float, float] = (0.6, 2.0),
                 sample_rates: tuple[int, ...] = (16000,), stereo_every: int = 0) -> Path:
    """Write a synthetic corpus of wav files and `manifest.csv` (id, path, split, speaker,
    activation, valence, dominance on a 1..7 scale) into `out_dir`; return the manifest path.

    Activation follows pitch, syllable rate and loudness; valence follows brightness; dominance
    follows loudness and low pitch. Splits are 70% train, 15% dev, 15% test.
    """
    import soundfile as sf

    out_dir = Path(out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(utterances):
        pitch, rate = rng.uniform(0, 1), rng.uniform(0, 1)
        loudness, brightness = rng.uniform(0, 1), rng.uniform(0, 1)
        sample_rate = sample_rates[i % len(sample_rates)]
        audio = synth_utterance(rng, seconds=rng.uniform(*seconds), sample_rate=sample_rate,
                                pitch=90 + 170 * pitch, rate=2.5 + 4.5 * rate,
                                loudness=0.1 + 0.7 * loudness, brightness=brightness)
        if stereo_every and i % stereo_every == 0:
            audio = np.stack([audio, 0.9 * audio], axis=1)
        uid = f"utt{i:04d}"
        sf.write(out_dir / "wav" / f"{uid}.wav", audio, sample_rate, subtype="PCM_16")
        noise = rng.normal(0, 0.15, size=3)
        scale = lambda x: float(np.clip(1 + 6 * x, 1, 7))  # noqa: E731
        split = "train" if i % 20 < 14 else ("dev" if i % 20 < 17 else "test")
        rows.append({
            "id": uid, "path": f"wav/{uid}.wav", "split": split, "speaker": f"spk{i % 6}",
            "activation": round(scale(0.5 * pitch + 0.3 * rate + 0.2 * loudness + noise[0] / 6), 3),
            "valence": round(scale(brightness + noise[1] / 6), 3),
            "dominance": round(scale(0.6 * loudness + 0.4 * (1 - pitch) + noise[2] / 6), 3),
        })
    return _write_manifest(out_dir, rows)


def _write_manifest(out_dir: Path, rows: list[dict]) -> Path:
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def synth_rate_corpus(out_dir: str | Path, *, utterances: int = 200, seed: int = 0,
                      syllables: tuple[int, int] = (5, 6)) -> Path:
    """A corpus where arousal drives speaking rate, pitch and loudness together, as in real
    emotional speech, so duration follows activation: each utterance says `syllables` syllables
    at 2.5..7 per second, and fast (active) utterances are short. Same columns and splits as
    `synth_corpus`; returns the manifest path. Length-sorted batches hold nearly one
    activation value here."""
    import soundfile as sf

    out_dir = Path(out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(utterances):
        arousal, brightness, spare = rng.uniform(0, 1, size=3)
        pitch, loudness = np.clip(arousal + rng.normal(0, 0.15, size=2), 0, 1)
        rate_hz = 2.5 + 4.5 * arousal
        seconds = rng.integers(syllables[0], syllables[1] + 1) / rate_hz
        audio = synth_utterance(rng, seconds=seconds, sample_rate=16000, pitch=90 + 170 * pitch,
                                rate=rate_hz, loudness=0.1 + 0.7 * loudness, brightness=brightness)
        uid = f"utt{i:04d}"
        sf.write(out_dir / "wav" / f"{uid}.wav", audio, 16000, subtype="PCM_16")
        noise = rng.normal(0, 0.1, size=3)
        scale = lambda x: float(np.clip(1 + 6 * x, 1, 7))  # noqa: E731
        split = "train" if i % 20 < 14 else ("dev" if i % 20 < 17 else "test")
        rows.append({
            "id": uid, "path": f"wav/{uid}.wav", "split": split, "speaker": f"spk{i % 6}",
            "activation": round(scale(arousal + noise[0]), 3),
            "valence": round(scale(brightness + noise[1]), 3),
            "dominance": round(scale(0.5 * loudness + 0.5 * spare + noise[2]), 3),
        })
    return _write_manifest(out_dir, rows)
