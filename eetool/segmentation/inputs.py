"""A segmentation command's inputs: the checkpoint checked to be a segmentation network, its masks, batches of
them preprocessed for the network, and CBT's class-statistics pass over them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from eetool.core.errors import ModelMismatchError
from eetool.segmentation.calibration import add_batch
from eetool.segmentation.model import EXIT_NAMES, EESegNet
from eetool.segmentation.pixel_thresholds import (
    ClassStats,
)

if TYPE_CHECKING:
    from eetool.core.checkpoint import Checkpoint
    from eetool.core.datasets import Dataset, Preprocess
    from eetool.core.distributed import World
    from eetool.core.options import Run
    from eetool.segmentation.networks import SegmentationNet

def is_segmentation_checkpoint(run: Run, ref: str) -> bool:
    """Whether --checkpoint names a segmentation network, from its metadata alone (no weights are read); a file
    that cannot be read this way is left to the checkpoint loader to refuse."""
    from eetool.core.architectures import SEGMENTATION_ARCHS
    from eetool.core.checkpoint import SPEC_KEY, resolve_path

    if run.model_options.arch in SEGMENTATION_ARCHS:
        return True
    path = resolve_path(ref)
    if not path.endswith(".safetensors"):
        return False
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        import json

        return json.loads(meta.get(SPEC_KEY, "{}")).get("arch") in SEGMENTATION_ARCHS
    except Exception:  # unreadable: the loader reports it with its own error
        return False


def require_segmentation(ckpt: Checkpoint, what: str, exits: bool = False) -> SegmentationNet:
    """The checkpoint's segmentation network; with ``exits``, one that has its early exits (a torchvision network
    has them only once `train-exits` added them)."""
    from eetool.segmentation.tv import TorchvisionSegNet

    if not isinstance(ckpt.model, EESegNet | TorchvisionSegNet):
        raise ModelMismatchError(f"{what} is for segmentation networks, and {ckpt.label} is a classifier",
                                 "use --method e2cm, sdn, entropy or e2cm+sdn for a classifier, or give an eeseg "
                                 "checkpoint (`eetool train -d fashion-mnist-scenes`)")
    if exits and isinstance(ckpt.model, TorchvisionSegNet):
        ckpt.model.require_exits()
    return ckpt.model


def load_masks(spec: str, split: str, indices: str | None, ckpt: Checkpoint) -> Dataset:
    from eetool.core.datasets import load_dataset
    from eetool.segmentation.data import check_masks

    ds = load_dataset(spec, split, indices)
    check_masks(ds, ckpt.spec)
    return ds


def preprocessed_batches(ds: Dataset, preprocess: Preprocess, batch_size: int, device: torch.device
             ) -> Any:
    for images, masks, _ in ds.batches(batch_size):
        yield preprocess(images, device), masks


def class_statistics(model: SegmentationNet, ds: Dataset, preprocess: Preprocess, batch_size: int,
                     device: torch.device, reporter: Any, world: World | None = None) -> ClassStats:
    """One streaming pass: every exit's softmax summed per ground-truth class (float64). Under torchrun (``world``)
    each rank sums its whole batches and the float64 sums and the counts are added up over the ranks: the counts
    are one process's, the sums one process's but for the order of float64 additions."""
    from eetool.core.distributed import all_sum, shard_batches

    stats = ClassStats.empty(len(EXIT_NAMES), model.num_classes)
    model.eval().to(device)
    batches = len(shard_batches(list(range(-(-len(ds) // batch_size))), world)) if world else -(-len(ds) // batch_size)
    with torch.no_grad(), reporter.bar(batches, "class statistics") as bar:
        for images, masks, _ in ds.batches(batch_size, world=world):
            add_batch(stats, model, preprocess(images, device), masks)
            bar.advance()
    if world is not None:
        all_sum(stats.sums, world)
        all_sum(stats.counts, world)
    return stats
