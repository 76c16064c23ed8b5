"""Either segmentation network, eeseg (``segmentation.model``) or a torchvision one (``segmentation.tv``, masked by
``segmentation.tv_masked``), behind the calls the commands make: the plain network's and the first exit's
multiply-adds, and early exit. The torchvision modules are imported only for a torchvision network."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import torch

from eetool.core.choices import DECIDE_AT
from eetool.core.errors import UsageError
from eetool.segmentation import model as eeseg
from eetool.segmentation.model import DENSE_ABOVE, EarlyExitResult, EESegNet

if TYPE_CHECKING:
    from eetool.segmentation.tv import TorchvisionSegNet

SegmentationNet: TypeAlias = "EESegNet | TorchvisionSegNet"


def plain_macs(model: SegmentationNet, input_shape: tuple[int, int, int]) -> int:
    """Multiply-adds of the plain network on one image."""
    if isinstance(model, EESegNet):
        return eeseg.plain_macs(model, input_shape)
    from eetool.segmentation import tv

    return tv.plain_macs(model, input_shape)


def first_exit_macs(model: SegmentationNet, input_shape: tuple[int, int, int]) -> int:
    """Multiply-adds on one image when every pixel leaves at the first exit: the cheapest any thresholds get."""
    if isinstance(model, EESegNet):
        return eeseg.first_exit_macs(model, input_shape)
    from eetool.segmentation import tv

    return tv.first_exit_macs(model, input_shape)


def early_exit_forward(model: SegmentationNet, x: torch.Tensor, thresholds: torch.Tensor,
                       dense_above: float = DENSE_ABOVE, decide_at: str = "pixel") -> EarlyExitResult:
    """Pixel-level early exit with ``thresholds`` (early exits x classes): a pixel predicted as class j at early
    exit n leaves when its largest probability exceeds ``thresholds[n, j]``. eeseg computes only active positions
    after its stem, a torchvision network after its first exit; with ``decide_at="feature"`` either decides per
    position of its heads' grids."""
    if decide_at not in DECIDE_AT:
        raise UsageError(f"unknown --decide-at {decide_at!r}", f"use one of {', '.join(DECIDE_AT)}")
    if isinstance(model, EESegNet):
        return eeseg.early_exit_forward(model, x, thresholds, dense_above, decide_at=decide_at)
    from eetool.segmentation import tv_masked

    return tv_masked.early_exit_forward(model, x, thresholds, decide_at=decide_at)
