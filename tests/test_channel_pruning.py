"""Channel pruning (classification.channel_pruning): a smaller dense network whose exits still fit their heads."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from eetool.classification.channel_pruning import PIP_HINT, check_savable, prune_channels, pruned_spec
from eetool.classification.exit_heads import ExitHeads, HeadsSpec, load_heads, save_heads
from eetool.core.artifacts import Provenance
from eetool.core.builders import build_model
from eetool.core.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from eetool.core.costs import count_macs, measure
from eetool.core.errors import ModelMismatchError, UsageError
from eetool.core.exits import SPLIT, build_exit_model

pytest.importorskip("torch_pruning")

SHAPE = (1, 28, 28)
SPEC = ModelSpec(arch="resnet20", num_classes=10, input_shape=SHAPE, mean=[0.3], std=[0.35],
                 arch_args={"width": 8})


def random_state(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm statistics and affine terms, so that every tensor of the state matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("pool.mix"):
                p.copy_(torch.randn(1, generator=gen))
    return model.eval()


def make_heads(model: nn.Module, kind: str = "sdn", with_distances: bool = False, selection: str = "every"
               ) -> ExitHeads:
    exit_model = build_exit_model(model, selection)
    shapes = exit_model.exit_shapes(SHAPE)
    torch.manual_seed(1)
    spec = HeadsSpec(kind=kind, exits=exit_model.exits, in_shapes=[list(s) for s in shapes], num_classes=10,
                     with_distances=with_distances)
    return random_state(ExitHeads(spec), 2)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def dense() -> nn.Module:
    torch.manual_seed(0)
    return random_state(SPEC.build(), 0)


@pytest.fixture(scope="module")
def halved(dense: nn.Module):  # type: ignore[no-untyped-def]
    heads = make_heads(dense)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    result = prune_channels(dense, SHAPE, target_macs=0.5, heads=heads)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items()), "the dense model was changed"
    return heads, result


def test_macs_reach_the_target_from_below(halved, dense) -> None:  # type: ignore[no-untyped-def]
    _, result = halved
    assert result.dense_macs == count_macs(dense, SHAPE)
    assert result.pruned_macs == count_macs(result.model, SHAPE)
    # At or under the target; one step of 2% of every layer's channels (one channel of an 8-channel stage is
    # 12.5%) costs at most about a quarter of the MACs it had, so the result is not far under it.
    assert 0.38 * result.dense_macs <= result.pruned_macs <= 0.5 * result.dense_macs
    assert sum(p.numel() for p in result.model.parameters()) < 0.6 * sum(p.numel() for p in dense.parameters())


def test_exits_stay_where_they_were_and_fit_the_rebuilt_heads(halved, dense) -> None:  # type: ignore[no-untyped-def]
    heads, result = halved
    before, after = build_exit_model(dense, "every"), build_exit_model(result.model, "every")
    assert after.mode == before.mode == SPLIT and after.exits == before.exits == heads.spec.exits
    # The costs of the stages still add up to the whole model: exits still stop computation.
    assert measure(after, SHAPE).model_macs == result.pruned_macs
    shapes = after.exit_shapes(SHAPE)
    assert [list(s) for s in shapes] == result.heads.spec.in_shapes
    assert [s[0] for s in shapes] != [s[0] for s in before.exit_shapes(SHAPE)]  # channels really went
    features, logits = after.features(torch.randn(5, *SHAPE))
    assert logits.shape == (5, 10)
    assert [tuple(o.shape) for o in result.heads(features)] == [(5, 10)] * len(shapes)


def test_save_and_load_rebuild_the_pruned_network_exactly(halved, tmp_path) -> None:  # type: ignore[no-untyped-def]
    heads, result = halved
    spec = pruned_spec(SPEC, result.model)
    assert "width" not in spec.arch_args and len(spec.arch_args["block_widths"]) == 3
    path, heads_path = str(tmp_path / "pruned.safetensors"), str(tmp_path / "heads.safetensors")
    save_checkpoint(path, result.model, spec, Provenance(kind="checkpoint", args={"made_by": "tests"}))
    save_heads(heads_path, result.heads, Provenance(kind="exit-heads", exits=heads.spec.exits))
    loaded = load_checkpoint(path)
    loaded_heads, _ = load_heads(heads_path)
    assert loaded.spec.arch_args == spec.arch_args
    x = torch.randn(6, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), result.model(x))
        features, _ = build_exit_model(loaded.model, ",".join(heads.spec.exits)).features(x)
        original, _ = build_exit_model(result.model, ",".join(heads.spec.exits)).features(x)
        for a, b in zip(loaded_heads(features), result.heads(original), strict=True):
            assert torch.equal(a, b)


def zero_odd_channels(model: nn.Module) -> None:
    """Make every odd channel of every layer dead (no weights in or out, batch norm output 0): pruning half of
    each layer's channels by their L1 norm must remove exactly those, and change no output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if m.weight.shape[1] > 1:
                    m.weight[:, 1::2] = 0
                if not (isinstance(m, nn.Linear) and m.out_features == 10):  # the classes stay
                    m.weight[1::2] = 0
            elif isinstance(m, nn.BatchNorm2d):
                m.weight[1::2] = 0
                m.bias[1::2] = 0


@pytest.mark.parametrize(("kind", "with_distances"), [("sdn", True), ("branchy", False)])
def test_pruning_dead_channels_changes_no_output_of_the_model_or_its_heads(dense, kind, with_distances) -> None:  # type: ignore[no-untyped-def]
    import copy

    model = copy.deepcopy(dense)
    zero_odd_channels(model)
    heads = make_heads(model, kind, with_distances, "quartiles")
    for head in heads.heads:
        if kind == "branchy":
            zero_odd_channels(head.branch)
    result = prune_channels(model, SHAPE, channel_ratio=0.5, heads=heads)
    exits = ",".join(heads.spec.exits)
    x = torch.randn(4, *SHAPE)
    distances = [torch.rand(4, 10) for _ in heads.spec.exits] if with_distances else None
    with torch.no_grad():
        features, logits = build_exit_model(model, exits).features(x)
        pruned_features, pruned_logits = build_exit_model(result.model, exits).features(x)
        torch.testing.assert_close(pruned_logits, logits, rtol=1e-4, atol=1e-5)
        for f, g in zip(features, pruned_features, strict=True):
            assert g.shape[1] == f.shape[1] // 2
            torch.testing.assert_close(g, f[:, 0::2], rtol=1e-4, atol=1e-5)
        for a, b in zip(result.heads(pruned_features, distances), heads(features, distances), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_layer_torch_pruning_has_no_rule_for_is_named() -> None:
    class Scale(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(channels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain.view(1, -1, 1, 1)

    model = nn.Sequential(nn.Conv2d(1, 8, 3), Scale(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 10))
    with pytest.raises(UsageError, match=r"layer '1' \(Scale\)") as err:
        prune_channels(model, SHAPE, channel_ratio=0.5)
    assert "\n" not in str(err.value)


def test_a_missing_torch_pruning_names_the_pip_command(dense, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # what an uninstalled package raises on import
    with pytest.raises(UsageError) as err:
        prune_channels(dense, SHAPE, target_macs=0.5)
    assert PIP_HINT in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [{}, {"target_macs": 0.5, "channel_ratio": 0.5}, {"target_macs": 1.0},
                                    {"channel_ratio": 0.0}, {"target_macs": float("nan")},
                                    {"channel_ratio": 0.5, "round_to": 0}])
def test_targets_outside_the_open_unit_interval_are_refused(dense, kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError):
        prune_channels(dense, SHAPE, **kwargs)


def test_heads_made_for_another_model_are_refused(dense) -> None:  # type: ignore[no-untyped-def]
    other = build_model("resnet20", 10, 1, {"width": 4})
    with pytest.raises(UsageError, match="heads"):
        prune_channels(dense, SHAPE, channel_ratio=0.5, heads=make_heads(other))


def test_only_cifar_resnets_can_be_saved_pruned() -> None:
    check_savable(SPEC)
    with pytest.raises(ModelMismatchError, match="resnet18"):
        check_savable(ModelSpec(arch="resnet18", num_classes=10, input_shape=(3, 32, 32), mean=[0.5], std=[0.5]))


def test_stage_widths_of_the_standard_widths_build_the_standard_resnet() -> None:
    torch.manual_seed(0)
    standard = build_model("resnet20", 10, 1, {"width": 8})
    torch.manual_seed(0)
    explicit = build_model("resnet20", 10, 1, {"stage_widths": [8, 16, 32], "block_widths": [[8] * 3, [16] * 3,
                                                                                             [32] * 3]})
    a, b = standard.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch_args", [
    {"width": 8, "stage_widths": [8, 16, 32]},
    {"stage_widths": [8, 16]},
    {"stage_widths": [8, 16, 10**9]},
    {"stage_widths": [8, 16, True]},
    {"block_widths": [[8] * 3, [16] * 3]},
    {"block_widths": [[8] * 3, [16] * 3, [32] * 4]},
    {"block_widths": [[8] * 3, [16] * 3, [32, 32, 0]]},
    {"block_widths": "wide"},
])
def test_bad_pruned_widths_are_refused_before_anything_is_built(arch_args) -> None:  # type: ignore[no-untyped-def]
    with torch.device("meta"), pytest.raises(UsageError, match="width"):
        build_model("resnet20", 10, 1, arch_args)


def test_batch_norm_recalibration_averages_the_batches_it_sees() -> None:
    from eetool.classification.channel_pruning import recalibrate_batch_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(4, *SHAPE) + k for k in range(3)]
    with torch.no_grad():
        outputs = torch.cat([model[0](x) for x in batches])
    recalibrate_batch_norm(model, batches)
    norm = model[1]
    assert not model.training and norm.momentum == 0.1
    torch.testing.assert_close(norm.running_mean, outputs.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
