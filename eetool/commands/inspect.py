"""eetool inspect: describe a checkpoint (mode, exits, shapes, costs) or any eetool artifact."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.core.options import (
    Count,
    CountOpt,
    ExitsOpt,
    Run,
    eetool_command,
)


@eetool_command("inspect", model_options=True)
def command(
    run: Run,
    file: Annotated[str | None, typer.Argument(help="A checkpoint or artifact to describe.",
                                               show_default=False)] = None,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="Checkpoint to describe with its "
                                                   "exits ('demo' for the embedded one).")] = None,
    exits: ExitsOpt = "every",
    count: CountOpt = Count.macs,
) -> None:
    """Describe a checkpoint (its exits, output shapes and cumulative costs) or an artifact. Writes nothing."""
    from eetool.core.inspection import InspectRequest, inspect_file

    inspect_file(run, InspectRequest(file=file, checkpoint=checkpoint, exits=exits, unit=count.value))
