"""torchvision's segmentation networks (FCN, DeepLabV3, LR-ASPP) as eetool checkpoints, with per-pixel exit heads.

``TorchvisionSegNet`` loads a torchvision state dict under torchvision's own names (random initialisation, nothing
downloaded); with ``--arch-args '{exits: true}'`` it has three exit heads after three backbone stages.

Method: docs/methods/segmentation-inference.md#torchvision-networks
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from eetool.core.architectures import TORCHVISION_SEGMENTATION_ARCHS
from eetool.core.batch_norm_folding import fold_batch_norm_within
from eetool.core.errors import ModelMismatchError, UsageError
from eetool.segmentation.model import Head, InferenceCopy, upsample

EXIT_POINTS = {"resnet": ("layer1", "layer2", "layer3"), "mobilenet": ("3", "6", "12")}
DEFAULT_HEAD_WIDTH = 64


class TorchvisionSegNet(nn.Module):
    pixel_exits = True  # per-pixel exits of its own: not a classifier for class means or exit heads

    def __init__(self, arch: str, num_classes: int, in_channels: int, arch_args: dict[str, Any]) -> None:
        super().__init__()
        from torchvision.models import segmentation

        from eetool.core.builders import STEM_ARGS, adapt_stem, refuse_downloads

        args = dict(arch_args)
        exits = args.pop("exits", False)
        head_width = args.pop("head_width", DEFAULT_HEAD_WIDTH)
        if not isinstance(exits, bool):
            raise UsageError(f"--arch-args exits must be true or false, not {exits!r}", "e.g. '{exits: true}'")
        if not isinstance(head_width, int) or isinstance(head_width, bool) or not 1 <= head_width <= 1024:
            raise UsageError(f"--arch-args head_width must be a whole number from 1 to 1024, not {head_width!r}",
                             f"e.g. '{{head_width: {DEFAULT_HEAD_WIDTH}}}'")
        refuse_downloads(args)
        stem = {k: args.pop(k) for k in STEM_ARGS if k in args}
        try:
            net = getattr(segmentation, arch)(weights=None, weights_backbone=None, num_classes=num_classes, **args)
        except (TypeError, ValueError) as e:
            raise UsageError(f"bad --arch-args for {arch}: {e}",
                             "torchvision's segmentation builders take aux_loss; eetool adds exits and head_width"
                             ) from None
        if in_channels != 3 or stem:
            adapt_stem(net, arch, in_channels, **stem)
        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        self.backbone = cast(nn.ModuleDict, net.backbone)  # torchvision's IntermediateLayerGetter
        self.classifier = net.classifier
        self.aux_classifier = getattr(net, "aux_classifier", None)  # trained by torchvision's recipe, unused here
        self.takes_features = arch.startswith("lraspp")  # LR-ASPP's head reads the low and high features
        self.exit_points = EXIT_POINTS["resnet" if "resnet" in arch else "mobilenet"]
        names = list(self.backbone.keys())
        self.stage_names = _split(names, self.exit_points)
        self.exit_heads = nn.ModuleList(
            Head(_out_channels(self.backbone[p]), head_width, num_classes) for p in self.exit_points
        ) if exits else None
        self.dense_cost_cache: dict[tuple[int, int, int], DenseCosts] = {}  # by input shape: one counting pass each
        self.channels_last = False  # True for inference_net's copy (channels last, BatchNorm folded)
        self._inference: InferenceCopy[TorchvisionSegNet] = InferenceCopy()

    def inference_net(self) -> TorchvisionSegNet:
        """The network inference runs: in eval mode without gradients, a cached copy in channels last with each
        BatchNorm that follows a convolution folded into it (remade when a parameter or buffer changes); otherwise
        this network itself.
        Method: docs/methods/segmentation-inference.md#torchvision-networks"""
        if self.channels_last or self.training or torch.is_grad_enabled():
            return self
        return self._inference.of(self, self._channels_last_copy)

    def _channels_last_copy(self) -> TorchvisionSegNet:
        net = copy.deepcopy(self, {id(self._inference): InferenceCopy()})  # without the cache and its copy
        # the backbone as one (its stem's convolution and BatchNorm are modules of their own), the exit points'
        # outputs kept for the heads; the classifier and each head as a whole
        fold_batch_norm_within(net, net.backbone, net.exit_points)
        for region in (net.classifier, *(net.exit_heads or [])):
            fold_batch_norm_within(net, region)
        net.to(memory_format=torch.channels_last).requires_grad_(False)
        net.channels_last = True
        return net

    def run_stage(self, n: int, x: torch.Tensor, saved: dict[str, torch.Tensor]) -> torch.Tensor:
        """Backbone stage ``n`` (0..3: up to each exit point, then the rest), keeping the outputs the classifier
        reads in ``saved`` (by torchvision's return names)."""
        returned = cast(dict[str, str], self.backbone.return_layers)  # type: ignore[attr-defined]
        for name in self.stage_names[n]:
            x = self.backbone[name](x)
            if name in returned:
                saved[returned[name]] = x
        return x

    def finish(self, saved: dict[str, torch.Tensor], size: Any) -> torch.Tensor:
        """The final classifier's logits at ``size``, from the saved backbone outputs."""
        out = self.classifier(saved) if self.takes_features else self.classifier(saved["out"])
        return upsample(out, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ``out``: the plain network (the exit heads are not computed)."""
        net = self.inference_net()
        if net is not self:
            return net(x.contiguous(memory_format=torch.channels_last))
        size = x.shape[-2:]
        saved: dict[str, torch.Tensor] = {}
        for n in range(len(self.stage_names)):
            x = self.run_stage(n, x, saved)
        return self.finish(saved, size)

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the three exit heads and the final classifier, at the input's size."""
        heads = self.require_exits()
        net = self.inference_net()
        if net is not self:
            return net.forward_exits(x.contiguous(memory_format=torch.channels_last))
        size = x.shape[-2:]
        saved: dict[str, torch.Tensor] = {}
        out = []
        h = x
        for n in range(len(self.stage_names)):
            h = self.run_stage(n, h, saved)
            if n < len(heads):
                out.append(upsample(heads[n](h), size))
        return [*out, self.finish(saved, size)]

    def require_exits(self) -> nn.ModuleList:
        if self.exit_heads is None:
            raise ModelMismatchError(f"this {self.arch} has no exit heads",
                                     "train them with `eetool train-exits -c CHECKPOINT -d DATA -o OUT` and use OUT")
        return self.exit_heads


def _split(names: list[str], points: tuple[str, ...]) -> list[list[str]]:
    stages: list[list[str]] = [[]]
    for name in names:
        stages[-1].append(name)
        if name in points:
            stages.append([])
    if len(stages) != len(points) + 1:
        raise AssertionError(f"exit points {points} not all in {names}")
    return stages


def _out_channels(module: nn.Module) -> int:
    """The channels a backbone block puts out: those of its last convolution."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def build(arch: str, num_classes: int, in_channels: int, arch_args: dict[str, Any]) -> TorchvisionSegNet:
    assert arch in TORCHVISION_SEGMENTATION_ARCHS
    return TorchvisionSegNet(arch, num_classes, in_channels, arch_args)


# ---------------------------------------------------------------------------------------------
# Costs and early exit


@dataclass(frozen=True)
class DenseCosts:
    """Multiply-adds of one image in each part: the four backbone stages (the last with the classifier) and the
    three exit heads."""

    stages: list[int]
    heads: list[int]


def dense_costs(model: TorchvisionSegNet, input_shape: tuple[int, int, int]) -> DenseCosts:
    """Convolution and linear multiply-adds of each part on one image, counted by hooks on a forward pass of one
    image of zeros, once per input shape."""
    if input_shape in model.dense_cost_cache:
        return model.dense_cost_cache[input_shape]
    part = [0]
    macs: dict[int, int] = {}

    def count(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = cast(nn.Linear, module).in_features
        macs[part[0]] = macs.get(part[0], 0) + output[0].numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    training = model.training
    model.eval()  # DeepLabV3's image pooling normalises one value per channel: training mode refuses that
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
            saved: dict[str, torch.Tensor] = {}
            heads = model.exit_heads
            for n in range(len(model.stage_names)):
                part[0] = n
                x = model.run_stage(n, x, saved)
                if heads is not None and n < len(heads):
                    part[0] = 4 + n
                    upsample(heads[n](x), input_shape[1:])
            part[0] = 3
            model.finish(saved, input_shape[1:])
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    costs = DenseCosts([macs.get(n, 0) for n in range(4)], [macs.get(4 + n, 0) for n in range(3)])
    model.dense_cost_cache[input_shape] = costs
    return costs


def plain_macs(model: TorchvisionSegNet, input_shape: tuple[int, int, int]) -> int:
    return sum(dense_costs(model, input_shape).stages)


def first_exit_macs(model: TorchvisionSegNet, input_shape: tuple[int, int, int]) -> int:
    """Every pixel leaving at the first exit: the first stage and head (both costs agree there)."""
    costs = dense_costs(model, input_shape)
    return costs.stages[0] + costs.heads[0]
