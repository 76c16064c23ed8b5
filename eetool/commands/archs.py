"""eetool archs: list the architectures and dataset sources eetool knows."""

from __future__ import annotations

from eetool.core.architectures import ARCHITECTURES
from eetool.core.options import Run, eetool_command
from eetool.core.sources import DATA_SOURCES


@eetool_command("archs")
def command(run: Run) -> None:
    """List architectures (--arch) and dataset sources (--data). Reads and writes nothing."""
    doc = {"eetool": list(ARCHITECTURES.names(family="eetool")),
           "torchvision": list(ARCHITECTURES.names(family="torchvision")),
           "datasets": list(DATA_SOURCES.names()), "custom": "package.module:callable"}
    run.emit(doc, lambda d: "\n".join([
        "eetool (28x28 / 32x32 inputs): " + ", ".join(d["eetool"]),
        "torchvision: " + ", ".join(d["torchvision"]),
        "your own: package.module:callable with --arch-args",
        "datasets: " + ", ".join(d["datasets"]),
    ]))
