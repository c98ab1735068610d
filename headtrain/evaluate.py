"""`ser evaluate`: metrics, predictions and a scatter plot for one split of a store or manifest."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_split(model, source, ids: list[str], *, batch_size: int, device, accelerator=None,
                  workers: int = 2) -> np.ndarray:
    """Standardised predictions (N, targets) in the order of `ids`; eval mode, length-sorted batches."""
    from .data import iterate_batches, plan_batches

    was_training = model.training
    model.eval()
    plan = plan_batches([source.length(uid) for uid in ids], batch_size=batch_size, seed=0, epoch=0,
                        shuffle=False)
    processes = accelerator.num_processes if accelerator is not None else 1
    if processes > 1:  # round robin over length-sorted batches; gathered back below
        plan = plan[accelerator.process_index::processes]
    out = np.zeros((len(ids), 0))
    rows = []
    for indices, batch in zip(plan, iterate_batches(source, ids, None, plan, workers=workers)):
        batch.to(device)
        if accelerator is not None:
            with accelerator.autocast():
                pred = model(batch.inputs, batch.mask)
        else:
            pred = model(batch.inputs, batch.mask)
        rows.append((indices, pred.float().cpu().numpy()))
    if processes > 1:
        from accelerate.utils import gather_object
        rows = gather_object(rows)
    if rows:
        out = np.zeros((len(ids), rows[0][1].shape[1]))
        for indices, pred in rows:
            out[indices] = pred
    model.train(was_training)
    return out


OUTPUT_FORMATS = (".csv", ".parquet")


def write_predictions(path: Path, columns: dict[str, list], targets: list, pred: np.ndarray,
                      true: np.ndarray | None) -> None:
    """`columns` (id, path, split ...), then `<target>` (if known) and `<target>_pred` per
    target (headtrain.targets.Target): a value, or a categorical target's class name; Parquet
    for a .parquet path, else CSV. Written atomically: a failure (disk full) leaves no cut
    file behind."""
    import io

    import pyarrow as pa

    from cachegen.store import parquet_bytes, write_atomic

    from .run import writing

    values: dict[str, list] = {}  # float column -> numbers, class column -> names
    for j, target in enumerate(targets):
        def column(array: np.ndarray) -> list:
            if target.categorical:
                return [target.classes[int(v)] for v in array]
            return [float(v) for v in array]

        if true is not None:
            values[target.name] = column(true[:, j])
        values[f"{target.name}_pred"] = column(pred[:, j])
    if path.suffix.lower() == ".parquet":
        data = parquet_bytes(pa.table({
            **{name: pa.array(cells, pa.string()) for name, cells in columns.items()},
            **{name: pa.array(cells, pa.string() if cells and isinstance(cells[0], str) else pa.float64())
               for name, cells in values.items()}}))
    else:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow([*columns, *values])
        for i in range(len(pred)):
            writer.writerow([*(cells[i] or "" for cells in columns.values()),
                             *(c if isinstance(c := cells[i], str) else f"{c:.6g}" for cells in values.values())])
        data = text.getvalue().encode()
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)


@dataclass(frozen=True)
class EvaluateConfig:
    run: str
    out: str
    from_cache: str | None = None
    manifest: str | None = None
    split: str = "test"
    labels: str | None = None
    model: str | None = None  # base checkpoint, if not where the run recorded it
    batch_size: int = 16
    device: str | None = None
    cache_dir: str | None = None
    audio_root: str | None = None

    def validate(self) -> None:
        from cachegen.errors import ConfigError
        from cachegen.device import resolve_device
        if bool(self.from_cache) == bool(self.manifest):
            raise ConfigError("pass exactly one of --from-cache STORE or --manifest MANIFEST")
        if self.audio_root and self.from_cache:
            raise ConfigError(f"--audio-root {self.audio_root}: resolves a manifest's audio paths, "
                              "and a store's states need none; drop it")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        resolve_device(self.device)


def evaluate(config: EvaluateConfig, *, source=None) -> dict:
    """Write metrics.json, predictions.csv, scatter.png (dimensional targets) and
    confusion_<target>.png (categorical targets) for `config.split` into `config.out`.

    Returns the metrics: {target: {"ccc", "pearson", "mse"}} or, for a categorical target,
    {"uar", "macro_f1", "accuracy", "classes", "confusion"}. `source`: the store opened
    already, as a CacheSource (a sweep shares one).
    """
    from cachegen.device import resolve_device
    from .inputs import Inputs
    from .labels import apply_classes, load_splits
    from .metrics import target_metrics
    from .run import load_run, output_lock, refuse_run_output

    config.validate()
    refuse_run_output(Path(config.out), option="--out")
    inputs = Inputs.open(from_cache=config.from_cache, manifest=config.manifest, labels=config.labels,
                         cache_dir=config.cache_dir, audio_root=config.audio_root, shared=source)
    run = load_run(config.run, from_audio=not inputs.from_store, cache_layer=inputs.cache_layer,
                   model=config.model)
    inputs.check_run(config.run, run.spec)
    if run.spec.strategy.reads_pooled and inputs.from_store:  # weighted-sum: pooled means, no frames
        source = inputs.pooled_source(run.spec.pooled_layers)
    else:
        source = inputs.source(run.model.backbone, run.feature_extractor)
    table = inputs.table
    categorical = [t for t in run.target_specs if t.categorical]
    if run.info.get("class_map") and categorical[0].name in table.column_names:
        # the run's merges (excited -> happy) and left-out classes
        table = apply_classes(table, categorical[0].name, run.info["class_map"])
    split = load_splits(table, source=inputs.table_name, targets=run.targets, splits=[config.split],
                        available=inputs.available,
                        classes={t.name: t.classes for t in categorical})[config.split]
    for i, target in enumerate(run.target_specs):
        values = split.targets[:, i]
        if not target.categorical and values.min() == values.max():
            log.warning("'%s' is %g for every one of the %d utterance(s) of the '%s' split: its CCC and Pearson are "
                        "0 whatever the predictions (they measure agreement with variation)",
                        target.name, values[0], len(values), config.split)
    device = resolve_device(config.device)
    model = run.model.to(device)
    pred = run.to_label_scale(predict_split(model, source, split.ids, batch_size=config.batch_size,
                                            device=device))
    metrics = target_metrics(pred, split.targets, run.target_specs)
    out = Path(config.out)
    with output_lock(out):  # two evaluations into one folder would mix their files
        write_evaluation(out, config.split, run, split, pred, metrics)
    return metrics


def write_evaluation(out: Path, split_name: str, run, split, pred: np.ndarray, metrics: dict) -> None:
    from .plots import plot_confusion, plot_scatter
    from .run import write_json, writing

    # metrics.json first out, last in: a folder without it is an evaluation that did not finish,
    # and nothing of an earlier evaluation here is left beside this one's files
    with writing(out):
        for old in [out / "metrics.json", out / "predictions.csv", out / "scatter.png",
                    *out.glob("confusion_*.png")]:
            old.unlink(missing_ok=True)
    categorical = [t for t in run.target_specs if t.categorical]
    write_predictions(out / "predictions.csv", {"id": split.ids, "split": [split_name] * len(split.ids)},
                      run.target_specs, pred, split.targets)
    dimensional = [i for i, t in enumerate(run.target_specs) if not t.categorical]
    if dimensional:
        with writing(out / "scatter.png"):
            plot_scatter(pred[:, dimensional], split.targets[:, dimensional],
                         [run.targets[i] for i in dimensional], metrics, str(out / "scatter.png"),
                         split=split_name)
    for target in categorical:
        path = out / f"confusion_{target.name}.png"
        with writing(path):
            plot_confusion(target.name, metrics[target.name], str(path), split=split_name)
    with writing(out / "metrics.json"):
        write_json(metrics, out / "metrics.json")
