"""Batch norm folded into the convolutions (eetool.core.batch_norm_folding): the folded copy against the network as
saved, on the shipped demo checkpoint with its real E²CM exits and on a torchvision ResNet-18 whose batch norms
hold non-trivial statistics; what is left unfolded because it cannot be proved; predict's and evaluate's flag."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from cli_helpers import invoke, ok
from torch import nn

from eetool.core.batch_norm_folding import fold_batch_norm, folded_exit_model, folded_pairs
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.exits import ExitModel, build_exit_model
from eetool.core.inference import run_early_exit

# Float rounding of a folded convolution: a few units in the last place of each product, summed over a layer and
# carried through the network; measured at most 3.2e-7 relative to the largest logit on the demo test set and
# 1.3e-6 on the ResNet-18 below, so 1e-4 leaves a wide margin and still fails a folding that is wrong (a missed
# scale or shift moves logits by whole units).
RELATIVE = 1e-4
NEAR = 1e-5  # a confidence this close to its exit's threshold may leave on either side of it


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def resnet18() -> nn.Module:
    """Random weights, and batch norms whose statistics and affine parameters are far from the identity."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def all_confidences(em: ExitModel, x: torch.Tensor, scores: Callable) -> torch.Tensor:
    """Every sample's confidence at every exit, from the whole network (no sample leaves): [exits, samples]."""
    with torch.inference_mode():
        feats, _ = em.features(x)
        return torch.stack([scores(j, f)[0].float() for j, f in enumerate(feats)])


def compare_passes(em: ExitModel, x: torch.Tensor, scores: Callable, thresholds: list[float]) -> tuple[int, int]:
    """The early-exit pass of ``em`` and of its folded copy on ``x``: (samples that differ in class or exit,
    samples with a confidence within NEAR of a threshold at an exit they reach). Asserts that every difference
    is such a sample, and that samples leave at several exits (else there is little to compare)."""

    def decide(j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conf, pred = scores(j, h)
        return conf > thresholds[j], pred

    folded = folded_exit_model(em)
    classes, exits = run_early_exit(em, x, decide)
    folded_classes, folded_exits = run_early_exit(folded, x, decide)
    conf = all_confidences(em, x, scores)
    t = torch.tensor(thresholds)[:, None]
    reached = torch.arange(len(thresholds))[:, None] <= torch.minimum(exits, folded_exits)[None, :]
    near = ((conf - t).abs() < NEAR) & reached
    boundary = near.any(0)
    differ = (classes != folded_classes) | (exits != folded_exits)
    assert not (differ & ~boundary).any(), f"{int((differ & ~boundary).sum())} samples differ away from a threshold"
    assert len(set(exits.tolist())) > 2, "samples leave at several exits"
    return int(differ.sum()), int(boundary.sum())


# ---------------------------------------------------------------------------------------------
# The demo checkpoint, its E²CM exits fitted by eetool on the demo data


@pytest.fixture(scope="module")
def demo_exits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("bnfold")
    means, thresholds = d / "means.safetensors", d / "thresholds.yaml"
    ok(invoke("calibrate-means", "-c", "demo", "-d", "demo", "--split", "train", "-o", means, "-q"))
    ok(invoke("fit-thresholds", "--means", means, "-o", thresholds, "--budget", 0.25, "--budget", 0.5, "-q"))
    return means, thresholds


def demo_inputs() -> tuple[object, torch.Tensor]:
    ckpt = load_checkpoint("demo")
    ds = load_dataset("demo", "test")
    assert ds.images is not None
    return ckpt, Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)(ds.images, "cpu")


def test_every_batch_norm_of_the_demo_resnet_is_folded_and_the_logits_agree() -> None:
    ckpt, x = demo_inputs()
    model = ckpt.model.eval()  # type: ignore[attr-defined]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model)
    assert batch_norms(model) == folded_pairs(folded) == 21 and batch_norms(folded) == 0
    with torch.inference_mode():
        logits, folded_logits = model(x), folded(x)
    scale = float(logits.abs().max())
    assert float((logits - folded_logits).abs().max()) < RELATIVE * scale
    assert torch.equal(logits.argmax(1), folded_logits.argmax(1))
    # the checkpoint's own network is untouched
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert batch_norms(model) == 21


@pytest.mark.parametrize("point", [0, 1])
def test_demo_e2cm_exits_give_the_same_classes_and_exits_folded(demo_exits: tuple[Path, Path], point: int) -> None:
    from eetool.classification.early_exit_evaluation import early_exit_setup

    means, thresholds = demo_exits
    ckpt, x = demo_inputs()
    em, rule, _, chosen, _, _ = early_exit_setup(ckpt, str(means), None, str(thresholds), str(point), "cpu")  # type: ignore[arg-type]
    limits = list(chosen[0][1]["thresholds"])
    differ, boundary = compare_passes(em, x, rule.scores, limits)
    # the exit features themselves: within rounding of the unfolded network's
    folded = folded_exit_model(em)
    with torch.inference_mode():
        feats, _ = em.features(x)
        folded_feats, _ = folded.features(x)
    for f, g in zip(feats, folded_feats, strict=True):
        assert float((f - g).abs().max()) < RELATIVE * float(f.abs().max())
    print(f"point {point}: {differ} of {len(x)} samples differ, {boundary} within {NEAR} of a threshold")


# ---------------------------------------------------------------------------------------------
# A torchvision ResNet-18 (a foreign network, split by its blocks)


def test_torchvision_resnet18_is_folded_and_its_exits_agree() -> None:
    model = resnet18()
    folded = fold_batch_norm(model)
    assert folded_pairs(folded) == batch_norms(model) == 20  # every block's and every downsample's
    x = torch.randn(48, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits, folded_logits = model(x), folded(x)
    assert float((logits - folded_logits).abs().max()) < RELATIVE * float(logits.abs().max())
    assert torch.equal(logits.argmax(1), folded_logits.argmax(1))

    em = build_exit_model(model, "every")
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        widths = [f.shape[1] for f in em.features(x[:1])[0]]
    projections = [torch.randn(w, 10, generator=gen) for w in widths]

    def scores(j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pooled features of unit length: confidences spread out below 1 (not saturated, all at one threshold)
        p = torch.softmax(nn.functional.normalize(h.mean((2, 3)), dim=1) @ projections[j] * 2, 1)
        return p.max(1)

    conf = all_confidences(em, x, scores)
    # a threshold per exit that about a fifth of the samples pass, so that every exit is used
    thresholds = conf.quantile(0.8, dim=1).tolist()
    differ, boundary = compare_passes(em, x, scores, thresholds)
    assert boundary < len(x) // 10, "the confidences are spread out, not stacked at the thresholds"
    print(f"resnet18: {differ} of {len(x)} samples differ, {boundary} within {NEAR} of a threshold")


# ---------------------------------------------------------------------------------------------
# What cannot be proved is left as it is


def test_a_pair_split_by_an_exit_is_left_unfolded() -> None:
    """An nn.Sequential is split into its children: the exit after the convolution reads its own output."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    model[1].running_mean.fill_(0.5)
    folded = fold_batch_norm(model)
    assert folded_pairs(folded) == 0 and batch_norms(folded) == 1


class Residual(nn.Module):
    """The convolution's output is read twice: by the batch norm and by the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


class Hooked(nn.Module):
    """Cannot be split into units (hook mode): an exit at a convolution must keep reading the convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.block = Residual()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.bn(self.conv(x))).mean((2, 3)))


def test_only_the_pairs_the_data_flow_proves_are_folded() -> None:
    model = Hooked().eval()
    # the exit at conv keeps conv and bn apart; in the block, conv feeds two readers, conv2 -> bn2 is folded
    folded = fold_batch_norm(model, exits=["conv", "block"])
    assert folded_pairs(folded) == 1
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.block.bn, nn.BatchNorm2d)
    assert not isinstance(folded.block.bn2, nn.BatchNorm2d)
    # without that exit, conv -> bn is folded too
    assert folded_pairs(fold_batch_norm(model)) == 2
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        assert float((model(x) - folded(x)).abs().max()) < 1e-5


def test_a_shared_or_hooked_convolution_is_left_unfolded() -> None:
    shared = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(nn.Sequential(shared, nn.BatchNorm2d(4)), nn.Sequential(shared, nn.BatchNorm2d(4)),
                          nn.Flatten(), nn.Linear(4, 2))
    assert folded_pairs(fold_batch_norm(model)) == 0
    hooked = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.Flatten(), nn.Linear(4, 2))
    assert folded_pairs(fold_batch_norm(hooked)) == 1
    # a forward pre-hook (as torch.nn.utils.prune's masks) may change what the convolution computes
    hooked[0][0].register_forward_pre_hook(lambda module, args: None)
    assert folded_pairs(fold_batch_norm(hooked)) == 0


# ---------------------------------------------------------------------------------------------
# The commands: folded by default, --no-fold-batch-norm runs the network as saved


def test_predict_folded_and_unfolded_agree_on_the_demo(demo_exits: tuple[Path, Path]) -> None:
    means, thresholds = demo_exits
    args = ["predict", "-c", "demo", "-d", "demo", "--means", means, "--thresholds", thresholds, "--point", 0, "-q"]
    folded = [json.loads(line) for line in ok(invoke(*args)).stdout.splitlines()]
    saved = [json.loads(line) for line in ok(invoke(*args, "--no-fold-batch-norm")).stdout.splitlines()]
    assert len(folded) == len(saved) > 0
    differ = [(a, b) for a, b in zip(folded, saved, strict=True)
              if (a["class"], a["exit_index"]) != (b["class"], b["exit_index"])]
    assert not differ, differ  # none of the demo's confidences is within rounding of a threshold
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(folded, saved, strict=True)) < NEAR


def test_evaluate_gives_the_same_accuracy_and_exits_folded(demo_exits: tuple[Path, Path], tmp_path: Path) -> None:
    means, thresholds = demo_exits
    indices = tmp_path / "indices.txt"
    indices.write_text("\n".join(str(i) for i in range(0, 2000, 4)))  # 500 of the demo test images
    args = ["evaluate", "-c", "demo", "-d", "demo", "--indices", indices, "--means", means, "--thresholds",
            thresholds, "--point", 0, "--repeats", 1, "--format", "json", "-q"]
    folded = json.loads(ok(invoke(*args)).stdout)
    saved = json.loads(ok(invoke(*args, "--no-fold-batch-norm")).stdout)
    assert len(folded["points"]) == 2 and folded["samples"] == 500
    for a, b in zip(folded["points"], saved["points"], strict=True):
        assert (a["name"], a["accuracy"], a["cost"], a.get("exit_shares")) == \
            (b["name"], b["accuracy"], b["cost"], b.get("exit_shares"))
