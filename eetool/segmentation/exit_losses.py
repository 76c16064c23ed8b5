"""Training a segmentation network with `eetool train`: the sum of every exit's loss (weight 1 each, as the
thesis trains), and the checks that model and data are both segmentation."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from eetool.core.errors import ModelMismatchError, UsageError
from eetool.core.training_loop import Mix, Step, TrainConfig
from eetool.segmentation import IGNORE
from eetool.segmentation.model import EESegNet


def exit_losses_step(label_smoothing: float = 0.0) -> Step:
    """Loss: the sum of the exits' per-pixel cross-entropies (ignored pixels left out); logits: the final exit's.
    A torchvision network without exit heads has the final exit only (`train-exits` adds the others)."""
    from eetool.segmentation.tv import TorchvisionSegNet

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mix: Mix | None) -> tuple[torch.Tensor, torch.Tensor]:
        target = y.long()
        if isinstance(model, TorchvisionSegNet) and model.exit_heads is None:
            outs = [model(x)]
        else:
            outs = cast(EESegNet, model).forward_exits(x)
        loss = sum((F.cross_entropy(o, target, ignore_index=IGNORE, label_smoothing=label_smoothing) for o in outs),
                   start=torch.zeros((), device=x.device))
        return loss, outs[-1]

    return step


def segmentation_config(cfg: TrainConfig, log: Any) -> TrainConfig:
    """The training options that apply to masks: no mixup, and no crop or flip (they would move the pixels away
    from their labels)."""
    if cfg.mixup > 0:
        raise UsageError("--mixup does not apply to segmentation", "drop --mixup")
    if cfg.augment:
        log("augmentation is off for segmentation: the random crop and flip would move pixels off their labels")
        cfg.augment = False
    return cfg


def require_same_task(arch_is_segmentation: bool, data_is_segmentation: bool, arch: str, data: str) -> None:
    if arch_is_segmentation and not data_is_segmentation:
        raise ModelMismatchError(f"{arch} is a segmentation network but {data} holds one label per image",
                                 "train it on segmentation data (--data fashion-mnist-scenes)")
    if data_is_segmentation and not arch_is_segmentation:
        raise ModelMismatchError(f"{data} holds per-pixel masks but {arch} is a classifier",
                                 "use --arch eeseg (or leave --arch out) for segmentation data")
