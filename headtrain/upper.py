"""The network that trains: (optional) feature encoder, transformer layers, pooling, head.

One module serves every strategy; they differ only in where the input enters and which
parameters learn:

| strategy | input                | held layers | trained                                       |
|----------|----------------------|-------------|-----------------------------------------------|
| full     | audio                | 1..N        | projection, positional conv, all layers, head |
| partial  | audio                | 1..N        | top K layers, head                            |
| cached   | states at layer L    | L+1..N      | top K layers, head                            |
| lora     | audio or states at L | as above    | LoRA adapters on the top K layers, head       |
| weighted-sum | pooled means of layers (or audio) | none or 1..N | softmax layer weights, head |

The convolutional feature encoder is always frozen. Frozen parts stay in eval mode (no
dropout) so that a frozen layer computes exactly what the cache stored. `weighted-sum` is its
own module (`WeightedSumModel`); `build_network` makes the one a `ModelSpec` describes.
"""

from __future__ import annotations

import torch
from torch import nn

from cachegen.encoder import drop_cached, embed, family_of, finish, run_layers, stable_layer_norm

from .spec import ModelSpec, Strategy


class Head(nn.Module):
    """Masked mean pooling over frames -> dropout -> Linear(D, D) -> tanh -> dropout ->
    Linear(D, targets): the regression head of Wav2Vec2 emotion models."""

    def __init__(self, hidden: int, targets: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, targets)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
        return self.out(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class WeightedSumHead(Head):
    """SUPERB's learnable weighted sum of layers (softmax weights), then `Head`.

    Mean pooling is linear, so the weighted sum of the layers' pooled means equals mean pooling
    of the weighted sum of their frame states: training on a store's pooled means is exact, and
    no frames need to be stored."""

    def __init__(self, layers: int, hidden: int, targets: int, dropout: float):
        super().__init__(hidden, targets, dropout)
        self.layer_logits = nn.Parameter(torch.zeros(layers))  # uniform weights to start

    def layer_weights(self) -> torch.Tensor:
        """(layers,) softmax weights, summing to 1."""
        return torch.softmax(self.layer_logits, 0)

    def forward(self, means: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """means: (B, layers, D) pooled means -> (B, targets); `mask` is unused (already pooled)."""
        mixed = (self.layer_weights()[None, :, None] * means).sum(1)  # (B, D)
        one_frame = torch.ones(len(mixed), 1, dtype=torch.bool, device=mixed.device)
        return super().forward(mixed[:, None, :], one_frame)


class EmotionModel(nn.Module):
    """`backbone` is a transformers encoder of a supported family (cachegen.encoder.FAMILIES);
    this module takes ownership."""

    def __init__(self, backbone, *, strategy: Strategy | str, cache_layer: int, top_layers: int,
                 targets: int, dropout: float, from_audio: bool,
                 lora_rank: int = 8, lora_alpha: int = 16, merged: bool = False):
        super().__init__()
        config = backbone.config
        layers = config.num_hidden_layers
        strategy = Strategy.parse(strategy)
        self.strategy, self.from_audio = strategy, from_audio
        self.family = family_of(config)
        self.first_layer = 0 if from_audio else cache_layer  # layers below are not held
        self.trained_from = 0 if strategy.trains_every_layer else layers - top_layers
        if not from_audio:  # the cache replaces the encoder and lower layers: drop them
            drop_cached(backbone, cache_layer)
        self.backbone = backbone
        for parameter in backbone.parameters():
            parameter.requires_grad = False
        self.set_dropout(dropout)
        for layer in self.trained_layers():
            if strategy.adapters and not merged:  # merged: an export, adapters already folded in
                add_lora(layer, rank=lora_rank, alpha=lora_alpha, targets=self.family.lora_targets)
            else:
                layer.requires_grad_(True)
        if strategy.trains_every_layer:
            backbone.feature_projection.requires_grad_(True)
            backbone.encoder.pos_conv_embed.requires_grad_(True)
        if stable_layer_norm(config) or strategy.trains_every_layer:
            backbone.encoder.layer_norm.requires_grad_(not strategy.adapters)
        self.head = Head(config.hidden_size, targets, dropout)

    @classmethod
    def from_spec(cls, backbone, spec: ModelSpec, *, from_audio: bool, cache_layer: int = 0,
                  dropout: float = 0.0, merged: bool = False) -> "EmotionModel":
        """The network `spec` describes, fed from audio or from states at `cache_layer`."""
        return cls(backbone, strategy=spec.strategy, cache_layer=cache_layer, top_layers=spec.top_layers,
                   targets=spec.output_width, dropout=dropout, from_audio=from_audio,
                   lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha, merged=merged)

    def trained_layers(self) -> list[nn.Module]:
        held = list(self.backbone.encoder.layers)
        return held[self.trained_from - self.first_layer:]

    def set_dropout(self, p: float) -> None:
        """Dropout of the trained layers (hidden, attention, feed-forward) and the head."""
        for layer in self.trained_layers():
            for module in layer.modules():
                if isinstance(module, nn.Dropout):
                    module.p = p
            for path in self.family.float_dropouts:
                owner, _, name = path.rpartition(".")
                setattr(layer.get_submodule(owner) if owner else layer, name, p)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # frozen parts compute what the cache holds: never dropout there
            self.backbone.eval()
            for layer in self.trained_layers():
                layer.train()
            if self.strategy.trains_every_layer:
                self.backbone.encoder.train()
                self.backbone.feature_projection.train()
        return self

    def forward(self, inputs, mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: list of waveforms (audio) or (B, T, D) states at layer `first_layer` with a
        (B, T) mask. Returns (B, targets) standardised predictions."""
        model = self.backbone
        if self.from_audio:
            hidden, mask = embed(model, inputs)
        else:
            hidden = inputs
        hidden = run_layers(model, model.encoder.layers, hidden, mask)  # (B, T, D)
        return self.head(finish(model, hidden), mask)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Only the tensors that learn, named as in the base model (encoder.layers.{absolute})."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        out = {}
        for name, tensor in self.state_dict().items():
            if name in names or ("lora_" in name):
                out[self.base_name(name)] = tensor.detach().cpu().contiguous()
        return out

    def base_name(self, name: str) -> str:
        prefix = "backbone.encoder.layers."
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            return f"encoder.layers.{int(index) + self.first_layer}.{rest}"
        return name.removeprefix("backbone.")

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {self.base_name(n): n for n in self.state_dict()}
        unknown = [n for n in tensors if n not in own]
        if unknown:
            raise KeyError(f"tensors not in this model: {', '.join(unknown[:5])}")
        self.load_state_dict({own[n]: t for n, t in tensors.items()}, strict=False)


class WeightedSumModel(nn.Module):
    """`--strategy weighted-sum`: the frozen base model's pooled layers mixed by learnt softmax
    weights, then the regression head (SUPERB's frozen baseline). Fed with a store's pooled
    means, (B, layers, D), nothing of the base model is held; fed with audio, the whole base
    model runs and each of `pooled_layers` is mean-pooled over the real frames, as the build
    pools them (float64 sums, float32 result)."""

    strategy = Strategy.WEIGHTED_SUM

    def __init__(self, backbone, *, pooled_layers: tuple[int, ...], targets: int, dropout: float,
                 from_audio: bool):
        super().__init__()
        config = backbone.config
        self.from_audio = from_audio
        self.pooled_layers = tuple(pooled_layers)
        self.backbone = backbone if from_audio else None  # pooled means replace the whole model
        if from_audio:
            backbone.requires_grad_(False)
        self.head = WeightedSumHead(len(self.pooled_layers), config.hidden_size, targets, dropout)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None:  # frozen: computes what the build pooled, never dropout
            self.backbone.eval()
        return self

    def pooled_means(self, waveforms: list[torch.Tensor]) -> torch.Tensor:
        """Audio -> (B, layers, D) mean over each utterance's real frames of hidden_states[i]
        for i in `pooled_layers`."""
        from cachegen.pooled import each_layer

        hidden, mask = embed(self.backbone, waveforms)
        weights = mask.to(torch.float64)[..., None]  # (B, T, 1)
        means = []
        for index, states in each_layer(self.backbone, hidden, mask):
            if index in self.pooled_layers:
                means.append(((states.double() * weights).sum(1) / weights.sum(1)).float())  # (B, D)
            if index == self.pooled_layers[-1]:
                break
        return torch.stack(means, 1)

    def forward(self, inputs, mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: list of waveforms (audio) or (B, layers, D) pooled means. Returns (B, targets)."""
        return self.head(self.pooled_means(inputs) if self.from_audio else inputs)

    def layer_weights(self) -> dict[str, float]:
        """{layer: its softmax weight}, as reported in a run's layer_weights.json."""
        weights = self.head.layer_weights().detach().float().cpu().tolist()
        return {str(layer): w for layer, w in zip(self.pooled_layers, weights)}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors that learn: the head's, layer weights included (head.layer_logits)."""
        return {f"head.{n}": t.detach().cpu().contiguous() for n, t in self.head.state_dict().items()}

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = [n for n in tensors if not n.startswith("head.")]
        if unknown:
            raise KeyError(f"tensors not in this model: {', '.join(unknown[:5])}")
        self.head.load_state_dict({n[len("head."):]: t for n, t in tensors.items()})


def build_network(backbone, spec: ModelSpec, *, from_audio: bool, cache_layer: int = 0,
                  dropout: float = 0.0, merged: bool = False) -> nn.Module:
    """The network `spec` describes (it takes ownership of `backbone`), fed from audio, from
    states at `cache_layer`, or (weighted-sum) from pooled means."""
    if spec.strategy.reads_pooled:
        return WeightedSumModel(backbone, pooled_layers=spec.pooled_layers, targets=spec.output_width,
                                dropout=dropout, from_audio=from_audio)
    return EmotionModel.from_spec(backbone, spec, from_audio=from_audio, cache_layer=cache_layer,
                                  dropout=dropout, merged=merged)


def add_lora(layer: nn.Module, *, rank: int, alpha: int, targets: tuple[str, ...]) -> None:
    """LoRA adapters (peft) on the `targets` projections of one layer (the family's
    `lora_targets`); the layer's own weights stay frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                       target_modules=list(targets)), layer)
    for name, parameter in layer.named_parameters():
        parameter.requires_grad = "lora_" in name


def merge_lora(module: nn.Module) -> None:
    """Fold LoRA adapters into the weights they adapt and remove the wrappers."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], child.get_base_layer())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters held by the model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
