"""Names of the architectures eetool builds; kept free of torch so the CLI can list them cheaply."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from eetool.core.registry import CLASSIFICATION, SEGMENTATION, Registry

if TYPE_CHECKING:
    from torch import nn

# One registration per architecture: its builder, called as build(arch, num_classes, in_channels, arch_args)
# -> nn.Module and imported only when the architecture is built, and its family (what `eetool archs` groups by).
ARCHITECTURES: Registry[Callable[..., nn.Module]] = Registry("architecture")
# CIFAR-style ResNets (He et al. 2016, section 4.2) as used by SDN and the pruning literature.
for _depth in (8, 20, 32, 56, 110):
    ARCHITECTURES.register(f"resnet{_depth}", "eetool.core.builders:build_cifar_resnet", family="eetool", depth=_depth)
# A small multi-scale dense early-exit network after MSDNet (eetool.classification.msdnet): exits on its coarsest scale.
ARCHITECTURES.register("msdnet", "eetool.classification.msdnet:build", family="eetool")
# Early-exit segmentation network (eetool.segmentation.model): per-pixel logits, three early exits and a final.
ARCHITECTURES.register("eeseg", "eetool.segmentation.model:build", task=SEGMENTATION, family="eetool")
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
              "mobilenet_v3_large", "mobilenet_v3_small", *(f"efficientnet_b{i}" for i in range(8)),
              *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))):
    ARCHITECTURES.register(_name, "eetool.core.builders:build_torchvision", family="torchvision")
# torchvision's segmentation networks (eetool.segmentation.tv), with per-pixel exit heads once `train-exits` adds them.
for _name in ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"):
    ARCHITECTURES.register(_name, "eetool.segmentation.tv:build", task=SEGMENTATION, family="torchvision")

TORCHVISION_ARCHS = ARCHITECTURES.names(CLASSIFICATION, family="torchvision")
CIFAR_RESNET_DEPTHS: dict[str, int] = {e.name: e.info["depth"] for e in ARCHITECTURES if "depth" in e.info}
TORCHVISION_SEGMENTATION_ARCHS = ARCHITECTURES.names(SEGMENTATION, family="torchvision")
SEGMENTATION_ARCHS = ARCHITECTURES.names(SEGMENTATION)
EETOOL_ARCHS = ARCHITECTURES.names(family="eetool")
ALL_ARCHS = EETOOL_ARCHS + TORCHVISION_ARCHS + TORCHVISION_SEGMENTATION_ARCHS

# torchvision's builders expect ImageNet-sized RGB input normalised with ImageNet statistics.
IMAGENET_INPUT_SHAPE = (3, 224, 224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_custom_arch(arch: str) -> bool:
    """A user's own factory is named ``package.module:callable``."""
    return ":" in arch


# Bounds on what a file's metadata (or a flag) may ask a model to be fed and to predict, checked before
# anything is allocated: a 60000 x 60000 input would take gigabytes in the first forward pass.
MAX_INPUT_CHANNELS = 64
MAX_INPUT_SIDE = 4096
MAX_CLASSES = 1_000_000


@dataclass(frozen=True)
class ModelOptions:
    """How to build and feed weights that do not record it (foreign state dicts): the options
    --arch, --arch-args, --num-classes, --input-shape, --mean and --std, which every command that
    reads a checkpoint takes. For an eetool checkpoint, --input-shape, --mean and --std override its
    metadata and the others must agree with it."""

    arch: str | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    input_shape: tuple[int, int, int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def given(self) -> dict[str, object]:
        """The options that were set, by flag name (what provenance records of them)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if v not in (None, {})}
