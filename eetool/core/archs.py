"""Names of the architectures eetool builds; kept free of torch so the CLI can list them cheaply."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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

# torchvision's segmentation networks (eetool.segmentation.tv), with per-pixel exit heads once `train-exits` adds them.
TORCHVISION_SEGMENTATION_ARCHS: tuple[str, ...] = (
    "fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
)

# Early-exit segmentation networks (eetool.segmentation.model): per-pixel logits, three early exits and a final.
SEGMENTATION_ARCHS: tuple[str, ...] = ("eeseg", *TORCHVISION_SEGMENTATION_ARCHS)

EETOOL_ARCHS: tuple[str, ...] = (*CIFAR_RESNET_DEPTHS, "eeseg")

ALL_ARCHS: tuple[str, ...] = EETOOL_ARCHS + TORCHVISION_ARCHS + TORCHVISION_SEGMENTATION_ARCHS

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

    def given(self) -> dict[str, Any]:
        """The options that were set, by flag name (what provenance records of them)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if v not in (None, {})}
