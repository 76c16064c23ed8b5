"""An early-exit segmentation network (``eeseg``) and its pixel-level early-exit inference (ADP-C's masking).

``EESegNet``: a stride-2 stem, four dilated residual stages at half resolution, a pixelwise head after each.
``early_exit_forward`` computes only the positions whose pixels are still active (``PixelExits``, ``GridExits``).

Method: docs/methods/segmentation-inference.md#the-eeseg-network
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from eetool.core.choices import DECIDE_AT
from eetool.core.errors import UsageError
from eetool.segmentation.masked import (
    FeatureMap,
    conv_rows,
    cover,
    pointwise,
    positions,
    read_mask,
    tap_rows,
)

SEGMENTATION_ARCH = "eeseg"
EXIT_NAMES = ["exit1", "exit2", "exit3", "final"]
DILATIONS = (1, 2, 4, 8)
# A block with at least this share of active positions runs dense (then keeps the inactive positions' features):
# on one CPU thread a gathered 3x3 convolution of eeseg's width 16 (im2col in blocks, one product each) costs about
# 3.5x the dense one per position computed (the gather alone 1.5-2x), and a block's first convolution also computes
# the active positions' neighbourhoods, so the two break even near 0.2 active at dilations 1 and 2 and 0.11 to 0.19
# at 4 and 8 (load 6 to 13), measured with a 100-scene batch by bench/segmentation.py's --crossover (before the
# blocked gather and the unpadded grid: 0.15 to 0.2, and 0.1 at dilation 8)
DENSE_ABOVE = 0.2


class Block(nn.Module):
    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.conv1 = nn.Conv2d(width, width, 3, 1, dilation, dilation, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(width)  # nn.Identity once folded (EESegNet.inference_net)
        self.conv2 = nn.Conv2d(width, width, 3, 1, dilation, dilation, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place: each ReLU's input is a fresh tensor that nothing else reads (BatchNorm's and convolution's
        # backward need their inputs, not their outputs)
        return F.relu(x + self.residual(x), inplace=True)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """What the block adds to its input (before its last ReLU)."""
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))


class Head(nn.Module):
    """Pixelwise: 1x1 convolution, BatchNorm, ReLU, 1x1 convolution to the classes."""

    def __init__(self, width: int, head_width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, head_width, 1, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(head_width)  # nn.Identity once folded (EESegNet.inference_net)
        self.conv2 = nn.Conv2d(head_width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn(self.conv1(x)), inplace=True))  # in place: as in Block


NetT = TypeVar("NetT", bound=nn.Module)


class InferenceCopy(Generic[NetT]):
    """A network's inference copy, made by ``make`` on first use and remade whenever a parameter or buffer of the
    network has changed since (keyed by each tensor's storage and version counter: an optimiser step,
    ``load_state_dict``, a move). A plain attribute of the network, not a submodule: the copy is in no state
    dict."""

    def __init__(self) -> None:
        self._version: tuple[tuple[int, int], ...] | None = None
        self._net: NetT | None = None

    def of(self, network: nn.Module, make: Callable[[], NetT]) -> NetT:
        version = tuple((t.data_ptr(), t._version) for t in itertools.chain(network.parameters(), network.buffers()))
        if self._net is None or self._version != version:
            # ordinary tensors even when first used under torch.inference_mode (the copy outlives that block)
            with torch.inference_mode(False), torch.no_grad():
                self._version, self._net = version, make()
        return self._net


class EESegNet(nn.Module):
    pixel_exits = True  # per-pixel exits of its own: not a classifier for class means or exit heads

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, head_width: int = 32,
                 blocks: int = 1) -> None:
        super().__init__()
        self.width, self.head_width, self.num_classes, self.in_channels = width, head_width, num_classes, in_channels
        self.blocks = blocks
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList(nn.Sequential(*(Block(width, d) for _ in range(blocks))) for d in DILATIONS)
        self.heads = nn.ModuleList(Head(width, head_width, num_classes) for _ in DILATIONS)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.folded = False  # True for inference_net's copy, whose BatchNorms are in its convolutions
        self._inference: InferenceCopy[EESegNet] = InferenceCopy()

    def inference_net(self) -> EESegNet:
        """The network inference runs: in eval mode without gradients, a cached copy with each BatchNorm folded into
        the convolution before it, channels last (the same outputs up to float32 rounding), remade when a parameter or
        buffer changes; otherwise this network itself, which is never changed.
        Method: docs/methods/segmentation-inference.md#batchnorm-folded-channels-last
        """
        if self.folded or self.training or torch.is_grad_enabled():
            return self
        return self._inference.of(self, self._folded_copy)

    def _folded_copy(self) -> EESegNet:
        net = EESegNet(self.num_classes, self.in_channels, self.width, self.head_width, self.blocks)
        like = next(self.parameters())
        net.to(like.device, like.dtype).load_state_dict(self.state_dict())
        net.eval()
        for i in (0, 3):  # the stem: convolution, BatchNorm, ReLU, twice
            net.stem[i] = fuse_conv_bn_eval(cast(nn.Conv2d, net.stem[i]), cast(nn.BatchNorm2d, net.stem[i + 1]))
            net.stem[i + 1] = nn.Identity()
        for block in cast(list[Block], [b for stage in net.stages for b in cast(nn.Sequential, stage)]):
            block.conv1 = fuse_conv_bn_eval(block.conv1, cast(nn.BatchNorm2d, block.bn1))
            block.conv2 = fuse_conv_bn_eval(block.conv2, cast(nn.BatchNorm2d, block.bn2))
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
        for head in cast(list[Head], list(net.heads)):
            head.conv1 = fuse_conv_bn_eval(head.conv1, cast(nn.BatchNorm2d, head.bn))
            head.bn = nn.Identity()
        net.requires_grad_(False)
        # channels last: mkldnn's convolutions on eeseg's narrow maps take 0.5-0.9x the time of NCHW (a 1x1
        # head convolution at batch 100 about 0.1x), and bilinear upsampling 0.3x
        net.to(memory_format=torch.channels_last)
        net.folded = True
        return net

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """The input in the memory format of this network's weights: channels last for the folded copy (every
        later map and the logits follow it; their shapes are the same), as given otherwise."""
        return x.contiguous(memory_format=torch.channels_last) if self.folded else x

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit at the input's size, the network's own (final) last."""
        return [upsample(logits, x.shape[-2:]) for logits in self.grid_exits(x)]

    def grid_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit on the half-resolution grid, before upsampling, the final exit's last."""
        net = self.inference_net()
        if net is not self:
            return net.grid_exits(x)
        h = self.stem(self._layout(x))
        out = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            out.append(head(h))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network: the final exit's logits only (the early heads are not computed)."""
        net = self.inference_net()
        if net is not self:
            return net(x)
        h = self.stem(self._layout(x))
        for stage in self.stages:
            h = stage(h)
        return upsample(self.heads[-1](h), x.shape[-2:])


def upsample(logits: torch.Tensor, size: Any) -> torch.Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def build(arch: str, num_classes: int, in_channels: int, arch_args: dict[str, Any]) -> EESegNet:
    """The builder eetool.core.architectures registers for ``eeseg`` (the one architecture it builds)."""
    allowed = {"width": 256, "head_width": 256, "blocks": 8}
    for key, value in arch_args.items():
        if key not in allowed:
            raise UsageError(f"bad --arch-args for {SEGMENTATION_ARCH}: unknown {key!r}",
                             "eeseg takes width, head_width and blocks")
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= allowed[key]:
            raise UsageError(f"--arch-args {key} must be a whole number from 1 to {allowed[key]}, not {value!r}",
                             "e.g. '{width: 32, blocks: 1}'")
    return EESegNet(num_classes, in_channels, **arch_args)


# ---------------------------------------------------------------------------------------------
# Costs: multiply-adds per computed position


@dataclass(frozen=True)
class PositionCosts:
    """Multiply-adds of computing one grid position in each part of the network."""

    stem: int  # per grid position (both convolutions)
    conv: int  # one 3x3 convolution of a block
    head: int  # one exit head

    @classmethod
    def of(cls, model: EESegNet) -> PositionCosts:
        c, ch = model.width, model.head_width
        return cls(stem=model.in_channels * c * 9 + c * c * 9, conv=c * c * 9, head=c * ch + ch * model.num_classes)


def grid_size(model: EESegNet, height: int, width: int) -> tuple[int, int]:
    """The stem's output grid (stride 2, padding 1, kernel 3)."""
    return (height + 1) // 2, (width + 1) // 2


def plain_macs(model: EESegNet, input_shape: tuple[int, int, int]) -> int:
    """Multiply-adds of the plain network on one image: every position through the stem, every block and the
    final head."""
    costs = PositionCosts.of(model)
    h, w = grid_size(model, *input_shape[1:])
    return h * w * (costs.stem + 2 * len(DILATIONS) * model.blocks * costs.conv + costs.head)


def first_exit_macs(model: EESegNet, input_shape: tuple[int, int, int]) -> int:
    """Multiply-adds on one image when every pixel leaves at the first exit: the cheapest any thresholds get."""
    costs = PositionCosts.of(model)
    h, w = grid_size(model, *input_shape[1:])
    return h * w * (costs.stem + 2 * model.blocks * costs.conv + costs.head)


# ---------------------------------------------------------------------------------------------
# Pixel-level early exit


@dataclass
class EarlyExitResult:
    logits: torch.Tensor  # B x K x H x W: each pixel's logits at the exit it left by
    exit_index: torch.Tensor  # B x H x W (uint8): that exit, 0..len(exits)-1
    macs: int  # multiply-adds actually computed for the batch
    active_positions: list[int]  # grid positions computed by each stage (the stem's are all of them)
    # ADP-C's anytime predictions: per exit, the B x H x W class map had inference stopped there (pixels that
    # left before keep their exit's class, the others take this exit's), or a function that makes them when they
    # are first asked for (``exit_predictions``): the feature-level rule keeps what they need on the grid and
    # upsamples only the last one on the way
    anytime: list[torch.Tensor] | Callable[[], list[torch.Tensor]]
    exit_macs: list[int]  # the multiply-adds spent up to and including each exit's head
    # what ran: blocks run dense above an active share count every position (``macs`` is the masked cost: eeseg's
    # gathered positions, torchvision's analytic share of each part)
    executed_macs: int | None = None

    @property
    def exit_predictions(self) -> list[torch.Tensor]:
        if callable(self.anytime):
            self.anytime = self.anytime()
        return self.anytime


class PixelExits:
    """The per-pixel side of pixel-level early exit, shared by eeseg and the torchvision networks: which pixels
    have left, by which exit and with what logits, and the anytime predictions.

    ``take`` is called once per exit with the exit's grid logits; only the pixels still active are worked on.
    Method: docs/methods/segmentation-inference.md#the-per-pixel-bookkeeping
    """

    def __init__(self, batch: int, height: int, width: int, last: int, device: torch.device) -> None:
        self.exit_index = torch.full((batch, height, width), last, dtype=torch.uint8, device=device)
        self.pixels = torch.ones(batch, height, width, dtype=torch.bool, device=device)  # still active
        self._still: torch.Tensor | None = None  # the active pixels' flat numbers; None while every pixel is
        # (B * H * W) x K: a left pixel's logits, an active one's anything; the first exit's upsampled map itself
        self._logits: torch.Tensor | None = None
        self._predictions: list[torch.Tensor] = []

    def take(self, grid_logits: torch.Tensor, thresholds: torch.Tensor | None) -> bool:
        """The next exit: ``grid_logits`` (B x h x w x K) upsampled to the image; with ``thresholds`` (one per class)
        the active pixels whose largest probability exceeds their predicted class's leave, without (the final
        exit) every active pixel takes these logits. Returns whether any pixel is still active."""
        batch, height, width = self.pixels.shape
        classes = grid_logits.shape[-1]
        # channels last: bilinear upsampling and the reductions over classes are several times faster so
        up = upsample(grid_logits.permute(0, 3, 1, 2), (height, width)).permute(0, 2, 3, 1)
        every = up.reshape(-1, classes)  # a view: up is B x H x W x K in memory
        still, logits = self._still, self._logits
        if still is None or logits is None:  # no pixel has left: these are every pixel's logits so far
            rows = logits = self._logits = every
        else:
            rows = every.index_select(0, still)
        top, prediction = rows.max(-1)
        if still is None:
            self._predictions.append(prediction.view(batch, height, width))
        else:  # pixels that left before keep their exit's class
            anytime = self._predictions[-1].clone()
            anytime.view(-1)[still] = prediction
            self._predictions.append(anytime)
        if thresholds is None:
            if still is not None:
                logits[still] = rows
            return False
        confidence = 1 / (rows - top[:, None]).exp_().sum(-1)  # the softmax's largest, without dividing every class
        leave = confidence > thresholds.to(confidence.device)[prediction]
        if still is None:
            gone, still = positions(leave), positions(~leave)
        else:
            logits[still[leave]] = rows[leave]
            gone, still = still[leave], still[~leave]
        self._still = still
        self.exit_index.view(-1)[gone] = len(self._predictions) - 1
        self.pixels.view(-1)[gone] = False
        return still.numel() > 0

    def logits(self) -> torch.Tensor:
        """B x K x H x W: each pixel's logits at the exit it left by (channels-last memory)."""
        batch, height, width = self.pixels.shape
        assert self._logits is not None, "no exit taken"
        return self._logits.view(batch, height, width, -1).permute(0, 3, 1, 2)

    def predictions(self, exits: int) -> list[torch.Tensor]:
        """The anytime class map of each of ``exits`` exits: those after every pixel had left repeat the last."""
        return self._predictions + [self._predictions[-1]] * (exits - len(self._predictions))


class GridExits:
    """The feature-level rule (``decide_at="feature"``, beyond the thesis): decided per grid position on the head's own
    logits; the grid of the logits each position left with is upsampled once, at the end. ``take`` gets the logits
    of the positions still active, in the order of their flat numbers.
    Method: docs/methods/segmentation-inference.md#the-feature-level-rule-beyond-the-thesis
    """

    def __init__(self, batch: int, grid_hw: tuple[int, int], size: tuple[int, int], classes: int, last: int,
                 like: torch.Tensor) -> None:
        self.size, self.last = size, last
        # B x h x w x K, every position written by the first exit
        self.grid = torch.empty(batch, *grid_hw, classes, dtype=like.dtype, device=like.device)
        self.exit_grid = torch.full((batch, *grid_hw), last, dtype=torch.uint8, device=like.device)
        self.active = torch.ones(batch, *grid_hw, dtype=torch.bool, device=like.device)  # positions still active
        self._still: torch.Tensor | None = None  # their flat numbers; None while every position is
        self._written: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # per exit: where, and the rows written

    def take(self, rows: torch.Tensor, thresholds: torch.Tensor | None) -> bool:
        """The next exit: ``rows`` (active positions x K) are the active positions' logits; with ``thresholds``
        (one per class) those whose largest probability exceeds their predicted class's leave. Returns whether any
        position is still active."""
        still = self._still
        flat = self.grid.view(-1, self.grid.shape[-1])
        if still is None:
            flat.copy_(rows)
        else:
            flat.index_copy_(0, still, rows)
        self._written.append((still, rows))
        if thresholds is None:
            return False
        leave = leaving(rows, thresholds)
        if still is None:  # masks over every position, without looking up the numbers of those that leave
            self.exit_grid.view(-1).masked_fill_(leave, len(self._written) - 1)
            self.active.view(-1).copy_(leave.logical_not_())
            still = positions(self.active)
        else:
            gone, still = still[leave], still[~leave]
            self.exit_grid.view(-1)[gone] = len(self._written) - 1
            self.active.view(-1)[gone] = False
        self._still = still
        return still.numel() > 0

    def still(self) -> torch.Tensor | None:
        """The flat numbers of the positions still active, in order; None while every position is."""
        return self._still

    def logits(self) -> torch.Tensor:
        """B x K x H x W: the grid of kept logits upsampled to the image (channels-last memory)."""
        return upsample(self.grid.permute(0, 3, 1, 2), self.size)

    def exit_index(self) -> torch.Tensor:
        """B x H x W: each pixel's exit, that of the grid position it lies in."""
        return pixel_grid(self.exit_grid, self.size)

    def predictions(self, final: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
        """The anytime class maps, made when called: after exit n, the grid with the rows exit n wrote in place of
        the later ones, upsampled; ``final`` (the last exit's map) is given as computed."""
        def anytime() -> list[torch.Tensor]:
            maps = []
            for still, rows in self._written[:-1]:
                grid = self.grid.clone()
                flat = grid.view(-1, grid.shape[-1])
                if still is None:
                    flat.copy_(rows)
                else:
                    flat.index_copy_(0, still, rows)
                maps.append(upsample(grid.permute(0, 3, 1, 2), self.size).max(1).indices)
            maps.append(final)
            return maps + [final] * (self.last + 1 - len(maps))
        return anytime


def leaving(rows: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Which of ``rows`` (N x K logits) leave: those whose softmax's largest probability exceeds the threshold of
    their predicted class (``thresholds``: one per class)."""
    thresholds = thresholds.to(rows.device)
    if bool(thresholds.min() == thresholds.max()):  # one threshold (ADP-C's): the predicted class is not needed,
        top = rows.amax(-1)  # and the largest logit alone takes a quarter of the time of the largest with its class
        bar = thresholds[0]
    else:
        top, prediction = rows.max(-1)
        bar = thresholds[prediction]
    confidence = 1 / (rows - top[:, None]).exp_().sum(-1)  # the softmax's largest, without dividing every class
    return confidence > bar


def pixel_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x H x W: each pixel takes the value of the B x h x w grid position it lies in (the stride is H / h,
    rounded to a power of two, as ``cover`` has it)."""
    stride = 2 ** round(math.log2(size[0] / grid.shape[1]))
    rows = torch.arange(size[0], device=grid.device) // stride
    cols = torch.arange(size[1], device=grid.device) // stride
    return grid.index_select(1, rows).index_select(2, cols)


def _sparse_block(block: Block, grid: FeatureMap, active: torch.Tensor, costs: PositionCosts,
                  dense_above: float = 1.0, at: torch.Tensor | None = None) -> tuple[int, int]:
    """One residual block on the active positions of ``grid``, in place; returns the multiply-adds of the masked
    computation and those that ran (at or above ``dense_above`` active share the block runs dense and keeps the
    inactive positions' features). ``at``: the active positions' rows, where the caller has them."""
    if float(active.float().mean()) >= dense_above:
        features = grid.nchw()  # a view of the grid: the block's output is written in place
        # the convolution reads a contiguous map (a padded grid's view would take mkldnn about 2.7x as long)
        residual = block.residual(features.contiguous(memory_format=torch.channels_last))
        if bool(active.all()):
            features.add_(residual).relu_()
        else:
            # an inactive position adds zero times the residual and is not rectified (its floor is -inf, an active
            # one's 0, as the block's last ReLU has it), so it keeps its features: in place, in two passes over the
            # map (a masked fill of the residual, an addition and the clamp took three)
            inactive = ~active[:, None]
            floor = torch.zeros(inactive.shape, dtype=residual.dtype, device=residual.device)
            features.addcmul_(residual, active[:, None].to(residual.dtype)).clamp_(
                min=floor.masked_fill_(inactive, -math.inf))
        needed = neighbourhoods(active, block.dilation)
        return (int(needed.sum()) + int(active.sum())) * costs.conv, 2 * active.numel() * costs.conv
    if at is None:
        at = grid.index(active)
    hw = (grid.height, grid.width)
    inner = FeatureMap.empty(grid.batch, *hw, grid.channels, grid.rows, grid.pad)
    taps = tap_rows(block.conv2, at, hw, inner)
    # the first convolution is needed wherever the second reads it: the active positions' neighbourhoods
    needed = inner.index(read_mask(taps, inner))
    # pointwise applies a BatchNorm to rows, or the identity that replaces it once folded
    inner.rows.index_copy_(0, needed, F.relu(pointwise([block.bn1], conv_rows(block.conv1, grid, tap_rows(
        block.conv1, needed, hw, grid))), inplace=True))
    rows = pointwise([block.bn2], conv_rows(block.conv2, inner, taps))
    grid.rows.index_copy_(0, at, rows.add_(grid.rows.index_select(0, at)).relu_())
    macs = (needed.numel() + at.numel()) * costs.conv
    return macs, macs


def neighbourhoods(active: torch.Tensor, dilation: int) -> torch.Tensor:
    """B x H x W: the positions a 3 x 3 convolution dilated by ``dilation`` reads for its ``active`` outputs
    ("same" zero padding): three shifted ORs along each axis."""
    height, width, d = active.shape[1], active.shape[2], dilation
    padded = F.pad(active, (d, d, d, d))
    rows = padded[:, :, :width] | padded[:, :, d:d + width] | padded[:, :, 2 * d:2 * d + width]
    return rows[:, :height] | rows[:, d:d + height] | rows[:, 2 * d:2 * d + height]


def head_rows(head: Head, rows: torch.Tensor) -> torch.Tensor:
    return pointwise([head.conv1, head.bn, nn.ReLU(inplace=True), head.conv2], rows)  # fresh rows: in place


@torch.no_grad()
def early_exit_forward(model: EESegNet, x: torch.Tensor, thresholds: torch.Tensor,
                       dense_above: float = DENSE_ABOVE, decide_at: str = "pixel") -> EarlyExitResult:
    """Pixel-level early exit with ``thresholds`` (early exits x classes): a pixel predicted as class j at exit n
    leaves there when its largest probability exceeds ``thresholds[n, j]``; the rest take the final exit's class.
    ``decide_at="feature"`` decides per position of the heads' grid (``GridExits``)."""
    if decide_at not in DECIDE_AT:
        raise UsageError(f"unknown --decide-at {decide_at!r}", f"use one of {', '.join(DECIDE_AT)}")
    model = model.eval().inference_net()
    if decide_at == "feature":
        return _feature_exit_forward(model, x, thresholds, dense_above)
    costs = PositionCosts.of(model)
    batch, _, height, width = x.shape
    grid = FeatureMap.of(model.stem(model._layout(x)))
    gh, gw = grid.height, grid.width
    macs = batch * gh * gw * costs.stem
    executed = macs
    last = len(model.stages) - 1
    grid_logits = torch.zeros(batch, gh, gw, model.num_classes, dtype=x.dtype, device=x.device)
    exits = PixelExits(batch, height, width, last, x.device)
    active = torch.ones(batch, gh, gw, dtype=torch.bool, device=x.device)
    computed: list[int] = []
    exit_macs: list[int] = []
    for n in range(len(DILATIONS)):
        stage, head = cast(nn.Sequential, model.stages[n]), cast(Head, model.heads[n])
        computed.append(int(active.sum()))
        for block in cast(list[Block], list(stage)):
            masked, ran = _sparse_block(block, grid, active, costs, dense_above)
            macs, executed = macs + masked, executed + ran
        if bool(active.all()):  # every position: the grid's rows in order, without looking up their numbers
            grid_logits.view(-1, model.num_classes).copy_(head_rows(head, grid.nhwc().reshape(-1, grid.channels)))
        else:
            rows = head_rows(head, grid.rows[grid.index(active)])
            grid_logits.view(-1, model.num_classes)[positions(active)] = rows
        macs += int(active.sum()) * costs.head
        executed += int(active.sum()) * costs.head
        exit_macs.append(int(macs))
        if not exits.take(grid_logits, None if n == last else thresholds[n]):
            # the final exit, or every pixel has left: later exits would compute nothing and change nothing
            computed.extend([0] * (last - n))
            exit_macs.extend([int(macs)] * (last - n))
            break
        active = cover(exits.pixels, (gh, gw))
    return EarlyExitResult(exits.logits(), exits.exit_index, int(macs), computed, exits.predictions(last + 1),
                           exit_macs, executed_macs=executed)


def _feature_exit_forward(model: EESegNet, x: torch.Tensor, thresholds: torch.Tensor, dense_above: float
                          ) -> EarlyExitResult:
    """``early_exit_forward`` with the feature-level rule (``GridExits``): the blocks and heads as there, on the
    positions that have not left."""
    costs = PositionCosts.of(model)
    batch, _, height, width = x.shape
    grid = FeatureMap.of(model.stem(model._layout(x)))
    gh, gw = grid.height, grid.width
    macs = executed = batch * gh * gw * costs.stem
    last = len(model.stages) - 1
    exits = GridExits(batch, (gh, gw), (height, width), model.num_classes, last, x)
    active = exits.active
    computed: list[int] = []
    exit_macs: list[int] = []
    for n in range(len(DILATIONS)):
        stage, head = cast(nn.Sequential, model.stages[n]), cast(Head, model.heads[n])
        count = int(active.sum())
        computed.append(count)
        at = exits.still()  # the active positions' rows (the grid is unpadded): None while every position is
        for block in cast(list[Block], list(stage)):
            masked, ran = _sparse_block(block, grid, active, costs, dense_above, at)
            macs, executed = macs + masked, executed + ran
        if at is None:  # every position: the head's 1x1 convolutions on the map (mkldnn's: 0.65x the time of the
            # same products on its rows, and the same values)
            rows = head(grid.nchw()).permute(0, 2, 3, 1).reshape(-1, model.num_classes)
        else:
            rows = head_rows(head, grid.rows.index_select(0, at))
        macs += count * costs.head
        executed += count * costs.head
        exit_macs.append(int(macs))
        if not exits.take(rows, None if n == last else thresholds[n]):
            computed.extend([0] * (last - n))
            exit_macs.extend([int(macs)] * (last - n))
            break
    logits = exits.logits()
    final = logits.max(1).indices  # the class map, as the plain network's is taken
    return EarlyExitResult(logits, exits.exit_index(), int(macs), computed, exits.predictions(final), exit_macs,
                           executed_macs=executed)
