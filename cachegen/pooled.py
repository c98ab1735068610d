"""Every layer of the encoder, one at a time, and each utterance's pooled statistics of them.

`each_layer` walks transformers' `hidden_states` in order (index i = the output of layer i,
0 = the input of the first layer; for stable-layer-norm models transformers' hidden_states[N],
like a store at L = N, is before the final layer norm) without keeping them all. The build (`--pooled-layers`) stores per utterance the mean and the
standard deviation over frames of the chosen layers; `ser analyze` compares layers with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .encoder import embed, run_layers, to_host


def each_layer(model, hidden: torch.Tensor, mask: torch.Tensor, *,
               first: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (i, (B, T, D) hidden_states[i]) for i = first..N, from `hidden` = hidden_states[first]."""
    layers = model.encoder.layers
    for index in range(first, model.config.num_hidden_layers + 1):
        if index > first:
            hidden = run_layers(model, layers[index - 1:index], hidden, mask)
        yield index, hidden


def parse_pooled_layers(value: str | None, num_layers: int) -> tuple[int, ...]:
    """'all' -> (0..N); '0,6,12' -> those; None or '' -> () (no pooled statistics).

    Raises:
        ValueError: a layer outside 0..N or a word that is not a number (the message names it).
    """
    if not value:
        return ()
    if value.strip() == "all":
        return tuple(range(num_layers + 1))
    try:
        layers = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        layers = []
    if not layers:
        raise ValueError(f"{value!r}: expected 'all' or layer numbers such as 0,6,12")
    outside = [n for n in layers if not 0 <= n <= num_layers]
    if outside:
        raise ValueError(f"{value!r}: layers must lie in 0..{num_layers} (0 = the input of the "
                         "first transformer layer)")
    return tuple(layers)


class PooledStack:
    """Like `LowerStack`, and also each utterance's (layers, 2, D) mean and std over frames of
    `pooled` hidden states (float32; population std). Runs every layer up to max(pooled, L)."""

    def __init__(self, model, layers: int, pooled: tuple[int, ...], *, device: str = "cpu",
                 dtype: str = "float32"):
        self.model = model.eval().to(device)
        self.layers = layers
        self.pooled = tuple(pooled)
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def __call__(self, waveforms: list[np.ndarray]) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        """Normalised 16 kHz waveforms -> ((frames, D) states at layer L (`to_host`), (layers, 2, D)
        float32 statistics) per utterance."""
        tensors = [torch.from_numpy(np.asarray(w, dtype=np.float32)).to(self.device) for w in waveforms]
        hidden, mask = embed(self.model, tensors)
        counts = mask.sum(dim=1).tolist()
        states: list[torch.Tensor] = []
        stats = np.zeros((len(tensors), len(self.pooled), 2, hidden.shape[-1]), np.float32)
        last = max(self.pooled + (self.layers,))
        for index, layer_hidden in each_layer(self.model, hidden, mask):
            if index == self.layers:
                states = [to_host(layer_hidden[i, :n], self.dtype) for i, n in enumerate(counts)]
            if index in self.pooled:
                slot = self.pooled.index(index)
                for i, n in enumerate(counts):
                    frames = layer_hidden[i, :n].double()  # (T, D)
                    stats[i, slot, 0] = frames.mean(0).cpu().numpy()
                    stats[i, slot, 1] = frames.std(0, correction=0).cpu().numpy()
            if index == last:
                break
        return states, list(stats)
