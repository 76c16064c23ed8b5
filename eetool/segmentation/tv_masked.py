"""Masked early exit for torchvision's segmentation ResNets (fcn_resnet50, deeplabv3_resnet50).

The stem and layer1 run dense up to the first exit, on every pixel. After it, layer2, layer3, layer4 and the
classifier compute only active positions: a position of a stage's grid (stride 8: the segmentation ResNets
dilate layer3 and layer4 instead of striding) stays active while any input pixel it covers has not left.

- A Bottleneck's 3x3 convolution (strided in layer2's first block, dilated 2 and 4 in layer3 and layer4) and
  its 1x1 convolutions and shortcut run on the active positions of the block's output grid; its first 1x1
  convolution runs where the 3x3 reads it (the active positions' neighbourhoods). An inactive position keeps
  its features through a block whose input and output have the same shape; the first block of a layer changes
  the channels (and, in layer2, the resolution), so there an inactive position's features were never computed
  and are zero, as padding reads.
- The exit heads run on active positions; an inactive position keeps the previous exit's logits (bilinearly
  resampled to this grid), which active pixels near it read when the logits are upsampled.
- The classifier: FCN's 3x3 convolution on the active positions; DeepLabV3's ASPP on the positions its
  following 3x3 convolution reads, with the image pooling branch reading the current layer4 map as it stands
  (the active positions' new features, the inactive ones' zeros) and computed once per image still active.

A block (or the classifier) whose share of active positions is at least ``dense_above`` runs dense over the
whole grid and then keeps the inactive positions' previous features: the same result, and ``executed_macs``
counts the dense work. ``macs`` stays the analytic masked cost (each part's multiply-adds times the share of
pixels still active), as for the networks that are not masked.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation.deeplabv3 import ASPPPooling

from eetool.segmentation.masked import (
    FeatureMap,
    bn_rows,
    conv_rows,
    macs_per_position,
    out_size,
    pointwise,
    positions,
    read_mask,
    tap_rows,
    write_active,
)
from eetool.segmentation.model import EXIT_NAMES, EarlyExitResult, Head, upsample
from eetool.segmentation.tv import TorchvisionSegNet, dense_costs

# A block computes dense at or above this share of active positions: on one CPU thread a gathered Bottleneck of
# fcn_resnet50 (4 images, a 16 x 16 grid, blob-shaped masks, its neighbourhoods included) is faster than the dense
# one up to about 0.5 (layer2) to 0.75 (layer3, layer4) active
DENSE_ABOVE = 0.6


def cover(pixels: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """B x gh x gw: a grid position is active while any input pixel it covers is."""
    stride = 2 ** round(math.log2(pixels.shape[1] / grid_hw[0]))
    active = F.max_pool2d(pixels[:, None].float(), stride, stride, ceil_mode=True)[:, 0] > 0
    assert tuple(active.shape[1:]) == grid_hw, (active.shape, grid_hw)
    return active


def bottleneck(block: Bottleneck, src: FeatureMap, active: torch.Tensor, dense_above: float
               ) -> tuple[FeatureMap, int]:
    """One torchvision Bottleneck on the ``active`` positions of its output grid (see the module's doc);
    returns its output and the multiply-adds computed. ``src`` is updated in place when the shapes agree."""
    conv1, conv2, conv3, downsample = block.conv1, block.conv2, block.conv3, block.downsample
    out_hw = out_size(conv2, src.height, src.width)
    per_output = macs_per_position(conv2) + macs_per_position(conv3) + (
        0 if downsample is None else macs_per_position(cast(nn.Conv2d, downsample[0])))
    out = src if downsample is None else FeatureMap.zeros(src.batch, *out_hw, conv3.out_channels, src.rows)
    if float(active.float().mean()) >= dense_above:
        write_active(active, block(src.nchw()), out)
        return out, src.batch * (src.height * src.width * macs_per_position(conv1)
                                 + out_hw[0] * out_hw[1] * per_output)
    at = positions(active)
    inner = FeatureMap.empty(src.batch, src.height, src.width, conv1.out_channels, src.rows)
    taps = tap_rows(conv2, at, out_hw, inner)
    needed = positions(read_mask(taps, inner))
    inner.rows[needed] = pointwise([conv1, block.bn1, block.relu], src.rows[needed])
    rows = pointwise([block.bn2, block.relu, conv3, block.bn3], conv_rows(conv2, inner, taps))
    if downsample is None:
        identity = src.rows[at]
    else:
        shortcut = cast(nn.Conv2d, downsample[0])
        identity = bn_rows(conv_rows(shortcut, src, tap_rows(shortcut, at, out_hw, src)),
                           cast(nn.BatchNorm2d, downsample[1]))
    out.rows[at] = torch.relu(rows + identity)
    return out, needed.numel() * macs_per_position(conv1) + at.numel() * per_output


def _aspp(aspp: nn.Module, src: FeatureMap, at: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """ASPP's output rows at positions ``at``; ``images`` (B, bool) are those still active."""
    parts, macs = [], 0
    for branch in cast(nn.ModuleList, aspp.convs):
        modules = list(cast(nn.Sequential, branch))
        if isinstance(branch, ASPPPooling):  # the current map, every position; once per image still active
            pooled = pointwise(modules[1:], src.nhwc().mean((1, 2)))
            parts.append(pooled[at // (src.height * src.width)])
            macs += int(images.sum()) * macs_per_position(cast(nn.Conv2d, modules[1]))
        else:
            conv = cast(nn.Conv2d, modules[0])
            parts.append(pointwise(modules[1:], conv_rows(conv, src, tap_rows(conv, at, (src.height, src.width),
                                                                                src))))
            macs += at.numel() * macs_per_position(conv)
    project = list(cast(nn.Sequential, aspp.project))
    return pointwise(project, torch.cat(parts, 1)), macs + at.numel() * macs_per_position(
        cast(nn.Conv2d, project[0]))


def classifier(head: nn.Sequential, src: FeatureMap, active: torch.Tensor, dense_above: float
               ) -> tuple[torch.Tensor, int]:
    """FCN's or DeepLabV3's classifier: logits rows at the active positions and the multiply-adds computed."""
    modules = list(head)
    aspp = modules.pop(0) if not isinstance(modules[0], nn.Conv2d) else None
    conv = cast(nn.Conv2d, modules[0])
    pointwise_macs = sum(macs_per_position(m) for m in modules[1:] if isinstance(m, nn.Conv2d))
    at = positions(active)
    hw = (src.height, src.width)
    if float(active.float().mean()) >= dense_above:
        everywhere = torch.ones_like(active)
        dense = head(src.nchw()).permute(0, 2, 3, 1).reshape(-1, modules[-1].out_channels)  # type: ignore[union-attr]
        macs = everywhere.numel() * (macs_per_position(conv) + pointwise_macs)
        if aspp is not None:
            macs += _aspp_macs(aspp, everywhere)
        return dense[at], macs
    macs = at.numel() * (macs_per_position(conv) + pointwise_macs)
    if aspp is None:
        source = src
        taps = tap_rows(conv, at, hw, src)
    else:
        source = FeatureMap.empty(src.batch, *hw, conv.in_channels, src.rows)
        taps = tap_rows(conv, at, hw, source)
        needed = positions(read_mask(taps, source))
        source.rows[needed], spent = _aspp(aspp, src, needed, active.flatten(1).any(1))
        macs += spent
    return pointwise(modules[1:], conv_rows(conv, source, taps)), macs


def _aspp_macs(aspp: nn.Module, computed: torch.Tensor) -> int:
    """ASPP's multiply-adds when it computes every position of ``computed`` (B x H x W, all true)."""
    batch, positions_ = computed.shape[0], computed.numel()
    macs = positions_ * macs_per_position(cast(nn.Conv2d, cast(nn.Sequential, aspp.project)[0]))
    for branch in cast(nn.ModuleList, aspp.convs):
        modules = cast(list[nn.Conv2d], [m for m in cast(nn.Sequential, branch) if isinstance(m, nn.Conv2d)])
        macs += (batch if isinstance(branch, ASPPPooling) else positions_) * macs_per_position(modules[0])
    return macs


@torch.no_grad()
def early_exit_forward(model: TorchvisionSegNet, x: torch.Tensor, thresholds: torch.Tensor,
                       dense_above: float = DENSE_ABOVE) -> EarlyExitResult:
    """Pixel-level early exit with ``thresholds`` (early exits x classes) on a segmentation ResNet, masked after
    the first exit (see the module's doc)."""
    heads = model.require_exits()
    model.eval()
    costs = dense_costs(model, (int(x.shape[1]), int(x.shape[2]), int(x.shape[3])))
    batch, _, height, width = x.shape
    last = len(EXIT_NAMES) - 1
    logits = torch.zeros(batch, model.num_classes, height, width, dtype=x.dtype, device=x.device)
    exit_index = torch.full((batch, height, width), last, dtype=torch.uint8, device=x.device)
    pixels = torch.ones(batch, height, width, dtype=torch.bool, device=x.device)
    anytime = torch.zeros(batch, height, width, dtype=torch.long, device=x.device)
    exit_predictions: list[torch.Tensor] = []
    exit_macs: list[int] = []
    computed: list[int] = []
    h = model.run_stage(0, x, {})
    grid_logits = heads[0](h).permute(0, 2, 3, 1)  # B x h x w x K
    fmap = FeatureMap.of(h)
    analytic = float(batch * (costs.stages[0] + costs.heads[0]))
    executed = batch * (costs.stages[0] + costs.heads[0])
    computed.append(batch * height * width)
    for n in range(last + 1):
        if n > 0:
            share = float(pixels.flatten(1).float().mean(1).sum())  # images' worth of active pixels
            computed.append(int(pixels.sum()))
            for name in model.stage_names[n]:
                for block in cast(list[Bottleneck], list(cast(nn.Sequential, model.backbone[name]))):
                    active = cover(pixels, out_size(block.conv2, fmap.height, fmap.width))
                    fmap, spent = bottleneck(block, fmap, active, dense_above)
                    executed += spent
            at = positions(active)
            grid_logits = F.interpolate(grid_logits.permute(0, 3, 1, 2), (fmap.height, fmap.width),
                                        mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()
            if n < last:
                head = cast(Head, heads[n])
                rows = pointwise([head.conv1, head.bn, nn.ReLU(), head.conv2], fmap.rows[at])
                spent = at.numel() * (macs_per_position(head.conv1) + macs_per_position(head.conv2))
                analytic += share * (costs.stages[n] + costs.heads[n])
            else:
                rows, spent = classifier(cast(nn.Sequential, model.classifier), fmap, active, dense_above)
                analytic += share * costs.stages[n]
            executed += spent
            grid_logits.view(-1, model.num_classes)[at] = rows
        up = upsample(grid_logits.permute(0, 3, 1, 2), (height, width))
        exit_macs.append(round(analytic))
        if n == last:
            logits = torch.where(pixels[:, None], up, logits)
            exit_predictions.append(torch.where(pixels, up.argmax(1), anytime))
            break
        confidence, prediction = up.softmax(1).max(1)
        anytime = torch.where(pixels, prediction, anytime)
        exit_predictions.append(anytime)
        leave = pixels & (confidence > thresholds[n].to(x.device)[prediction])
        logits = torch.where(leave[:, None], up, logits)
        exit_index[leave] = n
        pixels = pixels & ~leave
        if not bool(pixels.any()):  # every pixel has left: later exits compute nothing and change nothing
            computed.extend([0] * (last - n))
            exit_predictions.extend([anytime] * (last - n))
            exit_macs.extend([round(analytic)] * (last - n))
            break
    return EarlyExitResult(logits, exit_index, round(analytic), computed, exit_predictions, exit_macs,
                           executed_macs=executed)
