"""torchvision's segmentation networks as checkpoints: building all four (on the meta device), loading a
torchvision state dict as it is, the exit heads, the pixel-level early exit (exited pixels keep their exit's
logits; both costs follow from where the pixels left) and `train-exits`, `fit-thresholds`, `evaluate` end to end
on LR-ASPP (the smallest) at 32 x 32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import invoke, ok, one_error_line
from safetensors.torch import save_file

from eetool.core.architectures import TORCHVISION_SEGMENTATION_ARCHS, ModelOptions
from eetool.core.builders import build_model
from eetool.segmentation.networks import early_exit_forward, first_exit_macs, plain_macs
from eetool.segmentation.tv import TorchvisionSegNet, dense_costs

ARCH = "lraspp_mobilenet_v3_large"
SHAPE = (3, 32, 32)


@pytest.mark.parametrize("arch", TORCHVISION_SEGMENTATION_ARCHS)
def test_every_architecture_builds_with_three_exit_heads(arch: str) -> None:
    with torch.device("meta"):
        net = build_model(arch, 5, 1, {"exits": True, "head_width": 8})
    assert isinstance(net, TorchvisionSegNet) and net.exit_heads is not None and len(net.exit_heads) == 3
    assert len(net.stage_names) == 4 and all(net.stage_names)
    assert next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 1
    assert all(k.startswith(("backbone.", "classifier.", "aux_classifier.", "exit_heads."))
               for k in net.state_dict())


@pytest.fixture(scope="module")
def network() -> TorchvisionSegNet:
    torch.manual_seed(0)
    net = build_model(ARCH, 4, 3, {"exits": True, "head_width": 8})
    assert isinstance(net, TorchvisionSegNet)
    return net.eval()


def test_inference_runs_a_channels_last_copy_that_leaves_the_network_as_it_is(network: TorchvisionSegNet) -> None:
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    state = {k: v.clone() for k, v in network.state_dict().items()}
    reference = network(x).detach()  # with gradients: the network itself, NCHW
    assert not reference.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        copy = network.inference_net()
        assert copy is not network and copy.channels_last and network.inference_net() is copy  # made once
        out = network(x)
        exits = network.forward_exits(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out - reference).abs().max() < 1e-4  # float32 rounding of another summation order (about 1e-6)
    with torch.enable_grad():
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(exits, network.forward_exits(x), strict=True))
    after = network.state_dict()
    assert all(torch.equal(after[k], v) and after[k].is_contiguous() for k, v in state.items())
    with torch.no_grad():
        network.classifier.low_classifier.weight.mul_(2)  # an in-place change: the copy is remade
        try:
            assert network.inference_net() is not copy
            with torch.enable_grad():
                changed = network(x).detach()
            assert (network(x) - changed).abs().max() < 1e-4 and (changed - reference).abs().max() > 1e-3
        finally:
            network.classifier.low_classifier.weight.div_(2)


def test_a_torchvision_state_dict_loads_as_it_is(tmp_path: Path) -> None:
    from torchvision.models import segmentation

    from eetool.core.checkpoint import load_checkpoint

    torch.manual_seed(1)
    tv = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=6).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    ckpt = load_checkpoint(str(tmp_path / "tv.pt"), ModelOptions(arch=ARCH, input_shape=SHAPE))
    assert ckpt.spec.num_classes == 6  # read from the classifier's weights
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(ckpt.model.eval()(x), tv(x)["out"], atol=1e-5)


def test_thresholds_of_one_and_zero_give_the_plain_network_and_the_first_exit(network: TorchvisionSegNet) -> None:
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = network.forward_exits(x)
        assert torch.allclose(outs[-1], network(x), atol=1e-5)
    kept = early_exit_forward(network, x, torch.ones(3, 4))
    assert torch.allclose(kept.logits, outs[-1], atol=1e-5) and bool((kept.exit_index == 3).all())
    assert kept.macs == kept.executed_macs == 3 * (plain_macs(network, SHAPE) + sum(dense_costs(network,
                                                                                                  SHAPE).heads))
    left = early_exit_forward(network, x, torch.zeros(3, 4))
    assert torch.allclose(left.logits, outs[0], atol=1e-5) and bool((left.exit_index == 0).all())
    assert left.macs == left.executed_macs == 3 * first_exit_macs(network, SHAPE)


def test_exited_pixels_keep_their_exit_and_the_costs_follow_where_pixels_left(network: TorchvisionSegNet) -> None:
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    x[0] *= 0  # an image unlike the others, so that images' pixels leave at different stages
    with torch.no_grad():
        outs = network.forward_exits(x)
    confidences = [o.softmax(1).amax(1) for o in outs[:3]]
    # about half the pixels still present leave at each early exit
    thresholds = torch.stack([c.median().expand(4) for c in confidences])
    result = early_exit_forward(network, x, thresholds)
    shares = torch.bincount(result.exit_index.flatten().long(), minlength=4)
    assert int(shares[0]) > 0 and int(shares[1:].sum()) > 0
    # the first exit runs dense: its pixels hold its logits (later exits read masked features, tested below)
    where = result.exit_index == 0
    assert torch.allclose(result.logits.permute(0, 2, 3, 1)[where], outs[0].permute(0, 2, 3, 1)[where], atol=1e-4)
    costs = dense_costs(network, SHAPE)
    parts = [s + h for s, h in zip(costs.stages, [*costs.heads, 0], strict=True)]
    analytic = sum(float((image >= s).float().mean()) * part for image in result.exit_index
                   for s, part in enumerate(parts))  # each part times the share of pixels not left before it
    assert result.executed_macs is not None
    assert result.macs == round(analytic) and result.macs < result.executed_macs < 4 * sum(parts)
    # the anytime view: stopped after exit n, a pixel that left before holds the class it left with
    final = result.logits.argmax(1)
    assert torch.equal(result.exit_predictions[0], outs[0].argmax(1))
    for n in range(4):
        left = result.exit_index < n
        assert torch.equal(result.exit_predictions[n][left], final[left])
        spent = sum(float((image >= s).float().mean()) * parts[s] for image in result.exit_index for s in range(n + 1))
        assert abs(result.exit_macs[n] - spent) <= 1
    assert result.exit_macs[-1] == result.macs


def write_squares(path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    masks = torch.zeros(8, 32, 32, dtype=torch.uint8)
    for i in range(8):
        y, x = torch.randint(0, 20, (2,), generator=gen).tolist()
        images[i, :, y:y + 12, x:x + 12] = 200
        masks[i, y:y + 12, x:x + 12] = 1
        images[i, :, :, 28:] = 90
        masks[i, :, 28:] = 2
    save_file({"images": images, "masks": masks}, str(path), metadata={"classes": "bg\nsquare\nbar"})


def test_train_exits_fit_thresholds_and_evaluate_on_a_torchvision_network(tmp_path: Path) -> None:
    from torchvision.models import segmentation

    write_squares(tmp_path / "seg.safetensors")
    data = f"segmentation:{tmp_path / 'seg.safetensors'}"
    torch.manual_seed(0)
    tv = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    foreign = ["-c", tmp_path / "tv.pt", "--arch", ARCH, "--input-shape", "3,32,32"]
    out = tmp_path / "exits.safetensors"
    one_error_line(invoke("fit-thresholds", "--method", "adp-c", *foreign, "-o", tmp_path / "t.yaml"), 4)
    one_error_line(invoke("train-exits", *foreign, "-d", data, "-o", out, "--joint"), 2)
    trained = json.loads(ok(invoke("train-exits", *foreign, "-d", data, "-o", out, "--epochs", "1",
                                   "--batch-size", "4", "--format", "json", "-q")).stdout)
    assert [r["exit"] for r in trained["exits"]] == ["exit1", "exit2", "exit3", "final"]
    assert 0 < trained["exits"][0]["cost_normalised"] < trained["exits"][2]["cost_normalised"] < 1
    ok(invoke("fit-thresholds", "--method", "cbt", "-c", out, "-d", data, "--split", "train", "-o",
              tmp_path / "cbt.yaml", "--alpha", "0.5", "--beta", "0.9", "-q"))
    doc = json.loads(ok(invoke("evaluate", "-c", out, "-d", data, "--split", "train", "--thresholds",
                               tmp_path / "cbt.yaml", "--repeats", "1", "--format", "json", "-q")).stdout)
    plain, cbt = doc["points"]
    assert plain["cost"] == 1.0 and "executed_cost" not in plain
    assert 0 < cbt["cost"] <= cbt["executed_cost"]
    assert sum(cbt["exit_shares"].values()) == pytest.approx(1.0, abs=1e-5)
    # the feature-level rule, from fit-thresholds to evaluate, as for eeseg
    ok(invoke("fit-thresholds", "--method", "cbt", "-c", out, "-d", data, "--split", "train", "-o",
              tmp_path / "feature.yaml", "--alpha", "0.5", "--beta", "0.9", "--decide-at", "feature", "-q"))
    doc = json.loads(ok(invoke("evaluate", "-c", out, "-d", data, "--split", "train", "--thresholds",
                               tmp_path / "feature.yaml", "--repeats", "1", "--format", "json", "-q")).stdout)
    feature = doc["points"][1]
    assert feature["decide_at"] == "feature" and 0 < feature["cost"] <= feature["executed_cost"]
    assert sum(feature["exit_shares"].values()) == pytest.approx(1.0, abs=1e-5)


def test_train_exits_refuses_data_of_more_classes_than_the_network(tmp_path: Path) -> None:
    """Masks whose labels all fit (0..2) but whose file names four classes: not the data this network was made for."""
    from safetensors.torch import load_file
    from torchvision.models import segmentation

    write_squares(tmp_path / "three.safetensors")
    save_file(load_file(tmp_path / "three.safetensors"), str(tmp_path / "four.safetensors"),
              metadata={"classes": "bg\nsquare\nbar\ncircle"})
    tv = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    data = f"segmentation:{tmp_path / 'four.safetensors'}"
    line = one_error_line(invoke("train-exits", "-c", tmp_path / "tv.pt", "--arch", ARCH, "--input-shape", "3,32,32",
                                 "-d", data, "-o", tmp_path / "e.safetensors", "--epochs", "1"), 4)
    assert "has 4 classes but the model has 3" in line
    assert not (tmp_path / "e.safetensors").exists()


def test_train_without_exit_heads_trains_the_final_exit_alone() -> None:
    import torch.nn.functional as F

    from eetool.segmentation.exit_losses import exit_losses_step

    torch.manual_seed(4)
    net = build_model(ARCH, 4, 3, {})
    x, y = torch.randn(2, *SHAPE), torch.randint(0, 4, (2, 32, 32))
    loss, logits = exit_losses_step()(net.train(), x, y, None)
    net.eval()
    assert torch.allclose(loss, F.cross_entropy(logits, y), atol=1e-6)


def test_the_frozen_backbone_step_trains_the_heads_alone(network: TorchvisionSegNet) -> None:
    from eetool.segmentation.pixel_head_training import frozen_backbone_step

    network.zero_grad()
    before = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith("exit_heads.")}
    network.train()  # as `fit` leaves it: the step itself keeps the backbone's BatchNorm statistics
    x, y = torch.randn(2, *SHAPE), torch.randint(0, 4, (2, 32, 32))
    loss, _ = frozen_backbone_step(network, x, y, None)
    loss.backward()
    network.eval()
    assert all(p.grad is None for n, p in network.named_parameters() if not n.startswith("exit_heads."))
    assert all(p.grad is not None for p in network.require_exits().parameters())
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------
# Masked execution of the torchvision networks after the first exit


@pytest.fixture(scope="module", params=TORCHVISION_SEGMENTATION_ARCHS)
def tv_net(request: pytest.FixtureRequest) -> TorchvisionSegNet:
    """Each torchvision network, its BatchNorm statistics away from the identity so that skipping one would
    show."""
    torch.manual_seed(5)
    net = build_model(request.param, 4, 3, {"exits": True, "head_width": 8})
    assert isinstance(net, TorchvisionSegNet)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)  # type: ignore[union-attr]
            m.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    return net.eval()


MASKED_SHAPE = (3, 48, 48)  # a 6 x 6 grid after layer1's stride 8 (MobileNetV3: 6 x 6 after block 6, then 3 x 3)


def test_the_inference_copy_folds_every_batch_norm_the_passes_run_and_computes_the_same_logits(
        tv_net: TorchvisionSegNet) -> None:
    x = torch.randn(2, *MASKED_SHAPE, generator=torch.Generator().manual_seed(8))
    unfolded = tv_net.forward_exits(x)  # with gradients: the network itself
    with torch.no_grad():
        folded = tv_net.forward_exits(x)
        copy = tv_net.inference_net()
    run = [*copy.backbone.values(), copy.classifier, *(copy.exit_heads or [])]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for region in run for m in region.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tv_net.modules())  # the network keeps its own
    for a, b in zip(folded, unfolded, strict=True):
        assert float((a - b.detach()).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-5


def half_leaving(net: TorchvisionSegNet, x: torch.Tensor) -> torch.Tensor:
    """Thresholds that let about half the pixels still present leave at each early exit."""
    with torch.no_grad():
        outs = net.forward_exits(x)
    return torch.stack([o.softmax(1).amax(1).median().expand(net.num_classes) for o in outs[:3]])


def test_a_masked_network_where_nobody_leaves_is_the_dense_network(tv_net: TorchvisionSegNet) -> None:
    from eetool.segmentation import tv_masked

    x = torch.randn(2, *MASKED_SHAPE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = tv_net(x)
    for dense_above in (1.0, float("inf")):  # whole blocks dense once all is active, or gathered rows always
        result = tv_masked.early_exit_forward(tv_net, x, torch.full((3, 4), 2.0), dense_above=dense_above)
        assert bool((result.exit_index == 3).all())
        assert float((result.logits - dense).abs().max()) <= 1e-4 * float(dense.abs().max()) + 1e-5
        assert result.macs == result.executed_macs == 2 * (plain_macs(tv_net, MASKED_SHAPE)
                                                           + sum(dense_costs(tv_net, MASKED_SHAPE).heads))


def test_a_masked_network_gives_the_same_result_gathered_or_dense_and_exited_pixels_never_change(
        tv_net: TorchvisionSegNet) -> None:
    from eetool.segmentation import tv_masked

    x = torch.randn(2, *MASKED_SHAPE, generator=torch.Generator().manual_seed(7))
    thresholds = half_leaving(tv_net, x)
    gathered = tv_masked.early_exit_forward(tv_net, x, thresholds, dense_above=float("inf"))
    dense = tv_masked.early_exit_forward(tv_net, x, thresholds, dense_above=0.0)
    assert torch.equal(gathered.exit_index, dense.exit_index)
    assert torch.allclose(gathered.logits, dense.logits, atol=1e-4)
    assert gathered.executed_macs is not None and dense.executed_macs is not None
    assert gathered.macs == dense.macs and gathered.executed_macs < dense.executed_macs
    # what happens after the first exit (the others leaving at the second, or nobody before the end) does not
    # touch the pixels that left at the first
    stay = thresholds.clone()
    stay[1:] = 2.0
    later = tv_masked.early_exit_forward(tv_net, x, stay, dense_above=float("inf"))
    left = gathered.exit_index == 0
    assert torch.equal(left, later.exit_index == 0) and 0.2 < float(left.float().mean()) < 0.8
    assert torch.equal(gathered.logits.permute(0, 2, 3, 1)[left], later.logits.permute(0, 2, 3, 1)[left])


def reads(active: torch.Tensor, conv: torch.nn.Conv2d, in_hw: tuple[int, int]) -> torch.Tensor:
    """The input positions ``conv`` reads for its ``active`` outputs: a transposed convolution of ones."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]  # type: ignore[index]
    reach = (active.shape[-1] - 1) * s - 2 * p + d * (k - 1) + 1
    spread = torch.nn.functional.conv_transpose2d(active[:, None].float(), torch.ones(1, 1, k, k), stride=s,
                                                  padding=p, dilation=d, output_padding=in_hw[-1] - reach)
    return spread[:, 0] > 0


def per_position(conv: torch.nn.Conv2d) -> int:
    return conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups


@pytest.mark.parametrize("tv_net", ["fcn_resnet50"], indirect=True)  # the count below follows FCN's classifier
def test_a_masked_fcn_computes_the_active_positions_only(tv_net: TorchvisionSegNet) -> None:
    from eetool.segmentation import tv_masked

    x = torch.randn(2, *MASKED_SHAPE, generator=torch.Generator().manual_seed(8))
    result = tv_masked.early_exit_forward(tv_net, x, half_leaving(tv_net, x), dense_above=float("inf"))
    costs = dense_costs(tv_net, MASKED_SHAPE)
    heads = tv_net.require_exits()
    expected = 2 * (costs.stages[0] + costs.heads[0])
    hw = (12, 12)  # layer1's grid
    for n, layer in enumerate(("layer2", "layer3", "layer4"), start=1):
        pixels = result.exit_index >= n  # not left before stage n
        active = torch.nn.functional.max_pool2d(pixels[:, None].float(), 8, 8)[:, 0] > 0  # the 6 x 6 grid
        for block in tv_net.backbone[layer]:
            expected += int(reads(active, block.conv2, hw).sum()) * per_position(block.conv1)
            expected += int(active.sum()) * (per_position(block.conv2) + per_position(block.conv3) + (
                0 if block.downsample is None else per_position(block.downsample[0])))
            hw = (6, 6)
        if n < 3:
            expected += int(active.sum()) * (per_position(heads[n].conv1) + per_position(heads[n].conv2))
        else:
            expected += int(active.sum()) * (per_position(tv_net.classifier[0]) + per_position(tv_net.classifier[4]))
    assert result.executed_macs == expected
    # the analytic cost: each part's multiply-adds times the share of its image's pixels still active
    parts = [s + h for s, h in zip(costs.stages, [*costs.heads, 0], strict=True)]
    analytic = sum(float((image >= s).float().mean()) * part for image in result.exit_index
                   for s, part in enumerate(parts))
    assert result.macs == pytest.approx(analytic, rel=1e-7)  # summed in another order
    assert result.macs < result.executed_macs < 2 * sum(parts)


@pytest.mark.parametrize("name", ["4", "5", "13"])  # strided and changing channels; a residual; dilated
def test_a_masked_inverted_residual_computes_the_active_positions_only(name: str) -> None:
    from torchvision.models.mobilenetv3 import InvertedResidual

    from eetool.segmentation import tv_masked
    from eetool.segmentation.masked import FeatureMap

    torch.manual_seed(9)
    net = build_model("lraspp_mobilenet_v3_large", 4, 3, {})
    assert isinstance(net, TorchvisionSegNet)
    block = net.backbone[name].eval()
    assert isinstance(block, InvertedResidual)
    expand, depthwise, squeeze, project = block.block  # all three blocks expand and squeeze-excite
    conv = depthwise[0]
    src = torch.randn(2, expand[0].in_channels, 12, 12, generator=torch.Generator().manual_seed(10))
    out_hw = (12 // conv.stride[0], 12 // conv.stride[1])
    active = torch.rand(2, *out_hw, generator=torch.Generator().manual_seed(11)) < 0.4
    active[1] = False  # an image with nothing active: no squeeze-excitation either
    with torch.no_grad():
        gathered, spent = tv_masked.inverted_residual(block, FeatureMap.of(src), active, float("inf"))
        dense, _ = tv_masked.inverted_residual(block, FeatureMap.of(src), active, 0.0)
        whole, _ = tv_masked.inverted_residual(block, FeatureMap.of(src), torch.ones_like(active), float("inf"))
        expected_whole = block(src)
    assert int(active.sum()) > 4
    expected = int(reads(active, conv, (12, 12)).sum()) * per_position(expand[0])
    expected += int(active.sum()) * (per_position(conv) + per_position(project[0]))
    expected += 1 * (per_position(squeeze.fc1) + per_position(squeeze.fc2))  # once, for the one active image
    assert spent == expected
    # the same result gathered or dense; inactive positions keep their features (zero where the shape changes)
    assert torch.allclose(gathered.nchw(), dense.nchw(), atol=1e-5)
    kept = src if block.use_res_connect else torch.zeros_like(gathered.nchw())
    assert torch.equal(gathered.nchw().permute(0, 2, 3, 1)[~active], kept.permute(0, 2, 3, 1)[~active])
    # every position active: torchvision's block, squeeze-excitation pooling the whole map
    assert torch.allclose(whole.nchw(), expected_whole, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The feature-level rule on grids of different strides (``decide_at="feature"``, ``StridedGridExits``)


def strided_feature_exits_by_definition(grids: list[torch.Tensor], thresholds: torch.Tensor,
                                        size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                        list[torch.Tensor]]:
    """The rule on every exit's full grid (B x h x w x K each, the first the finest): a cell (a position of the first
    grid) leaves at the first early exit where the position covering it was computed (it covers a cell still
    active) and passes its predicted class's threshold; exit n's grid holds its logits where computed and the
    previous exit's grid resampled elsewhere. A pixel that reached the final exit takes its grid upsampled; one that
    left early, the grid of the cells upsampled, each cell holding its exit's grid resampled to the cells. The
    anytime map after early exit n: the same grid of cells with the cells still active at exit n taking exit n's."""
    last = len(grids) - 1
    batch, h0, w0 = grids[0].shape[:3]
    exit_cell = torch.full((batch, h0, w0), last)
    kept: list[torch.Tensor] = []
    for n, g in enumerate(grids):
        ratio = h0 // g.shape[1]
        active = (exit_cell == last).view(batch, g.shape[1], ratio, g.shape[2], ratio).any(4).any(2)
        if n == 0:
            kept.append(g)
        else:
            resampled = F.interpolate(kept[-1].permute(0, 3, 1, 2), g.shape[1:3], mode="bilinear",
                                      align_corners=False).permute(0, 2, 3, 1)
            kept.append(torch.where(active[..., None], g, resampled))
        if n < last:
            confidence, prediction = g.softmax(-1).max(-1)
            passes = active & (confidence > thresholds[n][prediction])
            cells = passes.repeat_interleave(ratio, 1).repeat_interleave(ratio, 2)
            exit_cell = torch.where(cells & (exit_cell == last), n, exit_cell)

    def up(grid: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(grid.permute(0, 3, 1, 2), hw, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)

    on_cells = torch.stack([up(k, (h0, w0)) for k in kept])  # exits x B x h0 x w0 x K

    def cells_image(exits: torch.Tensor) -> torch.Tensor:
        cells = on_cells.gather(0, exits[None, ..., None].expand(1, *on_cells.shape[1:]))[0]
        return up(cells, size).permute(0, 3, 1, 2)

    stride = size[0] // h0
    exit_index = exit_cell.repeat_interleave(stride, 1).repeat_interleave(stride, 2)
    final = up(kept[-1], size).permute(0, 3, 1, 2)
    logits = torch.where((exit_index == last)[:, None], final, cells_image(exit_cell))
    anytime = [cells_image(exit_cell.clamp(max=n)).argmax(1) for n in range(last)] + [logits.argmax(1)]
    return logits, exit_index, anytime


@pytest.mark.parametrize(("strides", "shares"), [((1, 2, 4, 2), (0.5, 0.5, 0.5)),  # LR-ASPP's 4, 8, 16 and 8
                                                 ((1, 2, 2, 2), (0.3, 0.4, 0.6)),  # the ResNets' 4, 8, 8 and 8
                                                 ((1, 2, 4, 4), (0.0, 0.6, 1.0))])  # none, then all
def test_strided_grid_exits_match_the_feature_rule_recomputed_directly(strides: tuple[int, ...],
                                                                       shares: tuple[float, ...]) -> None:
    from test_segmentation_feature_exits import thresholds_between

    from eetool.segmentation.masked import cover, positions
    from eetool.segmentation.tv_masked import StridedGridExits

    gen = torch.Generator().manual_seed(12)
    cells, size = (8, 8), (32, 32)
    grids = [3 * torch.randn(3, 8 // s, 8 // s, 5, generator=gen) for s in strides]
    thresholds = thresholds_between(grids, shares)
    exits = StridedGridExits(3, cells, size, 3, torch.device("cpu"))
    grid = grids[0]
    for n, g in enumerate(grids):  # as the network's loop builds each exit's grid
        at = None
        if n > 0:
            computed = cover(exits.pixels, tuple(g.shape[1:3]))
            at = positions(computed)
            grid = F.interpolate(grid.permute(0, 3, 1, 2), g.shape[1:3], mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1).contiguous()
            grid.view(-1, 5)[at] = g.reshape(-1, 5)[at]
        if not exits.take(grid, thresholds[n] if n < 3 else None, at):
            break
    logits, exit_index, anytime = strided_feature_exits_by_definition(grids, thresholds, size)
    assert torch.equal(exits.exit_index().long(), exit_index)
    assert torch.equal(exits.pixels, exit_index == 3)
    final = exits.logits()
    assert torch.allclose(final, logits, atol=1e-5)
    predictions = exits.predictions(final.argmax(1))()
    assert all(torch.equal(p, q) for p, q in zip(predictions, anytime, strict=True))
    if shares[0] == 0:  # nobody at the first exit, everybody left by the third
        assert bool((exit_index > 0).all()) and bool((exit_index < 3).all())
    else:
        assert len(set(exit_index.flatten().tolist())) == 4  # cells leave at every exit


def test_feature_rule_nobody_leaving_is_the_dense_network_everybody_the_first_exit(
        tv_net: TorchvisionSegNet) -> None:
    from eetool.segmentation import tv_masked

    x = torch.randn(2, *MASKED_SHAPE, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        outs = tv_net.forward_exits(x)
    stay = tv_masked.early_exit_forward(tv_net, x, torch.full((3, 4), 2.0), decide_at="feature")
    assert bool((stay.exit_index == 3).all())
    assert float((stay.logits - outs[-1]).abs().max()) <= 1e-4 * float(outs[-1].abs().max()) + 1e-5
    assert torch.equal(stay.exit_predictions[-1], stay.logits.argmax(1))
    assert stay.macs == stay.executed_macs == 2 * (plain_macs(tv_net, MASKED_SHAPE)
                                                   + sum(dense_costs(tv_net, MASKED_SHAPE).heads))
    leave = tv_masked.early_exit_forward(tv_net, x, torch.zeros(3, 4), decide_at="feature")
    assert bool((leave.exit_index == 0).all()) and torch.allclose(leave.logits, outs[0], atol=1e-5)
    assert leave.macs == 2 * first_exit_macs(tv_net, MASKED_SHAPE) and leave.active_positions[1:] == [0, 0, 0]


def test_feature_rule_gathered_or_dense_is_the_same_and_cells_that_left_never_change(
        tv_net: TorchvisionSegNet) -> None:
    from eetool.segmentation import tv_masked

    x = torch.randn(2, *MASKED_SHAPE, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        first = tv_net.require_exits()[0](tv_net.run_stage(0, x, {})).softmax(1).amax(1)
    cut = float(first.median())  # about half the first exit's positions leave there
    thresholds = torch.tensor([[cut] * 4, [0.0] * 4, [0.0] * 4])
    gathered = tv_masked.early_exit_forward(tv_net, x, thresholds, dense_above=float("inf"), decide_at="feature")
    dense = tv_masked.early_exit_forward(tv_net, x, thresholds, dense_above=0.0, decide_at="feature")
    assert torch.equal(gathered.exit_index, dense.exit_index)
    assert torch.allclose(gathered.logits, dense.logits, atol=1e-4)
    assert gathered.macs == dense.macs and gathered.executed_macs is not None
    assert dense.executed_macs is not None and gathered.executed_macs < dense.executed_macs
    stay = thresholds.clone()
    stay[1:] = 2.0
    later = tv_masked.early_exit_forward(tv_net, x, stay, dense_above=float("inf"), decide_at="feature")
    left = gathered.exit_index == 0
    assert torch.equal(left, later.exit_index == 0) and 0.2 < float(left.float().mean()) < 0.8
    # a pixel reads the exit's grid positions within one of its own: where all of them left at the first exit,
    # what happens after it does not touch the pixel (the first exit's grid has stride 4 at this size)
    gone = (gathered.exit_index[:, ::4, ::4] == 0).float()
    settled = (-F.max_pool2d(-gone[:, None], 3, 1, 1)[:, 0] > 0).repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert int(settled.sum()) > 0
    assert torch.equal(gathered.logits.permute(0, 2, 3, 1)[settled], later.logits.permute(0, 2, 3, 1)[settled])
    # the analytic cost: each part's multiply-adds times the share of its image's pixels still active
    costs = dense_costs(tv_net, MASKED_SHAPE)
    parts = [s + h for s, h in zip(costs.stages, [*costs.heads, 0], strict=True)]
    analytic = sum(float((image >= s).float().mean()) * part for image in later.exit_index
                   for s, part in enumerate(parts))
    assert later.macs == pytest.approx(analytic, rel=1e-7)
