"""Dataset source names and default locations; free of torch so the CLI can list them cheaply."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eetool.core.registry import CLASSIFICATION, SEGMENTATION, Registry

# --data NAME[:PATH], one registration per source: the loader (called as loader(name, path, split, options,
# geometry) -> Dataset), how help shows it (``usage``) and whether completion adds the colon a path follows.
DATA_SOURCES: Registry[Callable[..., object]] = Registry("data source")  # eetool.core.datasets casts the Dataset
for _idx in ("mnist", "fashion-mnist", "kmnist"):
    DATA_SOURCES.register(_idx, "eetool.core.datasets:load_idx_source", idx=True)
for _cifar in ("cifar10", "cifar100"):
    DATA_SOURCES.register(_cifar, "eetool.core.datasets:load_cifar_source", completes_path=True)
DATA_SOURCES.register("folder", "eetool.core.datasets:load_folder_source", usage="folder:PATH", completes_path=True)
DATA_SOURCES.register("safetensors", "eetool.core.datasets:load_safetensors_source", usage="safetensors:FILE",
                      completes_path=True)
DATA_SOURCES.register("demo", "eetool.core.datasets:load_demo_source")
# per-pixel label masks (eetool.segmentation.data)
DATA_SOURCES.register("fashion-mnist-scenes", "eetool.segmentation.data:load_scenes_source", task=SEGMENTATION)
DATA_SOURCES.register("brain-atlas", "eetool.segmentation.atlas:load_atlas_source", task=SEGMENTATION)
DATA_SOURCES.register("segmentation", "eetool.segmentation.data:load_masks_source", task=SEGMENTATION,
                      usage="segmentation:FILE", completes_path=True)
DATA_SOURCES.register("segmentation-folder", "eetool.segmentation.folder:load_folder_source", task=SEGMENTATION,
                      usage="segmentation-folder:PATH", completes_path=True)

IDX_SOURCES = DATA_SOURCES.names(idx=True)
SEGMENTATION_SOURCES = DATA_SOURCES.names(SEGMENTATION)
SOURCES = DATA_SOURCES.names()


def _usages(task: str) -> str:
    shown = [e.info.get("usage", e.name) for e in DATA_SOURCES if e.task == task]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def source_list() -> str:
    """Every registered source as --data's help lists them."""
    return f"{_usages(CLASSIFICATION)}; for segmentation {_usages(SEGMENTATION)}"


def data_completions() -> list[str]:
    """--data's completions: the source names, with a colon where a path follows."""
    return [f"{e.name}:" if e.info.get("completes_path") else e.name for e in DATA_SOURCES]


DATA_ROOT_ENV = "EETOOL_DATA_DIR"  # $EETOOL_DATA_DIR/<name> is used when no PATH is given
DEFAULT_PATHS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
                 "brain-atlas": "/usr/share/mricron/templates"}  # Debian's mricron-data
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist", "brain-atlas": "mricron-data"}  # what provides them


def demo_path(name: str) -> Path:
    """A file of the embedded demo (package data)."""
    return Path(__file__).parents[1] / "demo" / name
