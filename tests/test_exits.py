"""Exit points and stages: the chained stages are the model, and exit selection follows its rules."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from eetool.core.builders import build_model
from eetool.core.errors import UsageError
from eetool.core.exits import (
    HOOK,
    SPLIT,
    build_exit_model,
    candidate_exits,
    chain_units,
    exit_input,
    select_exits,
)


class WithUnits(nn.Module):
    """A model that says how it splits: four units, the last one its head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Tanh())
        self.c = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(self.b(self.a(x))))

    def eetool_units(self) -> list[tuple[str, nn.Module]]:
        return [("a", self.a), ("b", self.b), ("c", self.c), ("head", self.head)]


class Branchy(nn.Module):
    """Not a chain: ``b`` reads the input, not ``a``'s output, and the head adds both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.b = nn.Conv2d(3, 4, 5, stride=2, padding=2)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.a(x))  # overwrites a's output in place
        g = self.b(x)
        return self.head(h.mean((2, 3)) + g.amax((2, 3)))


def plain_sequential() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, stride=2), nn.Sigmoid(),
                         nn.Conv2d(5, 6, 3), nn.Flatten(1), nn.LazyLinear(7))


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that eval-mode BN does something to compare."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def reference_exit_outputs(model: nn.Module, exits: list[str],
                           x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The outputs of the modules named by the exits, tapped from the model's own forward pass."""
    captured: dict[str, torch.Tensor] = {}
    # torchvision's ResNet has no `stem` module: its stem ends at the max pooling.
    module = {"stem": "maxpool"} if isinstance(model, torchvision.models.ResNet) else {}
    handles = [model.get_submodule(module.get(name, name)).register_forward_hook(
        lambda m, a, out, name=name: captured.__setitem__(name, exit_input(out).clone())) for name in exits]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return [captured[name] for name in exits], logits


SPLITTABLE = {
    "resnet20": (lambda: build_model("resnet20", 10, 1, {"width": 4}), (1, 16, 16)),
    "resnet18": (lambda: build_model("resnet18", 10, 3), (3, 64, 64)),
    "mobilenet_v3_small": (lambda: build_model("mobilenet_v3_small", 10, 3), (3, 64, 64)),
    "efficientnet_b0": (lambda: build_model("efficientnet_b0", 10, 3), (3, 64, 64)),
    "vgg11": (lambda: build_model("vgg11", 10, 3), (3, 64, 64)),
    "sequential": (plain_sequential, (3, 16, 16)),
    "eetool_units": (WithUnits, (3, 16, 16)),
    "msdnet": (lambda: build_model("msdnet", 10, 1, {"width": 4, "growth": 4}), (1, 28, 28)),
    "msdnet-5-blocks": (lambda: build_model("msdnet", 10, 3, {"width": 2, "growth": 3, "blocks": 5, "layers": 1}),
                        (3, 32, 32)),
}


@pytest.mark.parametrize("family", list(SPLITTABLE))
@torch.no_grad()
def test_chained_stages_are_the_model(family: str) -> None:
    torch.manual_seed(0)
    factory, shape = SPLITTABLE[family]
    model = factory()
    if family == "sequential":
        model(torch.zeros(1, *shape))  # materialise the lazy layer
    randomise_bn(model)
    model.eval()
    em = build_exit_model(model, "every")
    assert em.mode == SPLIT
    assert len(em.stages) == len(em.exits) + 1
    # Every parameter of the model belongs to exactly one stage.
    stage_params = [id(p) for stage in em.stages for p in stage.parameters()]
    assert len(stage_params) == len(set(stage_params))
    assert set(stage_params) == {id(p) for p in model.parameters()}

    x = torch.randn(2, *shape)
    h = x
    for stage in em.stages:
        h = stage(h)
    want_outs, want_logits = reference_exit_outputs(model, em.exits, x)
    assert torch.allclose(h, want_logits, atol=1e-5, rtol=1e-4)
    outs, logits = em.features(x)
    assert torch.allclose(logits, want_logits, atol=1e-5, rtol=1e-4)
    assert len(outs) == len(em.exits)
    for out, want in zip(outs, want_outs, strict=True):
        assert torch.allclose(out, want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_fewer_exits_still_chain_to_the_model() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1, {"width": 4})
    randomise_bn(model)
    model.eval()
    x = torch.randn(3, 1, 12, 12)
    for selection in ("half", "quartiles", "layer2.0", "stem,layer3.1"):
        em = build_exit_model(model, selection)
        outs, logits = em.features(x)
        want_outs, want_logits = reference_exit_outputs(model, em.exits, x)
        assert torch.allclose(logits, want_logits, atol=1e-5)
        for out, want in zip(outs, want_outs, strict=True):
            assert torch.allclose(out, want, atol=1e-5)


def test_resnet20_candidates_are_the_stem_and_every_block() -> None:
    model = build_model("resnet20", 10, 1, {"width": 4})
    mode, candidates = candidate_exits(model)
    assert mode == SPLIT
    blocks = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert candidates == ["stem", *blocks]  # the thesis puts an exit after every ResNet block
    units = chain_units(model)
    assert units is not None and [n for n, _ in units] == ["stem", *blocks, "head"]


def test_torchvision_resnet_units_follow_its_blocks() -> None:
    model = build_model("resnet18", 10, 3)
    _, candidates = candidate_exits(model)
    blocks = [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in range(2)]
    assert candidates == ["stem", *blocks]


def test_vgg_units_end_at_pooling_layers() -> None:
    model = build_model("vgg11", 10, 3)
    pools = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    _, candidates = candidate_exits(model)
    assert candidates == pools


def test_exit_shapes_of_resnet20() -> None:
    width = 4
    model = build_model("resnet20", 10, 1, {"width": width})
    em = build_exit_model(model, "every")
    # The stem and stage 1 keep 28x28 at `width` channels; stages 2 and 3 halve the size and double the channels.
    want = [(width, 28, 28)] * 4 + [(2 * width, 14, 14)] * 3 + [(4 * width, 7, 7)] * 3
    assert em.exit_shapes((1, 28, 28)) == want


def test_exit_shapes_leave_a_training_model_untouched() -> None:
    model = build_model("resnet20", 10, 1, {"width": 4}).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_exit_model(model, "every").exit_shapes((1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Selection


NAMES = [f"u{i}" for i in range(7)]


def test_every_half_quartiles() -> None:
    model = nn.Sequential(*(nn.Identity() for _ in range(9)))
    assert select_exits(NAMES, "every", model) == NAMES
    assert select_exits(NAMES, "half", model) == ["u1", "u3", "u5"]
    # With 7 candidates the quartiles are exactly the 2nd, 4th and 6th.
    assert select_exits(NAMES, "quartiles", model) == ["u1", "u3", "u5"]
    # With 3 candidates, each quartile is one of them.
    assert select_exits(NAMES[:3], "quartiles", model) == NAMES[:3]


def test_quartiles_on_a_real_model_are_ordered_and_distinct() -> None:
    model = build_model("resnet20", 10, 1, {"width": 4})
    _, candidates = candidate_exits(model)
    chosen = build_exit_model(model, "quartiles").exits
    positions = [candidates.index(n) for n in chosen]
    assert len(chosen) == 3 and positions == sorted(set(positions))


def test_explicit_names() -> None:
    model = build_model("resnet20", 10, 1, {"width": 4})
    em = build_exit_model(model, " layer1.1 , layer3.0,")
    assert em.exits == ["layer1.1", "layer3.0"]
    assert len(em.stages) == 3


@pytest.mark.parametrize("selection", [
    "nonsense",  # unknown
    "head",
    "layer1.0.conv1",  # a module inside a unit: cannot be a cut in split mode
    "stem,stem",  # twice
    "layer2.0,layer1.0",  # out of order
    "",  # nothing
    " , ",
])
def test_bad_selections(selection: str) -> None:
    model = build_model("resnet20", 10, 1, {"width": 4})
    with pytest.raises(UsageError):
        build_exit_model(model, selection)


# ---------------------------------------------------------------------------------------------
# Hook mode


@torch.no_grad()
def test_hook_mode_features_equal_a_manual_forward() -> None:
    torch.manual_seed(0)
    model = Branchy()
    randomise_bn(model)
    model.eval()
    assert chain_units(model) is None
    em = build_exit_model(model, "every")
    assert em.mode == HOOK and em.stages is None
    assert em.exits == ["a", "b", "relu"]
    x = torch.randn(3, 3, 10, 10)
    outs, logits = em.features(x)
    a_out = model.a[1](model.a[0](x))
    b_out = model.b(x)
    want_logits = model.head(torch.relu(a_out).mean((2, 3)) + b_out.amax((2, 3)))
    assert torch.allclose(outs[0], a_out, atol=1e-6)  # before the in-place ReLU
    assert torch.allclose(outs[1], b_out, atol=1e-6)
    assert torch.allclose(outs[2], torch.relu(a_out), atol=1e-6)
    assert torch.allclose(logits, want_logits, atol=1e-6)
    assert torch.allclose(logits, model(x), atol=1e-6)
    assert em.exit_shapes((3, 10, 10)) == [(4, 10, 10), (4, 5, 5), (4, 10, 10)]


@torch.no_grad()
def test_hook_mode_takes_any_module_and_refuses_unknown_names() -> None:
    model = Branchy().eval()
    em = build_exit_model(model, "a.0,b")
    x = torch.randn(2, 3, 6, 6)
    outs, _ = em.features(x)
    assert torch.allclose(outs[0], model.a[0](x), atol=1e-6)
    with pytest.raises(UsageError):
        build_exit_model(model, "a,c")
    with pytest.raises(UsageError):
        build_exit_model(model, "a,a")


@torch.no_grad()
def test_split_features_are_not_overwritten_by_in_place_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(1),
                          nn.Linear(4 * 6 * 6, 3))
    randomise_bn(model)
    model.eval()
    em = build_exit_model(model, "1")
    x = torch.randn(2, 3, 8, 8)
    outs, logits = em.features(x)
    bn_out = model[1](model[0](x))
    assert (bn_out < 0).any()  # otherwise the ReLU would not show
    assert torch.allclose(outs[0], bn_out, atol=1e-6)
    assert torch.allclose(logits, model(x), atol=1e-6)
