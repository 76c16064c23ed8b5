"""Building architectures: torchvision's classifiers, eetool's CIFAR-style ResNets, user factories."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from eetool.core.architectures import (
    ALL_ARCHS,
    ARCHITECTURES,
    CIFAR_RESNET_DEPTHS,
    is_custom_arch,
)
from eetool.core.errors import UsageError


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or planes  # a channel-pruned block may be narrower inside than its output
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Projection shortcut (option B): a 1x1 convolution where the shape changes.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-6n+2 for small images: a 3x3 stem, three stages of n blocks (16, 32, 64 channels).

    A channel-pruned ResNet records its widths instead of ``width``: ``stage_widths`` are the three
    stages' residual streams (the stem's output is the first: the first stage adds to it unprojected),
    ``block_widths`` the inner width (first convolution) of each block, one list of n per stage.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 stage_widths: list[int] | None = None, block_widths: list[list[int]] | None = None) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise UsageError(f"CIFAR ResNet depth must be 6n+2, got {depth}", "use 20, 32, 56 or 110")
        blocks = (depth - 2) // 6
        streams = stage_widths or [width * mult for mult in (1, 2, 4)]
        inner = block_widths or [[w] * blocks for w in streams]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, streams[0], 3, 1, 1, bias=False), nn.BatchNorm2d(streams[0]), nn.ReLU(inplace=True)
        )
        planes = streams[0]
        stages = []
        for stage in range(3):
            layers = []
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(planes, streams[stage], stride, inner[stage][b]))
                planes = streams[stage]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model(arch: str, num_classes: int, in_channels: int, arch_args: dict[str, Any] | None = None) -> nn.Module:
    """Build an untrained model; weights are loaded by ``eetool.core.checkpoint``. A registered architecture
    (eetool.core.architectures) is built by its builder, a user's own by its ``package.module:callable``."""
    arch_args = dict(arch_args or {})
    if arch in ARCHITECTURES:
        builder: Callable[..., nn.Module] = ARCHITECTURES.get(arch).load()
        return builder(arch, num_classes, in_channels, arch_args)
    if is_custom_arch(arch):
        return _build_custom(arch, num_classes, in_channels, arch_args)
    raise UsageError(
        f"unknown architecture {arch!r}",
        f"choose one of {', '.join(ALL_ARCHS[:6])}, ... (`eetool archs` lists all) or give package.module:callable",
    )


def build_cifar_resnet(arch: str, num_classes: int, in_channels: int, arch_args: dict[str, Any]) -> CifarResNet:
    width = arch_args.get("width", 16)
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 1024:
        raise UsageError(f"--arch-args width must be a whole number from 1 to 1024, not {width!r}",
                         "e.g. '{width: 16}' (the standard CIFAR ResNet)")
    _check_pruned_widths(arch_args, (CIFAR_RESNET_DEPTHS[arch] - 2) // 6)
    try:
        return CifarResNet(CIFAR_RESNET_DEPTHS[arch], num_classes=num_classes, in_channels=in_channels, **arch_args)
    except TypeError as e:
        raise UsageError(f"bad --arch-args for {arch}: {e}",
                         "eetool's CIFAR ResNets take width (or a pruned one's stage_widths and block_widths)"
                         ) from None


# The widest stream a CIFAR ResNet of the largest width (1024) has: a pruned one is never wider.
MAX_PRUNED_WIDTH = 4 * 1024


def _stem_size(key: str, value: object, default: int, top: int) -> int:
    """An --arch-args stem size: ``default`` when not given, else a whole number from 1 to ``top``."""
    size = default if value is None else value
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= top:
        raise UsageError(f"--arch-args {key} must be a whole number from 1 to {top}, not {size!r}",
                         f"e.g. '{{{key}: 3}}'")
    return size


def _check_pruned_widths(arch_args: dict[str, Any], blocks: int) -> None:
    """A channel-pruned ResNet's widths (see CifarResNet), checked before anything is built from them."""
    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_PRUNED_WIDTH

    hint = "leave them as `eetool` wrote them, or give width alone"
    if "stage_widths" in arch_args:
        if "width" in arch_args:
            raise UsageError("--arch-args give both width and stage_widths", "give one of them")
        streams = arch_args["stage_widths"]
        if not isinstance(streams, list) or len(streams) != 3 or not all(whole(v) for v in streams):
            raise UsageError(f"--arch-args stage_widths must be 3 whole numbers from 1 to {MAX_PRUNED_WIDTH}, "
                             f"not {streams!r}", hint)
    if "block_widths" in arch_args:
        inner = arch_args["block_widths"]
        if (not isinstance(inner, list) or len(inner) != 3
                or not all(isinstance(s, list) and len(s) == blocks and all(whole(v) for v in s) for s in inner)):
            raise UsageError(f"--arch-args block_widths must be 3 lists of {blocks} whole numbers from 1 to "
                             f"{MAX_PRUNED_WIDTH}", hint)


# eetool's own arguments for torchvision classifiers, for weights whose first convolution was changed
# (a one-channel 3x3 stem for 28 x 28 images, say): the kernel is read from the weights, the stride and
# ResNet's max-pool are not in them and come from --arch-args.
STEM_ARGS = ("stem_kernel", "stem_stride", "stem_pool")
NEVER_DOWNLOAD = ("weights", "weights_backbone", "progress")


def refuse_downloads(arch_args: dict[str, Any]) -> None:
    """torchvision builders download weights when asked to; --arch-args never may ask."""
    for key in NEVER_DOWNLOAD:
        if key in arch_args:
            raise UsageError(f"--arch-args {key!r} is not taken: eetool never downloads weights",
                             "load the weights you have with --checkpoint")


def build_torchvision(arch: str, num_classes: int, in_channels: int, arch_args: dict[str, Any]) -> nn.Module:
    import torchvision

    refuse_downloads(arch_args)
    stem = {k: arch_args.pop(k) for k in STEM_ARGS if k in arch_args}
    try:
        model: nn.Module = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **arch_args)
    except (TypeError, ValueError) as e:
        raise UsageError(f"bad --arch-args for {arch}: {e}", "see torchvision's documentation of the builder") from None
    if in_channels != 3 or stem:
        adapt_stem(model, arch, in_channels, **stem)
    return model


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first 2-D convolution in definition order: the stem of every classifier eetool builds."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last linear layer in definition order: the classifier of every classifier eetool builds."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


def adapt_stem(model: nn.Module, arch: str, in_channels: int, stem_kernel: object = None,
                stem_stride: object = None, stem_pool: object = True) -> None:
    """Replace the first convolution for ``in_channels`` inputs (and another kernel or stride); the stem options
    are --arch-args values, checked here."""
    found = first_conv(model)
    assert found is not None  # every torchvision classifier eetool lists starts with a convolution
    name, conv = found
    kernel = _stem_size("stem_kernel", stem_kernel, conv.kernel_size[0], 15)
    stride = _stem_size("stem_stride", stem_stride, conv.stride[0], 8)
    if not isinstance(stem_pool, bool):
        raise UsageError(f"--arch-args stem_pool must be true or false, not {stem_pool!r}", "e.g. '{stem_pool: false}'")
    new = nn.Conv2d(in_channels, conv.out_channels, kernel, stride, kernel // 2, bias=conv.bias is not None)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    if not stem_pool:
        if not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
            raise UsageError(f"--arch-args stem_pool applies to ResNets, not {arch}", "drop stem_pool")
        model.maxpool = nn.Identity()


def _build_custom(arch: str, num_classes: int, in_channels: int, arch_args: dict[str, Any]) -> nn.Module:
    module_name, _, attr = arch.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"cannot import {arch}: {e}", "check that the module is importable (PYTHONPATH)") from None
    params = inspect.signature(factory).parameters
    # Pass what eetool knows only where the factory asks for it.
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if name in params and name not in arch_args:
            arch_args[name] = value
    try:
        model = factory(**arch_args)
    except TypeError as e:
        raise UsageError(f"bad --arch-args for {arch}: {e}", "pass the factory's arguments as YAML/JSON") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module", "return the model itself")
    return model
