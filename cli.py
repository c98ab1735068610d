"""The `ser` command: a thin click layer. Each command builds a config and calls one function."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from cachegen.errors import SerError


class SerGroup(click.Group):
    """Turns every SerError into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SerError as err:
            # a library's message quoted inside ours (pyarrow's, zarr's) may span lines
            click.echo("ser: error: " + " ".join(str(err).split()), err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("ser: interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


class EchoHandler(logging.Handler):
    """Library log messages to stderr through click (so CliRunner captures them too)."""

    def emit(self, record):
        click.echo(self.format(record), err=True)


class OutPath(click.Path):
    """A path to write: click.Path that refuses an empty or blank name (an unset shell variable
    in `--out "$DIR"` would otherwise write into the current folder)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail(f"{value!r}: an empty name; name the file or folder to write", param, ctx)
        return super().convert(value, param, ctx)


def _set_threads(ctx, param, value: int | None) -> None:
    if value is not None:
        import os

        import torch

        cores = os.cpu_count() or 1
        if value > cores:  # more threads than cores only wait for each other (and 10**20 overflows)
            raise click.BadParameter(f"{value}: this machine has {cores} CPU cores; use at most {cores}",
                                     ctx=ctx, param=param)
        torch.set_num_threads(value)


# On a shared or busy machine torch's default (one thread per core) oversubscribes the cores.
_THREADS = click.option("--threads", type=click.IntRange(min=1), default=None, expose_value=False,
                        callback=_set_threads,
                        help="torch intra-op CPU threads (default: one per core).")


@click.group(cls=SerGroup)
@click.version_option(package_name="ser", prog_name="ser", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Efficient finetuning for dimensional speech emotion recognition."""
    for name in ("cachegen", "headtrain"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, EchoHandler)]
        logger.addHandler(EchoHandler())
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False


def _storage_options(ctx, param, value: str | None) -> None:
    if value:
        from cachegen.sources import configure_storage

        configure_storage(value, source="--storage-options")


STORAGE_OPTIONS = click.option(
    "--storage-options", metavar="JSON", expose_value=False, callback=_storage_options,
    help='Options of the fsspec backend per protocol for s3://, gs://, ... URLs, e.g. '
         '\'{"s3": {"endpoint_url": "http://minio:9000"}}\' (default: the backend\'s own '
         'configuration: environment variables, ~/.aws, ~/.config/fsspec).')


@main.group()
def cache() -> None:
    """Build, inspect and verify stores of lower-layer hidden states."""


@cache.command("build")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--model", default="facebook/wav2vec2-base", show_default=True,
              help="Hub id or local folder of a Wav2Vec2, HuBERT, WavLM or data2vec-audio model.")
@click.option("--layers", default=9, show_default=True, help="Lower transformer layers to cache.")
@click.option("--out", required=True, type=OutPath(file_okay=False), help="Store folder.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32", "int8"]),
              default="float16", show_default=True,
              help="Storage dtype of the states (int8: per-frame scales, about half of float16's "
                   "bytes; docs/cache-format.md gives its error bound).")
@click.option("--compression", type=click.Choice(["none", "lz4", "zstd"]), default=None,
              help="Compression of the states (default none: measured fastest, lossless codecs "
                   "save under 10 %; docs/benchmarks.md). A store keeps its own on resume.")
@click.option("--batch-size", default=8, show_default=True,
              help="Utterances per batch (and at most 20 s of padded audio per utterance slot).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
@click.option("--workers", type=int, default=None,
              help="Background audio decoding threads (default: one per CPU core, 2 to 8).")
@click.option("--audio-root", type=click.Path(file_okay=False), default=None,
              help="Folder that relative paths resolve against (default: the manifest's folder).")
@click.option("--shard-frames", type=int, default=None,
              help="Frames per shard file (default: about 16 MiB per file).")
@click.option("--overwrite", is_flag=True,
              help="Delete an existing ser store at --out first (never a folder that is not one).")
@click.option("--part", default=None, metavar="I/N",
              help="Cache only part I of N (independent jobs, e.g. a SLURM array); finalise "
                   "afterwards with the same command without --part.")
@click.option("--pooled-layers", default=None, metavar="all|I,J,...",
              help="Also store each utterance's mean and std over frames of these layers' "
                   "hidden states (0 = input of layer 1), for `ser analyze probe`.")
@click.option("--max-seconds", type=float, default=300.0, show_default=True,
              help="Skip (and record) audio longer than this; 0: no limit. Memory grows with length.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@_THREADS
def cache_build(manifest, model, layers, out, dtype, compression, batch_size, device, workers,
                audio_root, shard_frames, overwrite, part, pooled_layers, max_seconds, no_progress):
    """Run the feature encoder and lower LAYERS layers once; store each utterance's states."""
    from cachegen.build import BuildConfig, build_cache

    summary = build_cache(BuildConfig(
        manifest=manifest, out=out, model=model, layers=layers, dtype=dtype, compression=compression,
        batch_size=batch_size, device=device, workers=workers, overwrite=overwrite, audio_root=audio_root,
        shard_frames=shard_frames, part=_part(part), pooled_layers=pooled_layers,
        max_seconds=max_seconds or None,
        progress=not no_progress))
    if summary.main:
        click.echo(summary.text())
    if summary.failed:
        sys.exit(1)


def _part(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected I/N such as 1/4", param_hint="--part")
    return index, count


@cache.command("info")
@click.argument("store")
@STORAGE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--cache-dir", default=None, help="Keep a remote store's files here after their first read.")
def cache_info(store, as_json, cache_dir):
    """Show what a store holds: model, layer, dtype, utterances, hours, size, failures."""
    import json

    from cachegen.verify import format_info, store_info

    info = store_info(store, cache_dir=cache_dir)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))


@cache.command("verify")
@click.argument("store")
@STORAGE_OPTIONS
@click.option("--cache-dir", default=None, help="Keep a remote store's files here after their first read.")
@click.option("--repair", is_flag=True,
              help="Local store: forget the damaged utterances, so that rerunning the store's "
                   "`ser cache build` command computes them again (the rest is kept).")
def cache_verify(store, cache_dir, repair):
    """Check every utterance's checksum and the index; exit 1 naming each problem."""
    from cachegen.verify import repair_store, verify_store

    report = verify_store(store, cache_dir=cache_dir)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    if report.ok:
        click.echo(f"{store}: ok ({report.checked} utterances, every checksum matches)")
        return
    click.echo(f"{store}: {len(report.problems)} problem(s) in {report.checked} utterances", err=True)
    if repair:
        forgotten = repair_store(store, report)
        click.echo(f"{store}: forgot {len(forgotten)} damaged utterance(s) ({', '.join(forgotten[:10])}"
                   f"{' ...' if len(forgotten) > 10 else ''}); the store is incomplete until you rerun "
                   "the same `ser cache build` command, which computes only them")
        return
    sys.exit(1)


@cache.command("copy")
@click.argument("src")
@click.argument("dst", type=OutPath())
@STORAGE_OPTIONS
@click.option("--jobs", type=click.IntRange(min=1), default=4, show_default=True, help="Files fetched at once.")
def cache_copy(src, dst, jobs):
    """Copy store SRC (folder, .zip or URL) to DST (folder, .zip or URL such as s3://...).

    Resumable (rerun after an interruption), verified by checksum before DST becomes a store."""
    from cachegen.share import copy_store

    click.echo(copy_store(src, dst, jobs=jobs).text())


@cache.command("pack")
@click.argument("store")
@click.argument("out", type=OutPath(dir_okay=False))
def cache_pack(store, out):
    """Pack STORE into one zip OUT (stored, not deflated), verified; readable in place."""
    from cachegen.share import pack_store

    click.echo(pack_store(store, out).text())


def _floats(value: str | None, option: str) -> tuple[float, float] | None:
    if not value:
        return None
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected LOW,HIGH such as 1,7", param_hint=option)
    return low, high


_LOG_WITH = click.option("--log-with", default=None, metavar="TRACKER",
                         help="Also log losses, dev metrics and learning rate per epoch to an "
                              "accelerate tracker: tensorboard (pip install 'ser[tensorboard]'), "
                              "wandb, mlflow, ...")


def _weights(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected numbers such as 1,0.5", param_hint="--loss-weights")


# Categorical targets: a target that is a text column (e.g. emotion) gets a classification head.
_CLASS_OPTIONS = (
    click.option("--classes", default=None,
                 help="Classes of the categorical target, in order; '+' merges (e.g. "
                      "neutral,happy+excited,angry,sad), other values are left out. Preset: iemocap4. "
                      "Default: the training split's values."),
    click.option("--class-weights", type=click.Choice(["none", "balanced"]), default="none",
                 show_default=True, help="Cross-entropy weights: balanced = inverse class frequency."),
    click.option("--loss-weights", default=None,
                 help="One weight per target (e.g. 1,1,0.5): the loss is the weighted mean of "
                      "the dimensional loss and each categorical target's cross-entropy."),
)


@main.command("train")
@click.option("--from-cache", "from_cache", default=None,
              help="Store to train from (strategies cached, lora, weighted-sum).")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False),
              help="Manifest to train from audio (strategies partial, full, lora).")
@click.option("--model", default=None, help="Base checkpoint (default: the store's; "
              "facebook/wav2vec2-base from audio).")
@click.option("--strategy", type=click.Choice(["cached", "partial", "full", "lora", "weighted-sum"]), default=None,
              help="Default: cached with --from-cache, partial with --manifest. weighted-sum: "
                   "the frozen model's baseline (SUPERB): learnt softmax weights over the "
                   "layers of a store built with --pooled-layers, and the head.")
@click.option("--top-layers", default=3, show_default=True, help="Transformer layers finetuned (K).")
@click.option("--targets", default="activation,valence,dominance", show_default=True,
              help="Label columns to predict, comma-separated.")
@click.option("--out", default=None, type=OutPath(file_okay=False), help="Run directory.")
@click.option("--resume", default=None, type=click.Path(file_okay=False, exists=True),
              help="Continue this run from its last epoch checkpoint, with the options it was "
                   "started with.")
@click.option("--labels", default=None, type=click.Path(dir_okay=False),
              help="Labels table (CSV/Parquet: id, targets, split) instead of the store's.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--dev-split", default="dev", show_default=True)
@click.option("--label-range", default=None, help="LOW,HIGH: reject labels outside (e.g. 1,7).")
@click.option("--loss", type=click.Choice(["ccc", "mse"]), default="ccc", show_default=True)
@click.option("--lr", default=5e-5, show_default=True, help="Learning rate of transformer layers.")
@click.option("--head-lr", default=1e-3, show_default=True, help="Learning rate of the head.")
@click.option("--weight-decay", default=0.01, show_default=True)
@click.option("--warmup", default=0.1, show_default=True, help="Warmup, as a fraction of all steps.")
@click.option("--clip", default=1.0, show_default=True, help="Gradient norm clipping (0: off).")
@click.option("--dropout", default=0.1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--max-frames", type=int, default=None, help="Random crop of longer utterances in training.")
@click.option("--early-stop", type=int, default=None, help="Stop after N epochs without dev gain.")
@click.option("--batching", type=click.Choice(["random", "length"]), default="random", show_default=True,
              help="random: each batch a random sample, so the CCC loss sees the spread of the "
                   "targets. length: sorted by length within buckets: 35 points less padding, "
                   "but where duration follows the targets 0.055 lower dev CCC, with no "
                   "measurable time saved on a tiny model on CPU (docs/training.md).")
@click.option("--select", default="mean", show_default=True, metavar="TARGET|mean",
              help="Best epoch by the mean dev CCC over the targets, or by one target's dev CCC.")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "no"]), default=None,
              help="Mixed precision (default: bf16/fp16 on GPU, no on CPU).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda if available).")
@click.option("--lora-rank", default=8, show_default=True)
@click.option("--lora-alpha", default=16, show_default=True)
@_CLASS_OPTIONS[0]
@_CLASS_OPTIONS[1]
@_CLASS_OPTIONS[2]
@click.option("--workers", default=2, show_default=True, help="Background reading threads.")
@click.option("--preload/--no-preload", default=None,
              help="Keep the store's states in memory after their first read (default: when they "
                   "take at most 4 GiB and a quarter of the available memory).")
@_LOG_WITH
@click.option("--cache-dir", default=None, help="Keep a local copy of remote store files here (later epochs and runs read it).")
@STORAGE_OPTIONS
@click.option("--audio-root", default=None, type=click.Path(file_okay=False))
@click.option("--no-progress", is_flag=True)
@click.option("--overwrite", is_flag=True,
              help="Replace the run in --out (removes only the files a run writes).")
@_THREADS
@click.pass_context
def train_command(ctx, targets, label_range, loss_weights, no_progress, out, resume, **options):
    """Finetune the top K layers and a regression head (from a store or from audio).

    `--resume RUN` alone continues RUN with the options it was started with; options given
    again must agree with them (the store, model and labels locations may change)."""
    from click.core import ParameterSource

    from headtrain import TrainConfig, train
    from headtrain.train import resume_config

    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise click.BadParameter("--resume continues a run in place: drop --out or give the same folder")
    if not (out or resume):
        raise click.UsageError("Missing option '--out'.")
    options.update(targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                   label_range=_floats(label_range, "--label-range"),
                   loss_weights=_weights(loss_weights), progress=not no_progress)
    if resume:
        given = {name: value for name, value in options.items()
                 if ctx.get_parameter_source({"progress": "no_progress"}.get(name, name))
                 is not ParameterSource.DEFAULT}
        config = resume_config(resume, **given)
    else:
        config = TrainConfig(out=out, **options)
    result = train(config)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    from headtrain.metrics import format_metrics

    click.echo(f"best epoch {result.best_epoch}: dev {format_metrics(result.best_dev or {})}; run "
               f"written to {result.run_dir} (curves.png, log.jsonl, config.json, model.safetensors)")


# Options of `ser sweep` that take a comma-separated list of values (an axis of the sweep).
_SWEPT = ("seeds", "top_layers", "lr", "head_lr", "dropout", "weight_decay", "warmup", "batch_size",
          "epochs", "loss", "strategy", "max_frames", "clip", "class_weights", "batching", "lora_rank",
          "lora_alpha")


@main.command("sweep")
@click.option("--from-cache", "from_cache", default=None, help="Store every run trains from.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False), help="Or: train from audio.")
@click.option("--out", required=True, type=OutPath(file_okay=False),
              help="Sweep folder: runs/, summary.csv, summary.md, summary.png.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="TOML file of training options; a list is an axis of the sweep.")
@click.option("--seeds", default=None, help="Seeds each configuration is trained with, e.g. 0,1,2.")
@click.option("--top-layers", default=None, help="List, e.g. 1,2,3.")
@click.option("--lr", default=None, help="List, e.g. 5e-5,1e-4.")
@click.option("--head-lr", default=None, help="List.")
@click.option("--dropout", default=None, help="List.")
@click.option("--weight-decay", default=None, help="List.")
@click.option("--warmup", default=None, help="List.")
@click.option("--batch-size", default=None, help="List.")
@click.option("--epochs", default=None, help="List.")
@click.option("--loss", default=None, help="List of ccc, mse.")
@click.option("--strategy", default=None, help="List of cached, lora, weighted-sum (from a store).")
@click.option("--max-frames", default=None, help="List.")
@click.option("--clip", default=None, help="List.")
@click.option("--class-weights", default=None, help="List of none, balanced.")
@click.option("--batching", default=None, help="List of random, length.")
@click.option("--lora-rank", default=None, help="List.")
@click.option("--lora-alpha", default=None, help="List.")
@click.option("--targets", default=None, help="Label columns every run predicts, comma-separated.")
@click.option("--loss-weights", default=None, help="One weight per target.")
@click.option("--classes", default=None, help="Classes of a categorical target (see ser train).")
@click.option("--folds", default=None,
              help="Column (e.g. session): leave-one-group-out; each fold tests on one group and "
                   "picks its best epoch on the next group (sorted order, wrapping around).")
@click.option("--model", default=None)
@click.option("--labels", default=None, type=click.Path(dir_okay=False))
@click.option("--train-split", default=None)
@click.option("--dev-split", default=None)
@click.option("--label-range", default=None, help="LOW,HIGH.")
@click.option("--early-stop", type=int, default=None)
@click.option("--select", default=None, metavar="TARGET|mean", help="Best epoch of each run (see ser train).")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "no"]), default=None)
@click.option("--device", default=None)
@click.option("--workers", type=int, default=None)
@click.option("--preload/--no-preload", default=None,
              help="Keep the store's states in memory after their first read, for all runs "
                   "(default: when they take at most 4 GiB and a quarter of the available memory).")
@click.option("--cache-dir", default=None)
@STORAGE_OPTIONS
@click.option("--audio-root", default=None, type=click.Path(file_okay=False))
@_LOG_WITH
@click.option("--no-progress", is_flag=True)
@_THREADS
def sweep_command(out, config_file, folds, targets, loss_weights, label_range, no_progress, **options):
    """Train every combination of the listed values (x seeds, x folds) and summarise them."""
    from headtrain.sweep import SweepConfig, parse_list, read_config_file, sweep

    shared, grid, file_folds = read_config_file(config_file) if config_file else ({}, {}, None)
    for name, text in options.items():
        if text is None:
            continue
        field = "seed" if name == "seeds" else name
        if name in _SWEPT:
            values = parse_list(field, text)
            grid.pop(field, None)
            shared.pop(field, None)
            if len(values) > 1:
                grid[field] = values
            else:
                shared[field] = values[0]
        else:
            shared[field] = text
    if targets:
        shared["targets"] = tuple(t.strip() for t in targets.split(",") if t.strip())
    if loss_weights:
        shared["loss_weights"] = _weights(loss_weights)
    if label_range:
        shared["label_range"] = _floats(label_range, "--label-range")
    shared["progress"] = not no_progress
    result = sweep(SweepConfig(out=out, train=shared, grid=grid, folds=folds or file_folds))
    best = next((row for row in result.summary if row["best"]), None)
    if best:
        varied = {k: v for k, v in best.items() if k in grid}
        folds_score = (f", left-out folds' score {best['test_score_mean']:.3f}"
                       if "test_score_mean" in best else "")
        if folds or file_folds:
            from headtrain.folds import FOLD_RULE

            click.echo(f"folds by {folds or file_folds} ({FOLD_RULE}): " + "; ".join(
                f"test {f['test']}, dev {f['dev']}" for f in result.folds))
        click.echo(f"best: {varied or 'the only configuration'} (dev score "
                   f"{best['dev_score_mean']:.3f}{folds_score} over {best['runs']} run(s))")
    click.echo(f"{len(result.runs)} runs in {out}/runs; summary in {out}/summary.md, summary.csv, summary.png")


@main.command("evaluate")
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.option("--from-cache", "from_cache", default=None, help="Store holding the split.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False), help="Or: evaluate from audio.")
@click.option("--split", default="test", show_default=True)
@click.option("--labels", default=None, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=OutPath(file_okay=False))
@click.option("--model", default=None, help="Base checkpoint, if moved since training.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default=None)
@click.option("--cache-dir", default=None, help="Keep a local copy of remote store files here.")
@STORAGE_OPTIONS
@click.option("--audio-root", default=None, type=click.Path(file_okay=False))
@_THREADS
def evaluate_command(**options):
    """Metrics, predictions.csv and a scatter plot of RUN on one split."""
    from headtrain import EvaluateConfig, evaluate

    metrics = evaluate(EvaluateConfig(**options))
    for target, values in metrics.items():
        if "uar" in values:
            click.echo(f"{target}: UAR {values['uar']:.3f}, macro-F1 {values['macro_f1']:.3f}, "
                       f"accuracy {values['accuracy']:.3f}")
        else:
            click.echo(f"{target}: CCC {values['ccc']:.3f}, Pearson {values['pearson']:.3f}, "
                       f"MSE {values['mse']:.4f}")
    plots = ["scatter.png"] * any("ccc" in v for v in metrics.values()) + [
        f"confusion_{t}.png" for t, v in metrics.items() if "uar" in v]
    click.echo(f"written: {options['out']}/metrics.json, predictions.csv, {', '.join(plots)}")


@main.command("predict")
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.argument("audio", nargs=-1, type=click.Path())
@click.option("--manifest", default=None, type=click.Path(dir_okay=False))
@click.option("--split", default=None)
@click.option("--out", required=True, type=OutPath(dir_okay=False),
              help="Predictions: .csv, or .parquet.")
@click.option("--model", default=None, help="Base checkpoint, if moved since training.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default=None)
@click.option("--audio-root", default=None, type=click.Path(file_okay=False))
@click.option("--workers", default=2, show_default=True, help="Background audio decoding threads.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@_THREADS
def predict_command(audio, no_progress, **options):
    """Predict from raw audio files or folders with a run or an exported model (no store needed).

    Files that cannot be used (unreadable, empty, shorter than the model's receptive field)
    are skipped and named; the others are predicted; the exit status is then 1."""
    from headtrain import PredictConfig, predict

    result = predict(PredictConfig(audio=tuple(audio), progress=not no_progress, **options))
    click.echo(f"predicted {result.predicted} utterances into {result.out}")
    if result.skipped:
        click.echo(f"ser: {len(result.skipped)} file(s) skipped (named above)", err=True)
        sys.exit(1)


@main.command("export")
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=OutPath(file_okay=False))
@click.option("--model", default=None, help="Base checkpoint, if moved since training.")
def export_command(run, out, model):
    """Write a self-contained model directory (whole network, LoRA merged)."""
    from headtrain import export

    path = export(run, out, model=model)
    click.echo(f"exported to {path} (transformers model + head.safetensors + ser_head.json)")


@main.command("bench")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False))
@click.option("--model", default="facebook/wav2vec2-base", show_default=True)
@click.option("--layers", default=9, show_default=True, help="Cached lower layers (L).")
@click.option("--top-layers", default=3, show_default=True, help="Finetuned layers (K).")
@click.option("--strategies", default="full,partial,cached,lora", show_default=True)
@click.option("--amp", type=click.Choice(["bf16", "fp16", "no"]), default="no", show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--steps", default=10, show_default=True, help="Timed steps per strategy.")
@click.option("--warmup-steps", default=2, show_default=True, help="Untimed steps first.")
@click.option("--device", default=None)
@click.option("--store", default=None, help="Reuse this store instead of building one.")
@click.option("--json", "json_out", default=None, type=OutPath(dir_okay=False), help="Write results here.")
@_THREADS
def bench_command(strategies, **options):
    """Measure every strategy side by side on identical batches (speed, memory, parameters)."""
    from headtrain.bench import BenchConfig, bench, format_table

    report = bench(BenchConfig(strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
                               **options))
    click.echo(format_table(report))


@main.command("demo")
@click.option("--out", default="demo-output", show_default=True, type=OutPath(file_okay=False))
@click.option("--epochs", default=8, show_default=True)
@_THREADS
def demo_command(out, epochs):
    """Offline end to end: synthetic corpus, tiny random model, cache, train, evaluate."""
    from headtrain.demo import run_demo

    run_demo(out, epochs=epochs, echo=click.echo)


@main.group()
def analyze() -> None:
    """Choose L and K from data: how finetuning moves each layer, what each layer knows."""


@analyze.command("change")
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=OutPath(file_okay=False),
              help="Folder for change.csv, change.json, change.png.")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False),
              help="Audio for CKA (default: what the run trained from).")
@click.option("--from-cache", "from_cache", default=None, help="Or: a store for CKA (cached runs).")
@click.option("--split", default=None, help="Split sampled for CKA (default: the run's dev split).")
@click.option("--utterances", default=100, show_default=True,
              help="Utterances sampled for CKA; 0: weights only (no audio read).")
@click.option("--metric", type=click.Choice(["representation", "weights"]), default=None,
              help="The change that decides the recommended L (default: representation; "
                   "weights with --utterances 0).")
@click.option("--threshold", default=0.5, show_default=True,
              help="A layer counts as changed from this fraction of the largest change on.")
@click.option("--model", default=None, help="Base checkpoint, if moved since training.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default=None)
@click.option("--seed", default=0, show_default=True, help="Seed of the utterance sample.")
@click.option("--cache-dir", default=None, help="Keep a local copy of remote store files here.")
@click.option("--audio-root", default=None, type=click.Path(file_okay=False))
@click.option("--no-progress", is_flag=True)
def analyze_change_command(no_progress, **options):
    """Per layer: how far RUN moved from its pretrained model (weights, CKA); recommends L."""
    from headtrain.analyze import ChangeConfig, analyze_change, change_text

    result = analyze_change(ChangeConfig(**options), progress=not no_progress)
    click.echo(change_text(result))
    click.echo(f"written: {options['out']}/change.csv, change.json, change.png")


@analyze.command("probe")
@click.argument("source")
@click.option("--out", required=True, type=OutPath(file_okay=False),
              help="Folder for probe.csv, probe.json, probe.png.")
@click.option("--model", default=None, help="Model to run on a manifest's audio (default "
              "facebook/wav2vec2-base); with a store, checked against the store's weights.")
@click.option("--targets", default="activation,valence,dominance", show_default=True,
              help="Label columns to probe, comma-separated.")
@click.option("--labels", default=None, type=click.Path(dir_okay=False),
              help="Labels table (CSV/Parquet: id, targets, split) instead of the source's.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--dev-split", default="dev", show_default=True)
@click.option("--weighted-sum", is_flag=True,
              help="Also train a learnable weighted sum of layers + head (SUPERB-style baseline).")
@click.option("--epochs", default=200, show_default=True, help="Full-batch epochs of --weighted-sum.")
@click.option("--lr", default=1e-2, show_default=True, help="Learning rate of --weighted-sum.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Utterances per model run (manifest).")
@click.option("--device", default=None)
@click.option("--cache-dir", default=None, help="Keep a local copy of remote store files here.")
@click.option("--audio-root", default=None, type=click.Path(file_okay=False))
@click.option("--no-progress", is_flag=True)
def analyze_probe_command(targets, no_progress, **options):
    """What each layer knows: a ridge probe per layer on pooled statistics, dev CCC; suggests K.

    SOURCE is a store built with --pooled-layers, or a manifest (statistics computed here)."""
    from headtrain.analyze import ProbeConfig, analyze_probe, probe_text

    result = analyze_probe(ProbeConfig(targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                                       **options), progress=not no_progress)
    click.echo(probe_text(result))
    click.echo(f"written: {options['out']}/probe.csv, probe.json, probe.png")


@main.group()
def prepare() -> None:
    """Turn a downloaded corpus into a manifest (id, path, split, labels)."""


_OUT = click.option("--out", required=True, type=OutPath(dir_okay=False),
                    help="Manifest to write: .csv, or .parquet.")
_SKIP_MISSING = click.option("--skip-missing", is_flag=True,
                             help="Leave out labelled utterances whose audio is missing.")
_ROOT = click.argument("root", type=click.Path(exists=True, file_okay=False))


@prepare.command("msp-podcast")
@_ROOT
@_OUT
@_SKIP_MISSING
def prepare_msp_podcast(root: str, out: str, skip_missing: bool) -> None:
    """MSP-Podcast: ROOT holds Audios/ and Labels/labels_consensus.csv (or .json)."""
    from cachegen.recipes import prepare_msp_podcast

    click.echo(prepare_msp_podcast(root, out=out, skip_missing=skip_missing))


@prepare.command("iemocap")
@_ROOT
@_OUT
@click.option("--test-session", type=int, default=5, show_default=True,
              help="Session whose turns make the test split.")
@click.option("--dev-session", type=int, default=4, show_default=True,
              help="Session whose turns make the dev split.")
@_SKIP_MISSING
def prepare_iemocap(root: str, out: str, test_session: int, dev_session: int,
                    skip_missing: bool) -> None:
    """IEMOCAP: ROOT (IEMOCAP_full_release) holds Session1 .. Session5."""
    from cachegen.recipes import prepare_iemocap

    click.echo(prepare_iemocap(root, out=out, test_session=test_session,
                               dev_session=dev_session, skip_missing=skip_missing))


@prepare.command("folder")
@_ROOT
@_OUT
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="CSV or Parquet table with an 'id' column (path under ROOT, no extension).")
@click.option("--split", default="hash:80/10/10", show_default=True,
              help="hash:TRAIN/DEV/TEST percentages by a stable hash of the id, or column:NAME "
                   "of the labels table.")
def prepare_folder(root: str, out: str, labels: str | None, split: str) -> None:
    """Every wav/flac/ogg/mp3 under ROOT, optionally joined with a labels table by id."""
    from cachegen.recipes import prepare_folder

    click.echo(prepare_folder(root, out=out, labels=labels, split=split))


if __name__ == "__main__":
    main()
