"""CBT's calibration pass: every exit's softmax at the input's size, summed per ground-truth class (eq. 3.1).

For eeseg, whose exits are logits on a half-resolution grid upsampled 2x bilinearly, the pass avoids the
full-resolution image layout altogether. Bilinear 2x upsampling (align_corners=False) is a fixed stencil: image
pixel (2i + r, 2j + c) is 3/4 of grid position (i, j) and 1/4 of its neighbour towards the pixel, first along
the rows, then along the columns (the border repeats its edge). The four pixel phases (r, c) are therefore four
grid-sized tensors, each made by two ``lerp``s, and eq. 3.1 only sums over pixels, so the pixels need not be put
back in image order: the masks are split into the same four phases instead (a cheap integer slice). The phases'
softmax over the classes and the one-hot products run on a few images at a time (``CHUNK_ELEMENTS``), so the
intermediates stay in the CPU's cache instead of streaming the whole batch through memory four or five times.

Precision: probabilities are float32 (as the network's logits). Each one-hot product sums one image's pixels
(4 h w of them) in float32; those partial sums go to float64 before anything else is added to them, so a class
sum's relative rounding error is at most (4 h w - 1) 2^-24 (2.4e-4 for a 64 x 64 image in the worst case; about
sqrt(4 h w) 2^-24 = 4e-6 typically), however many images are streamed. The upsampled logits and the softmax
differ from ``F.interpolate``'s and ``Tensor.softmax``'s by float32 rounding (a few units in the last place, and
|logit| 2^-24 relatively from scaling the logits to base 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from eetool.segmentation.model import EESegNet, upsample

if TYPE_CHECKING:
    from eetool.segmentation.model import SegmentationNet
    from eetool.segmentation.thresholds import ClassStats

# Probabilities (exits x classes x pixels) handled at once: about 4 MB of float32, so that a chunk's phases,
# softmax and one-hot product stay in a core's cache (fewer images per chunk add per-call overhead, more spill).
CHUNK_ELEMENTS = 1 << 20
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
    """Add a batch given as every exit's grid logits (B x K x h x w each) and the B x 2h x 2w ground truth: the
    statistics of ``stats.update`` on the logits upsampled 2x bilinearly and their softmax, computed phase by
    phase (see the module's docstring)."""
    exits, k = len(grid_logits), stats.counts.shape[0]
    batch = masks.shape[0]
    # one-hot row 0 collects the ignored pixels (IGNORE is -1) and is left out of the products
    rows = pixel_phases(masks).reshape(batch, 1, -1).long().add_(1)  # B x 1 x 4hw
    stats.counts += torch.bincount(rows.view(-1), minlength=k + 1)[1:].cpu()
    device = grid_logits[0].device
    rows = rows.to(device)
    # base 2 (see softmax_of_bounded) for logits within EXP_SAFE: the scaling is linear, so it commutes with the
    # phases' lerps
    bound = max(max(-float(low), float(high)) for low, high in map(torch.aminmax, grid_logits))
    scale = LOG2_E if bound < EXP_SAFE else 1.0
    # an accelerator takes the batch at once: its caches are not what the chunks are sized for
    step = max(1, CHUNK_ELEMENTS // grid_logits[0][0].numel() // exits // 4) if device.type == "cpu" else batch
    for start in range(0, batch, step):
        chunk = slice(start, start + step)
        images = min(step, batch - start)
        # b x (exits K) x h x w, a chunk in cache and channels first (eeseg's logits come channels last): the
        # phases' row and column slices, the softmax over classes and the one-hot products want each map
        # contiguous; one pass copies, lays out and scales
        logits = grid_logits[0].new_empty(images, exits * k, *grid_logits[0].shape[-2:])
        for n, g in enumerate(grid_logits):
            torch.mul(g[chunk], scale, out=logits[:, n * k:(n + 1) * k])
        probs = upsampled_phases(logits)  # b x (exits K) x 4 x h x w
        probs = softmax_of_bounded(probs.view(images, exits, k, -1), bound)
        probs = probs.view(images, exits * k, -1)
        one_hot = torch.zeros(images, k + 1, probs.shape[-1], dtype=probs.dtype, device=device)
        one_hot.scatter_(1, rows[chunk], 1.0)
        # per image: (K + 1) x (exits K), the ignored pixels' row dropped after the product (before it, the
        # one-hot would be copied to a contiguous K rows)
        partial = torch.bmm(one_hot, probs.transpose(1, 2))[:, 1:]
        stats.sums += partial.to(torch.float64).sum(0).view(k, exits, k).transpose(0, 1).cpu()


def softmax_of_bounded(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Softmax over dimension 2, in place, of logits given in base 2 (natural logits times LOG2_E) when their
    natural magnitude ``bound`` is below EXP_SAFE. Such logits need no shift by their maximum: 2 to the power of
    each is a normal float32 and the sums stay finite, so one ``exp2`` and one multiplication by the sums'
    reciprocals give the probabilities (the same values up to rounding; the shift costs a full pass for the
    maximum). ``exp2`` because on CPU it takes about a quarter of ``exp``'s time (a rounding of the scaled logit
    moves a probability by at most |logit| 2^-24 relatively, 4e-6 at EXP_SAFE). Larger logits are given in
    natural units and take ``Tensor.softmax``."""
    if not bound < EXP_SAFE:  # NaN included
        return logits.softmax(2)
    exps = logits.exp2_()
    return exps.mul_(exps.sum(2, keepdim=True).reciprocal_())


def pixel_phases(masks: torch.Tensor) -> torch.Tensor:
    """B x 2h x 2w -> B x 4 x h x w: the pixels (2i + r, 2j + c) as phase 2r + c, in ``upsampled_phases``' order."""
    return torch.stack([masks[:, r::2, c::2] for r in (0, 1) for c in (0, 1)], 1)


def upsampled_phases(logits: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> B x C x 4 x h x w: ``F.interpolate(logits, size=(2h, 2w), mode="bilinear")``'s pixels
    (2i + r, 2j + c) as phase 2r + c. Even output rows and columns take 1/4 of the previous grid row or column,
    odd ones 1/4 of the next; the edge is repeated (the interpolation clamps its source index there)."""
    h, w = logits.shape[-2:]
    padded = F.pad(logits, (1, 1, 1, 1), mode="replicate")
    middle = padded[:, :, 1:h + 1]
    b, channels = logits.shape[:2]
    out = logits.new_empty(b, channels, 4, h, w)
    for r, rows in enumerate((torch.lerp(middle, padded[:, :, 0:h], 0.25),
                              torch.lerp(middle, padded[:, :, 2:h + 2], 0.25))):
        centre = rows[..., 1:w + 1]
        torch.lerp(centre, rows[..., 0:w], 0.25, out=out[:, :, 2 * r])
        torch.lerp(centre, rows[..., 2:w + 2], 0.25, out=out[:, :, 2 * r + 1])
    return out
