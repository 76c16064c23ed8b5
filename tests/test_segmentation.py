"""Early-exit segmentation: CBT's equations against a direct recomputation, the masked inference (exited pixels
never change, inactive positions keep their features, the cost counts only computed positions, the per-pixel
bookkeeping on active rows against every exit on full maps), the scene and mask sources, and the commands end to
end on a tiny network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from eetool.cli import app
from eetool.core.artifacts import Provenance
from eetool.core.checkpoint import ModelSpec, save_checkpoint
from eetool.core.errors import InputError, UsageError
from eetool.segmentation import IGNORE
from eetool.segmentation.data import SOLID, make_scenes
from eetool.segmentation.masked import FeatureMap
from eetool.segmentation.metrics import confusion, iou, mean_iou, pixel_accuracy
from eetool.segmentation.model import (
    EESegNet,
    PixelExits,
    PositionCosts,
    _sparse_block,
    early_exit_forward,
    grid_size,
    plain_macs,
)
from eetool.segmentation.pixel_thresholds import ClassStats, adp_c, cbt, cbt_ns, check_range

runner = CliRunner()
FASHION = Path("/usr/share/datasets/fashion-mnist")


def random_batch(gen: torch.Generator, exits: int = 4, b: int = 3, k: int = 4, side: int = 5
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    probs = [torch.rand(b, k, side, side, generator=gen, dtype=torch.float64).softmax(1) for _ in range(exits)]
    masks = torch.randint(0, k, (b, side, side), generator=gen).to(torch.int16)
    masks[:, 0, 0] = IGNORE
    return probs, masks


def direct_class_means(batches: list[tuple[list[torch.Tensor], torch.Tensor]], k: int) -> torch.Tensor:
    """p_{n,k} by the definition (eq. 3.1): a loop over every labelled pixel."""
    exits = len(batches[0][0])
    sums = torch.zeros(exits, k, k, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.float64)
    for probs, masks in batches:
        for b, h, w in np.ndindex(*masks.shape):
            truth = int(masks[b, h, w])
            if truth == IGNORE:
                continue
            counts[truth] += 1
            for n in range(exits):
                sums[n, truth] += probs[n][b, :, h, w]
    return sums / counts[None, :, None]


def eq_3_3(scores: list[float], alpha: float, beta: float) -> list[float]:
    low, high = min(scores), max(scores)
    return [(1 - (s - low) / (high - low)) * (beta - alpha) + alpha for s in scores]


def top1_minus_top2(v: torch.Tensor) -> float:
    ordered = sorted(v.tolist(), reverse=True)
    return ordered[0] - ordered[1]


def test_cbt_matches_equations_3_1_to_3_3_recomputed_directly() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(gen) for _ in range(3)]
    stats = ClassStats.empty(4, 4)
    for probs, masks in batches:  # streamed batch by batch
        stats.update(probs, masks)
    p = direct_class_means(batches, 4)
    assert torch.allclose(stats.exit_means(), p, atol=1e-12)
    shared = p.mean(0)  # eq. 3.2
    expected = eq_3_3([top1_minus_top2(shared[k]) for k in range(4)], 0.9, 0.998)
    thresholds, scores = cbt(stats, 0.9, 0.998, early_exits=3)
    assert thresholds.shape == (3, 4)
    for row in thresholds:
        assert row.tolist() == pytest.approx(expected, abs=1e-12)
    assert scores.tolist() == pytest.approx([top1_minus_top2(shared[k]) for k in range(4)], abs=1e-12)
    # the surest class gets alpha, the least sure beta
    assert float(thresholds[0, int(scores.argmax())]) == pytest.approx(0.9)
    assert float(thresholds[0, int(scores.argmin())]) == pytest.approx(0.998)


def test_cbt_ns_scales_each_exit_on_its_own() -> None:
    gen = torch.Generator().manual_seed(1)
    batches = [random_batch(gen) for _ in range(2)]
    stats = ClassStats.empty(4, 4)
    for probs, masks in batches:
        stats.update(probs, masks)
    p = direct_class_means(batches, 4)
    thresholds, _ = cbt_ns(stats, 0.5, 0.9, early_exits=3)
    for n in range(3):
        expected = eq_3_3([top1_minus_top2(p[n, k]) for k in range(4)], 0.5, 0.9)
        assert thresholds[n].tolist() == pytest.approx(expected, abs=1e-12)


def test_absent_class_and_equal_scores_get_beta() -> None:
    stats = ClassStats.empty(2, 3)
    probs = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 2, 1)
    stats.update([probs, probs], torch.tensor([[[0], [1]]], dtype=torch.int16))  # class 2 has no pixel
    thresholds, _ = cbt(stats, 0.9, 0.998, early_exits=1)
    # classes 0 and 1 have the same mean vector, hence the same score: eq. 3.3 is 0/0, so both get beta
    assert thresholds[0].tolist() == pytest.approx([0.998, 0.998, 0.998])
    other = torch.tensor([0.1, 0.8, 0.1], dtype=torch.float64).view(1, 3, 1, 1)
    stats.update([other, other], torch.tensor([[[1]]], dtype=torch.int16))
    thresholds, _ = cbt(stats, 0.9, 0.998, early_exits=1)
    assert thresholds[0, 2] == pytest.approx(0.998)  # still absent: beta, outside the min and max
    assert sorted(thresholds[0, :2].tolist()) == pytest.approx([0.9, 0.998])


@pytest.mark.parametrize(("alpha", "beta"), [(0.9, 0.9), (0.99, 0.9), (-0.1, 0.9), (0.9, 1.5), (float("nan"), 0.9)])
def test_bad_alpha_beta_are_refused(alpha: float, beta: float) -> None:
    with pytest.raises(UsageError):
        check_range(alpha, beta)


def test_adp_c_is_one_threshold() -> None:
    assert adp_c(0.998, 3, 5).unique().tolist() == [0.998]
    with pytest.raises(UsageError):
        adp_c(1.5, 3, 5)


def trained_like(model: EESegNet, seed: int = 0) -> EESegNet:
    """Random BatchNorm statistics, so that eval mode is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def net() -> EESegNet:
    torch.manual_seed(0)
    return trained_like(EESegNet(5, in_channels=1, width=8, head_width=8))


def test_nobody_leaving_early_is_the_plain_network(net: EESegNet) -> None:
    x = torch.randn(2, 1, 20, 20)
    result = early_exit_forward(net, x, torch.full((3, 5), 2.0))
    with torch.no_grad():
        assert torch.allclose(result.logits, net(x), atol=1e-5)
    assert (result.exit_index == 3).all()
    costs = PositionCosts.of(net)
    positions = 2 * 10 * 10
    # the plain network plus the three early heads, on every position
    assert result.macs == 2 * plain_macs(net, (1, 20, 20)) + 3 * positions * costs.head


def test_everyone_leaving_first_costs_the_stem_first_stage_and_head(net: EESegNet) -> None:
    x = torch.randn(2, 1, 20, 20)
    result = early_exit_forward(net, x, torch.zeros(3, 5))
    with torch.no_grad():
        assert torch.allclose(result.logits, net.forward_exits(x)[0], atol=1e-5)
    assert (result.exit_index == 0).all()
    costs = PositionCosts.of(net)
    h, w = grid_size(net, 20, 20)
    assert result.macs == 2 * h * w * (costs.stem + 2 * costs.conv + costs.head)
    assert result.active_positions == [2 * h * w, 0, 0, 0]


def test_inactive_positions_keep_their_features_and_active_ones_match_the_dense_block(net: EESegNet) -> None:
    gen = torch.Generator().manual_seed(3)
    grid = torch.randn(2, 9, 9, 8, generator=gen)
    active = torch.rand(2, 9, 9, generator=gen) < 0.3
    block = net.stages[1][0]  # dilation 2
    # gathered rows always (the map padded as early_exit_forward pads it, or not), or dense over the whole grid
    maps = [FeatureMap.of(grid.permute(0, 3, 1, 2), pad) for pad in (0, 8, 8)]
    with torch.no_grad():
        spent = [_sparse_block(block, fmap, active, PositionCosts.of(net), dense_above)
                 for fmap, dense_above in zip(maps, (1.0, 1.0, 0.0), strict=True)]
        dense = block(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    # the cost: the first convolution on the active positions' neighbourhoods, the second on the active ones
    padded = torch.nn.functional.pad(active.float(), (2, 2, 2, 2))
    needed = torch.nn.functional.max_pool2d(padded[:, None], 3, 1, 0, 2)[:, 0] > 0
    masked = (int(needed.sum()) + int(active.sum())) * PositionCosts.of(net).conv
    for fmap in maps:
        out = fmap.nhwc()
        assert torch.equal(out[~active], grid[~active])  # bit for bit: never recomputed
        assert torch.allclose(out[active], dense[active], atol=1e-5)
    assert spent[0] == spent[1] == (masked, masked)
    assert spent[2] == (masked, 2 * active.numel() * PositionCosts.of(net).conv)  # the dense block ran everywhere


def test_one_active_position_costs_its_neighbourhood_and_itself(net: EESegNet) -> None:
    grid = torch.randn(1, 8, 9, 9)
    active = torch.zeros(1, 9, 9, dtype=torch.bool)
    active[0, 4, 4] = True
    with torch.no_grad():
        spent, ran = _sparse_block(net.stages[2][0], FeatureMap.of(grid), active, PositionCosts.of(net))  # dilation 4
    assert spent == ran == (9 + 1) * PositionCosts.of(net).conv


def test_exited_pixels_never_change_afterwards(net: EESegNet) -> None:
    x = torch.randn(3, 1, 20, 20)
    with torch.no_grad():
        first = net.forward_exits(x)[0].softmax(1).amax(1)
    cut = float(first.median())  # about half the pixels leave at the first exit
    later_leave = torch.tensor([[cut] * 5, [0.0] * 5, [0.0] * 5])
    later_stay = torch.tensor([[cut] * 5, [2.0] * 5, [2.0] * 5])
    a = early_exit_forward(net, x, later_leave)
    b = early_exit_forward(net, x, later_stay)
    left = a.exit_index == 0
    assert torch.equal(left, b.exit_index == 0)
    assert 0.2 < float(left.float().mean()) < 0.8
    # what happens after the first exit (everyone else leaving at the second, or nobody before the end) does not
    # touch the pixels that left at the first
    assert torch.equal(a.logits.permute(0, 2, 3, 1)[left], b.logits.permute(0, 2, 3, 1)[left])
    # and fewer active pixels cost less, never more
    assert a.macs < b.macs
    assert a.active_positions[1] == b.active_positions[1] < a.active_positions[0]
    # gathering the active rows in every block, however many are active, gives the same pixels at the masked cost;
    # the blocks that ran dense above DENSE_ABOVE cost more than that
    gathered = early_exit_forward(net, x, later_stay, dense_above=float("inf"))
    assert torch.equal(gathered.exit_index, b.exit_index) and torch.allclose(gathered.logits, b.logits, atol=1e-5)
    assert gathered.macs == gathered.executed_macs == b.macs
    assert b.executed_macs is not None and b.executed_macs > b.macs


def exits_by_full_maps(grid_logits: list[torch.Tensor], thresholds: torch.Tensor, size: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Pixel-level early exit by its definition, every exit on every pixel's full logits: the logits each pixel
    left with, its exit and the anytime class maps."""
    ups = [torch.nn.functional.interpolate(g.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=False)
           for g in grid_logits]
    last = len(ups) - 1
    exit_index = torch.full(ups[0][:, 0].shape, last)
    for n in reversed(range(last)):  # a pixel leaves at the first early exit whose confidence passes
        confidence, prediction = ups[n].softmax(1).max(1)
        exit_index = torch.where(confidence > thresholds[n][prediction], n, exit_index)
    stacked = torch.stack(ups)  # exits x B x K x H x W
    logits = stacked.gather(0, exit_index[None, :, None].expand(1, *stacked.shape[1:]))[0]
    anytime = [torch.where(exit_index < n, logits.argmax(1), up.argmax(1)) for n, up in enumerate(ups)]
    return logits, exit_index, anytime


@pytest.mark.parametrize(("grid", "size", "shares"), [((5, 7), (10, 14), (0.5, 0.5, 0.5)),  # eeseg's stride 2
                                                       ((3, 3), (24, 24), (0.4, 0.3, 0.2)),  # torchvision's 8
                                                       ((5, 7), (10, 14), (0.0, 0.6, 1.0))])  # none, then all
def test_pixel_exits_on_active_rows_match_every_exit_on_full_maps(grid: tuple[int, int], size: tuple[int, int],
                                                                  shares: tuple[float, ...]) -> None:
    gen = torch.Generator().manual_seed(11)
    grid_logits = [3 * torch.randn(3, *grid, 5, generator=gen) for _ in range(4)]
    # per exit, a threshold that about ``shares[n]`` of the pixels pass, midway across a gap between their
    # confidences, so that no pixel's confidence is within rounding of it; 2 and 0 for none and all
    thresholds = torch.empty(3, 5)
    for n, share in enumerate(shares):
        up = torch.nn.functional.interpolate(grid_logits[n].permute(0, 3, 1, 2), size, mode="bilinear")
        confidences = up.softmax(1).amax(1)
        distinct = confidences.unique()  # sorted
        near = max(0, round((1 - share) * (len(distinct) - 2)) - 5)
        i = near + int(distinct.diff()[near:near + 10].argmax())  # the widest gap near the share
        thresholds[n] = 2.0 if share == 0 else 0.0 if share == 1 else float(distinct[i:i + 2].mean())
        assert float((confidences - thresholds[n, 0]).abs().min()) > 1e-6
    exits = PixelExits(3, *size, 3, torch.device("cpu"))
    for n, g in enumerate(grid_logits):
        if not exits.take(g, thresholds[n] if n < 3 else None):
            break
    logits, exit_index, anytime = exits_by_full_maps(grid_logits, thresholds, size)
    assert torch.equal(exits.exit_index.long(), exit_index)
    assert torch.allclose(exits.logits(), logits, atol=1e-6)  # the same kernel on the same grid: bit for bit
    predictions = exits.predictions(4)
    assert all(torch.equal(p, q) for p, q in zip(predictions, anytime, strict=True))
    assert torch.equal(exits.pixels, exit_index == 3)
    if shares[0] == 0:  # nobody at the first exit, everybody left by the third
        assert bool((exit_index > 0).all()) and bool((exit_index < 3).all())
    else:
        assert len(set(exit_index.flatten().tolist())) == 4  # pixels leave at every exit


def unfolded_exits(net: EESegNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The exits through the trained BatchNorms themselves: with gradients on, inference does not fold."""
    with torch.enable_grad():
        assert net.inference_net() is net
        return [out.detach() for out in net.forward_exits(x)]


def test_folded_inference_matches_the_batchnorm_network() -> None:
    torch.manual_seed(1)
    net = trained_like(EESegNet(5, in_channels=1, width=8, head_width=8, blocks=2), seed=1)
    x = torch.randn(3, 1, 20, 20)
    reference = unfolded_exits(net, x)
    with torch.no_grad():
        folded = net.inference_net()
        exits, plain = net.forward_exits(x), net(x)
        assert net.inference_net() is folded  # made once, then reused
    assert folded.folded and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # folding reorders float32 arithmetic only: logits of magnitude about 1-2 agree to ~1e-6; 1e-4 leaves margin
    assert max(float(r.abs().amax()) for r in reference) > 0.5  # non-trivial logits
    for got, want in zip(exits, reference, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-4)
    assert torch.allclose(plain, reference[-1], rtol=0, atol=1e-4)
    # the masked path runs the folded copy too, and with nobody leaving early it is the unfolded final exit
    result = early_exit_forward(net, x, torch.full((3, 5), 2.0))
    assert torch.allclose(result.logits, reference[-1], rtol=0, atol=1e-4)


def test_inference_leaves_the_trained_network_and_its_state_dict_alone() -> None:
    from eetool.segmentation.calibration import add_batch

    torch.manual_seed(2)
    net = trained_like(EESegNet(5, in_channels=1, width=8, head_width=8), seed=2)
    before = {name: t.clone() for name, t in net.state_dict().items()}
    modules_before = [type(m) for m in net.modules()]
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        net(x), net.forward_exits(x)
        add_batch(ClassStats.empty(4, 5), net, x, torch.randint(0, 5, (2, 20, 20)))
    early_exit_forward(net, x, torch.full((3, 5), 0.5))
    after = net.state_dict()
    assert list(after) == list(before)  # the cached copy is no submodule
    assert all(torch.equal(after[name], t) for name, t in before.items())
    assert [type(m) for m in net.modules()] == modules_before  # the BatchNorms are still there, for training
    net.train()
    assert net.inference_net() is net


def test_the_folded_copy_follows_changed_weights() -> None:
    torch.manual_seed(3)
    net = trained_like(EESegNet(5, in_channels=1, width=8, head_width=8), seed=3)
    x = torch.randn(2, 1, 20, 20)
    with torch.no_grad():
        net(x)
        first = net.inference_net()
        bn = net.heads[-1].bn
        assert isinstance(bn, torch.nn.BatchNorm2d) and bn.running_mean is not None
        bn.running_mean.add_(3.0)  # as an optimiser step or load_state_dict would change the weights in place
        assert net.inference_net() is not first
        got = net(x)
    want = unfolded_exits(net, x)[-1]
    assert torch.allclose(got, want, rtol=0, atol=1e-4)


def test_metrics_from_the_confusion_matrix() -> None:
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]], dtype=torch.int16)
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    m = confusion(pred, truth, 4)
    assert int(m.sum()) == 7  # the ignored pixel is left out
    assert pixel_accuracy(m) == pytest.approx(5 / 7)
    per = iou(m)
    assert per[:3].tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert bool(per[3].isnan())  # neither in the ground truth nor predicted: not in the mean
    assert mean_iou(m) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_scenes_are_seeded_and_labelled_by_their_garments() -> None:
    gen = np.random.default_rng(0)
    garments = gen.integers(0, 256, size=(20, 28, 28)).astype(np.uint8)
    garments[:, :4] = 0
    labels = np.arange(20) % 10
    a_img, a_mask = make_scenes(garments, labels, 8, seed=5)
    b_img, b_mask = make_scenes(garments, labels, 8, seed=5)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(make_scenes(garments, labels, 8, seed=6)[0], a_img)
    assert a_img.shape == (8, 1, 64, 64) and a_mask.shape == (8, 64, 64)
    assert set(np.unique(a_mask).tolist()) <= {IGNORE, *range(11)}
    bright, blank = a_img[:, 0] >= SOLID, a_img[:, 0] == 0
    assert (a_mask[bright] >= 1).all()  # every bright pixel is a garment's
    assert (a_mask[blank] == 0).all()  # every black pixel is background
    assert (a_mask[~bright & ~blank] == IGNORE).all()  # faint rims are ignored


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_scenes_are_the_same_on_every_load() -> None:
    from eetool.segmentation.data import fashion_mnist_scenes

    a = fashion_mnist_scenes(FASHION, "test", count=16)
    b = fashion_mnist_scenes(FASHION, "test", count=16)
    assert a.fingerprint == b.fingerprint and a.num_classes == 11
    assert fashion_mnist_scenes(FASHION, "train", count=16).fingerprint != a.fingerprint


def write_mask_file(path: Path, *, masks: torch.Tensor | None = None, classes: str = "bg\nsquare\nbar") -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(24, 1, 16, 16, dtype=torch.uint8)
    made = torch.zeros(24, 16, 16, dtype=torch.uint8)
    for i in range(24):
        y, x = torch.randint(0, 10, (2,), generator=gen).tolist()
        images[i, 0, y:y + 6, x:x + 6] = 200
        made[i, y:y + 6, x:x + 6] = 1
        made[i, y + 6:y + 7, x:x + 6] = 255  # an unlabelled rim
        images[i, 0, :, 14:] = 90
        made[i, :, 14:] = 2
    save_file({"images": images, "masks": made if masks is None else masks}, str(path),
              metadata={"classes": classes})


def test_mask_file_maps_the_ignore_label(tmp_path: Path) -> None:
    from eetool.core.datasets import load_dataset

    write_mask_file(tmp_path / "seg.safetensors")
    ds = load_dataset(f"segmentation:{tmp_path / 'seg.safetensors'}", "train")
    assert ds.labels.dtype == torch.int16 and ds.labels.shape == (24, 16, 16)
    assert set(ds.labels.unique().tolist()) == {IGNORE, 0, 1, 2}
    assert ds.classes == ["bg", "square", "bar"]


@pytest.mark.parametrize(("masks", "says"), [
    (torch.zeros(24, 16, 15, dtype=torch.uint8), "masks have shape"),
    (torch.full((24, 16, 16), 7, dtype=torch.uint8), "outside the classes"),
    (torch.zeros(24, 16, 16), "masks are torch.float32"),
])
def test_bad_mask_files_are_refused(tmp_path: Path, masks: torch.Tensor, says: str) -> None:
    from eetool.core.datasets import load_dataset

    write_mask_file(tmp_path / "bad.safetensors", masks=masks)
    with pytest.raises(InputError, match=says):
        load_dataset(f"segmentation:{tmp_path / 'bad.safetensors'}", "train")


def test_train_fit_and_evaluate_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "seg.safetensors"
    write_mask_file(data)
    ckpt = tmp_path / "eeseg.safetensors"
    made = runner.invoke(app, ["train", "-d", f"segmentation:{data}", "-o", str(ckpt), "--epochs", "2",
                               "--batch-size", "8", "--optimizer", "adamw", "--lr", "0.01", "--arch-args",
                               "{width: 8, head_width: 8}", "-q", "--format", "json"])
    assert made.exit_code == 0, made.stderr
    trained = json.loads(made.stdout)
    assert trained["arch"] == "eeseg" and 0 <= trained["train_accuracy"] <= 1
    for method, extra in (("cbt", ["--alpha", "0.5", "--beta", "0.9"]), ("cbt-ns", []), ("adp-c", ["--threshold",
                                                                                                   "0.7"])):
        out = tmp_path / f"{method}.yaml"
        reads = ["-d", f"segmentation:{data}"] if method != "adp-c" else []  # adp-c's one threshold needs no data
        made = runner.invoke(app, ["fit-thresholds", "--method", method, "-c", str(ckpt), *reads, "-o", str(out), "-q",
                                   *extra])
        assert made.exit_code == 0, made.stderr
        done = runner.invoke(app, ["evaluate", "-c", str(ckpt), "-d", f"segmentation:{data}", "--split", "train",
                                   "--thresholds", str(out), "--repeats", "1", "--format", "json", "-q"])
        assert done.exit_code == 0, done.stderr
        doc = json.loads(done.stdout)
        plain, early = doc["points"]
        assert plain["cost"] == 1.0 and 0 <= plain["miou"] <= 1
        assert sum(early["exit_shares"].values()) == pytest.approx(1.0, abs=1e-5)
        assert 0 < early["cost"] < 1.1
        assert early["gflops"] == pytest.approx(2 * early["macs"] / 1e9, abs=1e-6)  # rounded to 6 places
    import yaml

    fitted = yaml.safe_load((tmp_path / "cbt.yaml").read_text())
    assert fitted["provenance"]["kind"] == "segmentation-thresholds"
    assert min(fitted["thresholds"][0]) == pytest.approx(0.5) and max(fitted["thresholds"][0]) == pytest.approx(0.9)
    assert sum(fitted["statistics"]["pixels"].values()) > 0


def test_a_segmentation_checkpoint_records_its_spec(tmp_path: Path) -> None:
    spec = ModelSpec(arch="eeseg", num_classes=3, input_shape=(1, 16, 16), mean=[0.5], std=[0.25],
                     arch_args={"width": 4, "head_width": 4})
    path = tmp_path / "m.safetensors"
    save_checkpoint(str(path), spec.build(), spec, Provenance(kind="checkpoint"))
    from eetool.core.checkpoint import load_checkpoint

    assert isinstance(load_checkpoint(str(path)).model, EESegNet)


def test_budget_bisection_keeps_a_bracket_around_the_budget() -> None:
    from eetool.segmentation.pixel_thresholds import BUDGET_TOLERANCE, fit_budget

    tried: list[float] = []

    def cost(value: float) -> float:  # steps, as pixel counts make it
        tried.append(value)
        return 0.3 + round(value * 40) / 80

    found = fit_budget(cost, 0.55, 0.0, 0.998, lambda c: UsageError(f"costs {c}", "hint"))
    assert cost(found.value) == found.cost <= 0.55
    assert found.over is not None and found.over_cost is not None and found.over_cost > 0.55
    assert 0 < found.over - found.value <= BUDGET_TOLERANCE
    assert 0.998 not in tried  # alpha stays below beta
    with pytest.raises(UsageError, match="costs 0.3"):
        fit_budget(cost, 0.2, 0.0, 0.998, lambda c: UsageError(f"costs {c}", "hint"))
    loose = fit_budget(cost, 5.0, 0.0, 0.998, lambda c: UsageError("", ""))  # every value meets it
    assert loose.over is None and 0.998 - BUDGET_TOLERANCE <= loose.value < 0.998


@pytest.fixture(scope="module")
def budget_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, EESegNet, torch.Tensor]:
    """An untrained-but-not-trivial network on the square scenes, and the inputs as the commands see them."""
    from eetool.core.datasets import Preprocess, load_dataset

    d = tmp_path_factory.mktemp("budget")
    write_mask_file(d / "seg-data.safetensors")
    spec = ModelSpec(arch="eeseg", num_classes=3, input_shape=(1, 16, 16), mean=[0.5], std=[0.25],
                     arch_args={"width": 8, "head_width": 8})
    torch.manual_seed(1)
    model = trained_like(spec.build(), seed=1)
    save_checkpoint(str(d / "seg.safetensors"), model, spec, Provenance(kind="checkpoint"))
    ds = load_dataset(f"segmentation:{d / 'seg-data.safetensors'}", "train")
    images, _, _ = next(iter(ds.batches(256)))
    x = Preprocess(spec.input_shape, spec.mean, spec.std)(images, torch.device("cpu"))
    return d / "seg.safetensors", d / "seg-data.safetensors", model, x


def mean_cost(model: EESegNet, x: torch.Tensor, thresholds: list[list[float]], decide_at: str) -> float:
    """The cost `evaluate` reports, recomputed from the thresholds as written, by the rule ``decide_at``."""
    result = early_exit_forward(model, x, torch.tensor(thresholds, dtype=torch.float32), decide_at=decide_at)
    return result.macs / (x.shape[0] * plain_macs(model, (1, 16, 16)))


@pytest.mark.parametrize("method", ["cbt", "adp-c"])
def test_budget_search_meets_the_budget_and_a_larger_value_would_not(
        tmp_path: Path, budget_inputs: tuple[Path, Path, EESegNet, torch.Tensor], method: str) -> None:
    import yaml

    from eetool.segmentation.pixel_thresholds import BUDGET_TOLERANCE

    ckpt, data, model, x = budget_inputs
    # per feature, asked for (the default, per pixel, is searched in the test of --search-over both)
    everyone_first = mean_cost(model, x, [[0.0] * 3] * 3, "feature")
    nobody_early = mean_cost(model, x, [[1.0] * 3] * 3, "feature")
    budget = round((everyone_first + nobody_early) / 2, 4)  # midway: the search has room both ways
    out = tmp_path / "t.yaml"
    made = runner.invoke(app, ["fit-thresholds", "--method", method, "--budget", str(budget), "--beta", "0.998",
                               "--decide-at", "feature", "-c", str(ckpt), "-d", f"segmentation:{data}", "-o",
                               str(out), "-q"])
    assert made.exit_code == 0, made.stderr
    doc = yaml.safe_load(out.read_text())
    fitted = doc["budget"]
    assert fitted["target"] == budget and fitted["searched"] == ("alpha" if method == "cbt" else "threshold")
    value = doc["alpha"] if method == "cbt" else doc["threshold"]
    assert doc["decide_at"] == "feature"
    cost = mean_cost(model, x, doc["thresholds"], "feature")
    assert cost <= budget and cost == pytest.approx(fitted["cost"], abs=1e-6)
    # the nearest value tried above it spends more than the budget
    assert 0 < fitted["over"] - value <= BUDGET_TOLERANCE and fitted["over_cost"] > budget
    if method == "cbt":
        from eetool.core.datasets import Preprocess, load_dataset
        from eetool.core.reporting import Reporter
        from eetool.segmentation.inputs import class_statistics
        from eetool.segmentation.pixel_thresholds import cbt

        assert 0 <= value < doc["beta"] == 0.998
        assert min(doc["thresholds"][0]) == pytest.approx(value) and max(doc["thresholds"][0]) == pytest.approx(0.998)
        stats = class_statistics(model, load_dataset(f"segmentation:{data}", "train"),
                                 Preprocess((1, 16, 16), [0.5], [0.25]), 256, torch.device("cpu"), Reporter())
        over = cbt(stats, fitted["over"], 0.998, 3)[0].tolist()
    else:
        over = [[fitted["over"]] * 3] * 3
    assert mean_cost(model, x, over, "feature") == pytest.approx(fitted["over_cost"], abs=1e-6)
    assert mean_cost(model, x, over, "feature") > budget
    done = runner.invoke(app, ["evaluate", "-c", str(ckpt), "-d", f"segmentation:{data}", "--split", "train",
                               "--thresholds", str(out), "--repeats", "1", "--format", "json", "-q"])
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["points"][1]["cost"] == pytest.approx(fitted["cost"], abs=1e-5)


def test_a_budget_that_does_not_bind_is_met_below_beta_with_a_warning(
        tmp_path: Path, budget_inputs: tuple[Path, Path, EESegNet, torch.Tensor]) -> None:
    import yaml

    ckpt, data, _, _ = budget_inputs
    out = tmp_path / "t.yaml"
    made = runner.invoke(app, ["fit-thresholds", "--method", "cbt", "--budget", "5", "--beta", "0.9", "-c", str(ckpt),
                               "-d", f"segmentation:{data}", "-o", str(out), "--no-progress"])
    assert made.exit_code == 0, made.stderr
    assert "does not bind" in made.stderr and "does not bind" not in made.stdout
    doc = yaml.safe_load(out.read_text())
    assert doc["budget"]["over"] is None and 0.89 < doc["alpha"] < 0.9


def test_budget_search_over_beta_meets_the_budget_and_a_larger_beta_would_not(
        tmp_path: Path, budget_inputs: tuple[Path, Path, EESegNet, torch.Tensor]) -> None:
    import yaml

    from eetool.core.datasets import Preprocess, load_dataset
    from eetool.core.reporting import Reporter
    from eetool.segmentation.inputs import class_statistics
    from eetool.segmentation.pixel_thresholds import BUDGET_TOLERANCE, cbt

    ckpt, data, model, x = budget_inputs
    at_alpha = mean_cost(model, x, [[0.3] * 3] * 3, "pixel")  # beta = alpha: every class at alpha
    nobody_early = mean_cost(model, x, [[1.0] * 3] * 3, "pixel")
    budget = round((at_alpha + nobody_early) / 2, 4)
    out = tmp_path / "t.yaml"
    made = runner.invoke(app, ["fit-thresholds", "--method", "cbt", "--budget", str(budget), "--search-over", "beta",
                               "--alpha", "0.3", "-c", str(ckpt), "-d", f"segmentation:{data}", "-o", str(out), "-q"])
    assert made.exit_code == 0, made.stderr
    doc = yaml.safe_load(out.read_text())
    fitted = doc["budget"]
    assert fitted["searched"] == "beta" and doc["alpha"] == 0.3 and 0.3 < doc["beta"] < 1
    assert doc["decide_at"] == "pixel"  # the default for every network
    assert min(doc["thresholds"][0]) == pytest.approx(0.3) and max(doc["thresholds"][0]) == pytest.approx(doc["beta"])
    cost = mean_cost(model, x, doc["thresholds"], "pixel")
    assert cost <= budget and cost == pytest.approx(fitted["cost"], abs=1e-6)
    assert 0 < fitted["over"] - doc["beta"] <= BUDGET_TOLERANCE
    stats = class_statistics(model, load_dataset(f"segmentation:{data}", "train"),
                             Preprocess((1, 16, 16), [0.5], [0.25]), 256, torch.device("cpu"), Reporter())
    over = cbt(stats, 0.3, fitted["over"], 3)[0].tolist()
    assert mean_cost(model, x, over, "pixel") == pytest.approx(fitted["over_cost"], abs=1e-6)
    assert fitted["over_cost"] > budget


def test_budget_search_over_both_keeps_the_pair_of_best_miou_within_the_budget(
        tmp_path: Path, budget_inputs: tuple[Path, Path, EESegNet, torch.Tensor]) -> None:
    import yaml

    from eetool.core.datasets import load_dataset
    from eetool.segmentation.threshold_fitting import BETA_GRID

    ckpt, data, model, x = budget_inputs
    masks = next(iter(load_dataset(f"segmentation:{data}", "train").batches(256)))[1]
    everyone_first = mean_cost(model, x, [[0.0] * 3] * 3, "pixel")
    nobody_early = mean_cost(model, x, [[1.0] * 3] * 3, "pixel")
    budget = round((everyone_first + nobody_early) / 2, 4)
    out = tmp_path / "t.yaml"
    made = runner.invoke(app, ["fit-thresholds", "--method", "cbt", "--budget", str(budget), "--search-over", "both",
                               "-c", str(ckpt), "-d", f"segmentation:{data}", "-o", str(out), "-q"])
    assert made.exit_code == 0, made.stderr
    doc = yaml.safe_load(out.read_text())
    fitted = doc["budget"]
    assert fitted["searched"] == "both" and sorted(c["beta"] for c in fitted["candidates"]) == list(BETA_GRID)
    met = [c for c in fitted["candidates"] if c["alpha"] is not None]
    assert met and all(c["cost"] <= budget for c in met)
    best = max(met, key=lambda c: (c["miou"], -c["cost"]))
    assert (doc["alpha"], doc["beta"]) == (best["alpha"], best["beta"]) and fitted["miou"] == best["miou"]
    result = early_exit_forward(model, x, torch.tensor(doc["thresholds"], dtype=torch.float32),
                                decide_at=doc["decide_at"])
    assert result.macs / (x.shape[0] * plain_macs(model, (1, 16, 16))) == pytest.approx(fitted["cost"], abs=1e-6)
    assert mean_iou(confusion(result.logits.argmax(1), masks, 3)) == pytest.approx(fitted["miou"], abs=1e-6)
