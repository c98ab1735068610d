"""The encoder: model families, loading and fingerprinting, and the encoder split at a layer.

Everything ser knows about a model family is one row of `FAMILIES`. The functions below call
transformers' own submodules in the order the family's `forward` does, so that
`run_layers(model, layers, *embed(model, audio))` over layers 0..L-1 equals transformers'
`hidden_states[L]`. The cache stores that; headtrain runs layers L+1..N and `finish` on it.
SpecAugment and LayerDrop are never applied, for any strategy: the cached layers could not
apply them, and every strategy must see the same inputs.

Adding a family (one whose layers take (hidden, mask) after a convolutional feature encoder,
a feature projection and a positional convolution, as Wav2Vec2's do): add a `Family` row
naming what differs, a tiny config in `cachegen/testing.py`, and the equivalence tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/wav2vec2-base"


@dataclass(frozen=True)
class Family:
    """What differs between model families that ser runs split at a layer.

    Attributes:
        model_type: transformers' `config.model_type`.
        cache_replaces: submodules (dotted paths on the base model) a store feeds instead of
            audio; a model fed from a store does not hold them (nor the layers below it).
        lora_targets: names of the linear layers inside one transformer layer that LoRA adapts.
            Only layers whose `forward` is called may be named: an adapter on a weight that the
            family reads directly (WavLM's attention projections) would never act.
        float_dropouts: attributes (dotted, inside one layer) that hold a dropout probability
            as a float rather than an nn.Dropout module.
        position_bias: layers take a relative position bias computed from layer 0's relative
            embedding for the sequence length (each layer gates it itself); a model fed from a
            store keeps layer 0's embedding to compute it.
        key_padding_mask: layers take the (B, T) bool mask of real frames; otherwise they take
            transformers' 4-D attention mask.
        stacked_pos_conv: the positional convolution is a stack of convolution layers
            (`pos_conv_embed.layers`); padded frames are zeroed before each of them (`positional`).
    """

    model_type: str
    cache_replaces: tuple[str, ...] = ("feature_extractor", "feature_projection", "encoder.pos_conv_embed")
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense",
                                     "output_dense")
    float_dropouts: tuple[str, ...] = ("attention.dropout",)
    position_bias: bool = False
    key_padding_mask: bool = False
    stacked_pos_conv: bool = False


FAMILIES = {family.model_type: family for family in (
    Family("wav2vec2"),
    Family("hubert"),
    Family("wavlm", lora_targets=("intermediate_dense", "output_dense"), position_bias=True,
           key_padding_mask=True),
    Family("data2vec-audio", stacked_pos_conv=True),
)}
SUPPORTED_TYPES = tuple(FAMILIES)


def family_of(config) -> Family:
    """The family row for a transformers config.

    Raises:
        ModelError: the model type has no row.
    """
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelError(f"model type '{config.model_type}' is not supported; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    return family


def stable_layer_norm(config) -> bool:
    """Large (pre-layer-norm) variant: normalise after the last layer, not after embedding.
    data2vec-audio has only the post-norm variant and no such field."""
    return bool(getattr(config, "do_stable_layer_norm", False))


def per_utterance_features(config) -> bool:
    """Group-norm feature encoders (base models) normalise each channel over time, so padding
    would leak into real frames: they run one utterance at a time."""
    return getattr(config, "feat_extract_norm", "layer") == "group"


@dataclass
class LoadedModel:
    model: object  # transformers encoder of a FAMILIES type, eval mode, on CPU
    feature_extractor: object
    model_id: str
    weights_sha256: str

    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> Family:
        return family_of(self.model.config)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def stable_layer_norm(self) -> bool:
        return stable_layer_norm(self.model.config)

    @property
    def frame_rate(self) -> float:
        return self.feature_extractor.sampling_rate / math.prod(self.model.config.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Samples needed for one output frame."""
        return receptive_field(self.model.config)

    @property
    def config_sha256(self) -> str:
        """sha256 of the config fields that change what the encoder computes (activation,
        norms, epsilons, geometry); ids, versions and training-only switches left out."""
        return config_sha256(self.model.config)

    def preprocessing(self) -> dict:
        fe = self.feature_extractor
        return {"sampling_rate": int(fe.sampling_rate), "do_normalize": bool(fe.do_normalize),
                "mono": True, "resampler": "soxr HQ", "feature_extractor": type(fe).__name__}


# Config fields that do not change what the encoder computes in eval mode.
CONFIG_IGNORED = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype",
                  "mask_time_prob", "mask_feature_prob", "mask_time_length", "mask_feature_length",
                  "mask_time_min_masks", "mask_feature_min_masks", "layerdrop", "hidden_dropout",
                  "attention_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout",
                  "feat_quantizer_dropout", "apply_spec_augment", "_attn_implementation",
                  "_attn_implementation_autoset", "vocab_size", "ctc_loss_reduction", "ctc_zero_infinity",
                  "use_weighted_layer_sum", "classifier_proj_size", "id2label", "label2id",
                  "num_labels", "problem_type", "output_hidden_states", "output_attentions",
                  "return_dict", "use_cache"}


def config_sha256(config) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in CONFIG_IGNORED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def quiet_transformers():
    """Within the block, transformers neither reports unused checkpoint weights (a pretraining
    head: ser loads only the encoder on purpose) nor shows its loading bars; its settings are
    restored afterwards, so a program that uses ser keeps its own."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers")
    level, bars = logger.level, hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(model_id: str) -> None:
    """A local model folder whose weights are only pickles is refused, never unpickled."""
    folder = Path(model_id)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"{folder}: weights only as a pickle ({', '.join(pickles[:3])}), which ser "
                         "never loads (loading one can run code); save the model with "
                         "save_pretrained(..., safe_serialization=True) to get model.safetensors")


def load_model(model_id: str = DEFAULT_MODEL) -> LoadedModel:
    """Load an encoder (no task head) and its feature extractor from a hub id or a local folder.

    Raises:
        ModelError: the model cannot be found or fetched (the message says to pass a local
            folder), or its type is not supported.
    """
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, Wav2Vec2FeatureExtractor

    if Path(model_id).is_dir():  # runs and stores then find it from any working folder
        model_id = str(Path(model_id).resolve())
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        where = "local folder" if Path(model_id).exists() else "hub id"
        raise ModelError(
            f"cannot load model '{model_id}' ({where}): {str(err).splitlines()[0]}; without network, "
            "pass a local folder saved with save_pretrained (e.g. --model ./wav2vec2-base)") from None
    if config.model_type not in FAMILIES:
        raise ModelError(f"model '{model_id}' is of type '{config.model_type}'; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    if getattr(config, "add_adapter", False):
        raise ModelError(f"model '{model_id}' has an adapter after its encoder (config.add_adapter), "
                         "which ser does not run: its stores and exports would not be what the "
                         "model computes; use the checkpoint without the adapter")
    # The hub ids for pretraining checkpoints mask time steps in training; ser never does (the
    # cached layers cannot), so that every strategy sees the same inputs.
    config.mask_time_prob = 0.0
    config.mask_feature_prob = 0.0
    refuse_pickled_weights(model_id)
    try:  # safetensors only: a pickle (pytorch_model.bin) can run code when loaded
        with quiet_transformers():
            model = AutoModel.from_pretrained(model_id, config=config, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load weights of '{model_id}': {str(err).splitlines()[0]}") from None
    model.eval()
    try:
        feature_extractor = AutoFeatureExtractor.from_pretrained(model_id)
    except (OSError, ValueError):
        log.warning("model '%s' has no preprocessor_config.json; using Wav2Vec2FeatureExtractor "
                    "defaults (16 kHz, normalised)", model_id)
        feature_extractor = Wav2Vec2FeatureExtractor(do_normalize=True)
    return LoadedModel(model=model, feature_extractor=feature_extractor, model_id=str(model_id),
                       weights_sha256=weights_sha256(model))


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


def audio_frames(model, samples: int, sample_rate: int) -> int:
    """Frames the encoder yields for a file of `samples` at `sample_rate` once resampled to
    16 kHz (soxr yields round(samples * 16000 / rate) samples)."""
    return frame_counts(model, [round(samples * 16000 / sample_rate)])[0]


def pad_frames(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, D) tensors into (B, T, D), zero-padded, with a (B, T) bool mask of real frames."""
    lengths = torch.tensor([s.shape[0] for s in sequences])
    batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    mask = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
    return batch, mask.to(batch.device)


def encode_features(model, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Convolutional feature encoder and projection: (B, T, D) and the frame mask."""
    if per_utterance_features(model.config):
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
    hidden = hidden + positional(model, hidden, mask)
    if not stable_layer_norm(model.config):
        hidden = encoder.layer_norm(hidden)
    return encoder.dropout(hidden), mask


def positional(model, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The positional convolution of zero-padded (B, T, D) states, for every utterance what it
    gives on that utterance alone (the reference: transformers run on one utterance, unpadded).

    A stack of convolutions (data2vec-audio) gets its padded frames zeroed again before each
    layer: the layers before turn zeros into non-zero values there, which the next kernel
    would carry into the real frames near the end of every shorter utterance. Alone, an
    utterance sees zeros past its end at every layer (the convolution's own padding), so
    zeroing gives the same numbers. transformers' batched forward zeroes them only before the
    first layer: its output for a padded utterance differs from the utterance run alone.
    """
    conv = model.encoder.pos_conv_embed
    if not family_of(model.config).stacked_pos_conv:
        return conv(hidden)  # one convolution: padding enters only as zeros
    padded = ~mask[:, None, :]  # (B, 1, T)
    states = hidden.transpose(1, 2)  # (B, D, T), as the layers take it
    for layer in conv.layers:
        states = layer(states.masked_fill(padded, 0.0))
    return states.transpose(1, 2)


def layer_inputs(model, hidden: torch.Tensor, mask: torch.Tensor) -> dict:
    """Keyword inputs every transformer layer of `model` takes besides the states: the
    attention mask in the family's form, and WavLM's relative position bias."""
    family = family_of(model.config)
    if family.key_padding_mask:
        inputs = {"attention_mask": mask}
    else:
        from transformers.masking_utils import create_bidirectional_mask

        inputs = {"attention_mask": create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                                               attention_mask=mask)}
    if family.position_bias:
        # transformers' layer 0 computes this itself when given none; computing it here lets a
        # model that starts above layer 0 (fed from a store) give every layer the same bias
        frames, heads = hidden.shape[1], model.config.num_attention_heads
        bias = relative_position_source(model).compute_bias(frames, frames)  # (H, T, T)
        inputs["position_bias"] = bias[None].expand(hidden.shape[0], -1, -1, -1).reshape(
            hidden.shape[0] * heads, frames, frames)
    return inputs


def relative_position_source(model):
    """The attention module holding the relative position embedding: layer 0's, or the one kept
    by `drop_cached` when layer 0 itself was dropped."""
    kept = getattr(model.encoder, "relative_position", None)
    return kept if kept is not None else model.encoder.layers[0].attention


def run_layers(model, layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run transformer `layers` (a sequence of `model`'s encoder layers) on (B, T, D) states;
    padded frames are masked out of attention."""
    if len(layers) == 0:
        return hidden
    inputs = layer_inputs(model, hidden, mask)
    with warnings.catch_warnings():
        # WavLM's attention hands torch a bool padding mask beside its float position bias,
        # which torch warns about on every call; the two are combined correctly
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
        for layer in layers:
            hidden = layer(hidden, **inputs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def finish(model, hidden: torch.Tensor) -> torch.Tensor:
    """Stable-layer-norm (large) encoders normalise after the last layer."""
    return model.encoder.layer_norm(hidden) if stable_layer_norm(model.config) else hidden


def drop_cached(model, cache_layer: int) -> None:
    """Remove from `model` what a store at `cache_layer` replaces: the family's `cache_replaces`
    parts and layers 0..cache_layer-1 (kept: what later layers still need, WavLM's relative
    position embedding). The layers left are renumbered from 0; `cache_layer` maps back."""
    from torch import nn

    family = family_of(model.config)
    for path in family.cache_replaces:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, None)
    layers = list(model.encoder.layers)
    if family.position_bias and cache_layer > 0:
        source = layers[0].attention
        for name, child in list(source.named_children()):  # only the embedding is used
            if name != "rel_attn_embed":
                setattr(source, name, None)
        model.encoder.relative_position = source
    model.encoder.layers = nn.ModuleList(layers[cache_layer:])


# storage dtypes that are the float32 states cast: the cast runs on the device, before the copy
# to the host, so that a GPU hands over half the bytes and the CPU converts nothing (casts round
# to nearest even on CPU and CUDA alike: the stored bytes do not depend on where it ran)
DEVICE_CASTS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def to_host(rows: torch.Tensor, dtype: str) -> torch.Tensor:
    """One utterance's (frames, hidden) states on the host, in `dtype` when it is a plain cast
    (DEVICE_CASTS), else float32 (int8 is quantised on the host from float32)."""
    return rows.to(DEVICE_CASTS.get(dtype, torch.float32)).cpu()


class LowerStack:
    """Feature encoder and the lower `layers` transformer layers, frozen, in eval mode; hands
    over states in the storage `dtype` when that is a plain cast (`to_host`)."""

    def __init__(self, model, layers: int, *, device: str = "cpu", dtype: str = "float32"):
        self.model = model.eval().to(device)
        self.layers = layers
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def __call__(self, waveforms: list[np.ndarray]) -> list[torch.Tensor]:
        """Normalised 16 kHz waveforms -> one (frames, hidden) tensor per utterance (`to_host`)."""
        tensors = [torch.from_numpy(np.asarray(w, dtype=np.float32)).to(self.device) for w in waveforms]
        hidden, mask = embed(self.model, tensors)
        hidden = run_layers(self.model, self.model.encoder.layers[:self.layers], hidden, mask)
        counts = mask.sum(dim=1).tolist()
        return [to_host(hidden[i, :n], self.dtype) for i, n in enumerate(counts)]
