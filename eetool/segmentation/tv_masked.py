"""Masked early exit for torchvision's segmentation ResNets (fcn_resnet50, deeplabv3_resnet50) and MobileNetV3s
(deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large): after the first exit, blocks compute only active
positions, or run dense above their crossover. The exit decision is taken per image pixel (``PixelExits``, the
thesis's rule) or per position of each exit's own grid (``StridedGridExits``).

Method: docs/methods/segmentation-inference.md#masked-resnets-fcn_resnet50-deeplabv3_resnet50
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation.deeplabv3 import ASPPPooling
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from eetool.segmentation.masked import (
    FeatureMap,
    add_active,
    conv_rows,
    cover,
    macs_per_position,
    out_size,
    pointwise,
    positions,
    read_mask,
    tap_rows,
    write_active,
)
from eetool.segmentation.model import (
    EXIT_NAMES,
    EarlyExitResult,
    Head,
    PixelExits,
    head_rows,
    leaving,
    pixel_grid,
    upsample,
)
from eetool.segmentation.tv import TorchvisionSegNet, dense_costs

# A block computes dense at or above this share of active positions: on one CPU thread a gathered Bottleneck of
# fcn_resnet50 (4 images, a 16 x 16 grid, blob-shaped masks, its neighbourhoods included) is faster than the dense
# one up to about 0.5 (layer2) to 0.75 (layer3, layer4) active
DENSE_ABOVE = 0.6
# The MobileNetV3s' InvertedResiduals cross over far lower: torch's dense depthwise convolution is cheap beside
# gathering every tap of every expanded channel. On one CPU thread (4 images, blob-shaped masks, the expansion's
# neighbourhoods included) a gathered block 5, 8 or 13 is faster than the dense one up to 0.06 to 0.2 active
MOBILENET_DENSE_ABOVE = 0.1


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
        identity = pointwise([downsample[1]], conv_rows(shortcut, src, tap_rows(shortcut, at, out_hw, src)))
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


def _squeeze_scale(se: SqueezeExcitation, pooled: torch.Tensor) -> torch.Tensor:
    """B x C: squeeze-excitation's channel scales from its pooled input."""
    return pointwise([se.fc1, se.activation, se.fc2, se.scale_activation], pooled)


def _squeeze_excite_dense(se: SqueezeExcitation, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Squeeze-excitation on a dense B x C x H x W map, pooling its ``active`` positions (see the module's doc)."""
    weight = active[:, None].to(h.dtype)
    pooled = (h * weight).sum((2, 3)) / weight.sum((2, 3)).clamp(min=1)
    return h * _squeeze_scale(se, pooled)[:, :, None, None]


def inverted_residual(block: InvertedResidual, src: FeatureMap, active: torch.Tensor, dense_above: float
                      ) -> tuple[FeatureMap, int]:
    """One torchvision InvertedResidual on the ``active`` positions of its output grid (see the module's doc);
    returns its output and the multiply-adds computed. ``src`` is updated in place when there is a residual."""
    layers = list(cast(nn.Sequential, block.block))
    depth = next(i for i, m in enumerate(layers)
                 if isinstance(m, Conv2dNormActivation) and cast(nn.Conv2d, m[0]).groups > 1)
    expand = [m for cna in layers[:depth] for m in cast(nn.Sequential, cna)]
    depthwise = list(cast(nn.Sequential, layers[depth]))
    dw_conv = cast(nn.Conv2d, depthwise[0])
    se = next((m for m in layers if isinstance(m, SqueezeExcitation)), None)
    project = list(cast(nn.Sequential, layers[-1]))
    out_hw = out_size(dw_conv, src.height, src.width)
    expand_macs = sum(macs_per_position(m) for m in expand if isinstance(m, nn.Conv2d))
    per_output = macs_per_position(dw_conv) + macs_per_position(cast(nn.Conv2d, project[0]))
    se_macs = 0 if se is None else macs_per_position(se.fc1) + macs_per_position(se.fc2)
    residual = bool(block.use_res_connect)
    dense = float(active.float().mean()) >= dense_above
    # without a residual the inactive positions are zero: written so by the dense pass, or zeros beforehand
    new = FeatureMap.empty if dense else FeatureMap.zeros
    out = src if residual else new(src.batch, *out_hw, cast(nn.Conv2d, project[0]).out_channels, src.rows)
    if dense:
        h = src.nchw()
        for layer in layers:
            h = _squeeze_excite_dense(layer, h, active) if isinstance(layer, SqueezeExcitation) else layer(h)
        add_active(active, h, out, residual)
        return out, src.batch * (src.height * src.width * expand_macs + out_hw[0] * out_hw[1] * per_output
                                 + se_macs)
    at = positions(active)
    spent = at.numel() * per_output
    if expand:
        inner = FeatureMap.empty(src.batch, src.height, src.width, dw_conv.in_channels, src.rows)
        taps = tap_rows(dw_conv, at, out_hw, inner)
        needed = positions(read_mask(taps, inner))
        inner.rows[needed] = pointwise(expand, src.rows[needed])
        spent += needed.numel() * expand_macs
    else:
        inner, taps = src, tap_rows(dw_conv, at, out_hw, src)
    rows = pointwise(depthwise[1:], conv_rows(dw_conv, inner, taps))
    if se is not None:
        image = at // (out_hw[0] * out_hw[1])
        sums = rows.new_zeros(src.batch, rows.shape[1]).index_add_(0, image, rows)
        counts = torch.bincount(image, minlength=src.batch).clamp(min=1)
        rows = rows * _squeeze_scale(se, sums / counts[:, None].to(rows.dtype))[image]
        spent += int(active.flatten(1).any(1).sum()) * se_macs
    rows = pointwise(project, rows)
    out.rows[at] = rows + src.rows[at] if residual else rows
    return out, spent


def pointwise_block(block: Conv2dNormActivation, src: FeatureMap, active: torch.Tensor, dense_above: float
                    ) -> tuple[FeatureMap, int]:
    """A 1x1 convolution with its BatchNorm and activation (MobileNetV3's last block) on the ``active``
    positions; inactive positions are zero."""
    modules = list(block)
    conv = cast(nn.Conv2d, modules[0])
    if float(active.float().mean()) >= dense_above:  # every position written: the inactive ones' zeros too
        out = FeatureMap.empty(src.batch, src.height, src.width, conv.out_channels, src.rows)
        add_active(active, block(src.nchw()), out, residual=False)
        return out, active.numel() * macs_per_position(conv)
    out = FeatureMap.zeros(src.batch, src.height, src.width, conv.out_channels, src.rows)
    at = positions(active)
    out.rows[at] = pointwise(modules, src.rows[at])
    return out, at.numel() * macs_per_position(conv)


def masked_block(block: nn.Module, src: FeatureMap, pixels: torch.Tensor, dense_above: float
                 ) -> tuple[FeatureMap, torch.Tensor, int]:
    """A backbone block on the positions of its output grid that cover active ``pixels`` (image pixels, or the
    cells of a finer grid): its output, those positions and the multiply-adds computed."""
    if isinstance(block, Bottleneck):
        active = cover(pixels, out_size(block.conv2, src.height, src.width))
        out, spent = bottleneck(block, src, active, dense_above)
    elif isinstance(block, InvertedResidual):
        layers = [m for m in cast(nn.Sequential, block.block) if isinstance(m, Conv2dNormActivation)]
        depthwise = next(c for c in (cast(nn.Conv2d, m[0]) for m in layers) if c.groups > 1)
        active = cover(pixels, out_size(depthwise, src.height, src.width))
        out, spent = inverted_residual(block, src, active, dense_above)
    elif isinstance(block, Conv2dNormActivation) and cast(nn.Conv2d, block[0]).kernel_size == (1, 1):
        active = cover(pixels, (src.height, src.width))
        out, spent = pointwise_block(block, src, active, dense_above)
    else:
        raise NotImplementedError(f"masked execution of {type(block).__name__}")
    return out, active, spent


def _counted_classifier(model: TorchvisionSegNet, saved: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The classifier run dense on the saved maps: its logits and the multiply-adds its convolutions did."""
    spent = [0]

    def count(module: nn.Module, args: object, output: torch.Tensor) -> None:
        conv = cast(nn.Conv2d, module)
        spent[0] += output.numel() // conv.out_channels * macs_per_position(conv)

    hooks = [m.register_forward_hook(count) for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
    try:
        out = model.classifier(saved) if model.takes_features else model.classifier(saved["out"])
    finally:
        for hook in hooks:
            hook.remove()
    return out, spent[0]


class StridedGridExits:
    """The feature-level rule (``decide_at="feature"``) on networks whose exits compute grids of different strides
    (the torchvision networks': 4, 8 and 16 or 8, the final 8 or 16). Each exit decides per position of its own
    grid, on its logits there; the first exit's grid, the finest, is the unit that leaves (a cell). A later exit
    computes the positions that cover a cell still active, and a position that passes its threshold takes every
    active cell it covers with it. Each exit's grid holds its logits where it computed them and, elsewhere, the
    previous exit's grid resampled to it (the network's loop builds it so). As eeseg's ``GridExits`` has it, the
    cells hold the logits they left with (their exit's grid resampled to the cells) and that grid is upsampled once,
    at the end, for the pixels that left early; those that reached the final exit take its grid upsampled, as the
    plain network does. A pixel's exit is its cell's.
    Method: docs/methods/segmentation-inference.md#the-feature-level-rule-on-the-torchvision-networks
    """

    def __init__(self, batch: int, cells_hw: tuple[int, int], size: tuple[int, int], last: int,
                 device: torch.device) -> None:
        self.size, self.last = size, last
        self.cells = torch.ones(batch, *cells_hw, dtype=torch.bool, device=device)  # still active
        self.exit_cells = torch.full((batch, *cells_hw), last, dtype=torch.uint8, device=device)
        # the image pixels of the active cells (updated in place): what the masked blocks cover
        self.pixels = torch.ones(batch, *size, dtype=torch.bool, device=device)
        self._grids: list[torch.Tensor] = []  # per exit taken: its B x h x w x K grid

    def take(self, grid_logits: torch.Tensor, thresholds: torch.Tensor | None, at: torch.Tensor | None = None
             ) -> bool:
        """The next exit: ``grid_logits`` (B x h x w x K) is its grid, computed at the flat positions ``at`` (None:
        every position); with ``thresholds`` (one per class) the computed positions whose largest probability
        passes their predicted class's leave with the active cells they cover. Returns whether a cell is still
        active."""
        self._grids.append(grid_logits)
        if thresholds is None:
            return False
        flat = grid_logits.reshape(-1, grid_logits.shape[-1])
        leave = leaving(flat if at is None else flat.index_select(0, at), thresholds)
        gone = torch.zeros(grid_logits.shape[:3], dtype=torch.bool, device=grid_logits.device)
        if at is None:
            gone.view(-1).copy_(leave)
        else:
            gone.view(-1)[at[leave]] = True
        cells = pixel_grid(gone, (int(self.cells.shape[1]), int(self.cells.shape[2]))) & self.cells
        self.exit_cells.masked_fill_(cells, len(self._grids) - 1)
        self.cells &= ~cells
        self.pixels.copy_(pixel_grid(self.cells, self.size))
        return bool(self.cells.any())

    def exit_index(self) -> torch.Tensor:
        """B x H x W: each pixel's exit, that of its cell."""
        return pixel_grid(self.exit_cells, self.size)

    def _image(self, grid: torch.Tensor) -> torch.Tensor:
        return upsample(grid.permute(0, 3, 1, 2), self.size)

    def _kept(self, upto: int) -> torch.Tensor:
        """B x h x w x K on the cells: each cell's logits from exit min(its exit, ``upto``), that exit's grid
        resampled to the cells (bilinearly, as the network's loop resamples)."""
        cells_hw = (int(self.cells.shape[1]), int(self.cells.shape[2]))
        kept: torch.Tensor | None = None
        for n in reversed(range(min(upto, len(self._grids) - 1) + 1)):
            grid = self._grids[n]
            if tuple(grid.shape[1:3]) != cells_hw:
                grid = F.interpolate(grid.permute(0, 3, 1, 2), cells_hw, mode="bilinear",
                                     align_corners=False).permute(0, 2, 3, 1)
            kept = grid if kept is None else torch.where((self.exit_cells == n)[..., None], grid, kept)
        assert kept is not None, "no exit taken"
        return kept

    def logits(self) -> torch.Tensor:
        """B x K x H x W: the cells' kept logits upsampled for the pixels that left early, the final exit's grid
        upsampled for the others (channels-last memory)."""
        final = self.exit_cells == self.last
        if bool(final.all()):
            return self._image(self._grids[-1])
        early = self._image(self._kept(self.last))
        if not bool(final.any()):
            return early
        return torch.where(pixel_grid(final, self.size)[:, None], self._image(self._grids[-1]), early)

    def predictions(self, final: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
        """The anytime class maps, made when called: after early exit n, the cells still active then take exit n's
        logits, and the cells are upsampled; ``final`` (the last exit's map) is given as computed."""
        def anytime() -> list[torch.Tensor]:
            maps = [self._image(self._kept(n)).max(1).indices for n in range(len(self._grids) - 1)]
            maps.append(final)
            return maps + [final] * (self.last + 1 - len(maps))
        return anytime


@torch.no_grad()
def early_exit_forward(model: TorchvisionSegNet, x: torch.Tensor, thresholds: torch.Tensor,
                       dense_above: float | None = None, decide_at: str = "pixel") -> EarlyExitResult:
    """Pixel-level early exit with ``thresholds`` (early exits x classes) on a torchvision segmentation network,
    masked after the first exit (see the module's doc); ``dense_above`` defaults to the family's crossover.
    ``decide_at="feature"`` decides per position of each exit's grid (``StridedGridExits``)."""
    model = model.eval().inference_net()  # channels last, as the plain network runs
    heads = model.require_exits()
    x = x.contiguous(memory_format=torch.channels_last)
    masked_classifier = "resnet" in model.arch  # the MobileNets' classifier runs dense on the final maps
    if dense_above is None:
        dense_above = DENSE_ABOVE if masked_classifier else MOBILENET_DENSE_ABOVE
    costs = dense_costs(model, (int(x.shape[1]), int(x.shape[2]), int(x.shape[3])))
    batch, _, height, width = x.shape
    last = len(EXIT_NAMES) - 1
    returned = cast(dict[str, str], model.backbone.return_layers)  # type: ignore[attr-defined]
    saved: dict[str, torch.Tensor] = {}
    h = model.run_stage(0, x, saved)
    exits: PixelExits | StridedGridExits = (
        StridedGridExits(batch, (int(h.shape[2]), int(h.shape[3])), (height, width), last, x.device)
        if decide_at == "feature" else PixelExits(batch, height, width, last, x.device))
    pixels = exits.pixels  # the pixels still active: ``exits`` updates it in place
    # what the blocks' active positions cover: the cells, when they are the unit (the same positions as their
    # pixels cover, from a 16x smaller map)
    units = exits.cells if isinstance(exits, StridedGridExits) else pixels
    exit_macs: list[int] = []
    computed: list[int] = []
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
                module = model.backbone[name]
                for block in list(module) if type(module) is nn.Sequential else [module]:
                    fmap, active, spent = masked_block(block, fmap, units, dense_above)
                    executed += spent
                if not masked_classifier and name in returned:  # kept as it stands for the dense classifier
                    saved[returned[name]] = fmap.nchw().clone()
            at = positions(active)
            if n < last or masked_classifier:  # the previous logits, kept by inactive positions, on this grid
                grid_logits = F.interpolate(grid_logits.permute(0, 3, 1, 2), (fmap.height, fmap.width),
                                            mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()
            if n < last:
                head = cast(Head, heads[n])
                rows = head_rows(head, fmap.rows[at])
                spent = at.numel() * (macs_per_position(head.conv1) + macs_per_position(head.conv2))
                analytic += share * (costs.stages[n] + costs.heads[n])
                grid_logits.view(-1, model.num_classes)[at] = rows
            elif masked_classifier:
                rows, spent = classifier(cast(nn.Sequential, model.classifier), fmap, active, dense_above)
                analytic += share * costs.stages[n]
                grid_logits.view(-1, model.num_classes)[at] = rows
            else:
                still = pixels.flatten(1).any(1)  # the images with active pixels: the others' logits are final
                final, spent = _counted_classifier(model, {k: v[still] for k, v in saved.items()})
                grid_logits = grid_logits.new_zeros(batch, *final.shape[2:], model.num_classes)
                grid_logits[still] = final.permute(0, 2, 3, 1)
                analytic += share * costs.stages[n]
            executed += spent
        exit_macs.append(round(analytic))
        bar = None if n == last else thresholds[n]
        if not (exits.take(grid_logits, bar, None if n == 0 else at) if isinstance(exits, StridedGridExits)
                else exits.take(grid_logits, bar)):
            # the final exit, or every pixel has left: later exits would compute nothing and change nothing
            computed.extend([0] * (last - n))
            exit_macs.extend([round(analytic)] * (last - n))
            break
    if isinstance(exits, StridedGridExits):
        logits = exits.logits()
        return EarlyExitResult(logits, exits.exit_index(), round(analytic), computed,
                               exits.predictions(logits.max(1).indices), exit_macs, executed_macs=executed)
    return EarlyExitResult(exits.logits(), exits.exit_index, round(analytic), computed, exits.predictions(last + 1),
                           exit_macs, executed_macs=executed)
