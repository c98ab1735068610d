"""What a trained network is: the strategy that trained it and the `ModelSpec` that rebuilds it.

A run's config.json and an export's ser_head.json hold the spec under "model_spec"; evaluate,
predict, export and bench rebuild the network from it alone (plus the base checkpoint).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from cachegen.errors import ConfigError
from cachegen.store import is_layer_list


class Strategy(str, Enum):
    """The paper's ways to finetune; they differ in where the input enters and what learns."""

    CACHED = "cached"  # states at layer L from a store; top K layers and head learn
    PARTIAL = "partial"  # audio; top K layers and head learn
    FULL = "full"  # audio; projection, positional convolution, every layer and head learn
    LORA = "lora"  # audio or a store; LoRA adapters on the top K layers and head learn
    # a store's pooled means of every pooled layer (SUPERB's frozen baseline): softmax layer
    # weights and head learn, no layer of the base model does
    WEIGHTED_SUM = "weighted-sum"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: str | Strategy, *, option: str = "--strategy") -> Strategy:
        """The strategy named `value`.

        Raises:
            ConfigError: no strategy has that name (the message lists them).
        """
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{option} {value!r}: choose one of {', '.join(s.value for s in cls)}") from None

    @property
    def reads_audio_only(self) -> bool:
        """Trains layers a store would replace, so it needs audio."""
        return self in (Strategy.PARTIAL, Strategy.FULL)

    @property
    def needs_store(self) -> bool:
        return self in (Strategy.CACHED, Strategy.WEIGHTED_SUM)

    @property
    def reads_pooled(self) -> bool:
        """Trains on each utterance's pooled means (a store built with --pooled-layers), not frames."""
        return self is Strategy.WEIGHTED_SUM

    @property
    def trains_every_layer(self) -> bool:
        return self is Strategy.FULL

    @property
    def adapters(self) -> bool:
        return self is Strategy.LORA


STRATEGIES = tuple(s.value for s in Strategy)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides the trained network's shape besides the base checkpoint (whose
    config names its family): rebuilding `EmotionModel` from it and loading the trained tensors gives the network
    that trained.

    Attributes:
        model_id: where the base checkpoint was loaded from (hub id or absolute folder).
        model_sha256: its weights' fingerprint (cachegen.encoder.weights_sha256).
        strategy: how it trained.
        cache_layer: the store's layer it trained from; 0 when it trained from audio or from
            pooled means (`weighted-sum`).
        top_layers: transformer layers that learned (all of them for `full`, none for
            `weighted-sum`).
        targets: label columns the head predicts, in output order.
        lora_rank, lora_alpha: LoRA adapter shape (used by `lora` only).
        classes: {categorical target: its classes in logit order}; a target not named here is
            dimensional (one output). Specs written before categorical targets have none.
        pooled_layers: the hidden_states indices (0 = the input of layer 1) whose pooled means
            `weighted-sum` mixes, in increasing order; empty for the other strategies (and
            absent from their JSON, as in specs written before it existed).
    """

    model_id: str
    model_sha256: str
    strategy: Strategy
    cache_layer: int
    top_layers: int
    targets: tuple[str, ...]
    lora_rank: int = 8
    lora_alpha: int = 16
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pooled_layers: tuple[int, ...] = ()

    @property
    def output_width(self) -> int:
        """The head's outputs: one per dimensional target, one logit per class."""
        return sum(len(self.classes.get(t, ())) or 1 for t in self.targets)

    def to_json(self) -> dict:
        data = {**asdict(self), "strategy": self.strategy.value, "targets": list(self.targets),
                "classes": {t: list(c) for t, c in self.classes.items()},
                "pooled_layers": list(self.pooled_layers)}
        if not self.pooled_layers:  # the other strategies' JSON stays as it was before the field
            del data["pooled_layers"]
        return data

    @classmethod
    def from_json(cls, data: dict, *, where: str) -> ModelSpec:
        """Read a spec written by `to_json`.

        Raises:
            ConfigError: a field is missing or of the wrong type (names `where` and the field).
        """
        fields = {"model_id": str, "model_sha256": str, "strategy": str,
                  "cache_layer": int, "top_layers": int, "targets": list, "lora_rank": int, "lora_alpha": int}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: model_spec is not an object")
        for name, kind in fields.items():
            value = data.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{where}: model_spec.{name} is {value!r}, expected {kind.__name__}")
        if not data["targets"] or not all(isinstance(t, str) for t in data["targets"]):
            raise ConfigError(f"{where}: model_spec.targets must name at least one label column")
        strategy = Strategy.parse(data["strategy"], option=f"{where}: model_spec.strategy")
        pooled = data.get("pooled_layers", [])
        if not is_layer_list(pooled):
            raise ConfigError(f"{where}: model_spec.pooled_layers is {pooled!r}, expected distinct "
                              "layer numbers (0 or more) in increasing order")
        if bool(pooled) != strategy.reads_pooled:
            raise ConfigError(f"{where}: model_spec.pooled_layers is {pooled!r}: strategy {strategy} "
                              f"{'needs the layers it mixes' if strategy.reads_pooled else 'mixes no layers'}")
        least_top = 0 if strategy.reads_pooled else 1  # weighted-sum trains no layer
        if (data["cache_layer"] < 0 or data["lora_rank"] < 1 or data["top_layers"] < least_top
                or (strategy.reads_pooled and data["top_layers"])):
            raise ConfigError(f"{where}: model_spec has cache_layer {data['cache_layer']}, top_layers "
                              f"{data['top_layers']}, lora_rank {data['lora_rank']}; out of range "
                              f"for strategy {strategy}")
        classes = data.get("classes", {})
        if not isinstance(classes, dict) or not all(
                t in data["targets"] and isinstance(c, list) and len(c) >= 2 and len(set(c)) == len(c)
                and all(isinstance(x, str) and x for x in c) for t, c in classes.items()):
            raise ConfigError(f"{where}: model_spec.classes must map categorical targets to lists of "
                              "at least two distinct class names")
        return cls(**{**{n: data[n] for n in fields}, "targets": tuple(data["targets"]),
                      "classes": {t: tuple(c) for t, c in classes.items()},
                      "strategy": strategy, "pooled_layers": tuple(pooled)})

    @classmethod
    def from_run_info(cls, info: dict, *, where: str) -> ModelSpec:
        """The spec of a run's config.json or an export's ser_head.json; those written before
        the spec existed are read from their separate fields."""
        if "model_spec" in info:
            return cls.from_json(info["model_spec"], where=where)
        trained = info.get("trained_from") or {}
        legacy = {"model_id": info.get("model_id") or trained.get("model_id") or "",
                  "model_sha256": info.get("model_sha256") or trained.get("model_sha256") or "",
                  "strategy": info.get("strategy"),
                  "cache_layer": info.get("cache_layer", 0), "top_layers": info.get("top_layers"),
                  "targets": info.get("targets"), "lora_rank": info.get("lora_rank", 8),
                  "lora_alpha": info.get("lora_alpha", 16)}
        return cls.from_json(legacy, where=where)

    def trained_from(self, layers: int) -> int:
        """Index of the first layer that learned, for a base model of `layers` layers (`layers`
        when none did)."""
        return 0 if self.strategy.trains_every_layer else layers - self.top_layers
