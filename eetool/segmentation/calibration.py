"""CBT's calibration pass: every exit's softmax at the input's size, summed per ground-truth class (eq. 3.1).

For eeseg the 2x bilinear upsampling is done as four pixel phases on the grid, channels last, a few images at a
time, with a base-2 softmax; float32 per image, float64 across images.

Method (and the precision bound): docs/methods/segmentation-inference.md#cbts-calibration-pass
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from eetool.segmentation.model import EESegNet, upsample

if TYPE_CHECKING:
    from eetool.segmentation.networks import SegmentationNet
    from eetool.segmentation.pixel_thresholds import ClassStats

# Probabilities (pixels x exits x classes) handled at once: about 4 MB of float32, so that a chunk's phases,
# softmax and per-class sums stay in a core's cache (fewer images per chunk add per-call overhead, more spill).
CHUNK_ELEMENTS = 1 << 20
# From this many classes on, each pixel's probabilities are a row, added to its class's row by ``index_add_`` (E K
# additions per pixel); below it, each exit's class maps are separate and a one-hot matrix product sums them
# ((K + 1) E K multiply-adds per pixel, but the softmax's sums over the classes run along whole maps). One CPU
# thread, per image: eeseg's 11 classes 380 us one-hot against 450 rows; garment-shaped masks on random logits
# equal at 11 classes, rows 1.2x faster at 14, 2x at 32; the atlas's 117 classes 32 ms against 12.
ROWS_FROM_CLASSES = 12
# exp(+-64) is a normal float32 (1.6e-28 to 6.2e27), and so is a sum of up to 10^10 of them.
EXP_SAFE = 64.0
LOG2_E = 1.4426950408889634  # 1 / ln 2: exp(x) = exp2(x LOG2_E)


def add_batch(stats: ClassStats, model: SegmentationNet, x: torch.Tensor, masks: torch.Tensor) -> None:
    """Add one batch of preprocessed images and their B x H x W ground truth (IGNORE left out) to ``stats``."""
    if isinstance(model, EESegNet):
        grid = model.grid_exits(x)
        if masks.shape[-2:] == (2 * grid[0].shape[-2], 2 * grid[0].shape[-1]):
            add_grid_batch(stats, grid, masks)
            return
    stats.update(exit_probabilities(model, x), masks)


def exit_probabilities(model: SegmentationNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's softmax at the input's size (B x K x H x W each), the values of ``forward_exits(x)``'s softmax:
    eeseg's grid logits are upsampled in channels-last layout (bilinear interpolation computes the same values in
    either layout, and on CPU this one is about 3x faster) and brought back to channels-first, where the softmax
    over the classes is fastest."""
    if not isinstance(model, EESegNet):
        return [logits.softmax(1) for logits in model.forward_exits(x)]
    size = x.shape[-2:]
    return [upsample(logits.contiguous(memory_format=torch.channels_last), size).contiguous().softmax(1)
            for logits in model.grid_exits(x)]


def add_grid_batch(stats: ClassStats, grid_logits: list[torch.Tensor], masks: torch.Tensor) -> None:
    """Add a batch given as every exit's grid logits (B x K x h x w each, any memory format) and the B x 2h x 2w
    ground truth: the statistics of ``stats.update`` on the logits upsampled 2x bilinearly and their softmax,
    computed phase by phase (see the module's docstring)."""
    exits, k = len(grid_logits), stats.counts.shape[0]
    batch = masks.shape[0]
    h, w = grid_logits[0].shape[-2:]
    pixels = 4 * h * w  # per image
    # row 0 collects the ignored pixels (IGNORE is -1) and is left out
    labels = pixel_phases(masks).reshape(-1).long().add_(1)  # B 4 h w: the phases' order
    stats.counts += torch.bincount(labels, minlength=k + 1)[1:].cpu()
    device = grid_logits[0].device
    labels = labels.to(device)
    rows = k >= ROWS_FROM_CLASSES
    # an accelerator takes the batch at once: its caches are not what the chunks are sized for
    step = max(1, CHUNK_ELEMENTS // (exits * k * pixels)) if device.type == "cpu" else batch
    for start in range(0, batch, step):
        chunk = slice(start, start + step)
        images = min(step, batch - start)
        chunk_labels = labels[start * pixels:(start + images) * pixels]
        # one copy lays out (eeseg's logits come channels last) and joins the exits; then, for logits within
        # EXP_SAFE, base 2 (see softmax_of_bounded): the scaling is linear, so it commutes with the phases' lerps
        if rows:  # b x h x w x (exits K): a row per grid position
            logits = grid_logits[0].new_empty(images, h, w, exits * k)
            for n, g in enumerate(grid_logits):
                logits[..., n * k:(n + 1) * k] = g[chunk].permute(0, 2, 3, 1)
            bound = to_base_2(logits)
            probs = softmax_of_bounded(upsampled_phases(logits).view(-1, exits, k), bound)  # (b 4 h w) x exits x K
            partial = class_sums_by_rows(probs.view(images, pixels, -1), chunk_labels, k)
        else:  # b x (exits K) x h x w: a map per exit and class
            logits = grid_logits[0].new_empty(images, exits * k, h, w)
            for n, g in enumerate(grid_logits):
                logits[:, n * k:(n + 1) * k] = g[chunk]
            bound = to_base_2(logits)
            phases = upsampled_phases(logits.view(-1, h, w, 1))  # (b exits K) x 4 x h x w x 1
            probs = softmax_of_bounded(phases.view(images, exits, k, pixels), bound, dim=2)
            partial = class_sums_by_one_hot(probs.view(images, exits * k, pixels), chunk_labels, k)
        stats.sums += partial.view(k, exits, k).transpose(0, 1).cpu()


def to_base_2(logits: torch.Tensor) -> float:
    """The logits' largest magnitude; when it is below EXP_SAFE, the logits are scaled to base 2 in place (as
    ``softmax_of_bounded`` takes them). ``logits`` is contiguous: ``aminmax`` would copy another layout first."""
    low, high = torch.aminmax(logits)
    bound = max(-float(low), float(high))
    if bound < EXP_SAFE:
        logits.mul_(LOG2_E)
    return bound


def class_sums_by_one_hot(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """K x C float64: the images' (b x C x pixels) maps summed per label (``labels``: b pixels, 1 + class, 0 for
    ignored pixels, which are left out), one image's (K + 1) x C product in float32 before the float64 total (the
    ignored pixels' row is dropped after it: before, the one-hot would be copied to a contiguous K rows)."""
    images, _, pixels = probs.shape
    one_hot = torch.zeros(images, k + 1, pixels, dtype=probs.dtype, device=probs.device)
    one_hot.scatter_(1, labels.view(images, 1, pixels), 1.0)
    return torch.bmm(one_hot, probs.transpose(1, 2)).sum(0, dtype=torch.float64)[1:]


def class_sums_by_rows(probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """K x C float64: the images' (b x pixels x C) rows summed per label (``labels``: b pixels, 1 + class, 0 for
    ignored pixels, which are left out), each image in float32 (``index_add_``) before the float64 total."""
    images, pixels, channels = probs.shape
    accumulator = probs.new_empty(k + 1, channels)
    total = torch.zeros(k + 1, channels, dtype=torch.float64, device=probs.device)
    for i in range(images):
        accumulator.zero_()
        accumulator.index_add_(0, labels[i * pixels:(i + 1) * pixels], probs[i])
        total += accumulator
    return total[1:]


def softmax_of_bounded(logits: torch.Tensor, bound: float, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim``, in place, of logits given in base 2 (natural logits times LOG2_E) when their natural
    magnitude ``bound`` is below EXP_SAFE: one ``exp2`` and no shift by the maximum (the same values up to rounding).
    Larger logits are given in natural units and take ``Tensor.softmax``.
    Method: docs/methods/segmentation-inference.md#cbts-calibration-pass
    """
    if not bound < EXP_SAFE:  # NaN included
        return logits.softmax(dim)
    exps = logits.exp2_()
    return exps.mul_(exps.sum(dim, keepdim=True).reciprocal_())


def pixel_phases(masks: torch.Tensor) -> torch.Tensor:
    """B x 2h x 2w -> B x 4 x h x w: the pixels (2i + r, 2j + c) as phase 2r + c, in ``upsampled_phases``' order."""
    return torch.stack([masks[:, r::2, c::2] for r in (0, 1) for c in (0, 1)], 1)


def upsampled_phases(x: torch.Tensor) -> torch.Tensor:
    """B x h x w x C -> B x 4 x h x w x C: bilinear ``F.interpolate`` to (2h, 2w) of channels-last ``x``, pixel
    (2i + r, 2j + c) as phase 2r + c. Even rows and columns take 1/4 of the previous grid row or column, odd ones
    of the next; the edge is repeated."""
    b, h, w, channels = x.shape
    padded = x.new_empty(b, h + 2, w + 2, channels)
    padded[:, 1:h + 1, 1:w + 1] = x
    padded[:, 0, 1:w + 1] = x[:, 0]
    padded[:, h + 1, 1:w + 1] = x[:, h - 1]
    padded[:, :, 0] = padded[:, :, 1]
    padded[:, :, w + 1] = padded[:, :, w]
    middle = padded[:, 1:h + 1]
    out = x.new_empty(b, 4, h, w, channels)
    for r, rows in enumerate((torch.lerp(middle, padded[:, 0:h], 0.25),
                              torch.lerp(middle, padded[:, 2:h + 2], 0.25))):
        centre = rows[:, :, 1:w + 1]
        torch.lerp(centre, rows[:, :, 0:w], 0.25, out=out[:, 2 * r])
        torch.lerp(centre, rows[:, :, 2:w + 2], 0.25, out=out[:, 2 * r + 1])
    return out
