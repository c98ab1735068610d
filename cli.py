"""The `ser` command: a thin click layer. Each command builds a config and calls one function."""

from __future__ import annotations

import logging
import sys

import click

from cachegen.errors import SerError


class SerGroup(click.Group):
    """Turns every SerError into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SerError as err:
            click.echo(f"ser: error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("ser: interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


class EchoHandler(logging.Handler):
    """Library log messages to stderr through click (so CliRunner captures them too)."""

    def emit(self, record):
        click.echo(self.format(record), err=True)


@click.group(cls=SerGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Efficient finetuning for dimensional speech emotion recognition."""
    for name in ("cachegen", "headtrain"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, EchoHandler)]
        logger.addHandler(EchoHandler())
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False


@main.group()
def cache() -> None:
    """Build, inspect and verify stores of lower-layer hidden states."""


@cache.command("build")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--model", default="facebook/wav2vec2-base", show_default=True,
              help="Hub id or local folder of a Wav2Vec2/HuBERT model.")
@click.option("--layers", default=9, show_default=True, help="Lower transformer layers to cache.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the states.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
@click.option("--workers", default=2, show_default=True, help="Background audio decoding threads.")
@click.option("--audio-root", type=click.Path(file_okay=False), default=None,
              help="Folder that relative paths resolve against (default: the manifest's folder).")
@click.option("--shard-frames", type=int, default=None,
              help="Frames per shard file (default: about 16 MiB per file).")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out first.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def cache_build(manifest, model, layers, out, dtype, batch_size, device, workers, audio_root,
                shard_frames, overwrite, no_progress):
    """Run the feature encoder and lower LAYERS layers once; store each utterance's states."""
    from cachegen.build import BuildConfig, build_cache

    summary = build_cache(BuildConfig(
        manifest=manifest, out=out, model=model, layers=layers, dtype=dtype, batch_size=batch_size,
        device=device, workers=workers, overwrite=overwrite, audio_root=audio_root,
        shard_frames=shard_frames, progress=not no_progress))
    click.echo(summary.text())
    if summary.failed:
        sys.exit(1)


@cache.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--cache-dir", default=None, help="Keep fetched remote chunks here.")
def cache_info(store, as_json, cache_dir):
    """Show what a store holds: model, layer, dtype, utterances, hours, size, failures."""
    import json

    from cachegen.inspect import format_info, store_info

    info = store_info(store, cache_dir=cache_dir)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))


@cache.command("verify")
@click.argument("store")
@click.option("--cache-dir", default=None, help="Keep fetched remote chunks here.")
def cache_verify(store, cache_dir):
    """Check every utterance's checksum and the index; exit 1 naming each problem."""
    from cachegen.inspect import verify_store

    report = verify_store(store, cache_dir=cache_dir)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    if not report.ok:
        click.echo(f"{store}: {len(report.problems)} problem(s) in {report.checked} utterances", err=True)
        sys.exit(1)
    click.echo(f"{store}: ok ({report.checked} utterances, every checksum matches)")


@main.group()
def prepare() -> None:
    """Turn a downloaded corpus into a manifest (id, path, split, labels)."""


_OUT = click.option("--out", required=True, type=click.Path(dir_okay=False),
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
