"""Load a Wav2Vec2-family encoder and its preprocessing, and fingerprint its weights."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/wav2vec2-base"
# Encoders whose layers take (hidden_states, attention_mask) and share Wav2Vec2's prelude.
# WavLM threads a relative position bias from layer to layer and is not supported.
SUPPORTED_TYPES = ("wav2vec2", "hubert")


@dataclass
class LoadedModel:
    model: object  # Wav2Vec2Model or HubertModel, eval mode, on CPU
    feature_extractor: object
    model_id: str
    weights_sha256: str

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def frame_rate(self) -> float:
        return self.feature_extractor.sampling_rate / math.prod(self.model.config.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Samples needed for one output frame."""
        from .lower import receptive_field
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
    import json

    fields = {k: v for k, v in config.to_dict().items() if k not in CONFIG_IGNORED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


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
    import transformers
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, Wav2Vec2FeatureExtractor

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if Path(model_id).is_dir():  # runs and stores then find it from any working folder
        model_id = str(Path(model_id).resolve())
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        where = "local folder" if Path(model_id).exists() else "hub id"
        raise ModelError(
            f"cannot load model '{model_id}' ({where}): {str(err).splitlines()[0]}; without network, "
            "pass a local folder saved with save_pretrained (e.g. --model ./wav2vec2-base)") from None
    if config.model_type not in SUPPORTED_TYPES:
        raise ModelError(f"model '{model_id}' is of type '{config.model_type}'; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}")
    # The hub ids for pretraining checkpoints mask time steps in training; ser never does (the
    # cached layers cannot), so that every strategy sees the same inputs.
    config.mask_time_prob = 0.0
    config.mask_feature_prob = 0.0
    refuse_pickled_weights(model_id)
    try:  # safetensors only: a pickle (pytorch_model.bin) can run code when loaded
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
