"""`ser sweep`: many training runs from one store (seeds, K, learning rates, folds ...) and one
summary of them.

Each run is a normal run directory under `OUT/runs/`, named by the values that vary
(`top_layers=2__lr=0.0001__seed=1`). A run that finished is never trained again; one that was
interrupted after an epoch resumes from its checkpoint. The summary (`summary.csv`,
`summary.md`, `summary.png`) gives, per configuration (every varied value but the seed and
the fold), the mean and standard deviation over its runs of the dev score, of each target's
primary dev metric and, with folds, of the same on each fold's left-out group.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import product
from pathlib import Path

import numpy as np

from cachegen.errors import ConfigError, SerError

from .train import TrainConfig, ignored_options

log = logging.getLogger(__name__)
RUNS = "runs"
SEED, FOLD = "seed", "fold"
# Options that say where and how a run executes, not what it computes: never an axis.
NOT_SWEPT = {"out", "resume", "overwrite", "progress", "from_cache", "manifest", "labels", "cache_dir",
             "audio_root", "device", "workers", "preload", "log_with"}


@dataclass(frozen=True)
class SweepConfig:
    """Options of `ser sweep`.

    Args:
        out: the sweep folder (runs/, summary.csv, summary.md, summary.png, sweep.json).
        train: options every run shares, as TrainConfig fields (without `out`).
        grid: TrainConfig field -> the values to try; every combination is one configuration,
            and `seed` values repeat each configuration.
        folds: a column of the labels table: leave-one-group-out cross-validation by its
            values (see headtrain.folds); None trains on the table's own splits.
    """
    out: str
    train: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    folds: str | None = None

    def validate(self) -> None:
        known = {f.name for f in fields(TrainConfig)}
        for name in [*self.train, *self.grid]:
            if name not in known or name == "out":
                raise ConfigError(f"sweep option '{name}' is not a training option; choose from "
                                  f"{', '.join(sorted(known - {'out', 'resume'}))}")
        for name, values in self.grid.items():
            if name in NOT_SWEPT:
                raise ConfigError(f"sweep option '{name}' says where a run executes; give one value")
            if not values:
                raise ConfigError(f"sweep option '{name}': no values")
            if len(set(map(repr, values))) != len(values):
                raise ConfigError(f"sweep option '{name}': a value is given twice ({values})")
        if self.folds is not None and not self.folds.strip():
            raise ConfigError("--folds: name a column (e.g. session)")
        for name, value in self.train.items():
            check_type(name, value)
        for name, values in self.grid.items():
            for value in values:
                check_type(name, value)


def check_type(name: str, value) -> None:
    """A value from a file or a list must have the option's type (a TOML typo such as
    `epochs = "5"` is named here, not met as a traceback inside training)."""
    allowed, optional = _members(field_types()[name])
    origins = {typing.get_origin(a) or a for a in allowed}
    if value is None and optional:
        return
    if float in origins and isinstance(value, int) and not isinstance(value, bool):
        return
    if isinstance(value, tuple(origins)) and not (isinstance(value, bool) and bool not in origins):
        return
    names = " or ".join(getattr(o, "__name__", str(o)) for o in origins)
    raise ConfigError(f"sweep option '{name}': {value!r} is not a {names}")


@dataclass(frozen=True)
class PlannedRun:
    name: str
    values: dict  # the varied options of this run (with seed, and fold when folds are used)
    config: TrainConfig

    @property
    def configuration(self) -> tuple:
        return tuple((k, v) for k, v in self.values.items() if k not in (SEED, FOLD))


def field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _members(kind) -> tuple[list, bool]:
    """(the types of `X | Y | None` but None, whether None is allowed); ([kind], False) else."""
    import types

    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = typing.get_args(kind)
        return [a for a in members if a is not type(None)], type(None) in members
    return [kind], False


def parse_value(name: str, text: str):
    """One value of TrainConfig field `name` from text (a CLI list item)."""
    members, optional = _members(field_types()[name])
    kind = members[0]
    text = text.strip()
    if text.lower() in ("none", "") and optional:
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind in (int, float, str):
            return kind(text)
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')}: {text!r} is not a {kind.__name__}") from None
    raise ConfigError(f"--{name.replace('_', '-')} cannot be swept from the command line; "
                      "give its values in a --config file")


def parse_list(name: str, text: str) -> list:
    """`--lr 5e-5,1e-4` -> [5e-05, 0.0001] typed as TrainConfig's field."""
    return [parse_value(name, item) for item in text.split(",")]


def read_config_file(path: str) -> tuple[dict, dict, str | None]:
    """A TOML file of training options: a list is an axis of the sweep, any other value is
    shared by every run. Keys are option names with `-` or `_` (`seeds` means `seed`).
    `targets` and `label_range` take a list as one value; `folds` names the folds column.
    Returns (shared options, grid, folds)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML ({err})") from None
    shared, grid, folds = {}, {}, None
    tuple_fields = {"targets", "label_range", "loss_weights"}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = SEED if name == "seeds" else name
        if name == "folds":
            folds = str(value)
            continue
        if isinstance(value, dict):
            raise ConfigError(f"--config {path}: [{key}] tables are not used; write options at the top")
        axis = isinstance(value, list) and (name not in tuple_fields or
                                            all(isinstance(v, list) for v in value))
        if name == "targets" and isinstance(value, str):
            value = [t.strip() for t in value.split(",") if t.strip()]
        if axis:
            grid[name] = [tuple(v) if isinstance(v, list) else v for v in value]
        else:
            shared[name] = tuple(value) if isinstance(value, list) else value
    return shared, grid, folds


def _label(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "+".join(_label(v) for v in value)
    return str(value)


def run_name(values: dict) -> str:
    parts = [f"{k}={_label(v)}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9=+._-]", "_", "__".join(parts)) or "run"


def plan_runs(config: SweepConfig, *, folds: list | None = None) -> list[PlannedRun]:
    """Every configuration x seed (x fold) as a checked TrainConfig, before any training."""
    grid = dict(config.grid)
    seeds = grid.pop(SEED, [config.train.get(SEED, 0)])
    axes = list(grid.items())
    runs, names = [], {}
    for combination in product(*[values for _, values in axes]):
        for seed in seeds:
            for fold in folds or [None]:
                values = {name: value for (name, _), value in zip(axes, combination)}
                values[SEED] = seed
                if fold is not None:
                    values[FOLD] = fold.name
                name = run_name(values)
                if name in names:
                    raise ConfigError(f"two runs of the sweep would share the folder '{name}' "
                                      f"({names[name]} and {values}); use distinct values")
                names[name] = values
                options = {**config.train, **{k: v for k, v in values.items() if k != FOLD}}
                if fold is not None:
                    options.update(fold.train_options)
                train_config = TrainConfig(out=str(Path(config.out) / RUNS / name), **options)
                # a shared option (--lora-rank with --strategy cached,lora) applies to the runs
                # whose strategy reads it; an axis of values no run reads is still refused
                unread = [n for n in ignored_options(train_config) if n not in values]
                train_config = replace(train_config, **{n: TrainConfig.__dataclass_fields__[n].default
                                                        for n in unread})
                train_config.validate()
                runs.append(PlannedRun(name=name, values=values, config=train_config))
    return runs


def finished(run: PlannedRun, *, folds: bool) -> bool:
    """A run whose metrics are written, trained with exactly this run's options.

    Raises:
        ConfigError: the folder holds a run trained with other options (a changed sweep
            must not mix its runs with another sweep's).
    """
    from .train import RESUMABLE_CHANGES

    run_dir = Path(run.config.out)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return False
    saved = json.loads(config_path.read_text()).get("config", {})
    for name, value in asdict(run.config).items():
        if name in RESUMABLE_CHANGES:
            continue
        old = saved.get(name)
        if old != value and not (isinstance(value, tuple) and list(value) == old):
            raise ConfigError(f"{run_dir} was trained with {name}={old!r}, this sweep asks for "
                              f"{value!r}; give the sweep another --out, or delete that run")
    done = (run_dir / "metrics.json").is_file()
    return done and (not folds or (run_dir / "test" / "metrics.json").is_file())


@dataclass
class SweepResult:
    out: str
    runs: list[dict]  # per run: name, values, dev (and test) metrics
    summary: list[dict]  # per configuration, best first
    folds: list[dict] = field(default_factory=list)  # per fold: its test (held-out) and dev group


def check_same_sweep(config: SweepConfig, path: Path) -> None:
    """A sweep folder resumes only the sweep that made it: its grid, folds and the options
    that decide what a run computes must be the ones in its sweep.json.

    Raises:
        ConfigError: naming the first difference (one line).
    """
    from .run import read_json
    from .train import RESUMABLE_CHANGES

    if not path.is_file():
        return
    saved = read_json(path)

    def plain(value):  # as JSON has it: tuples are lists
        return json.loads(json.dumps(value))

    def computing(options) -> dict:
        return {k: v for k, v in (options or {}).items() if k not in RESUMABLE_CHANGES}

    now = {"grid": plain(config.grid), "folds": config.folds, "options": plain(computing(config.train))}
    before = {"grid": saved.get("grid"), "folds": saved.get("folds"), "options": computing(saved.get("train"))}
    for part in ("grid", "folds", "options"):
        if now[part] != before[part]:
            if isinstance(now[part], dict) and isinstance(before[part], dict):
                name = next(k for k in sorted({*now[part], *before[part]}) if now[part].get(k) != before[part].get(k))
                change = f"{name}: {before[part].get(name)!r} before, {now[part].get(name)!r} now"
            else:
                change = f"{before[part]!r} before, {now[part]!r} now"
            raise ConfigError(f"{path.parent} holds a sweep with other {part} ({change}); rerun it "
                              "with the same values to resume it, or give another --out")


def sweep(config: SweepConfig) -> SweepResult:
    """Train every run of the sweep that has not finished, then write the summary.

    The store is opened once for the whole sweep and shared by its runs (and, with folds, by
    the evaluation of each left-out group); with preloading its states are read once in all.

    Example:
        >>> sweep(SweepConfig(out="sweeps/k", train={"from_cache": "msp.zarr", "epochs": 5},
        ...                   grid={"top_layers": [1, 2, 3], "seed": [0, 1, 2]}))  # doctest: +SKIP
    """
    from .run import refuse_run_output

    config.validate()
    out = Path(config.out)
    refuse_run_output(out, option="--out")
    shared = TrainConfig(out=str(out), **config.train)
    source = None
    if shared.from_cache:  # once: every run is checked against it before any trains, then shares it
        from cachegen import open_cache

        from .data import CacheSource

        source = CacheSource(open_cache(shared.from_cache, cache_dir=shared.cache_dir), preload=shared.preload)
    reader = source.reader if source else None
    created = not out.exists()
    try:
        return _sweep(config, out, shared, source, reader)
    except SerError:
        # refused before any run trained (a target, split or model a run's data lacks): leave
        # no folder behind, whose sweep.json would refuse the corrected command as another sweep
        if created and not any((Path(r) / "config.json").is_file() for r in out.glob(f"{RUNS}/*")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _sweep(config: SweepConfig, out: Path, shared: TrainConfig, source, reader) -> SweepResult:
    """`sweep` once the store is open."""
    from . import folds
    from .evaluate import EvaluateConfig, evaluate
    from .run import write_json, writing
    from .train import check_top_layers, train

    fold_plan = None
    if config.folds:
        fold_plan = folds.plan_folds(shared, column=config.folds, folder=out / "folds", reader=reader)
    runs = plan_runs(config, folds=fold_plan)
    if reader is not None:
        for run in runs:
            check_top_layers(run.config, layers=reader.meta["num_hidden_layers"],
                             cache_layer=reader.meta["layers"])
    check_same_sweep(config, out / "sweep.json")
    held_out = [{"fold": f.name, "test": f.test, "dev": f.dev} for f in fold_plan or []]
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        write_json({"train": config.train, "grid": config.grid, "folds": config.folds,
                    "fold_rule": folds.FOLD_RULE if fold_plan else None, "held_out": held_out,
                    "runs": [{"name": r.name, "values": r.values} for r in runs]}, out / "sweep.json")
    if fold_plan:
        log.info("folds by %s: %s", config.folds, "; ".join(
            f"fold {f.name}: test {f.test}, dev {f.dev}, train the rest" for f in fold_plan))
    for index, run in enumerate(runs, start=1):
        if finished(run, folds=bool(fold_plan)):
            log.info("[%d/%d] %s: finished already", index, len(runs), run.name)
            continue
        run_dir = Path(run.config.out)
        trained = (run_dir / "metrics.json").is_file()
        resume = (run_dir / "checkpoint" / "state.json").is_file() and not trained
        log.info("[%d/%d] %s%s", index, len(runs), run.name, " (resuming)" if resume else "")
        if not trained:
            # a run stopped before its first checkpoint has nothing to keep: it starts again
            train(replace(run.config, resume=resume, overwrite=not resume and run_dir.exists()),
                  source=source)
        if fold_plan:
            evaluate(EvaluateConfig(run=str(run_dir), out=str(run_dir / "test"),
                                    from_cache=run.config.from_cache, manifest=run.config.manifest,
                                    labels=run.config.labels, split="test",
                                    cache_dir=run.config.cache_dir, audio_root=run.config.audio_root,
                                    device=run.config.device), source=source)
        write_summary(out, runs, folds=fold_plan)
    results = collect(runs, folds=bool(fold_plan))
    summary = write_summary(out, runs, folds=fold_plan)
    return SweepResult(out=str(out), runs=results, summary=summary, folds=held_out)


def collect(runs: list[PlannedRun], *, folds: bool) -> list[dict]:
    """The finished runs' own metrics: dev of the best epoch (metrics.json), and the left-out
    fold's (test/metrics.json)."""
    results = []
    for run in runs:
        path = Path(run.config.out) / "metrics.json"
        if not path.is_file():
            continue
        record = {"name": run.name, "values": run.values, "configuration": run.configuration,
                  "dev": json.loads(path.read_text())["dev"]}
        test_path = Path(run.config.out) / "test" / "metrics.json"
        if folds:
            if not test_path.is_file():
                continue
            record["test"] = json.loads(test_path.read_text())
        results.append(record)
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of one value is NaN."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def summarise(results: list[dict]) -> list[dict]:
    """Per configuration: runs, and mean/std of the dev score and each target's primary dev
    metric (CCC, or UAR for a categorical target), and of the same on the left-out folds.
    Sorted best first: highest mean dev score (with folds too)."""
    from .metrics import mean_score, primary_metric

    by_configuration: dict[tuple, list[dict]] = {}
    for record in results:
        by_configuration.setdefault(record["configuration"], []).append(record)
    rows = []
    for configuration, records in by_configuration.items():
        row = {**dict(configuration), "runs": len(records)}
        for part in ("dev", "test"):
            if part not in records[0]:
                continue
            for target, metrics in records[0][part].items():
                name, _ = primary_metric(metrics)
                mean, std = _mean_std([primary_metric(r[part][target])[1] for r in records])
                row[f"{part}_{target}_{name}_mean"], row[f"{part}_{target}_{name}_std"] = mean, std
            row[f"{part}_score_mean"], row[f"{part}_score_std"] = _mean_std(
                [mean_score(r[part]) for r in records])
        rows.append(row)
    # chosen on dev, as each run chose its epoch: the left-out folds stay an estimate, not a criterion
    rows.sort(key=lambda r: -r["dev_score_mean"] if math.isfinite(r["dev_score_mean"]) else math.inf)
    for i, row in enumerate(rows):
        row["best"] = i == 0
    return rows


def write_summary(out: Path, runs: list[PlannedRun], *, folds: list | None = None) -> list[dict]:
    """summary.csv, summary.md and summary.png from the runs finished so far; with `folds`
    (headtrain.folds.Fold), summary.md names each fold's test and dev group."""
    from .plots import plot_summary
    from .run import write_json

    rows = summarise(collect(runs, folds=any(FOLD in r.values for r in runs)))
    write_json({"configurations": rows}, out / "summary.json")
    if not rows:
        return rows
    columns = list(rows[0])
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.md").write_text(summary_markdown(rows, folds=folds))
    plot_summary(rows, str(out / "summary.png"))
    return rows


def _metric(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def summary_markdown(rows: list[dict], *, folds: list | None = None) -> str:
    """One line per configuration: its values, runs, and mean ± std per metric; best in bold."""
    value_columns = [c for c in rows[0] if not c.endswith(("_mean", "_std")) and c != "best"]
    metrics = [c[:-len("_mean")] for c in rows[0] if c.endswith("_mean")]
    header = value_columns + metrics
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_label(row[c]) for c in value_columns]  # 5e-05 stays 5e-05
        for metric in metrics:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells.append(_metric(mean) + ("" if math.isnan(std) else f" ± {std:.4f}"))
        if row["best"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Best (bold): highest mean dev score. Score: mean over targets of "
                 "CCC (dimensional) or UAR (categorical); ± is the sample standard deviation "
                 "over the configuration's runs (seeds and folds).")
    if folds:
        from .folds import FOLD_RULE

        lines.append("")
        lines.append(f"Folds ({FOLD_RULE}): " + "; ".join(
            f"fold {f.name} tests {f.test}, dev {f.dev}" for f in folds) + ". `test_*` columns are "
            "the left-out groups' metrics: an estimate, never used to choose.")
    return "\n".join(lines) + "\n"
