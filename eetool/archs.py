"""Names of the architectures eetool builds; kept free of torch so the CLI can list them cheaply."""

from __future__ import annotations

TORCHVISION_ARCHS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    *(f"efficientnet_b{i}" for i in range(8)),
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
)

# CIFAR-style ResNets (He et al. 2016, section 4.2) as used by SDN and the pruning literature.
CIFAR_RESNET_DEPTHS: dict[str, int] = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}

EETOOL_ARCHS: tuple[str, ...] = tuple(CIFAR_RESNET_DEPTHS)

ALL_ARCHS: tuple[str, ...] = EETOOL_ARCHS + TORCHVISION_ARCHS

# torchvision's builders expect ImageNet-sized RGB input normalised with ImageNet statistics.
IMAGENET_INPUT_SHAPE = (3, 224, 224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_custom_arch(arch: str) -> bool:
    """A user's own factory is named ``package.module:callable``."""
    return ":" in arch
