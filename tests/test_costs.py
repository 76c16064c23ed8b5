"""The cost model: stage MACs add up to the model, agree with torch's FLOP counter, and the arithmetic holds."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from eetool.core.builders import build_model
from eetool.core.costs import CostModel, count_macs, in_unit, measure
from eetool.core.exits import HOOK, build_exit_model

MODELS = {
    "resnet20": (lambda: build_model("resnet20", 10, 1, {"width": 4}), (1, 28, 28)),
    "resnet18": (lambda: build_model("resnet18", 10, 3), (3, 64, 64)),
    "mobilenet_v3_small": (lambda: build_model("mobilenet_v3_small", 10, 3), (3, 64, 64)),
    # its stages after the first hand on several scales, which ptflops cannot feed a module: the per-module rules
    # counted on them must add up to ptflops' count of the whole model, which takes one tensor
    "msdnet": (lambda: build_model("msdnet", 10, 1, {"width": 4, "growth": 4}), (1, 28, 28)),
    "msdnet-cifar": (lambda: build_model("msdnet", 10, 3), (3, 32, 32)),
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_stage_macs_add_up_to_the_whole_model(arch: str) -> None:
    factory, shape = MODELS[arch]
    model = factory().eval()
    costs = measure(build_exit_model(model, "every"), shape)
    whole = count_macs(model, shape)
    assert len(costs.stage_macs) == len(costs.exits) + 1
    assert all(m > 0 for m in costs.stage_macs)
    assert abs(costs.model_macs - whole) <= 0.01 * whole


def test_measure_leaves_a_training_model_training() -> None:
    model = build_model("resnet20", 10, 1, {"width": 4}).train()
    measure(build_exit_model(model, "half"), (1, 8, 8))
    assert all(m.training for m in model.modules())


def _conv_and_linear_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """ptflops' MACs of each convolution and linear layer on its own, at the input it gets, less the bias adds."""
    inputs: dict[nn.Module, tuple[int, ...]] = {}
    outputs: dict[nn.Module, int] = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs[module] = tuple(args[0].shape[1:])
        outputs[module] = out[0].numel()

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    total = 0
    for m in layers:
        total += count_macs(m, inputs[m]) - (outputs[m] if m.bias is not None else 0)
    return total


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_agrees_with_torch_flop_counter(arch: str) -> None:
    model = build_model(arch, 10, 3).eval()
    shape = (3, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *shape))
    torch_flops = counter.get_total_flops()
    # FlopCounterMode counts only convolutions and matrix products, at 2 FLOPs per multiply-add; on those
    # alone, ptflops' counts must agree exactly (each layer measured on its own, its bias adds taken out).
    assert 2 * _conv_and_linear_macs(model, shape) == torch_flops
    # ptflops also counts BatchNorm, activations, pooling and bias adds: about one operation per activation
    # element, against hundreds of multiply-adds per element in these networks' convolutions (64+ channels
    # of 3x3 kernels), so the whole count exceeds 2 x MACs of the matrix products by a few percent at most.
    ptflops_flops = 2 * count_macs(model, shape)
    assert torch_flops <= ptflops_flops <= 1.05 * torch_flops


def test_macs_of_a_convolution_from_its_definition() -> None:
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    # One multiply-add per kernel weight per output position: 3*3*3 weights for each of 8 x 5 x 5 outputs.
    assert count_macs(conv, (3, 10, 10)) == 3 * 3 * 3 * 8 * 5 * 5


# ---------------------------------------------------------------------------------------------
# CostModel arithmetic


def _random_cost_model(seed: int) -> CostModel:
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    return CostModel([f"e{i}" for i in range(n)], [rng.randint(1, 1000) for _ in range(n + 1)],
                     [rng.randint(0, 50) for _ in range(n)])


@pytest.mark.parametrize("seed", range(5))
def test_exit_costs_include_every_passed_overhead(seed: int) -> None:
    cm = _random_cost_model(seed)
    n = len(cm.exits)
    want = [sum(cm.stage_macs[:j + 1]) + sum(cm.overhead_macs[:j + 1]) for j in range(n)]
    want.append(sum(cm.stage_macs) + sum(cm.overhead_macs))
    assert cm.exit_costs() == want
    assert cm.backbone_cumulative() == [sum(cm.stage_macs[:j + 1]) for j in range(n + 1)]
    assert cm.normalised_exit_costs() == pytest.approx([c / sum(cm.stage_macs) for c in want])


@pytest.mark.parametrize("seed", range(5))
def test_average_is_the_weighted_mean(seed: int) -> None:
    cm = _random_cost_model(seed)
    rng = random.Random(100 + seed)
    counts = [rng.randint(0, 20) for _ in range(len(cm.exits) + 1)]
    counts[-1] += 1  # at least one sample
    costs = cm.exit_costs()
    want = sum(c * k for c, k in zip(costs, counts, strict=True)) / sum(counts) / cm.model_macs
    assert cm.average(counts) == pytest.approx(want, rel=1e-12)
    assert cm.average(torch.tensor(counts)) == pytest.approx(want, rel=1e-12)


def test_normalised_costs_without_overheads() -> None:
    cm = CostModel(["a", "b"], [30, 50, 20])
    assert cm.overhead_macs == [0, 0]
    assert cm.normalised_exit_costs() == pytest.approx([0.3, 0.8, 1.0])
    assert cm.average([0, 0, 7]) == pytest.approx(1.0)
    assert cm.average([1, 1, 0]) == pytest.approx(0.55)


def test_with_overheads_is_a_copy() -> None:
    cm = CostModel(["a", "b"], [30, 50, 20])
    richer = cm.with_overheads([5, 5])
    assert cm.overhead_macs == [0, 0]
    assert richer.exit_costs() == [35, 90, 110]
    assert richer.normalised_exit_costs()[-1] == pytest.approx(1.1)


def test_flops_are_twice_the_macs() -> None:
    cm = CostModel(["a"], [123, 456], [7])
    for cost in cm.exit_costs():
        assert in_unit(cost, "flops") == 2 * cost
        assert in_unit(cost, "macs") == cost


# ---------------------------------------------------------------------------------------------
# Hook mode


class Skip(nn.Module):
    """Cannot be split (a skip connection in forward), its children declared in execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.conv1(x)))
        return self.fc(self.pool(self.conv2(h) + h).flatten(1))


def test_hook_mode_costs_follow_the_per_module_rules() -> None:
    model = Skip()
    em = build_exit_model(model, "every")
    assert em.mode == HOOK and em.exits == ["conv1", "bn", "relu", "conv2", "pool"]
    cm = measure(em, (3, 8, 8))
    assert cm.mode == HOOK
    hw = 8 * 8
    # ptflops' rules: a convolution is k*k*C_in MACs per output element plus its bias add, an affine
    # BatchNorm 2 per element, a ReLU 1, pooling 1 per input element, a linear layer in*out plus the bias.
    per_module = [3 * 3 * 3 * 4 * hw + 4 * hw, 2 * 4 * hw, 4 * hw, 3 * 3 * 4 * 4 * hw + 4 * hw, 4 * hw, 4 * 5 + 5]
    cumulative = [sum(per_module[:j + 1]) for j in range(len(per_module))]
    assert cm.backbone_cumulative() == cumulative
    assert all(b >= a for a, b in zip(cm.backbone_cumulative(), cm.backbone_cumulative()[1:], strict=False))
    assert cm.model_macs == sum(per_module)
