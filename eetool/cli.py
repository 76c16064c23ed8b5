"""The command line: a typer app whose subcommands live one per module in ``eetool.commands``.

Importing this module does not import torch: command modules keep heavy imports inside their
functions, so ``eetool --help`` and tab completion stay fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

from eetool import __version__
from eetool.commands import COMMANDS, load_command
from eetool.core.interrupts import own_process


class _Group(TyperGroup):
    """Click's own usage errors (unknown option, bad choice, missing value) as one line on stderr, too."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except NoArgsIsHelpError as e:  # a bare `eetool`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else (prog_name or "eetool")
            message = e.format_message().replace("\n", " ").rstrip(".")
            sys.stderr.write(f"error: {message} (hint: see `{where} --help`)\n")
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.stderr.write("aborted\n")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="eetool",
    cls=_Group,
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
    if sys.stdout is None:  # started with stdout closed (>&-): what goes there is dropped, like > /dev/null
        _stdout_to_devnull()
    with own_process():  # once a command has ended, no signal changes the exit code it reports
        app(prog_name="eetool")


def _stdout_to_devnull() -> None:
    """Put /dev/null at file descriptor 1, so that no file eetool opens later takes the place of stdout."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != 1:
        os.dup2(devnull, 1)
        os.close(devnull)
    sys.stdout = open(1, "w", closefd=False)
