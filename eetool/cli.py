"""The command line: a typer app whose subcommands live one per module in ``eetool.commands``.

Importing this module does not import torch: command modules keep heavy imports inside their
functions, so ``eetool --help`` and tab completion stay fast.
"""

from __future__ import annotations

import typer

from eetool import __version__
from eetool.commands import COMMANDS, load_command

app = typer.Typer(
    name="eetool",
    help="Early exits for the checkpoints you already have: calibrate, fit, evaluate, prune.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"eetool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print eetool's version and exit.", callback=_version,
                                 is_eager=True),
) -> None:
    """Early exits for the checkpoints you already have."""


for _name in COMMANDS:
    _func = load_command(_name)
    app.command(_name, help=_func.__doc__)(_func)


def main() -> None:
    app(prog_name="eetool")
