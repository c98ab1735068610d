"""The CLI's choice lists are the library's registries: a strategy, dtype, loss or precision
added to the library and not to the CLI (or the reverse) fails here."""

import click
import pytest

from cachegen.store import STORAGE_DTYPES
from cli import main
from headtrain.bench import BenchConfig
from headtrain.metrics import LOSSES
from headtrain.spec import STRATEGIES
from headtrain.train import AMP_CHOICES


def choices(command: str, option: str) -> set[str]:
    group, *names = command.split()
    cmd = main.commands[group]
    for name in names:
        cmd = cmd.commands[name]
    param = next(p for p in cmd.params if p.name == option)
    assert isinstance(param.type, click.Choice), (command, option)
    return set(param.type.choices)


@pytest.mark.parametrize("command,option,registry", [
    ("train", "strategy", STRATEGIES),
    ("train", "loss", LOSSES),
    ("train", "amp", AMP_CHOICES),
    ("bench", "amp", AMP_CHOICES),
    ("cache build", "dtype", STORAGE_DTYPES),
])
def test_cli_choices_equal_the_library_registry(command, option, registry):
    assert choices(command, option) == set(registry)


def test_bench_default_strategies_are_every_strategy_that_runs_layers():
    from headtrain.spec import Strategy

    cli_default = next(p for p in main.commands["bench"].params if p.name == "strategies").default
    library_default = BenchConfig.__dataclass_fields__["strategies"].default
    runs_layers = {s for s in STRATEGIES if not Strategy(s).reads_pooled}  # bench refuses weighted-sum
    assert set(cli_default.split(",")) == set(library_default) == runs_layers
