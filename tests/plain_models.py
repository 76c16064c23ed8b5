"""A model without batch norm, for the torchrun training tests: under DistributedDataParallel its training is
the single-process training with the same global batch to float rounding, at any learning rate (an untrained
ResNet on random pixels amplifies rounding at larger rates, one process against itself on another thread
count included)."""

from __future__ import annotations

from torch import nn


def convnet(num_classes: int, in_channels: int, width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
