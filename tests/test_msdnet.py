"""The multi-scale dense network (msdnet): its exits, their shapes, its costs counted by hand, the scales it
carries, and its arguments. Chaining, costs against ptflops and early-exit inference against a brute-force
re-computation are in test_exits.py, test_costs.py and test_inference.py with the other architectures."""

from __future__ import annotations

import pytest
import torch

from eetool.classification.msdnet import scales_in_block
from eetool.core.builders import build_model
from eetool.core.costs import count_macs, layer_macs, measure
from eetool.core.errors import UsageError
from eetool.core.exits import SPLIT, build_exit_model, candidate_exits


def test_exits_are_at_the_end_of_every_block() -> None:
    model = build_model("msdnet", 10, 1, {"blocks": 5, "layers": 1})
    mode, candidates = candidate_exits(model)
    assert mode == SPLIT and candidates == [f"blocks.{b}" for b in range(5)]
    assert build_exit_model(model, "half").exits == ["blocks.1", "blocks.3"]


def test_later_blocks_drop_the_finest_scales() -> None:
    assert [scales_in_block(b, 4) for b in range(4)] == [3, 2, 1, 1]
    assert [scales_in_block(b, 5) for b in range(5)] == [3, 2, 2, 1, 1]
    assert [scales_in_block(b, 2) for b in range(2)] == [3, 1]
    assert scales_in_block(0, 1) == 3


@torch.no_grad()
def test_blocks_carry_the_scales_they_keep() -> None:
    model = build_model("msdnet", 10, 1, {}).eval()  # width 6, growth 6, 4 blocks of 2 layers
    em = build_exit_model(model, "every")
    h = torch.zeros(2, 1, 28, 28)
    shapes = []
    for stage in em.stages[:-1]:
        h = stage(h)
        shapes.append([tuple(t.shape[1:]) for t in h])
    # Stem: 6, 12, 24 channels at 28, 14, 7; each dense layer adds 6, 12, 24 at the scales kept; transitions halve.
    assert shapes == [[(9, 28, 28), (18, 14, 14), (36, 7, 7)],  # (6 + 2*6) / 2, (12 + 2*12) / 2, (24 + 2*24) / 2
                      [(21, 14, 14), (42, 7, 7)],  # (18 + 2*12) / 2, (36 + 2*24) / 2
                      [(45, 7, 7)],  # (42 + 2*24) / 2
                      [(93, 7, 7)]]  # 45 + 2*24, no transition after the last block
    assert em.exit_shapes((1, 28, 28)) == [(36, 7, 7), (42, 7, 7), (45, 7, 7), (93, 7, 7)]
    assert em.exit_shapes((1, 32, 32)) == [(36, 8, 8), (42, 8, 8), (45, 8, 8), (93, 8, 8)]


def test_convolution_and_linear_macs_of_each_stage_by_hand() -> None:
    model = build_model("msdnet", 10, 1, {"width": 1, "growth": 2, "blocks": 2, "layers": 1})
    em = build_exit_model(model, "every")
    got = [sum(m for _, m in stage) for stage in layer_macs(em, (1, 8, 8))]
    # A 3x3 convolution costs 9 * c_in * c_out per output position. Block 0 (scales 8x8, 4x4, 2x2):
    stem = 64 * 9 * 1 * 1 + 16 * 9 * 1 * 2 + 4 * 9 * 2 * 4  # 1, 2 and 4 channels
    # growth 2, 4, 8 at the three scales; the coarser two take half from the finer scale (strided)
    layer = 64 * 9 * 1 * 2 + (16 * 9 * 2 * 2 + 16 * 9 * 1 * 2) + (4 * 9 * 4 * 4 + 4 * 9 * 2 * 4)
    transition = 64 * 3 * 1 + 16 * 6 * 3 + 4 * 12 * 6  # 1x1: 3, 6, 12 channels halved
    # Block 1 keeps the coarsest scale (6 channels), fed by the dropped 4x4 one (3 channels): 4 + 4 new channels.
    block1 = 4 * 9 * 6 * 4 + 4 * 9 * 3 * 4
    # The classifier: 14 channels to 8 (2x2 to 1x1), 8 to 8 (1x1), then linear 8 -> 10 with its bias.
    head = 1 * 9 * 14 * 8 + 1 * 9 * 8 * 8 + 8 * 10 + 10
    assert got == [stem + layer + transition, block1, head]


def test_stage_macs_are_ptflops_count_of_the_whole_model() -> None:
    model = build_model("msdnet", 10, 3, {"width": 3, "growth": 4, "blocks": 3})
    costs = measure(build_exit_model(model, "every"), (3, 32, 32))
    assert costs.model_macs == count_macs(model, (3, 32, 32))
    assert all(m > 0 for m in costs.stage_macs)


@pytest.mark.parametrize("args", [{"width": 0}, {"blocks": 9}, {"layers": 1.5}, {"growth": True}, {"depth": 3}])
def test_bad_arch_args_are_usage_errors(args: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        build_model("msdnet", 10, 1, args)
