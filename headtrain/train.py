"""`ser train`: finetune the top layers and a regression head, from a store or from audio."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cachegen.errors import ConfigError, ManifestError

from .data import Batching
from .labels import Split
from .spec import ModelSpec, Strategy

log = logging.getLogger(__name__)
AMP_CHOICES = ("bf16", "fp16", "no")
SEED_MAX = 2**32 - 1  # numpy's seeding (accelerate's set_seed seeds it too) takes 0 .. 2**32 - 1


def check_seed(seed: int) -> None:
    """Raises ConfigError unless `seed` is one every random generator ser seeds accepts."""
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"--seed {seed}: must be in 0..{SEED_MAX}")
CLASS_WEIGHTS = ("none", "balanced")


# Options that only some strategies read: given another value than the default with another
# strategy, they would be ignored without a word.
READ_BY = {"lora_rank": lambda s: s is Strategy.LORA, "lora_alpha": lambda s: s is Strategy.LORA}


def ignored_options(config: TrainConfig) -> list[str]:
    """The fields of `config` set to another value than the default that its strategy never
    reads (READ_BY)."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    strategy = config.resolved_strategy
    return [name for name, reads in READ_BY.items()
            if not reads(strategy) and getattr(config, name) != defaults[name]]


@dataclass(frozen=True)
class TrainConfig:
    """Options of `ser train`; `validate` checks every cross-field rule before work starts."""
    out: str
    targets: tuple[str, ...] = ("activation", "valence", "dominance")
    from_cache: str | None = None
    manifest: str | None = None
    model: str | None = None  # default: the store's model, or facebook/wav2vec2-base for audio
    strategy: str | None = None  # default: cached with a store, partial with a manifest
    top_layers: int = 3
    labels: str | None = None
    train_split: str = "train"
    dev_split: str = "dev"
    label_range: tuple[float, float] | None = None
    loss: str = "ccc"
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of all steps
    clip: float = 1.0
    dropout: float = 0.1
    seed: int = 0
    epochs: int = 10
    batch_size: int = 16
    max_frames: int | None = None
    early_stop: int | None = None
    batching: str = "random"  # a Batching value: random, or length (less padding, worse CCC)
    select: str = "mean"  # best epoch by mean dev CCC over the targets, or by one target's CCC
    amp: str | None = None  # default: bf16 on GPUs that support it, fp16 on older GPUs, no on CPU
    device: str | None = None
    lora_rank: int = 8
    lora_alpha: int = 16
    classes: str | None = None  # classes of a categorical target, or a preset (headtrain.targets)
    class_weights: str = "none"  # or "balanced": cross-entropy weighted by inverse class frequency
    loss_weights: tuple[float, ...] | None = None  # one per target (default: all 1)
    workers: int = 2
    preload: bool | None = None  # keep the store's states in memory; None: when they fit data.PRELOAD_BUDGET
    log_with: str | None = None  # an accelerate tracker: tensorboard, wandb, mlflow, ...
    cache_dir: str | None = None
    audio_root: str | None = None
    resume: bool = False  # continue the run in `out` from its last epoch checkpoint
    overwrite: bool = False  # replace the run in `out` (only the files a run writes)
    progress: bool = True

    @property
    def resolved_strategy(self) -> Strategy:
        return Strategy.parse(self.strategy or (Strategy.CACHED if self.from_cache else Strategy.PARTIAL))

    @property
    def from_audio(self) -> bool:
        return self.from_cache is None

    def validate(self) -> None:
        strategy = self.resolved_strategy
        if strategy.needs_store and not self.from_cache:
            raise ConfigError(f"--strategy {strategy} needs --from-cache STORE"
                              + (" (built with --pooled-layers all)" if strategy.reads_pooled else ""))
        if strategy.reads_pooled and self.max_frames is not None:
            raise ConfigError(f"--max-frames {self.max_frames} crops frames, but --strategy {strategy} "
                              "trains on each utterance's pooled means: drop --max-frames")
        if strategy.reads_audio_only and self.from_cache:
            raise ConfigError(f"--strategy {strategy} trains from audio: pass --manifest, not --from-cache")
        if not self.from_cache and not self.manifest:
            raise ConfigError("nothing to train from: pass --from-cache STORE or --manifest MANIFEST")
        if self.from_cache and self.manifest:
            raise ConfigError("pass either --from-cache or --manifest, not both (use --labels for "
                              "other labels on a store)")
        if not self.targets:
            raise ConfigError("--targets: name at least one label column")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"--targets {','.join(self.targets)}: a target is named twice")
        reserved = [t for t in self.targets if t in ("id", "path", "split")]
        if reserved:
            raise ConfigError(f"--targets {','.join(reserved)}: id, path and split are not labels")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"--class-weights {self.class_weights!r}: choose one of {', '.join(CLASS_WEIGHTS)}")
        if self.loss_weights is not None:
            shown = ",".join(f"{w:g}" for w in self.loss_weights)
            if len(self.loss_weights) != len(self.targets):
                raise ConfigError(f"--loss-weights {shown}: give one weight per target "
                                  f"({len(self.targets)} targets)")
            if not all(math.isfinite(w) and w >= 0 for w in self.loss_weights) or not sum(self.loss_weights):
                raise ConfigError(f"--loss-weights {shown}: weights must be finite, at least 0 "
                                  "and not all 0")
        if self.classes:
            from .targets import parse_classes

            parse_classes(self.classes)
        if self.log_with is not None:  # '' too: accelerate refuses it with a traceback
            from .tracking import check_tracker

            check_tracker(self.log_with)
        if self.top_layers < 1:
            raise ConfigError(f"--top-layers {self.top_layers}: must be at least 1")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.batching not in {b.value for b in Batching}:
            raise ConfigError(f"--batching {self.batching!r}: choose one of "
                              f"{', '.join(b.value for b in Batching)}")
        if self.select != "mean" and self.select not in self.targets:
            raise ConfigError(f"--select {self.select!r}: choose 'mean' or one of the targets "
                              f"({', '.join(self.targets)})")
        if self.loss not in ("ccc", "mse"):
            raise ConfigError(f"--loss {self.loss!r}: choose ccc or mse")
        if self.amp is not None and self.amp not in AMP_CHOICES:
            raise ConfigError(f"--amp {self.amp!r}: choose one of {', '.join(AMP_CHOICES)}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"--max-frames {self.max_frames}: must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout {self.dropout}: must be in [0, 1)")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup {self.warmup}: a fraction of the steps, in [0, 1)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues a run, --overwrite replaces it: pass one of them")
        if self.train_split == self.dev_split:
            raise ConfigError(f"--train-split and --dev-split are both '{self.train_split}'")
        if self.label_range and self.label_range[0] >= self.label_range[1]:
            raise ConfigError(f"--label-range {self.label_range}: LOW must be below HIGH")
        for name in ("lr", "head_lr", "weight_decay", "clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be a finite number, 0 or more")
        for name in ("lora_rank", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        ignored = [] if self.resume else ignored_options(self)  # a saved run trains as it was started
        if ignored:
            name = ignored[0]
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: --strategy {strategy} "
                              "does not use it; drop it")
        if self.audio_root and self.from_cache and not self.resume:
            raise ConfigError(f"--audio-root {self.audio_root}: resolves a manifest's audio paths, "
                              "and a store's states need none; drop it")
        if self.early_stop is not None and self.early_stop < 1:
            raise ConfigError(f"--early-stop {self.early_stop}: must be at least 1 (epochs without a gain)")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers}: must be 0 or more")
        check_seed(self.seed)
        if self.label_range and not all(map(math.isfinite, self.label_range)):
            raise ConfigError(f"--label-range {self.label_range}: LOW and HIGH must be finite numbers")
        device = self.resolved_device
        if self.resolved_amp == "fp16" and not device.startswith("cuda"):
            raise ConfigError("--amp fp16 needs a CUDA GPU; on CPU use --amp bf16 or --amp no")

    @property
    def resolved_device(self) -> str:
        from cachegen.device import resolve_device

        return resolve_device(self.device)

    @property
    def resolved_amp(self) -> str:
        if self.amp:
            return self.amp
        if self.resolved_device.startswith("cuda"):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"


def _option_types() -> dict:
    """{field: (check, what is expected)} for every TrainConfig field, from its annotation: how
    a run's saved config.json is checked before a resume trusts it."""
    from dataclasses import fields

    from .run import is_int, is_number

    def optional(check):
        return lambda v: v is None or check(v)

    by_annotation = {
        "str": (lambda v: isinstance(v, str), "a string"),
        "int": (is_int, "an integer"),
        "float": (is_number, "a finite number"),
        "bool": (lambda v: isinstance(v, bool), "true or false"),
        "tuple[str, ...]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                            "a list of strings"),
        "tuple[float, float]": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_number, v)),
                                "[LOW, HIGH]"),
        "tuple[float, ...]": (lambda v: isinstance(v, list) and all(map(is_number, v)), "a list of numbers"),
    }
    types = {}
    for f in fields(TrainConfig):
        annotation = str(f.type)
        base = annotation.removesuffix(" | None")
        check, expected = by_annotation.get(base, (lambda v: True, "a value"))  # newer kinds: validate() checks
        types[f.name] = (optional(check), f"{expected} or null") if base != annotation else (check, expected)
    return types


OPTION_TYPES = _option_types()


@dataclass
class TrainResult:
    run_dir: str
    best_epoch: int
    best_dev: dict
    history: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0


def check_top_layers(config: TrainConfig, *, layers: int, cache_layer: int) -> int:
    """The layers that learn: K, which must fit above the cache, every layer for `full`, none
    for `weighted-sum`."""
    if config.resolved_strategy.reads_pooled:
        return 0
    top_layers = layers if config.resolved_strategy.trains_every_layer else config.top_layers
    if top_layers > layers - cache_layer:
        raise ConfigError(f"--top-layers {config.top_layers} is larger than the {layers - cache_layer} "
                          f"layers above the cache (layer {cache_layer} of {layers}); use at most "
                          f"{layers - cache_layer}, or a store built with fewer --layers")
    return top_layers


def load_targets(config: TrainConfig, table, table_name: str, available: set[str]):
    """(targets, {split: Split}, class map) for the train and dev splits. A target that is a
    text column is categorical: its classes are `--classes`, or the training split's values."""
    from .labels import apply_classes, categorical_columns, load_splits, split_classes
    from .targets import class_order, make_targets, parse_classes

    categorical = categorical_columns(table, list(config.targets))
    if config.class_weights != "none" and not categorical:
        raise ConfigError(f"--class-weights {config.class_weights}: weighs the classes of a categorical "
                          f"target (a text column such as emotion); {', '.join(config.targets)} are "
                          "numeric: drop it")
    class_map = None
    if config.classes:
        if len(categorical) != 1:
            raise ConfigError(f"--classes needs one categorical target (a text column such as "
                              f"emotion); the targets have {len(categorical)}: "
                              f"{', '.join(categorical) or 'none'}")
        class_map = parse_classes(config.classes)
        table = apply_classes(table, categorical[0], class_map)
    classes = {t: class_order(class_map) if class_map else split_classes(table, t, config.train_split)
               for t in categorical}
    for name, values in classes.items():
        if len(values) < 2 and not class_map:
            raise ConfigError(f"--targets {name}: the '{config.train_split}' split has "
                              f"{len(values)} class(es) ({', '.join(values) or 'none'}); a "
                              "classification needs at least two")
    splits = load_splits(table, source=table_name, targets=list(config.targets),
                         splits=[config.train_split, config.dev_split], available=available,
                         label_range=config.label_range, classes=classes)
    for i, name in enumerate(config.targets):
        for split in (config.train_split, config.dev_split):
            values = splits[split].targets[:, i]
            if name not in classes and values.min() == values.max():
                why = ("there is nothing to learn" if split == config.train_split else
                       "its CCC is 0 whatever the model predicts, so no epoch can be chosen by it")
                raise ManifestError(f"{table_name}: '{name}' is {values[0]:g} for every one of the "
                                    f"{len(values)} utterance(s) of the '{split}' split: {why}; the split needs "
                                    "utterances with other values")
    targets = make_targets(config.targets, classes, splits[config.train_split].targets)
    return targets, splits, class_map


# Options that may differ when resuming: they change where and how fast, not what is computed.
# Where the store, model and labels are may change; what they hold may not (checked by hash).
RESUMABLE_CHANGES = {"progress", "workers", "preload", "device", "cache_dir", "resume", "overwrite", "out",
                     "from_cache", "manifest", "model", "audio_root", "labels", "log_with"}


def train(config: TrainConfig, *, source=None) -> TrainResult:
    """Train per `config`; writes the run directory `config.out` and returns the best epoch.
    `source`: the store opened already, as a CacheSource (headtrain.inputs.Inputs.open's `shared`).

    Under `accelerate launch --num_processes N`, each process trains on its slice of every
    global batch of N * batch_size utterances; only the main process writes the run directory.

    Example:
        >>> train(TrainConfig(out="runs/a", from_cache="msp.zarr", top_layers=3,
        ...                   targets=("activation",)))  # doctest: +SKIP
    """
    from accelerate import Accelerator

    from .run import output_lock, refuse_store_output

    config.validate()
    run_dir = Path(config.out)
    refuse_store_output(run_dir, option="--out")
    accelerator = Accelerator(mixed_precision=config.resolved_amp, cpu=config.resolved_device == "cpu",
                              log_with=config.log_with, project_dir=str(run_dir) if config.log_with else None)
    # one training writes a folder at a time: a second one (or a resume of the same run) would
    # mix two trainings' epochs, weights and config.json
    with output_lock(run_dir, hold=accelerator.is_main_process):
        return _train(config, run_dir, accelerator, source=source)


def _train(config: TrainConfig, run_dir: Path, accelerator, *, source=None) -> TrainResult:
    """`train` once the run directory is held."""
    import json

    from accelerate.utils import set_seed
    from cachegen.encoder import load_model

    from cachegen.store import write_atomic
    from cachegen.build import library_versions

    from .data import iterate_batches, plan_batches
    from .evaluate import predict_split
    from .inputs import Inputs
    from .loop import fit, make_optimizer
    from .metrics import LOSSES, mean_score, primary_metric, target_metrics
    from .parallel import global_loss, local_plan
    from .plots import plot_curves
    from .run import (RUN_FORMAT, RUN_FORMAT_VERSION, WEIGHTS, checkpoint_folder, load_checkpoint,
                      save_checkpoint, save_tensors, write_json, write_layer_weights, writing)
    from .targets import class_weights, multitask_loss, standardised, to_labels
    from .tracking import PROJECT, epoch_values, run_options
    from .upper import build_network, count_parameters

    saved_info = check_resumable(config, run_dir) if config.resume else None
    replaced = run_files_in_the_way(run_dir, resume=config.resume, overwrite=config.overwrite)
    strategy = config.resolved_strategy
    inputs = Inputs.open(from_cache=config.from_cache, manifest=config.manifest, labels=config.labels,
                         cache_dir=config.cache_dir, audio_root=config.audio_root, preload=config.preload,
                         shared=source)
    # weighted-sum: refused at once (before the model loads) when the store has no pooled rows
    pooled = inputs.pooled_source() if strategy.reads_pooled else None
    loaded = load_model(config.model or inputs.model_id)
    inputs.check_model(loaded)
    source = pooled or inputs.source(loaded.model, loaded.feature_extractor)
    cache_layer = 0 if pooled else inputs.cache_layer  # pooled means do not depend on the store's L
    store_meta = inputs.meta
    layers = loaded.num_layers
    top_layers = check_top_layers(config, layers=layers, cache_layer=cache_layer)
    targets, splits, class_map = load_targets(config, inputs.table, inputs.table_name, inputs.available)
    train_split, dev_split = splits[config.train_split], splits[config.dev_split]

    total = sum(p.numel() for p in loaded.model.parameters())  # the whole base model
    set_seed(config.seed)
    spec = ModelSpec(model_id=loaded.model_id, model_sha256=loaded.weights_sha256, strategy=strategy,
                     cache_layer=cache_layer, top_layers=top_layers, targets=tuple(config.targets),
                     lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                     classes={t.name: t.classes for t in targets if t.categorical},
                     pooled_layers=pooled.layers if pooled else ())
    model = build_network(loaded.model, spec, from_audio=config.from_audio, cache_layer=cache_layer,
                          dropout=config.dropout)
    trainable, _ = count_parameters(model)
    processes, process = accelerator.num_processes, accelerator.process_index
    train_lengths = [source.length(uid) for uid in train_split.ids]
    global_batch = config.batch_size * processes

    def epoch_plan(epoch: int) -> list[list[int]]:
        plan = plan_batches(train_lengths, batch_size=global_batch, seed=config.seed, epoch=epoch,
                            batching=config.batching)
        return local_plan(plan, process, processes)

    steps_per_epoch = len(epoch_plan(0))
    optimizer, scheduler = make_optimizer(
        model, lr=config.lr, head_lr=config.head_lr, weight_decay=config.weight_decay,
        warmup_steps=int(config.warmup * steps_per_epoch * config.epochs),
        total_steps=steps_per_epoch * config.epochs)
    # the scheduler stays unprepared: accelerate would step it once per process, but every
    # process takes one step of the same global batch
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    train_targets = standardised(targets, train_split.targets)

    def train_batches(epoch: int):
        for batch in iterate_batches(source, train_split.ids, train_targets, epoch_plan(epoch),
                                     seed=config.seed, epoch=epoch, max_frames=config.max_frames,
                                     workers=config.workers, pin=device.type == "cuda"):
            yield batch.to(device)

    def evaluate() -> dict:
        pred = predict_split(model, source, dev_split.ids, batch_size=config.batch_size,
                             device=device, accelerator=accelerator, workers=config.workers)
        metrics = target_metrics(to_labels(targets, pred), dev_split.targets, targets)
        average = mean_score(metrics)
        return {"metrics": metrics, "mean": average,
                "score": average if config.select == "mean" else primary_metric(metrics[config.select])[1]}

    info = {
        "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "strategy": strategy.value,
        "model_spec": spec.to_json(),
        "model_id": loaded.model_id, "model_sha256": loaded.weights_sha256,
        "num_hidden_layers": layers, "hidden_size": loaded.hidden_size,
        "cache_layer": cache_layer, "top_layers": top_layers,
        "targets": list(config.targets), "label_mean": [t.mean for t in targets],
        "label_std": [t.std for t in targets], "class_map": class_map,
        "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
        "trainable_parameters": trainable, "total_parameters": total,
        "store": None if store_meta is None else {
            "location": config.from_cache, "layers": store_meta["layers"], "dtype": store_meta["dtype"],
            "model_sha256": store_meta["model_sha256"], "format_version": store_meta["format_version"],
            "states_sha256": states_fingerprint(source.reader, train_split.ids + dev_split.ids,
                                                pooled=bool(pooled))},
        "labels_sha256": labels_fingerprint(train_split, dev_split),
        "config": asdict(config), "amp": config.resolved_amp, "device": str(device),
        "processes": processes, "global_batch_size": global_batch,
        "versions": library_versions(),
        "train_utterances": len(train_split.ids), "dev_utterances": len(dev_split.ids),
    }
    log_path = run_dir / "log.jsonl"
    best = {"epoch": 0, "dev": None, "mean": -math.inf}
    history: list[dict] = []
    start_epoch = 0
    if saved_info is not None:
        check_same_data(run_dir, saved_info, info)
    if saved_info is not None and checkpoint_folder(run_dir) is None:
        if accelerator.is_main_process:  # stopped before its first epoch ended: nothing to keep
            log.info("%s stopped before its first epoch ended: training it from the start", run_dir)
    elif saved_info is not None:
        state = load_checkpoint(run_dir, model=accelerator.unwrap_model(model), optimizer=optimizer,
                                scheduler=scheduler)
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        best["mean"] = best["mean"] if best["mean"] is not None else -math.inf
        if accelerator.is_main_process:
            log.info("resuming %s after epoch %d of %d", run_dir, start_epoch, config.epochs)
    resume_hint = f"; then `ser train --resume {run_dir}` continues from the last epoch"

    def write_log() -> None:
        write_atomic(log_path, "".join(json.dumps(r) + "\n" for r in history).encode())

    if accelerator.is_main_process:
        with writing(run_dir):
            remove_run_files(run_dir, replaced)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_log()  # a resumed run forgets epochs logged after its checkpoint: they are trained again
            if not config.resume:
                write_json({**info, "best_epoch": None, "best_dev": None}, run_dir / "config.json")
    accelerator.wait_for_everyone()
    if config.log_with:
        accelerator.init_trackers(PROJECT, config=run_options(config))

    def save_best(unwrapped, epoch: int, dev: dict) -> None:
        """The weights of `epoch` as the run's result: tensors, config.json (and the layer
        weights of a weighted-sum run)."""
        save_tensors(unwrapped.trained_state(), run_dir / WEIGHTS)
        write_json({**info, "best_epoch": epoch, "best_dev": dev}, run_dir / "config.json")
        if pooled:
            write_layer_weights(run_dir, unwrapped.layer_weights(), epoch=epoch)

    def on_epoch(record: dict, improved: bool) -> None:
        if pooled:  # how the layer weights move, epoch by epoch
            record["layer_weights"] = accelerator.unwrap_model(model).layer_weights()
        history.append(record)
        if config.log_with:
            accelerator.log(epoch_values(record), step=record["epoch"])
        if improved:
            best.update(epoch=record["epoch"], dev=record["dev"], mean=record["dev_score"])
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            with writing(run_dir, hint=resume_hint):
                if improved:
                    save_best(unwrapped, best["epoch"], best["dev"])
                save_checkpoint(run_dir, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                                state={"epoch": record["epoch"], "history": history,
                                       "best": {**best, "mean": best["mean"] if math.isfinite(best["mean"]) else None}})
                write_log()
            with writing(run_dir / "curves.png", hint=resume_hint):
                plot_curves(history, str(run_dir / "curves.png"))
        accelerator.wait_for_everyone()

    weights = None
    if config.class_weights == "balanced":
        weights = {t.name: class_weights(t, train_split.targets[:, i])
                   for i, t in enumerate(targets) if t.categorical}
    loss = multitask_loss(targets, dimensional=LOSSES[config.loss],
                          weights=config.loss_weights or [1.0] * len(targets), class_weights=weights)
    if accelerator.is_main_process:
        log.info("training %s: %d of %d parameters (%.1f%%) learn; %d train / %d dev utterances; "
                 "amp %s on %s%s", strategy, trainable, total, 100 * trainable / total,
                 len(train_split.ids), len(dev_split.ids), config.resolved_amp, device,
                 f", {processes} processes" if processes > 1 else "")
    fit(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
        loss_fn=global_loss(loss, accelerator), epochs=config.epochs, clip=config.clip,
        train_batches=train_batches, evaluate=evaluate, on_epoch=on_epoch,
        early_stop=config.early_stop, progress=config.progress, steps_per_epoch=steps_per_epoch,
        start_epoch=start_epoch, best=best["mean"],
        stale=history[-1].get("epochs_without_gain", 0) if history else 0)
    if accelerator.is_main_process:
        with writing(run_dir, hint=resume_hint):
            if best["epoch"] == 0:  # dev score was never finite: keep the last weights, flagged
                save_best(accelerator.unwrap_model(model), len(history), history[-1]["dev"])
            # metrics.json last: a run directory without it is a training that did not finish
            write_json({"best_epoch": best["epoch"], "dev": best["dev"]}, run_dir / "metrics.json")
    if config.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=str(run_dir), best_epoch=best["epoch"], best_dev=best["dev"],
                       history=history, trainable_parameters=trainable, total_parameters=total)


# Options added after runs were first saved: an older run's config.json lacks them.
ADDED_OPTIONS = ("classes", "class_weights", "loss_weights", "log_with")


def saved_options(run_dir: Path) -> tuple[dict, dict]:
    """(config.json of the run in `run_dir`, its training options checked field by field).

    Raises:
        ConfigError: not a run directory, or config.json was edited or cut (naming the field).
    """
    from .run import RUN_FORMAT, check_fields, read_run_info

    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there; is it a run directory?")
    info = read_run_info(run_dir)
    if info["format"] != RUN_FORMAT:
        raise ConfigError(f"--resume {run_dir}: an export of a run, not a run; it cannot be resumed")
    check_fields(path, info, {
        "config": (lambda v: isinstance(v, dict), "an object of options"),
        "store": (lambda v: v is None or isinstance(v, dict), "an object or null"),
        "labels_sha256": (lambda v: isinstance(v, str), "a sha256 hex digest")})
    saved = dict(info["config"])
    for name in ADDED_OPTIONS:  # a run from before they existed trained with their defaults
        saved.setdefault(name, TrainConfig.__dataclass_fields__[name].default)
    check_fields(path, saved, OPTION_TYPES, prefix="config.")
    unknown = sorted(set(saved) - set(OPTION_TYPES))
    if unknown:
        raise ConfigError(f"{path}: field 'config.{unknown[0]}' is not an option of this ser's "
                          "`ser train`; the run comes from another version, or the file was edited")
    for name in ("targets", "label_range", "loss_weights"):
        saved[name] = None if saved[name] is None else tuple(saved[name])
    return info, saved


def resume_config(run_dir: str | Path, **given) -> TrainConfig:
    """The options of the run in `run_dir` (its config.json), with `given` options on top.

    Options that change what is computed must agree with the saved ones; the store, model,
    labels and audio locations (and progress, workers, device, cache dir) may change.

    Raises:
        ConfigError: naming the first option that differs, or a damaged config.json.
    """
    run_dir = Path(run_dir)
    _, saved = saved_options(run_dir)
    config = TrainConfig(**{**saved, "overwrite": False, **given, "out": str(run_dir), "resume": True})
    check_resumable(config, run_dir)
    return config


def check_resumable(config: TrainConfig, run_dir: Path) -> dict:
    """A resumed run must compute what the interrupted one would have: same training options.
    Returns the run's config.json."""
    info, saved = saved_options(run_dir)
    for name, value in asdict(config).items():
        if name in RESUMABLE_CHANGES or saved[name] == value:
            continue
        raise ConfigError(f"--resume {run_dir}: the run used --{name.replace('_', '-')} "
                          f"{_shown(saved[name])}, this command {_shown(value)}; drop the option "
                          "or give the value the run used")
    return info


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def states_fingerprint(reader, ids: list[str], *, pooled: bool = False) -> str:
    """sha256 of what a store holds for `ids` (frames and checksum of each, and with `pooled`
    the checksum of each pooled row): another store, or a rebuilt one with other states, gives
    another value."""
    import hashlib

    names = ["id", "frames", "crc32"] + (["pooled_crc32"] if pooled else [])
    columns = reader.index.select(names).to_pydict()
    rows = {uid: values for uid, *values in zip(*(columns[n] for n in names))}
    return hashlib.sha256(repr([(uid, *rows[uid]) for uid in ids]).encode()).hexdigest()


def labels_fingerprint(*splits: Split) -> str:
    """sha256 of the ids and target values of `splits`, in order."""
    import hashlib

    digest = hashlib.sha256()
    for split in splits:
        digest.update(repr((split.name, split.ids)).encode())
        digest.update(np.ascontiguousarray(split.targets, dtype=np.float64).tobytes())
    return digest.hexdigest()


def check_same_data(run_dir: Path, saved: dict, current: dict) -> None:
    """A resumed run continues on the same model weights, store states and labels.

    Raises:
        ConfigError: naming what differs and the option that chooses it.
    """
    checks = [("model_sha256", "model weights", "--model"), ("labels_sha256", "labels", "--labels")]
    saved_store, store = saved.get("store") or {}, current.get("store") or {}
    differs = [name for name in ("layers", "dtype", "model_sha256", "states_sha256")
               if name in saved_store and saved_store[name] != store.get(name)]
    if differs:
        raise ConfigError(f"--resume {run_dir}: the store differs from the one the run trained on "
                          f"(field store.{differs[0]}); resume with --from-cache "
                          f"{saved_store.get('location')} or a copy of it")
    for field_name, what, option in checks:
        if field_name in saved and saved[field_name] != current[field_name]:
            raise ConfigError(f"--resume {run_dir}: the {what} differ from those the run trained on "
                              f"(field {field_name}); resume with the {option} the run used")


def run_files_in_the_way(run_dir: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The run files `--overwrite` will remove from `run_dir` (checked before any work).

    Raises:
        ConfigError: `run_dir` holds a run and neither --resume nor --overwrite was given, or
            files named like a run's that `ser train` did not write.
    """
    from .run import RUN_FILES, is_run_dir

    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume or not present:
        return []
    if not is_run_dir(run_dir):
        raise ConfigError(f"--out {run_dir}: holds {present[0]}, which `ser train` did not write; "
                          "train into another folder (nothing was changed)")
    if not overwrite:
        raise ConfigError(f"--out {run_dir} already holds a run; pass --resume {run_dir} to continue "
                          "it, or --overwrite to replace it")
    return present


def remove_run_files(run_dir: Path, names: list[str]) -> None:
    """Remove a replaced run's own files; anything else in the folder stays."""
    import shutil

    for name in names:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
