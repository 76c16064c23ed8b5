"""eetool env: versions and devices, for bug reports."""

from __future__ import annotations

import platform
import sys

from eetool import __version__
from eetool.core.options import Run, eetool_command
from eetool.core.reporting import format_fields


@eetool_command("env")
def command(run: Run) -> None:
    """Print versions of Python, torch, torchvision and eetool, the device and thread count. Reads nothing."""
    import torch
    import torchvision

    device = run.torch()
    doc = {
        "eetool": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }
    run.emit(doc, lambda d: format_fields(list(d.items())))
