"""The encoder, split at a layer: embed audio, run a range of transformer layers, finish.

These functions call transformers' own submodules in the order Wav2Vec2Model.forward does,
so that `run_layers(embed(audio), 0, L)` equals transformers' `hidden_states[L]`. The cache
stores that; headtrain runs layers L+1..N and `finish` on it. SpecAugment and LayerDrop are
never applied, for any strategy: the cached layers could not apply them, and every strategy
must see the same inputs.
"""

from __future__ import annotations

import numpy as np
import torch


def receptive_field(config) -> int:
    """Samples the convolutional encoder needs for one output frame (400 for base models)."""
    field, jump = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def frame_counts(model, sample_counts: list[int]) -> list[int]:
    lengths = model._get_feat_extract_output_lengths(torch.tensor(sample_counts))
    return [int(n) for n in lengths]


def pad_frames(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, D) tensors into (B, T, D), zero-padded, with a (B, T) bool mask of real frames."""
    lengths = torch.tensor([s.shape[0] for s in sequences])
    batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    mask = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
    return batch, mask.to(batch.device)


def encode_features(model, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Convolutional feature encoder and projection: (B, T, D) and the frame mask.

    Group-norm encoders (base models) normalise each channel over time, so padding would leak
    into real frames: they run one utterance at a time. Layer-norm encoders run as one batch.
    """
    if model.config.feat_extract_norm == "group":
        feats = [model.feature_extractor(w[None]).transpose(1, 2)[0] for w in waveforms]
    else:
        audio, _ = pad_frames(waveforms)  # (B, S)
        out = model.feature_extractor(audio).transpose(1, 2)  # (B, T, C)
        counts = frame_counts(model, [w.shape[0] for w in waveforms])
        feats = [out[i, :n] for i, n in enumerate(counts)]
    feats, mask = pad_frames(feats)  # (B, T, C)
    projected = model.feature_projection(feats)
    hidden = projected[0] if isinstance(projected, tuple) else projected  # (B, T, D)
    return hidden, mask


def embed(model, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio to the input of the first transformer layer (transformers' hidden_states[0])."""
    hidden, mask = encode_features(model, waveforms)
    encoder = model.encoder
    hidden = hidden.masked_fill(~mask[..., None], 0.0)
    hidden = hidden + encoder.pos_conv_embed(hidden)
    if not model.config.do_stable_layer_norm:
        hidden = encoder.layer_norm(hidden)
    return encoder.dropout(hidden), mask


def run_layers(config, layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run transformer `layers` (a sequence of encoder layers) on (B, T, D) states; padded
    frames are masked out of attention."""
    from transformers.masking_utils import create_bidirectional_mask

    if len(layers) == 0:
        return hidden
    attention_mask = create_bidirectional_mask(config=config, inputs_embeds=hidden,
                                               attention_mask=mask)
    for layer in layers:
        hidden = layer(hidden, attention_mask=attention_mask)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def finish(model, hidden: torch.Tensor) -> torch.Tensor:
    """Stable-layer-norm (large) encoders normalise after the last layer."""
    return model.encoder.layer_norm(hidden) if model.config.do_stable_layer_norm else hidden


def audio_frames(model, samples: int, sample_rate: int) -> int:
    """Frames the encoder yields for a file of `samples` at `sample_rate` once resampled to
    16 kHz (soxr yields round(samples * 16000 / rate) samples)."""
    return frame_counts(model, [round(samples * 16000 / sample_rate)])[0]


class LowerStack:
    """Feature encoder and the lower `layers` transformer layers, frozen, in eval mode."""

    def __init__(self, model, layers: int, *, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.layers = layers
        self.device = device

    @torch.inference_mode()
    def __call__(self, waveforms: list[np.ndarray]) -> list[torch.Tensor]:
        """Normalised 16 kHz waveforms -> one (frames, hidden) float32 tensor per utterance."""
        tensors = [torch.from_numpy(np.asarray(w, dtype=np.float32)).to(self.device) for w in waveforms]
        hidden, mask = embed(self.model, tensors)
        hidden = run_layers(self.model.config, self.model.encoder.layers[:self.layers], hidden, mask)
        counts = mask.sum(dim=1).tolist()
        return [hidden[i, :n].float().cpu() for i, n in enumerate(counts)]
