"""A small multi-scale dense early-exit network in the spirit of MSDNet (Huang et al. 2018), for 28x28 and
32x32 inputs: three scales, dense layers, blocks that drop the finest scales, an exit after every block on the
coarsest scale. Its units (``eetool_units``) hand on the tuple of scales still in use.

Method: docs/trained-exits.md#early-exit-networks-trained-from-scratch
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eetool.core.errors import UsageError

SCALES = 3
SCALE_FACTORS = (1, 2, 4)  # channels of each scale, in units of ``width`` (stem) and ``growth`` (dense layers)
BOTTLENECK = 4  # a dense convolution's 1x1 bottleneck is at most this many times its output channels
CLASSIFIER_WIDTH = 8  # the classifier's convolutions have this many times ``width`` channels
DEFAULTS = {"width": 6, "growth": 6, "blocks": 4, "layers": 2}
LIMITS = {"width": 256, "growth": 256, "blocks": 8, "layers": 8}

Scales = tuple[torch.Tensor, ...]


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def dense_conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    """New features for a dense layer: a 3x3 convolution (strided from a finer scale), after a 1x1 bottleneck
    where the input is wider than ``BOTTLENECK`` times the output (narrower, it would narrow nothing)."""
    if cin <= BOTTLENECK * cout:
        return nn.Sequential(conv_bn_relu(cin, cout, 3, stride))
    inner = BOTTLENECK * cout
    return nn.Sequential(conv_bn_relu(cin, inner, 1), conv_bn_relu(inner, cout, 3, stride))


def scales_in_block(block: int, blocks: int) -> int:
    """How many scales block ``block`` of ``blocks`` keeps: all three in the first, then fewer, down to the
    coarsest alone in the last (3, 2, 1, 1 for four blocks; 3, 2, 2, 1, 1 for five)."""
    if blocks == 1:
        return SCALES
    return 1 + (SCALES - 1) * (blocks - 1 - block) // (blocks - 1)


class Stem(nn.Module):
    """The input at three scales: a 3x3 convolution, then two strided ones, each from the scale before."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        channels = [width * f for f in SCALE_FACTORS]
        self.convs = nn.ModuleList([conv_bn_relu(in_channels, channels[0], 3)] + [
            conv_bn_relu(channels[s - 1], channels[s], 3, 2) for s in range(1, SCALES)])

    def forward(self, x: torch.Tensor) -> Scales:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return tuple(out)


class ScaleUpdate(nn.Module):
    """One scale of a dense layer: its features with the new ones concatenated, from itself and (where there
    is one) the next finer scale."""

    def __init__(self, same: int, finer: int | None, growth: int) -> None:
        super().__init__()
        from_finer = growth // 2 if finer is not None else 0
        self.normal = dense_conv(same, growth - from_finer, 1)
        self.down = dense_conv(finer, from_finer, 2) if finer is not None else None

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None) -> torch.Tensor:
        parts = [same, self.normal(same)]
        if self.down is not None:
            assert finer is not None
            parts.append(self.down(finer))
        return torch.cat(parts, 1)


class DenseLayer(nn.Module):
    """A multi-scale dense layer from ``len(channels)`` scales to the coarsest ``keep`` of them: a scale that is
    dropped still feeds the next coarser one in this layer."""

    def __init__(self, channels: list[int], scale_ids: list[int], keep: int, growth: int) -> None:
        super().__init__()
        self.dropped = len(channels) - keep
        self.updates = nn.ModuleList([
            ScaleUpdate(channels[k], channels[k - 1] if k > 0 else None, growth * SCALE_FACTORS[scale_ids[k]])
            for k in range(self.dropped, len(channels))])

    def forward(self, xs: Scales) -> Scales:
        return tuple(update(xs[k], xs[k - 1] if k > 0 else None)
                     for k, update in enumerate(self.updates, start=self.dropped))


class Transition(nn.Module):
    """A 1x1 convolution per scale halving its channels, between blocks."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList([conv_bn_relu(c, c // 2, 1) for c in channels])

    def forward(self, xs: Scales) -> Scales:
        return tuple(conv(x) for conv, x in zip(self.convs, xs, strict=True))


class Classifier(nn.Module):
    """MSDNet's classifier on the coarsest scale: two strided 3x3 convolutions, average pooling, linear."""

    def __init__(self, cin: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(cin, width, 3, 2), conv_bn_relu(width, width, 3, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.linear = nn.Linear(width, num_classes)

    def forward(self, xs: Scales) -> torch.Tensor:
        return self.linear(self.features(xs[-1]))


class MSDNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 6, growth: int = 6,
                 blocks: int = 4, layers: int = 2) -> None:
        super().__init__()
        channels = [width * f for f in SCALE_FACTORS]
        scale_ids = list(range(SCALES))
        units: list[nn.Module] = []
        for b in range(blocks):
            parts: list[nn.Module] = [Stem(in_channels, width)] if b == 0 else []
            keep = scales_in_block(b, blocks)
            for _ in range(layers):
                layer = DenseLayer(channels, scale_ids, keep, growth)
                scale_ids = scale_ids[layer.dropped:]
                channels = [c + growth * SCALE_FACTORS[s] for c, s in zip(channels[layer.dropped:], scale_ids,
                                                                           strict=True)]
                parts.append(layer)
            if b < blocks - 1:
                parts.append(Transition(channels))
                channels = [c // 2 for c in channels]
            units.append(nn.Sequential(*parts))
        self.blocks = nn.ModuleList(units)
        self.head = Classifier(channels[-1], CLASSIFIER_WIDTH * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: Any = x
        for block in self.blocks:
            h = block(h)
        out: torch.Tensor = self.head(h)
        return out

    def eetool_units(self) -> list[tuple[str, nn.Module]]:
        return [*((f"blocks.{b}", block) for b, block in enumerate(self.blocks)), ("head", self.head)]


def build(arch: str, num_classes: int, in_channels: int, arch_args: dict[str, Any]) -> MSDNet:
    unknown = sorted(set(arch_args) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"bad --arch-args for {arch}: unknown {', '.join(unknown)}",
                         f"{arch} takes {', '.join(DEFAULTS)}, e.g. '{{width: 8, blocks: 4}}'")
    args = {**DEFAULTS, **arch_args}
    for key, value in args.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= LIMITS[key]:
            raise UsageError(f"--arch-args {key} of {arch} must be a whole number from 1 to {LIMITS[key]}, "
                             f"not {value!r}", f"e.g. '{{{key}: {DEFAULTS[key]}}}'")
    return MSDNet(num_classes, in_channels, **args)
