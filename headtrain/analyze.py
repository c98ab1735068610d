"""`ser analyze`: how far finetuning moved each layer, to choose the cache layer L from data.

`change` compares a trained run with its pretrained model, layer by layer: in weight space
(relative Frobenius change of the layer's parameters) and in representation space (linear CKA
of the two models' hidden states on a sample of utterances). docs/analyze.md explains how to
read the results.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cachegen.device import resolve_device
from cachegen.encoder import stable_layer_norm
from cachegen.errors import ConfigError

from .train import check_seed

log = logging.getLogger(__name__)


# --- linear CKA ---------------------------------------------------------------------------------

class LinearCKA:
    """Linear CKA (Kornblith et al., 2019) of two representations of the same frames, added in
    batches: ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc the column-centred
    (frames, D) matrices. Only D x D sums are kept (float64), shifted by the first batch's
    means so that large constant components do not cancel catastrophically."""

    def __init__(self):
        self.count = 0
        self.shift_x = self.shift_y = None
        self.sum_x = self.sum_y = self.xx = self.yy = self.xy = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: (n, Dx), y: (n, Dy): the same n frames in two representations."""
        x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"CKA needs the same frames: {x.shape[0]} != {y.shape[0]}")
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
            self.sum_x, self.sum_y = torch.zeros_like(self.shift_x), torch.zeros_like(self.shift_y)
            self.xx = x.new_zeros(x.shape[1], x.shape[1])
            self.yy = y.new_zeros(y.shape[1], y.shape[1])
            self.xy = x.new_zeros(x.shape[1], y.shape[1])
        x, y = x - self.shift_x, y - self.shift_y
        self.count += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.xy += x.T @ y

    def value(self) -> float:
        """CKA in [0, 1]; NaN when either representation is constant (or nothing was added)."""
        if not self.count:
            return math.nan
        mean_x, mean_y = self.sum_x / self.count, self.sum_y / self.count
        xx = self.xx - self.count * torch.outer(mean_x, mean_x)
        yy = self.yy - self.count * torch.outer(mean_y, mean_y)
        xy = self.xy - self.count * torch.outer(mean_x, mean_y)
        denominator = torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy)
        if denominator <= 0:
            return math.nan
        return float((xy.square().sum() / denominator).clamp(0, 1))


def linear_cka(x, y) -> float:
    """Linear CKA of two (frames, D) representations of the same frames."""
    cka = LinearCKA()
    cka.add(x, y)
    return cka.value()


# --- weight change ------------------------------------------------------------------------------

def layer_of(name: str, config) -> int | None:
    """The hidden_states index a parameter of an encoder (Wav2Vec2Model/HubertModel) belongs to:
    i for transformer layer i (1..N), 0 for what makes hidden_states[0] (feature projection,
    positional convolution, the layer norm of post-norm models), N for the final layer norm of
    stable-layer-norm models; None for the convolutional feature encoder and the SpecAugment
    embedding (never trained by ser)."""
    if name.startswith("encoder.layers."):
        return int(name.split(".")[2]) + 1
    if name.startswith("encoder.layer_norm."):
        return config.num_hidden_layers if stable_layer_norm(config) else 0
    if name.startswith(("feature_projection.", "encoder.pos_conv_embed.")):
        return 0
    return None


def weight_change(pretrained: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                  config) -> list[float]:
    """Per hidden_states index 0..N: ||W_finetuned - W_pretrained||_F / ||W_pretrained||_F over
    all parameters of that layer together (0.0 for a layer that did not move)."""
    count = config.num_hidden_layers
    moved, size = np.zeros(count + 1), np.zeros(count + 1)
    for name, before in pretrained.items():
        index = layer_of(name, config)
        if index is None or not before.is_floating_point():
            continue
        after = finetuned[name]
        moved[index] += float((after.double() - before.double()).square().sum())
        size[index] += float(before.double().square().sum())
    return [float(math.sqrt(m / s)) if s > 0 else 0.0 for m, s in zip(moved, size)]


def recommend_cache_layer(change: list[float], threshold: float) -> tuple[int, float]:
    """(L, cut): the highest L such that transformer layers 1..L each changed less than `cut` =
    `threshold` x the largest change of layers 1..N; `change` is indexed 0..N. At most N - 1:
    at least one layer is left to train."""
    top = max(change[1:])
    cut = threshold * top
    layer = 0
    while layer + 1 < len(change) - 1 and change[layer + 1] < cut:
        layer += 1
    return layer, cut


# --- ser analyze change -------------------------------------------------------------------------

METRICS = {"representation": "1 - CKA", "weights": "relative weight change"}


@dataclass(frozen=True)
class ChangeConfig:
    """Options of `ser analyze change`; checked by `validate` before any work starts."""
    run: str
    out: str
    manifest: str | None = None  # default: what the run trained from
    from_cache: str | None = None
    split: str | None = None  # default: the run's dev split
    utterances: int = 100  # sampled for CKA; 0: weights only
    metric: str | None = None  # the change that decides L: default representation (CKA), or
    # weights with --utterances 0
    threshold: float = 0.5  # a layer "changed" from threshold x the largest change on
    model: str | None = None  # base checkpoint, if moved since training
    batch_size: int = 8
    device: str | None = None
    seed: int = 0
    cache_dir: str | None = None
    audio_root: str | None = None

    @property
    def resolved_metric(self) -> str:
        return self.metric or ("representation" if self.utterances else "weights")

    def validate(self) -> None:
        if self.resolved_metric not in METRICS:
            raise ConfigError(f"--metric {self.metric!r}: choose one of {', '.join(METRICS)}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold {self.threshold}: a fraction of the largest change, in (0, 1]")
        if self.utterances < 0:
            raise ConfigError(f"--utterances {self.utterances}: must be 0 (weights only) or more")
        if self.resolved_metric == "representation" and self.utterances == 0:
            raise ConfigError("--metric representation needs utterances for CKA: drop "
                              "--utterances 0, or pass --metric weights")
        if self.manifest and self.from_cache:
            raise ConfigError("pass at most one of --manifest and --from-cache")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        check_seed(self.seed)
        resolve_device(self.device)
        check_out(self.out, self.run)


def check_out(out: str, run: str | None = None) -> None:
    """An analysis never writes into a run directory (it belongs to its training) or a store."""
    path = Path(out)
    if run is not None and path.resolve() == Path(run).resolve():
        raise ConfigError(f"--out {out}: that is the run directory; write the analysis elsewhere")
    if (path / "config.json").is_file() or (path / "zarr.json").is_file():
        raise ConfigError(f"--out {out}: holds a ser run or store; choose another folder")


def split_sample(table, ids: list[str], split: str | None, count: int, seed: int,
                 source: str) -> list[str]:
    """Up to `count` ids of `split` (all ids when the table has no split column), chosen at
    random with `seed`, in id order."""
    available = set(ids)
    if split and "split" in table.column_names:
        rows = table.select(["id", "split"]).to_pylist()
        chosen = [r["id"] for r in rows if r["split"] == split and r["id"] in available]
        if not chosen:
            raise ConfigError(f"{source}: no utterances of split '{split}' (pass --split)")
    else:
        chosen = sorted(available)
    rng = np.random.default_rng(seed)
    if len(chosen) > count:
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), count, replace=False))]
    return sorted(chosen)


def open_inputs(config: ChangeConfig, info: dict, base):
    """(source, sample ids, first layer, description) of the utterances CKA runs on; `base` is
    the pretrained LoadedModel."""
    from .inputs import Inputs

    trained = info.get("config", {})
    manifest = config.manifest or (None if config.from_cache else trained.get("manifest"))
    store = config.from_cache or (None if manifest else trained.get("from_cache"))
    split = config.split or trained.get("dev_split", "dev")
    if manifest or store:
        inputs = Inputs.open(from_cache=None if manifest else store, manifest=manifest,
                             cache_dir=config.cache_dir, audio_root=config.audio_root or trained.get("audio_root"))
        inputs.check_model(base)
        where, source = manifest or store, inputs.source(base.model, base.feature_extractor)
        ids = split_sample(inputs.table, inputs.ids, split, config.utterances, config.seed, where)
        return source, ids, inputs.cache_layer, where
    raise ConfigError(f"{config.run}: the run records no manifest or store; pass --manifest")


@torch.inference_mode()
def representation_change(pretrained, finetuned, source, ids: list[str], *, first: int,
                          batch_size: int, device: str, progress: bool = True) -> list[float]:
    """Linear CKA per hidden_states index 0..N between two encoders on the frames of `ids`
    (NaN below `first`, the layer a store's states enter at)."""
    from tqdm import tqdm

    from cachegen.encoder import embed
    from cachegen.pooled import each_layer

    from .data import iterate_batches, plan_batches

    count = pretrained.config.num_hidden_layers
    ckas = [LinearCKA() for _ in range(count + 1)]
    plan = plan_batches([source.length(uid) for uid in ids], batch_size=batch_size, seed=0,
                        epoch=0, shuffle=False)
    bar = tqdm(total=len(ids), unit="utt", desc="CKA", disable=not progress, dynamic_ncols=True)
    for batch in iterate_batches(source, ids, None, plan):
        batch.to(device)
        walks = []
        for model in (pretrained, finetuned):
            if source.kind == "audio":
                hidden, mask = embed(model, batch.inputs)
            else:
                hidden, mask = batch.inputs, batch.mask
            walks.append(each_layer(model, hidden, mask, first=first))
        for (index, x), (_, y) in zip(*walks):
            ckas[index].add(x[mask], y[mask])  # (frames, D): real frames only
        bar.update(len(batch.ids))
    bar.close()
    return [c.value() for c in ckas]


def analyze_change(config: ChangeConfig, *, progress: bool = True) -> dict:
    """Write change.csv, change.json and change.png into `config.out`; returns the JSON.

    Raises:
        ConfigError: bad options, or an output folder that belongs to a run or a store.
        StoreMismatch: the base checkpoint is not the one the run trained from.
    """
    from cachegen.encoder import load_model

    from .run import load_run, read_run_info
    from .spec import ModelSpec
    from .upper import merge_lora

    config.validate()
    info = read_run_info(config.run)
    if info["format"] != "ser-run":
        raise ConfigError(f"{config.run}: an export; analyse the run directory it came from")
    device = resolve_device(config.device)
    run = load_run(config.run, from_audio=True, model=config.model)
    spec: ModelSpec = run.spec
    if spec.strategy.reads_pooled:
        raise ConfigError(f"{config.run}: a {spec.strategy} run trains no layer of the model, so no "
                          "layer changed; its layer_weights.json shows which layers it uses")
    finetuned = run.model.backbone
    merge_lora(finetuned)
    base = load_model(config.model or spec.model_id)
    pretrained = base.model
    layers = pretrained.config.num_hidden_layers
    weights = weight_change(pretrained.state_dict(), finetuned.state_dict(), pretrained.config)
    trained_all = spec.trained_from(layers) == 0
    if not trained_all:
        log.warning("%s trained only layers %d..%d (%s, K=%d): the layers below were frozen and "
                    "did not change by construction; train with --strategy full (or K = %d) to "
                    "choose L from data", config.run, layers - spec.top_layers + 1, layers,
                    spec.strategy, spec.top_layers, layers)
    cka = [math.nan] * (layers + 1)
    described, sampled = None, 0
    if config.utterances:
        source, ids, first, described = open_inputs(config, info, base)
        if source.kind == "states" and any(weights[:first + 1]):
            raise ConfigError(f"{config.run} changed layers at or below the store's layer {first}: "
                              "its states cannot feed the finetuned model; pass --manifest")
        sampled = len(ids)
        pretrained.to(device)
        finetuned.to(device)
        cka = representation_change(pretrained, finetuned, source, ids, first=first,
                                    batch_size=config.batch_size, device=device, progress=progress)
        cka[:first] = [1.0] * first  # frozen below the store's layer: identical by construction
    metric = config.resolved_metric
    change = [1 - c for c in cka] if metric == "representation" else weights
    if metric == "representation" and any(math.isnan(c) for c in change[1:]):
        raise ConfigError(f"CKA is undefined for some layers of {config.run} (constant hidden "
                          "states on the sample): pass more --utterances, or --metric weights")
    layer, cut = recommend_cache_layer(change, config.threshold)
    rows = [{"layer": i, "weight_change": weights[i], "cka": None if math.isnan(cka[i]) else cka[i],
             "representation_change": None if math.isnan(cka[i]) else 1 - cka[i]}
            for i in range(layers + 1)]
    result = {
        "run": config.run, "model_id": spec.model_id, "strategy": spec.strategy.value,
        "num_hidden_layers": layers, "trained_all_layers": trained_all, "layers": rows,
        "metric": metric, "metric_label": METRICS[metric], "threshold": config.threshold,
        "cut": cut, "recommended_layers": layer, "recommended_top_layers": layers - layer,
        "utterances": sampled, "inputs": described, "split": config.split or
        info.get("config", {}).get("dev_split"),
    }
    write_report(config.out, "change", result, rows, plot_change)
    return result


def write_report(out: str, name: str, result: dict, rows: list[dict], plot) -> None:
    """`name`.json (the whole result), `name`.csv (one row per layer) and `name`.png in `out`."""
    from .run import write_json, writing

    folder = Path(out)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        write_json(result, folder / f"{name}.json")
        write_rows(rows, folder / f"{name}.csv")
    with writing(folder / f"{name}.png"):
        plot(result, str(folder / f"{name}.png"))


def write_rows(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
                           for k, v in row.items()} for row in rows])


def change_text(result: dict) -> str:
    """The recommendation in one sentence, with its threshold."""
    layers = result["num_hidden_layers"]
    top = max(result["layers"][1:], key=lambda r: r["weight_change"] if result["metric"] == "weights"
              else r["representation_change"])
    value = top["weight_change"] if result["metric"] == "weights" else top["representation_change"]
    chosen = result["recommended_layers"]
    below = {0: "not even layer 1 changed", 1: "layer 1 changed"}.get(chosen, f"layers 1..{chosen} each changed")
    text = (f"recommended --layers {chosen} (--top-layers {result['recommended_top_layers']}): "
            f"{below} less than {result['threshold']:g} x the largest change ({result['metric_label']} "
            f"{value:.4g} at layer {top['layer']} of {layers}), i.e. below {result['cut']:.4g}")
    if not result["trained_all_layers"]:
        text += "; the run did not train every layer, so this only restates its own K"
    return text


def plot_change(result: dict, path: str) -> None:
    """Weight change and 1 - CKA per layer, the threshold and the recommended L."""
    from .plots import _figure, save

    rows = result["layers"]
    layers = [r["layer"] for r in rows]
    panels = [("weight_change", "relative weight change")]
    if any(r["representation_change"] is not None for r in rows):
        panels.append(("representation_change", "1 - CKA (pretrained vs finetuned)"))
    fig, axes = _figure(5.5 * len(panels), 4, columns=len(panels))
    for ax, (key, label) in zip(axes, panels):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        ax.bar(layers, values, color="tab:blue")
        if (key == "weight_change") == (result["metric"] == "weights"):
            ax.axhline(result["cut"], color="tab:red", linestyle="--",
                       label=f"threshold {result['threshold']:g} x max")
            ax.legend()
        ax.axvline(result["recommended_layers"] + 0.5, color="k", linestyle=":")
        ax.set(xlabel="layer (0 = input of layer 1)", ylabel=label,
               title=f"{label}; L = {result['recommended_layers']}")
    save(fig, path)


# --- ser analyze probe ----------------------------------------------------------------------------

ALPHAS = np.logspace(-3, 5, 17)  # ridge penalties tried per layer and target (standardised features)


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, dev_x: np.ndarray) -> np.ndarray:
    """Ridge regression on standardised features, the penalty chosen per target by its exact
    leave-one-out error on the training rows (no dev data); returns dev predictions.

    train_x: (n, p), train_y: (n, targets), dev_x: (m, p) -> (m, targets) on train_y's scale.
    """
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.where(std > 1e-12 * max(1.0, np.abs(mean).max()), std, np.inf)  # constant: no signal
    x, dev = (train_x - mean) / std, (dev_x - mean) / std
    y_mean = train_y.mean(0)
    y = train_y - y_mean
    u, s, vt = np.linalg.svd(x, full_matrices=False)  # x = u diag(s) vt
    uty = u.T @ y  # (r, targets)
    best = np.full(y.shape[1], np.inf)
    coef = np.zeros((x.shape[1], y.shape[1]))
    for alpha in ALPHAS:
        shrink = s / (s ** 2 + alpha)  # (r,)
        fitted = u @ (s[:, None] * shrink[:, None] * uty)  # (n, targets)
        leverage = (u ** 2) @ (s * shrink) + 1 / len(x)  # diag of the hat matrix, intercept included
        loo = ((y - fitted) / np.clip(1 - leverage, 1e-9, None)[:, None]) ** 2
        error = loo.mean(0)
        better = error < best
        best[better] = error[better]
        coef[:, better] = (vt.T @ (shrink[:, None] * uty))[:, better]
    return dev @ coef + y_mean


def source_kind(location: str) -> str:
    """'manifest' for a CSV/Parquet file, 'store' for anything else (folder, .zip, URL)."""
    from cachegen.sources import URL

    is_table = Path(location).suffix.lower() in (".csv", ".parquet", ".pq")
    return "manifest" if is_table and not URL.search(location) and Path(location).is_file() else "store"


@dataclass(frozen=True)
class ProbeConfig:
    """Options of `ser analyze probe`; checked by `validate` before any work starts."""
    source: str  # a store built with --pooled-layers, or a manifest (statistics computed here)
    out: str
    model: str | None = None  # default: the store's model; facebook/wav2vec2-base for a manifest
    targets: tuple[str, ...] = ("activation", "valence", "dominance")
    labels: str | None = None
    train_split: str = "train"
    dev_split: str = "dev"
    weighted_sum: bool = False  # also train a learnable weighted sum of layers + head
    epochs: int = 200  # of the weighted-sum head (full batch)
    lr: float = 1e-2
    seed: int = 0
    batch_size: int = 8  # of the model run on audio (manifest)
    device: str | None = None
    cache_dir: str | None = None
    audio_root: str | None = None

    def validate(self) -> None:
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"--targets {','.join(self.targets)}: name each label column once")
        if self.train_split == self.dev_split:
            raise ConfigError(f"--train-split and --dev-split are both '{self.train_split}'")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr {self.lr}: must be a finite number above 0")
        check_seed(self.seed)
        resolve_device(self.device)
        check_out(self.out)


def pooled_from_store(config: ProbeConfig, *, progress: bool):
    """(ids, (n, layers, 2, D) features, pooled layer numbers, N, labels table, its name)."""
    from cachegen import open_cache

    from .labels import drop_failed

    reader = open_cache(config.source, cache_dir=config.cache_dir)
    if not reader.pooled_layers:
        raise ConfigError(f"{config.source}: holds no pooled statistics; rebuild it with `ser cache "
                          "build ... --pooled-layers all`, or probe the manifest with --model")
    if config.model:
        from cachegen.encoder import load_model

        from .inputs import check_store_model
        check_store_model(reader, load_model(config.model))
    from tqdm import tqdm

    features = {uid: reader.pooled(uid) for uid in tqdm(reader.ids, unit="utt", desc="reading",
                                                          disable=not progress, dynamic_ncols=True)}
    table = drop_failed(reader.table, reader.meta)
    return features, reader.pooled_layers, reader.meta["num_hidden_layers"], table, \
        f"{config.source} (manifest table)"


@torch.inference_mode()
def pooled_from_audio(config: ProbeConfig, wanted: set[str], *, progress: bool):
    """Statistics of every layer computed from the manifest's audio with `config.model`."""
    from tqdm import tqdm

    from cachegen.build import batches_in_order, decode
    from cachegen.audio import audio_seconds
    from cachegen.errors import AudioError
    from cachegen.manifest import load_manifest
    from cachegen.encoder import DEFAULT_MODEL, load_model
    from cachegen.pooled import PooledStack

    manifest = load_manifest(config.source, audio_root=config.audio_root)
    loaded = load_model(config.model or DEFAULT_MODEL)
    layers = loaded.num_layers
    device = resolve_device(config.device)
    stack = PooledStack(loaded.model, 0, tuple(range(layers + 1)), device=device)
    utterances = [u for u in manifest.utterances if u.id in wanted]
    seconds = {u.id: audio_seconds(u.path) for u in utterances}
    features = {}
    bar = tqdm(total=len(utterances), unit="utt", desc="pooling", disable=not progress, dynamic_ncols=True)
    for batch in batches_in_order(utterances, seconds, config.batch_size):
        decoded = [(u, decode(u, loaded.feature_extractor, loaded.receptive_field)) for u in batch]
        failed = [(u, samples) for u, (samples, info) in decoded if info is None]
        if failed:
            raise AudioError(f"{failed[0][1]} (and {len(failed) - 1} more)" if len(failed) > 1
                             else str(failed[0][1]))
        _, stats = stack([samples for _, (samples, _) in decoded])
        features.update({u.id: s for u, s in zip(batch, stats)})
        bar.update(len(batch))
    bar.close()
    return features, list(range(layers + 1)), layers, manifest.table, config.source


def analyze_probe(config: ProbeConfig, *, progress: bool = True) -> dict:
    """Per pooled layer, a ridge probe on [mean, std] over frames (train split) scored by dev CCC
    per target; optionally a learnable weighted sum of layers + head. Writes probe.csv,
    probe.json, probe.png into `config.out`; returns the JSON.

    Raises:
        ConfigError, ManifestError: bad options, labels or splits, named.
    """
    from .labels import load_splits, read_labels
    from .metrics import target_metrics

    config.validate()
    targets = list(config.targets)
    if source_kind(config.source) == "store":
        features, layers, count, table, table_name = pooled_from_store(config, progress=progress)
    else:
        from cachegen.manifest import load_manifest

        table, table_name = load_manifest(config.source, audio_root=config.audio_root).table, config.source
        features = None
    if config.labels:
        table, table_name = read_labels(config.labels), config.labels
    if features is None:
        wanted = set(table.column("id").to_pylist()) if "id" in table.column_names else set()
        features, layers, count, _, _ = pooled_from_audio(config, wanted, progress=progress)
    splits = load_splits(table, source=table_name, targets=targets,
                         splits=[config.train_split, config.dev_split], available=set(features),
                         label_range=None)
    train_split, dev_split = splits[config.train_split], splits[config.dev_split]
    # float32 as stored (80 KB per utterance for wav2vec2-base); float64 one layer at a time
    train_x = np.stack([features.pop(uid) for uid in train_split.ids])  # (n, layers, 2, D)
    dev_x = np.stack([features.pop(uid) for uid in dev_split.ids])
    features.clear()
    rows = []
    for k, layer in enumerate(layers):
        pred = ridge_probe(train_x[:, k].reshape(len(train_x), -1).astype(np.float64), train_split.targets,
                           dev_x[:, k].reshape(len(dev_x), -1).astype(np.float64))
        metrics = target_metrics(pred, dev_split.targets, targets)
        rows.append({"layer": layer, **{f"{t}_ccc": metrics[t]["ccc"] for t in targets},
                     "mean_ccc": float(np.mean([metrics[t]["ccc"] for t in targets]))})
    best = max(rows, key=lambda r: (r["mean_ccc"], -r["layer"]))
    result = {
        "source": config.source, "num_hidden_layers": count, "targets": targets,
        "train_utterances": len(train_split.ids), "dev_utterances": len(dev_split.ids),
        "probe": "ridge on [mean, std] over frames, standardised; penalty by leave-one-out on train",
        "layers": rows, "best_layer": best["layer"],
        "suggested_top_layers": max(1, count - best["layer"]),
    }
    if config.weighted_sum:
        result["weighted_sum"] = train_weighted_sum(train_x[:, :, 0], train_split.targets,
                                                    dev_x[:, :, 0], dev_split.targets, targets,
                                                    layers=layers, config=config)
    write_report(config.out, "probe", result, rows, plot_probe)
    return result


def train_weighted_sum(train_means: np.ndarray, train_y: np.ndarray, dev_means: np.ndarray,
                       dev_y: np.ndarray, targets: list[str], *, layers: list[int],
                       config: ProbeConfig) -> dict:
    """Full-batch AdamW on the CCC loss of standardised targets; returns dev metrics and the
    softmax layer weights after the last epoch. `ser train --strategy weighted-sum` trains the
    same network (upper.WeightedSumHead) as a run."""
    from .metrics import ccc_loss, target_metrics
    from .upper import WeightedSumHead

    torch.manual_seed(config.seed)
    y_mean, y_std = train_y.mean(0), np.where(train_y.std(0) > 0, train_y.std(0), 1.0)
    model = WeightedSumHead(len(layers), train_means.shape[-1], len(targets), dropout=0.0)
    x = torch.as_tensor(train_means, dtype=torch.float32)
    y = torch.as_tensor((train_y - y_mean) / y_std, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    model.train()
    for _ in range(config.epochs):
        optimizer.zero_grad()
        ccc_loss(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(dev_means, dtype=torch.float32)).numpy() * y_std + y_mean
        weights = model.layer_weights().tolist()
    metrics = target_metrics(pred, dev_y, targets)
    return {"dev": {t: metrics[t]["ccc"] for t in targets},
            "mean_ccc": float(np.mean([metrics[t]["ccc"] for t in targets])),
            "layer_weights": dict(zip(map(str, layers), weights)), "epochs": config.epochs}


def probe_text(result: dict) -> str:
    best = next(r for r in result["layers"] if r["layer"] == result["best_layer"])
    text = (f"best layer {best['layer']} of {result['num_hidden_layers']} (mean dev CCC "
            f"{best['mean_ccc']:.3f}); the {result['suggested_top_layers']} layer(s) above it are "
            f"where finetuning should act: suggested --top-layers {result['suggested_top_layers']} "
            f"(cache at most --layers {result['best_layer']}; compare with `ser analyze change`)")
    if "weighted_sum" in result:
        ws = result["weighted_sum"]
        heaviest = max(ws["layer_weights"], key=ws["layer_weights"].get)
        text += (f"; weighted sum of layers: mean dev CCC {ws['mean_ccc']:.3f}, heaviest layer "
                 f"{heaviest} ({ws['layer_weights'][heaviest]:.2f})")
    return text


def plot_probe(result: dict, path: str) -> None:
    """Dev CCC of each layer's probe per target (and the weighted sum's layer weights)."""
    from .plots import _figure, bar_layer_weights, save

    rows = result["layers"]
    panels = 2 if "weighted_sum" in result else 1
    fig, axes = _figure(5.5 * panels, 4, columns=panels)
    ax = axes[0]
    layers = [r["layer"] for r in rows]
    for target in result["targets"]:
        ax.plot(layers, [r[f"{target}_ccc"] for r in rows], "o-", label=target)
    ax.plot(layers, [r["mean_ccc"] for r in rows], "k--", label="mean")
    ax.axvline(result["best_layer"], color="k", linestyle=":")
    ax.set_xticks(layers)
    ax.set(xlabel="layer (0 = input of layer 1)", ylabel="dev CCC of a ridge probe",
           title=f"probe per layer; best {result['best_layer']}, K = {result['suggested_top_layers']}")
    ax.legend()
    if panels == 2:
        bar_layer_weights(axes[1], result["weighted_sum"]["layer_weights"],
                          title=f"weighted sum: dev CCC {result['weighted_sum']['mean_ccc']:.3f}")
    save(fig, path)
