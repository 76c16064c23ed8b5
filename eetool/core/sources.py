"""Dataset source names and default locations; free of torch so the CLI can list them cheaply."""

from __future__ import annotations

from pathlib import Path

IDX_SOURCES = ("mnist", "fashion-mnist", "kmnist")
# per-pixel label masks (eetool.segmentation.data)
SEGMENTATION_SOURCES = ("fashion-mnist-scenes", "brain-atlas", "segmentation", "segmentation-folder")
SOURCES = (*IDX_SOURCES, "cifar10", "cifar100", "folder", "safetensors", "demo", *SEGMENTATION_SOURCES)

DATA_ROOT_ENV = "EETOOL_DATA_DIR"  # $EETOOL_DATA_DIR/<name> is used when no PATH is given
DEFAULT_PATHS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
                 "brain-atlas": "/usr/share/mricron/templates"}  # Debian's mricron-data
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist", "brain-atlas": "mricron-data"}  # what provides them


def demo_path(name: str) -> Path:
    """A file of the embedded demo (package data)."""
    return Path(__file__).parents[1] / "demo" / name
