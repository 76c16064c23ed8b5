"""CBT's calibration pass (eetool.segmentation.calibration): the phase-by-phase statistics against eq. 3.1
recomputed pixel by pixel in float64 from ``F.interpolate`` and the softmax, with ignored pixels, absent classes,
batches split into chunks, logits too large for the unshifted exp and inputs of odd size; and memory that does
not grow with the number of batches streamed.

Margins: the fast path computes in float32 and sums each image's pixels in float32 before float64 (the module's
docstring bounds it); on these few pixels the means differ from the float64 definition by about 1e-7, so 1e-5
leaves a wide margin, while pairing a pixel with a wrong label or phase moves a mean by 1e-2 or more."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eetool.segmentation import IGNORE
from eetool.segmentation import calibration as cal
from eetool.segmentation.calibration import (
    EXP_SAFE,
    add_batch,
    add_grid_batch,
    pixel_phases,
    softmax_of_bounded,
    upsampled_phases,
)
from eetool.segmentation.model import EESegNet
from eetool.segmentation.pixel_thresholds import ClassStats

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Many small operations per chunk: on a shared, loaded machine two threads' hand-offs cost more than the work
    (the statistics do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def direct_means(batches: list[tuple[list[torch.Tensor], torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3.1 by its definition in float64: each exit's grid logits upsampled to the mask's size, the softmax of
    every labelled pixel added to its class's sum; p_{n,k} = sum / count (NaN for an absent class)."""
    exits = len(batches[0][0])
    sums = torch.zeros(exits, k, k, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.int64)
    for grids, masks in batches:
        probs = [F.interpolate(g.double(), size=tuple(masks.shape[-2:]), mode="bilinear").softmax(1) for g in grids]
        for b, y, x in np.ndindex(*masks.shape):
            truth = int(masks[b, y, x])
            if truth == IGNORE:
                continue
            counts[truth] += 1
            for n in range(exits):
                sums[n, truth] += probs[n][b, :, y, x]
    return sums / counts.to(torch.float64)[None, :, None], counts


def random_grids(gen: torch.Generator, b: int, k: int, h: int, w: int, scale: float = 3.0,
                 exits: int = 4) -> tuple[list[torch.Tensor], torch.Tensor]:
    grids = [torch.randn(b, k, h, w, generator=gen) * scale for _ in range(exits)]
    masks = torch.randint(0, k - 1, (b, 2 * h, 2 * w), generator=gen).to(torch.int16)  # class k - 1 is absent
    masks[:, ::3, ::2] = IGNORE
    return grids, masks


def test_upsampled_phases_are_the_bilinear_interpolation() -> None:
    logits = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 4
    phases = upsampled_phases(logits.permute(0, 2, 3, 1))  # channels last: 2 x 4 x 5 x 7 x 3
    image = torch.empty(2, 3, 10, 14)
    for r in (0, 1):
        for c in (0, 1):
            image[:, :, r::2, c::2] = phases[:, 2 * r + c].permute(0, 3, 1, 2)
    assert (image - F.interpolate(logits, size=(10, 14), mode="bilinear")).abs().max() < TOLERANCE
    masks = torch.arange(10 * 14).view(1, 10, 14)
    for r in (0, 1):
        for c in (0, 1):  # the masks' phases hold the same pixels
            assert torch.equal(pixel_phases(masks)[0, 2 * r + c], masks[0, r::2, c::2])


@pytest.mark.parametrize("chunk_elements", [1, 2 * 4 * 4 * 5 * 6 * 4, 1 << 20])
@pytest.mark.parametrize("rows_from", [99, 5])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_statistics_equal_eq_3_1_recomputed_pixel_by_pixel(monkeypatch: pytest.MonkeyPatch, chunk_elements: int,
                                                           rows_from: int, layout: torch.memory_format) -> None:
    # one image per chunk; two (3 = 2 + 1: a shorter last chunk); the whole batch. A map per exit and class and
    # one-hot products (rows from 99 classes), or a row per pixel added to its class's row (from 5); grids as
    # given or channels last (as eeseg's folded network makes them)
    monkeypatch.setattr(cal, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(cal, "ROWS_FROM_CLASSES", rows_from)
    gen = torch.Generator().manual_seed(1)
    batches = [random_grids(gen, 3, 5, 4, 6) for _ in range(3)]
    batches = [([g.contiguous(memory_format=layout) for g in grids], masks) for grids, masks in batches]
    stats = ClassStats.empty(4, 5)
    for grids, masks in batches:  # streamed batch by batch
        add_grid_batch(stats, grids, masks)
    expected, counts = direct_means(batches, 5)
    assert torch.equal(stats.counts, counts)
    assert counts[4] == 0 and stats.exit_means()[:, 4].isnan().all()  # the absent class: no mean
    assert (stats.exit_means()[:, :4] - expected[:, :4]).abs().max() < TOLERANCE
    assert stats.sums.dtype == torch.float64


@pytest.mark.parametrize("rows_from", [99, 2])
def test_logits_beyond_the_unshifted_exp_take_the_shifted_softmax(monkeypatch: pytest.MonkeyPatch,
                                                                  rows_from: int) -> None:
    monkeypatch.setattr(cal, "ROWS_FROM_CLASSES", rows_from)  # either layout
    gen = torch.Generator().manual_seed(2)
    grids, masks = random_grids(gen, 2, 4, 3, 3, scale=60.0)
    grids[1][0, 2, 1, 1] = 2 * EXP_SAFE  # exp(128) is infinite in float32
    stats = ClassStats.empty(4, 4)
    add_grid_batch(stats, grids, masks)
    expected, _ = direct_means([(grids, masks)], 4)
    assert (stats.exit_means()[:, :3] - expected[:, :3]).abs().max() < TOLERANCE
    # without the shift those logits would not give probabilities
    unshifted = softmax_of_bounded(torch.tensor([[[2 * EXP_SAFE], [0.0]]]).unsqueeze(0), 0.0)
    assert unshifted.isnan().any()


def test_eeseg_batches_go_phase_by_phase_or_through_the_dense_softmax_at_odd_sizes() -> None:
    torch.manual_seed(3)
    net = EESegNet(4, in_channels=1, width=8, head_width=8).eval()
    gen = torch.Generator().manual_seed(3)
    for side in (12, 11):  # 12: a 6 x 6 grid upsampled 2x; 11: a 6 x 6 grid to 11 x 11, the general path
        x = torch.randn(2, 1, side, side, generator=gen)
        masks = torch.randint(0, 4, (2, side, side), generator=gen).to(torch.int16)
        masks[0, 0] = IGNORE
        stats = ClassStats.empty(4, 4)
        with torch.no_grad():
            add_batch(stats, net, x, masks)
            grids = net.grid_exits(x)
        expected, counts = direct_means([(grids, masks)], 4)
        assert torch.equal(stats.counts, counts)
        assert (stats.exit_means() - expected).abs().max() < TOLERANCE


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
def test_memory_does_not_grow_with_the_number_of_batches() -> None:
    gen = torch.Generator().manual_seed(4)
    grids, masks = random_grids(gen, 8, 11, 32, 32)
    stats = ClassStats.empty(4, 11)
    for _ in range(5):  # the allocator's working set for one batch
        add_grid_batch(stats, grids, masks)
    before = resident_bytes()
    for _ in range(45):
        add_grid_batch(stats, grids, masks)
    # keeping each batch's probabilities would add 45 x 8 x 4 x 11 x 64 x 64 float32 = 260 MB
    assert resident_bytes() - before < 20 * 2**20
    assert stats.sums.shape == (4, 11, 11) and int(stats.counts.sum()) == 50 * int((masks != IGNORE).sum())
