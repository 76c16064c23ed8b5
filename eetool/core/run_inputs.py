"""A run's inputs: its --checkpoint and --data opened with the run's model and data options, and its share of
the data under torchrun (imports torch lazily)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from eetool.core.checkpoint import Checkpoint, ModelSpec
    from eetool.core.datasets import Dataset
    from eetool.core.options import Run


def open_checkpoint(run: Run, checkpoint: str) -> Checkpoint:
    """The --checkpoint, built with the command's foreign-checkpoint options where the file does not record them."""
    from eetool.core.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, run.model_options)


def data_path(spec: str) -> str | None:
    """The file or folder a ``--data NAME[:PATH]`` spec reads, so that no output replaces it."""
    from eetool.core.sources import SOURCES

    name, sep, path = spec.partition(":")
    if name in SOURCES:
        return (path or None) if sep else None
    return spec


def load_data(run: Run, data: str, split: str, indices: str | None = None, spec: ModelSpec | None = None
              ) -> Dataset:
    """``--data`` for the model of ``spec`` (its recipe for folder images), held or streamed as the data
    options say; without a spec, folder images keep the first image's size (or --crop's)."""
    from eetool.core.datasets import load_dataset
    from eetool.core.loading import Geometry, default_resize

    opts = run.data_options
    if spec is not None:
        geometry = opts.geometry(spec.arch, (spec.input_shape[1], spec.input_shape[2]), spec.resize)
    elif opts.crop is not None:
        geometry = Geometry(opts.resize or default_resize(run.model_options.arch or "", opts.crop), opts.crop)
    else:
        geometry = None
    return load_dataset(data, split, indices, opts, geometry)


def local_share(run: Run, ds: Dataset, batch_size: int
                ) -> tuple[Dataset, Callable[[torch.Tensor], torch.Tensor]]:
    """Under torchrun: this rank's whole batches of ``ds`` (as a dataset), and a function that puts every rank's
    per-sample rows back in the order of ``ds``. One process: ``ds`` and the identity."""
    from eetool.core.distributed import gather_rows, shard_positions

    world = run.world
    if not world.distributed:
        return ds, lambda rows: rows
    positions = shard_positions(len(ds), batch_size, world)
    return ds.subset(positions), lambda rows: gather_rows(rows, positions, len(ds), world)


def fed_as(run: Run) -> ModelSpec | None:
    """A stand-in spec saying how to decode folder images for a model trained from scratch: by --input-shape
    if given; None (the first image's size, or --crop's) if not."""
    from eetool.core.checkpoint import ModelSpec

    opts = run.model_options
    if opts.input_shape is None:
        return None
    return ModelSpec(arch=opts.arch or "resnet20", num_classes=1, input_shape=opts.input_shape, mean=[0.5],
                     std=[0.5])


def fresh_spec(run: Run, train_data: Dataset, default_arch: str) -> ModelSpec:
    """What to train from scratch: --arch (default ``default_arch``) fed as the data is, unless the options say
    otherwise."""
    from eetool.core.checkpoint import ModelSpec

    opts = run.model_options
    mean, std = (opts.mean, opts.std) if opts.mean and opts.std else train_data.channel_stats()
    c, h, w = train_data.image_shape
    spec = ModelSpec(arch=opts.arch or default_arch, arch_args=dict(opts.arch_args),
                     num_classes=opts.num_classes or train_data.num_classes,
                     input_shape=opts.input_shape or (c, h, w), mean=list(opts.mean or mean),
                     std=list(opts.std or std), classes=list(train_data.classes))
    if len(spec.classes) != spec.num_classes:
        spec.classes = []
    spec.check("the model to train", "check --num-classes, --input-shape, --mean and --std")
    return spec
