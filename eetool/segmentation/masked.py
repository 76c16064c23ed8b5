"""Masked execution: convolutions computed at chosen output positions only, shared by eeseg and the torchvision
backbones. A ``FeatureMap`` is flat channels-last rows plus one zero row (the padding); ``conv_rows`` gathers a
kernel's taps (``tap_rows``) and multiplies them as one matrix product.

Method: docs/methods/segmentation-inference.md#masked-execution
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FeatureMap:
    rows: torch.Tensor  # (B * (H + 2 pad) * (W + 2 pad) + 1) x C: the positions, a border of zeros, a zero row
    batch: int
    height: int
    width: int
    pad: int = 0  # a border of zeros this wide: a "same" convolution's taps need no bounds check

    @classmethod
    def empty(cls, batch: int, height: int, width: int, channels: int, like: torch.Tensor, pad: int = 0
              ) -> FeatureMap:
        """Uninitialised positions (only those written are ever read), the zero border and the zero row."""
        if pad:
            return cls.zeros(batch, height, width, channels, like, pad)
        rows = torch.empty(batch * height * width + 1, channels, dtype=like.dtype, device=like.device)
        rows[-1] = 0
        return cls(rows, batch, height, width)

    @classmethod
    def zeros(cls, batch: int, height: int, width: int, channels: int, like: torch.Tensor, pad: int = 0
              ) -> FeatureMap:
        rows = torch.zeros(batch * (height + 2 * pad) * (width + 2 * pad) + 1, channels, dtype=like.dtype,
                           device=like.device)
        return cls(rows, batch, height, width, pad)

    @classmethod
    def of(cls, x: torch.Tensor, pad: int = 0) -> FeatureMap:
        """A copy of a B x C x H x W tensor."""
        b, c, h, w = x.shape
        fmap = cls.empty(b, h, w, c, x, pad)
        fmap.nhwc().copy_(x.permute(0, 2, 3, 1))
        return fmap

    @property
    def channels(self) -> int:
        return int(self.rows.shape[1])

    def padded(self) -> torch.Tensor:
        p = self.pad
        return self.rows[:-1].view(self.batch, self.height + 2 * p, self.width + 2 * p, self.channels)

    def nhwc(self) -> torch.Tensor:
        p = self.pad
        return self.padded()[:, p:p + self.height, p:p + self.width]

    def nchw(self) -> torch.Tensor:
        """A view in channels-last memory format: what torch's dense convolutions take (a copy when padded)."""
        return self.nhwc().permute(0, 3, 1, 2)

    def index(self, mask: torch.Tensor) -> torch.Tensor:
        """The row numbers of a B x H x W mask's true positions."""
        p = self.pad
        return positions(F.pad(mask, (p, p, p, p)) if p else mask)


def cover(pixels: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """B x gh x gw: a grid position is active while any input pixel it covers is."""
    stride = 2 ** round(math.log2(pixels.shape[1] / grid_hw[0]))
    active = F.max_pool2d(pixels[:, None].float(), stride, stride, ceil_mode=True)[:, 0] > 0
    assert tuple(active.shape[1:]) == grid_hw, (active.shape, grid_hw)
    return active


def positions(mask: torch.Tensor) -> torch.Tensor:
    """The flat numbers of a mask's true positions."""
    return mask.reshape(-1).nonzero()[:, 0]


def out_size(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = cast(tuple[int, int], conv.padding)  # torch's type allows 'same', which eetool's networks don't use
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def tap_rows(conv: nn.Conv2d, out_rows: torch.Tensor, out_hw: tuple[int, int], src: FeatureMap) -> torch.Tensor:
    """N x taps: the rows of ``src`` that ``conv`` reads for each output position, in the kernel's order.

    On ``src``'s own grid (stride 1, "same" padding within ``src.pad``) the outputs are given by ``src``'s row
    numbers and each tap is a fixed offset from them. Otherwise ``src`` is unpadded, the outputs are flat
    positions of an ``out_hw`` grid, and taps outside the map read the zero row."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = cast(tuple[int, int], conv.padding)  # torch's type allows 'same', which eetool's networks don't use
    ky, kx = torch.arange(kh, device=out_rows.device) * dh, torch.arange(kw, device=out_rows.device) * dw
    if out_hw == (src.height, src.width) and (sh, sw) == (1, 1) and (2 * ph, 2 * pw) == (dh * (kh - 1), dw * (kw - 1)):
        if (kh, kw) == (1, 1):
            return out_rows[:, None]
        if max(ph, pw) <= src.pad:
            stride = src.width + 2 * src.pad
            return out_rows[:, None] + ((ky - ph)[:, None] * stride + (kx - pw)[None, :]).reshape(1, -1)
    assert src.pad == 0, "taps of a padded map: same-size convolutions only"
    if out_hw == (src.height, src.width) and (sh, sw) == (1, 1):  # a same-size convolution: its taps looked up
        return tap_table(conv, src).index_select(0, out_rows)
    return _taps(conv, out_rows, out_hw, src)


# Tap tables kept (a few shapes at a time: a run's full and last batch at eeseg's four dilations)
TAP_TABLES = 8
_tap_tables: dict[tuple[object, ...], torch.Tensor] = {}


def tap_table(conv: nn.Conv2d, src: FeatureMap) -> torch.Tensor:
    """(B H W) x taps: ``tap_rows`` of every position of ``src``'s (unpadded) grid for a stride-1 convolution of
    the same output size, computed once per shape and kept: looking up the rows of the positions to compute is one
    gather instead of a dozen operations on every tap (for eeseg's width 16 as much time as the product itself)."""
    key = (conv.kernel_size, conv.dilation, conv.padding, src.batch, src.height, src.width, src.rows.device)
    table = _tap_tables.get(key)
    if table is None:
        if len(_tap_tables) >= TAP_TABLES:
            _tap_tables.clear()
        every = torch.arange(src.batch * src.height * src.width, device=src.rows.device)
        table = _tap_tables[key] = _taps(conv, every, (src.height, src.width), src)
    return table


def _taps(conv: nn.Conv2d, out_rows: torch.Tensor, out_hw: tuple[int, int], src: FeatureMap) -> torch.Tensor:
    """``tap_rows`` on an unpadded ``src``, computed: taps outside the map read its zero row."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = cast(tuple[int, int], conv.padding)
    ky, kx = torch.arange(kh, device=out_rows.device) * dh, torch.arange(kw, device=out_rows.device) * dw
    oh, ow = out_hw
    b, rest = out_rows // (oh * ow), out_rows % (oh * ow)
    i, j = rest // ow, rest % ow
    ys = (i * sh - ph)[:, None, None] + ky[None, :, None]
    xs = (j * sw - pw)[:, None, None] + kx[None, None, :]
    inside = (ys >= 0) & (ys < src.height) & (xs >= 0) & (xs < src.width)
    flat = (b[:, None, None] * src.height + ys) * src.width + xs
    return torch.where(inside, flat, src.rows.shape[0] - 1).reshape(out_rows.numel(), -1)


def read_mask(taps: torch.Tensor, src: FeatureMap) -> torch.Tensor:
    """B x H x W: the positions of ``src`` that ``taps`` read (not its zero border or row)."""
    read = torch.zeros(src.rows.shape[0], dtype=torch.bool, device=taps.device)
    read[taps.reshape(-1)] = True
    p = src.pad
    return read[:-1].view(src.batch, src.height + 2 * p, src.width + 2 * p)[:, p:p + src.height, p:p + src.width]


def kernel_rows(conv: nn.Conv2d) -> torch.Tensor:
    """Out x (taps * In) in the order ``conv_rows`` gathers (tap-major, then channel)."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)


# Gathered elements (output positions x taps x channels) that ``conv_rows`` multiplies at once: a block of 2 MB of
# float32 stays in the core's cache for the product that reads it (3,640 positions of a 3x3 kernel on 16 channels,
# 113 on 512). One CPU thread, eeseg's width 16: the whole gather at once took 3-4x a dense convolution's time per
# position, blocks of 1,024 to 4,096 positions 2.5-3x, the product alone as fast as the dense convolution.
GATHER_ELEMENTS = 1 << 19
_gather_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def gather_buffer(elements: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of at least ``elements``, kept between calls (a fresh one of this size would be mapped and
    faulted in by the allocator every time)."""
    key = (like.dtype, like.device)
    buffer = _gather_buffers.get(key)
    if buffer is None or buffer.numel() < elements:
        buffer = _gather_buffers[key] = torch.empty(elements, dtype=like.dtype, device=like.device)
    return buffer[:elements]


def conv_rows(conv: nn.Conv2d, src: FeatureMap, taps: torch.Tensor) -> torch.Tensor:
    """N x Out: ``conv`` at the positions whose taps are ``taps`` (``tap_rows``): the taps' rows gathered
    (im2col) GATHER_ELEMENTS at a time into a kept buffer, each block multiplied by the kernel (with the bias) as
    one matrix product."""
    n, t = taps.shape
    if conv.groups == 1:
        weight = kernel_rows(conv).T
        out = src.rows.new_empty(n, conv.out_channels)
        block = max(1, min(n, GATHER_ELEMENTS // (t * src.channels)))
        buffer = gather_buffer(block * t * src.channels, src.rows)
        flat = taps.reshape(-1)
        for start in range(0, n, block):
            stop = min(n, start + block)
            gathered = buffer[:(stop - start) * t * src.channels].view((stop - start) * t, src.channels)
            torch.index_select(src.rows, 0, flat[start * t:stop * t], out=gathered)
            gathered = gathered.view(stop - start, t * src.channels)
            if conv.bias is None:
                torch.mm(gathered, weight, out=out[start:stop])
            else:
                torch.addmm(conv.bias, gathered, weight, out=out[start:stop])
        return out
    gathered = src.rows.index_select(0, taps.reshape(-1))
    if conv.groups == conv.in_channels == conv.out_channels:  # depthwise: one filter per channel
        out = (gathered.view(n, t, src.channels) * conv.weight.reshape(src.channels, t).T).sum(1)
    else:
        raise NotImplementedError(f"grouped convolution with {conv.groups} groups")
    return out if conv.bias is None else out + conv.bias


def bn_rows(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm on rows of channels."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return x * scale + (bn.bias - bn.running_mean * scale)


def pointwise(modules: list[nn.Module], rows: torch.Tensor) -> torch.Tensor:
    """1x1 convolutions, BatchNorm and elementwise modules (activations, eval-mode dropout) on rows."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            assert m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
            rows = rows @ m.weight[:, :, 0, 0].T if m.bias is None else F.linear(rows, m.weight[:, :, 0, 0], m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            rows = bn_rows(rows, m)
        else:
            rows = m(rows)
    return rows


def macs_per_position(conv: nn.Conv2d) -> int:
    return conv.out_channels * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]


def add_active(active: torch.Tensor, dense: torch.Tensor, out: FeatureMap, residual: bool) -> None:
    """Writes a dense B x C x H x W result at the ``active`` positions of ``out``, added to what is there when
    ``residual`` (the others keep theirs) or in place of it (the others become zero, as ``out`` holds where the
    block's shape changes): one pass over the map, the result multiplied by the mask (a ``torch.where`` of the
    result with the residual added beforehand took two, and each several times as long on a channels-last map)."""
    inner, rows = out.nhwc(), dense.permute(0, 2, 3, 1)
    if bool(active.all()):
        inner.add_(rows) if residual else inner.copy_(rows)
    elif residual:
        inner.addcmul_(rows, active[..., None].to(rows.dtype))
    else:
        torch.mul(rows, active[..., None].to(rows.dtype), out=inner)


def write_active(active: torch.Tensor, dense: torch.Tensor, out: FeatureMap) -> None:
    """Writes a dense B x C x H x W result at the ``active`` positions of ``out``, keeping the others."""
    inner = out.nhwc()
    if bool(active.all()):
        inner.copy_(dense.permute(0, 2, 3, 1))
    else:
        inner.copy_(torch.where(active[..., None], dense.permute(0, 2, 3, 1), inner))
