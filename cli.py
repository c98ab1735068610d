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


@click.group(cls=SerGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Efficient finetuning for dimensional speech emotion recognition."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)


@main.group()
def cache() -> None:
    """Build, inspect and verify stores of lower-layer hidden states."""


@main.group()
def prepare() -> None:
    """Turn a downloaded corpus into a manifest (id, path, split, labels)."""


if __name__ == "__main__":
    main()
