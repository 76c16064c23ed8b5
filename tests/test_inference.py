"""Early-exit inference against a brute-force, per-sample re-computation from the full features."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.exits import HOOK, ExitModel, build_exit_model, exit_input
from eetool.core.inference import (
    BUSY_SPREAD,
    evaluate_exits,
    interleaved,
    per_class_accuracy,
    run_early_exit,
    speeds,
    timing_spread,
)


def score(f: torch.Tensor) -> torch.Tensor:
    """What the test rule looks at: each sample's mean activation."""
    return f.flatten(1).mean(1)


def guess(f: torch.Tensor) -> torch.Tensor:
    """What the test rule predicts: the channel with the largest mean (mod 10)."""
    return f.mean((2, 3)).argmax(1) % 10


def well_separated_threshold(scores: torch.Tensor) -> float:
    """A threshold in the middle half of the scores, in their widest gap: float noise cannot flip a decision."""
    s = scores.sort().values
    lo, hi = len(s) // 4, max(len(s) // 4 + 1, 3 * len(s) // 4)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    k = lo + int(gaps.argmax())
    return float((s[k] + s[k + 1]) / 2)


# Each architecture with the exits the tests take: a chain of single tensors, and one that carries several scales.
ARCHS = {"resnet20": ({"width": 4}, "stem,layer1.2,layer2.1,layer3.0"),
         "msdnet": ({"width": 4, "growth": 4}, "every")}


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request: pytest.FixtureRequest) -> tuple[ExitModel, torch.Tensor]:
    from eetool.core.builders import build_model

    arch_args, exits = ARCHS[request.param]
    torch.manual_seed(0)
    model = build_model(request.param, 10, 1, arch_args)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    model.eval()
    return build_exit_model(model, exits), torch.randn(40, 1, 12, 12, generator=gen)


def thresholds_for(em: ExitModel, x: torch.Tensor) -> list[float]:
    """Thresholds that let a fair share of the still-remaining samples leave at each exit."""
    with torch.no_grad():
        outs, _ = em.features(x)
    remaining = torch.ones(x.shape[0], dtype=torch.bool)
    out = []
    for f in outs:
        s = score(f)
        t = well_separated_threshold(s[remaining]) if remaining.sum() >= 2 else math.inf
        out.append(t)
        remaining &= ~(s > t)
    return out


def threshold_rule(thresholds: list[float]):  # type: ignore[no-untyped-def]
    def decide(j: int, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return score(f) > thresholds[j], guess(f)

    return decide


def brute_force(em: ExitModel, x: torch.Tensor, thresholds: list[float]) -> tuple[list[int], list[int]]:
    """Each sample on its own, with every feature computed: the first exit whose test passes takes it."""
    with torch.no_grad():
        outs, logits = em.features(x)
    preds, exits = [], []
    for i in range(x.shape[0]):
        for j, f in enumerate(outs):
            fi = f[i:i + 1]
            if float(score(fi)) > thresholds[j]:
                preds.append(int(guess(fi)))
                exits.append(j)
                break
        else:
            preds.append(int(logits[i].argmax()))
            exits.append(len(outs))
    return preds, exits


def test_matches_the_brute_force_decisions(setup: tuple[ExitModel, torch.Tensor]) -> None:
    em, x = setup
    thresholds = thresholds_for(em, x)
    want_preds, want_exits = brute_force(em, x, thresholds)
    assert len(set(want_exits)) >= 3  # the test exercises several exits, the head included
    preds, exits = run_early_exit(em, x, threshold_rule(thresholds))
    assert exits.tolist() == want_exits
    assert preds.tolist() == want_preds


def test_never_exiting_gives_the_model_itself(setup: tuple[ExitModel, torch.Tensor]) -> None:
    em, x = setup

    def never(j: int, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(f.shape[0], dtype=torch.bool), torch.zeros(f.shape[0], dtype=torch.int64)

    preds, exits = run_early_exit(em, x, never)
    with torch.no_grad():
        assert preds.tolist() == em.model(x).argmax(1).tolist()
    assert exits.tolist() == [len(em.exits)] * x.shape[0]


def test_always_exiting_first(setup: tuple[ExitModel, torch.Tensor]) -> None:
    em, x = setup
    calls = []

    def always(j: int, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(j)
        return torch.ones(f.shape[0], dtype=torch.bool), guess(f)

    preds, exits = run_early_exit(em, x, always)
    with torch.no_grad():
        first = exit_input(em.stages[0](x))
    assert exits.tolist() == [0] * x.shape[0]
    assert preds.tolist() == guess(first).tolist()
    assert calls == [0]  # nobody is left to decide about later


def test_split_and_hook_mode_agree(setup: tuple[ExitModel, torch.Tensor]) -> None:
    em, x = setup
    hooked = ExitModel(em.model, HOOK, list(em.exits))
    thresholds = thresholds_for(em, x)
    split_preds, split_exits = run_early_exit(em, x, threshold_rule(thresholds))
    hook_preds, hook_exits = run_early_exit(hooked, x, threshold_rule(thresholds))
    assert hook_exits.tolist() == split_exits.tolist()
    assert hook_preds.tolist() == split_preds.tolist()


def test_exited_samples_leave_the_batch(setup: tuple[ExitModel, torch.Tensor]) -> None:
    em, x = setup
    thresholds = thresholds_for(em, x)
    _, want_exits = brute_force(em, x, thresholds)
    seen: list[int] = []
    handles = [stage.register_forward_pre_hook(lambda m, args: seen.append(exit_input(args[0]).shape[0]))
               for stage in em.stages]
    try:
        run_early_exit(em, x, threshold_rule(thresholds))
    finally:
        for h in handles:
            h.remove()
    # Stage k runs on the samples that passed exits 0..k-1.
    want = [sum(1 for e in want_exits if e >= k) for k in range(len(em.stages))]
    want = [n for n in want if n > 0]
    assert seen == want
    assert seen[-1] < seen[0]


def test_evaluate_exits_batches_like_one_big_batch(tiny_checkpoint: str, tiny_data: str) -> None:
    from eetool.core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    ds = load_dataset(tiny_data, "test")
    pre = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    em = build_exit_model(ckpt.model, "half")
    x = pre(ds.images)
    thresholds = thresholds_for(em, x)
    want_preds, want_exits = brute_force(em, x, thresholds)
    ckpt.model.train()  # evaluation must not depend on the mode it was handed the model in
    run = evaluate_exits(em, ds, pre, threshold_rule(thresholds), batch_size=24)
    assert run.exit_index.tolist() == want_exits
    assert run.predictions.tolist() == want_preds


def test_per_class_accuracy_against_a_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    num_classes = 6
    labels = torch.randint(-1, num_classes - 1, (200,), generator=gen)  # class 5 never occurs; -1 is unlabelled
    predictions = torch.randint(0, num_classes, (200,), generator=gen)
    predictions[labels == 2] = 2  # one class fully right
    got = per_class_accuracy(predictions, labels, num_classes)
    assert got.shape == (num_classes,)
    for k in range(num_classes):
        total = sum(1 for y in labels.tolist() if y == k)
        correct = sum(1 for p, y in zip(predictions.tolist(), labels.tolist(), strict=True) if y == k and p == k)
        if total == 0:
            assert math.isnan(float(got[k]))
        else:
            assert float(got[k]) == pytest.approx(correct / total)
    assert float(got[2]) == 1.0


# ---------------------------------------------------------------------------------------------
# Timing rounds: order and the figures drawn from them (no clock is read here)


def test_rounds_interleave_every_run() -> None:
    calls: list[str] = []

    def run(name: str):  # type: ignore[no-untyped-def]
        def call() -> str:
            calls.append(name)
            return f"{name}{calls.count(name)}"
        return call

    results = interleaved([run("plain"), run("p0"), run("p1")], 3)
    assert calls == ["plain", "p0", "p1"] * 3
    assert results == [["plain1", "p01", "p11"], ["plain2", "p02", "p12"], ["plain3", "p03", "p13"]]


def test_speedups_compare_runs_within_a_round_and_take_the_median() -> None:
    # round 2 ran on a machine twice as busy: every run took twice as long, so its speed-ups are unchanged
    seconds = [[2.0, 1.0, 0.5], [4.0, 2.0, 1.0], [2.0, 0.8, 0.5]]
    plain, p0, p1 = speeds(seconds, samples=100)
    assert plain.speedup == plain.speedup_min == plain.speedup_max == 1.0
    assert plain.seconds == [2.0, 4.0, 2.0] and plain.throughput == pytest.approx(50.0)
    assert (p0.speedup, p0.speedup_min, p0.speedup_max) == pytest.approx((2.0, 2.0, 2.5))
    assert p0.throughput == pytest.approx(100.0)  # median of 100, 50 and 125 samples/s
    assert (p1.speedup, p1.speedup_min, p1.speedup_max) == pytest.approx((4.0, 4.0, 4.0))
    # the plain model's times varied by 2x: the rounds disagree although the speed-ups held
    assert timing_spread([plain, p0, p1]) == pytest.approx(2.0)


def test_timing_spread_of_steady_rounds_or_one_round_is_one() -> None:
    assert timing_spread(speeds([[2.0, 1.0]], samples=10)) == 1.0
    assert timing_spread(speeds([[2.0, 1.0], [2.0, 1.0]], samples=10)) == 1.0
    # steady plain model, a point whose speed-up moved from 2x to 3x
    assert timing_spread(speeds([[3.0, 1.5], [3.0, 1.0]], samples=10)) == pytest.approx(1.5)
    assert timing_spread(speeds([[3.0, 1.5], [3.0, 1.0]], samples=10)) > BUSY_SPREAD
