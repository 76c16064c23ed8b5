"""The feature-level exit rule (``decide_at="feature"``): its bookkeeping against the rule recomputed directly on
every exit's full grid, the network's guarantees under it (nobody leaving is the plain network, positions that left
never change, the cost counts what an independent count says), the gathered convolution in blocks against torch's,
and the rule carried from fit-thresholds to evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_segmentation import trained_like, write_mask_file
from typer.testing import CliRunner

from eetool.cli import app
from eetool.core.errors import ExitCode, UsageError
from eetool.segmentation import masked
from eetool.segmentation.masked import FeatureMap, conv_rows, tap_rows
from eetool.segmentation.model import (
    DILATIONS,
    EESegNet,
    GridExits,
    PositionCosts,
    early_exit_forward,
    neighbourhoods,
    pixel_grid,
)

runner = CliRunner()


def feature_exits_by_definition(grid_logits: list[torch.Tensor], thresholds: torch.Tensor, size: tuple[int, int]
                                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The feature-level rule on every exit's full grid: a position leaves at the first early exit whose softmax's
    largest probability passes its predicted class's threshold and keeps that exit's logits; the image is the
    upsampled grid of kept logits, a pixel's exit its position's; the anytime map after exit n upsamples the grid
    with exit n's logits at the positions that had not left before it."""
    last = len(grid_logits) - 1
    exit_grid = torch.full(grid_logits[0].shape[:3], last)
    for n in reversed(range(last)):
        confidence, prediction = grid_logits[n].softmax(-1).max(-1)
        exit_grid = torch.where(confidence > thresholds[n][prediction], n, exit_grid)
    stacked = torch.stack(grid_logits)  # exits x B x h x w x K
    kept = stacked.gather(0, exit_grid[None, ..., None].expand(1, *stacked.shape[1:]))[0]

    def up(grid: torch.Tensor) -> torch.Tensor:
        return F.interpolate(grid.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=False)

    stride = size[0] // exit_grid.shape[1]
    exit_index = exit_grid.repeat_interleave(stride, 1).repeat_interleave(stride, 2)
    anytime = [up(torch.where((exit_grid < n)[..., None], kept, g)).argmax(1) for n, g in enumerate(grid_logits)]
    return up(kept), exit_index, anytime


def thresholds_between(grid_logits: list[torch.Tensor], shares: tuple[float, ...]) -> torch.Tensor:
    """Per early exit, a threshold that about ``shares[n]`` of the positions pass, midway across a gap between
    their confidences (no confidence within rounding of it); 2 and 0 for none and all."""
    k = grid_logits[0].shape[-1]
    thresholds = torch.empty(len(shares), k)
    for n, share in enumerate(shares):
        distinct = grid_logits[n].softmax(-1).amax(-1).unique()
        near = max(0, round((1 - share) * (len(distinct) - 2)) - 5)
        i = near + int(distinct.diff()[near:near + 10].argmax())
        thresholds[n] = 2.0 if share == 0 else 0.0 if share == 1 else float(distinct[i:i + 2].mean())
        if 0 < share < 1:
            assert float((grid_logits[n].softmax(-1).amax(-1) - thresholds[n, 0]).abs().min()) > 1e-6
    return thresholds


@pytest.mark.parametrize(("grid", "shares", "per_class"), [((5, 7), (0.5, 0.5, 0.5), False),
                                                           ((4, 4), (0.3, 0.2, 0.4), False),
                                                           ((5, 7), (0.7, 0.6, 0.8), True),  # CBT-like
                                                           ((5, 7), (0.0, 0.6, 1.0), False)])  # none, then all
def test_grid_exits_match_the_feature_rule_recomputed_directly(grid: tuple[int, int], shares: tuple[float, ...],
                                                               per_class: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    grid_logits = [3 * torch.randn(3, *grid, 5, generator=gen) for _ in range(4)]
    thresholds = thresholds_between(grid_logits, shares)
    if per_class:  # a threshold per predicted class: the odd classes never leave early
        thresholds[:, 1::2] = 2.0
    size = (2 * grid[0], 2 * grid[1])
    exits = GridExits(3, grid, size, 5, 3, grid_logits[0])
    for n, g in enumerate(grid_logits):
        flat, still = g.reshape(-1, 5), exits.still()
        if not exits.take(flat if still is None else flat[still], thresholds[n] if n < 3 else None):
            break
    logits, exit_index, anytime = feature_exits_by_definition(grid_logits, thresholds, size)
    assert torch.equal(exits.exit_index().long(), exit_index)
    final = exits.logits()
    assert torch.allclose(final, logits, atol=1e-6)
    predictions = exits.predictions(final.argmax(1))()
    assert all(torch.equal(p, q) for p, q in zip(predictions, anytime, strict=True))
    if shares[0] == 0:  # nobody at the first exit, everybody left by the third
        assert bool((exit_index > 0).all()) and bool((exit_index < 3).all())
    else:
        assert len(set(exit_index.flatten().tolist())) == 4  # positions leave at every exit


def test_pixel_grid_gives_each_pixel_its_position() -> None:
    grid = torch.arange(2 * 3 * 4).view(2, 3, 4)
    pixels = pixel_grid(grid, (5, 8))  # an odd height: the last grid row covers one pixel row
    for b in range(2):
        for i in range(5):
            for j in range(8):
                assert pixels[b, i, j] == grid[b, i // 2, j // 2]


@pytest.fixture(scope="module")
def net() -> EESegNet:
    torch.manual_seed(1)
    return trained_like(EESegNet(5, in_channels=1, width=8, head_width=8))


def test_feature_rule_nobody_leaving_is_the_plain_network_and_everybody_the_first_exit(net: EESegNet) -> None:
    x = torch.randn(2, 1, 20, 20)
    stay = early_exit_forward(net, x, torch.full((3, 5), 2.0), decide_at="feature")
    leave = early_exit_forward(net, x, torch.zeros(3, 5), decide_at="feature")
    with torch.no_grad():
        assert torch.allclose(stay.logits, net(x), atol=1e-5)
        assert torch.allclose(leave.logits, net.forward_exits(x)[0], atol=1e-5)
    assert (stay.exit_index == 3).all() and (leave.exit_index == 0).all()
    assert torch.equal(stay.exit_predictions[-1], stay.logits.argmax(1))
    assert leave.active_positions == [2 * 10 * 10, 0, 0, 0]


def test_feature_rule_positions_that_left_never_change_and_the_cost_is_counted(net: EESegNet) -> None:
    x = torch.randn(3, 1, 20, 20)
    with torch.no_grad():
        first = net.grid_exits(x)[0].softmax(1).amax(1)
    cut = float(first.median())  # about half the positions leave at the first exit
    later_leave = torch.tensor([[cut] * 5, [0.0] * 5, [0.0] * 5])
    later_stay = torch.tensor([[cut] * 5, [2.0] * 5, [2.0] * 5])
    a = early_exit_forward(net, x, later_leave, decide_at="feature")
    b = early_exit_forward(net, x, later_stay, decide_at="feature")
    left = a.exit_index == 0
    assert torch.equal(left, b.exit_index == 0) and 0.2 < float(left.float().mean()) < 0.8
    # a pixel reads the positions within one of its own (2x bilinear upsampling): where all of them left at the
    # first exit, what happens after it does not touch the pixel
    gone = (a.exit_index[:, ::2, ::2] == 0).float()
    settled = pixel_grid(-F.max_pool2d(-gone[:, None], 3, 1, 1)[:, 0] > 0, (20, 20))
    assert int(settled.sum()) > 0
    assert torch.equal(a.logits.permute(0, 2, 3, 1)[settled], b.logits.permute(0, 2, 3, 1)[settled])
    # the masked cost by an independent count: the stem everywhere, then per stage the first convolution on the
    # active positions' dilated neighbourhoods, the second and the head on the active positions
    costs = PositionCosts.of(net)
    exit_grid = b.exit_index[:, ::2, ::2]
    count = exit_grid.numel() * costs.stem
    for n, d in enumerate(DILATIONS):
        active = exit_grid >= n
        on = int(active.sum())
        count += (int(neighbourhoods(active, d).sum()) + on) * costs.conv + on * costs.head
    gathered = early_exit_forward(net, x, later_stay, dense_above=float("inf"), decide_at="feature")
    assert gathered.macs == gathered.executed_macs == b.macs == count
    assert torch.equal(gathered.exit_index, b.exit_index) and torch.allclose(gathered.logits, b.logits, atol=1e-5)
    dense = early_exit_forward(net, x, later_stay, dense_above=0.0, decide_at="feature")
    assert dense.executed_macs is not None and dense.executed_macs > dense.macs == count
    assert torch.allclose(dense.logits, b.logits, atol=1e-5)


def test_an_unknown_rule_is_refused(net: EESegNet) -> None:
    with pytest.raises(UsageError, match="--decide-at"):
        early_exit_forward(net, torch.randn(1, 1, 8, 8), torch.zeros(3, 5), decide_at="image")


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_gathered_convolution_in_blocks_is_torch_s_convolution(monkeypatch: pytest.MonkeyPatch, dilation: int
                                                               ) -> None:
    monkeypatch.setattr(masked, "GATHER_ELEMENTS", 7 * 9 * 6)  # blocks of 7 positions, the last one short
    gen = torch.Generator().manual_seed(dilation)
    conv = torch.nn.Conv2d(6, 4, 3, 1, dilation, dilation).requires_grad_(False)
    x = torch.randn(2, 6, 9, 11, generator=gen)
    active = torch.rand(2, 9, 11, generator=gen) < 0.4
    fmap = FeatureMap.of(x)
    at = fmap.index(active)
    rows = conv_rows(conv, fmap, tap_rows(conv, at, (9, 11), fmap))
    dense = conv(x).permute(0, 2, 3, 1)[active]
    assert rows.shape[0] > 2 * 7
    assert torch.allclose(rows, dense, atol=1e-5)
    # the tap table is kept per shape: a second call looks the same taps up
    assert torch.equal(tap_rows(conv, at, (9, 11), fmap), tap_rows(conv, at, (9, 11), fmap))


def fit(ckpt: Path, out: Path, *extra: str) -> Any:
    return runner.invoke(app, ["fit-thresholds", "--method", "adp-c", "--threshold", "0.7", "-c", str(ckpt),
                               "-o", str(out), "-q", *extra])


def test_the_rule_goes_from_fit_thresholds_to_evaluate_which_refuses_another(tmp_path: Path) -> None:
    import yaml

    data = tmp_path / "seg.safetensors"
    write_mask_file(data)
    ckpt = tmp_path / "eeseg.safetensors"
    made = runner.invoke(app, ["train", "-d", f"segmentation:{data}", "-o", str(ckpt), "--epochs", "1",
                               "--batch-size", "8", "--arch-args", "{width: 4, head_width: 4}", "-q"])
    assert made.exit_code == 0, made.stderr
    feature, pixel = tmp_path / "feature.yaml", tmp_path / "pixel.yaml"
    assert fit(ckpt, feature, "--decide-at", "feature").exit_code == 0
    assert fit(ckpt, pixel).exit_code == 0  # the default for every network: the thesis's rule
    assert yaml.safe_load(feature.read_text())["decide_at"] == "feature"
    assert yaml.safe_load(pixel.read_text())["decide_at"] == "pixel"
    evaluate = ["evaluate", "-c", str(ckpt), "-d", f"segmentation:{data}", "--split", "train", "--repeats", "1",
                "--format", "json", "-q"]
    done = runner.invoke(app, [*evaluate, "--thresholds", str(feature)])
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["points"][1]["decide_at"] == "feature"
    refused = runner.invoke(app, [*evaluate, "--thresholds", str(feature), "--decide-at", "pixel"])
    assert refused.exit_code == ExitCode.PROVENANCE and "fitted for --decide-at feature" in refused.stderr
    agreed = runner.invoke(app, [*evaluate, "--thresholds", str(pixel), "--decide-at", "pixel"])
    assert agreed.exit_code == 0, agreed.stderr
    alone = runner.invoke(app, [*evaluate, "--decide-at", "feature"])
    assert alone.exit_code == ExitCode.USAGE and "--decide-at" in alone.stderr
    assert fit(ckpt, tmp_path / "bad.yaml", "--decide-at", "image").exit_code == ExitCode.USAGE


def test_a_point_slower_than_the_plain_network_is_said_on_one_line() -> None:
    from eetool.segmentation.threshold_fitting import warn_if_slower

    said: list[str] = []

    class Reporter:
        def warn(self, line: str) -> None:
            said.append(line)

    class FakeRun:
        reporter = Reporter()

    warn_if_slower(FakeRun(), "adp-c", 1.02, "3 rounds")  # type: ignore[arg-type]
    assert said == []
    warn_if_slower(FakeRun(), "adp-c", 0.61, "3 rounds")  # type: ignore[arg-type]
    assert len(said) == 1 and "0.61x" in said[0] and "slower than the plain network" in said[0]
    assert "\n" not in said[0]


def test_a_classifier_refuses_decide_at_before_reading_anything(tmp_path: Path) -> None:
    from eetool.core.sources import demo_path

    fitted = runner.invoke(app, ["fit-thresholds", "--method", "e2cm", "--means", str(tmp_path / "absent"),
                                 "--budget", "0.5", "-o", str(tmp_path / "t.yaml"), "--decide-at", "pixel"])
    assert fitted.exit_code == ExitCode.USAGE and "--decide-at applies to --method cbt" in fitted.stderr
    evaluated = runner.invoke(app, ["evaluate", "-c", str(demo_path("demo-resnet20-fashion-mnist.safetensors")),
                                    "-d", "demo", "--decide-at", "pixel"])
    assert evaluated.exit_code == ExitCode.USAGE and "--decide-at applies to segmentation" in evaluated.stderr
    assert not (tmp_path / "t.yaml").exists()
