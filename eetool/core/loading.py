"""How folder data is decoded and fed: the options (``DataOptions``, ``Geometry``) and the choice between memory
and streaming. Torch-free, so that the CLI declares the options cheaply; the decoding is
``eetool.core.streaming``.

Recipe: docs/data-sources.md#large-image-folders-streaming-and-the-imagenet-recipe
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

from eetool.core.architectures import TORCHVISION_ARCHS

# Decoded folder data above this many bytes streams from disk in batches instead of being held in memory.
IN_MEMORY_LIMIT_BYTES = 2 * 2**30
# At most this many decoding processes by default: more rarely help one model keep up.
MAX_DEFAULT_WORKERS = 8


class DataLoading(str, Enum):
    auto = "auto"  # in memory up to IN_MEMORY_LIMIT_BYTES, streamed beyond
    memory = "memory"
    stream = "stream"


def default_workers() -> int:
    """Decoding processes: one core is left to the model (and to the process that feeds it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DEFAULT_WORKERS, cores - 1))


@dataclass(frozen=True)
class Geometry:
    """Folder images: shorter side resized to ``resize``, then centre-cropped to ``crop`` (height, width)."""

    resize: int
    crop: tuple[int, int]


def default_resize(arch: str, crop: tuple[int, int]) -> int:
    """torchvision's reference evaluation resizes to 256 for a 224 crop; other models to the crop itself."""
    side = min(crop)
    return round(side * 256 / 224) if arch in TORCHVISION_ARCHS else side


@dataclass(frozen=True)
class DataOptions:
    """--data-loading, --workers, --resize and --crop, as every command that reads data takes them."""

    loading: DataLoading = DataLoading.auto
    workers: int | None = None  # None: default_workers()
    resize: int | None = None  # None: the checkpoint's, else default_resize
    crop: tuple[int, int] | None = None  # None: the model's input size

    def geometry(self, arch: str, input_hw: tuple[int, int], recorded_resize: int | None) -> Geometry:
        """The recipe for a model: the flags over what the checkpoint records over the architecture's default."""
        crop = self.crop or input_hw
        return Geometry(self.resize or recorded_resize or default_resize(arch, crop), crop)

    def worker_count(self) -> int:
        return default_workers() if self.workers is None else self.workers
