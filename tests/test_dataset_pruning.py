"""Dataset pruning's algorithms, each checked against a direct re-computation on small inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eetool.classification import dataset_pruning as dp
from eetool.core import training_loop as training
from eetool.core.checkpoint import ModelSpec
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.errors import UsageError
from eetool.core.training_loop import TrainConfig, fit


def easy_dataset(n: int = 120, seed: int = 0) -> Dataset:
    """Class c has brightness 24c + 10 under noise: learnable in an epoch or two, even from pooled features."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    noise = torch.randint(-8, 9, (n, 1, 28, 28), generator=gen)
    images = (labels.view(n, 1, 1, 1) * 24 + 10 + noise).clamp(0, 255).to(torch.uint8)
    return Dataset("easy", "train", images, labels, [f"c{k}" for k in range(10)], "tests")


def test_log_odds_is_log_p_over_1_minus_p_and_keeps_ranking_past_float32_saturation() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    p = logits.double().softmax(1).max(1).values
    assert torch.allclose(dp.log_odds(logits), torch.log(p / (1 - p)))
    assert torch.allclose(dp.confidence(dp.log_odds(logits)), p)
    huge = torch.tensor([[60.0, 0.0], [80.0, 0.0]])
    assert bool((huge.softmax(1).max(1).values == 1.0).all())  # float32 cannot tell them apart
    margins = dp.log_odds(huge)
    assert margins.tolist() == pytest.approx([60.0, 80.0])


def test_qualification_keeps_the_highest_confidence_at_which_both_exits_were_right() -> None:
    tracker = dp.QualificationTracker(5)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(4):  # four presentations of every sample, in two batches each
        for positions in (torch.tensor([3, 0, 4]), torch.tensor([1, 2])):
            early = torch.randn(len(positions), 3, generator=gen) * 3
            final = torch.randn(len(positions), 3, generator=gen) * 3
            y = torch.randint(0, 3, (len(positions),), generator=gen)
            tracker._last = (early, final, y)
            tracker.after_step(positions)
            history.append((positions, early, final, y))
    expected = [float("-inf")] * 5
    for positions, early, final, y in history:
        for j, i in enumerate(positions.tolist()):
            pe = early[j].double().softmax(0)
            if int(early[j].argmax()) == int(y[j]) and int(final[j].argmax()) == int(y[j]):
                expected[i] = max(expected[i], math.log(float(pe.max()) / (1 - float(pe.max()))))
    assert tracker.qualified.tolist() == pytest.approx(expected)


def test_forgetting_counts_right_then_wrong_transitions() -> None:
    tracker = dp.ForgettingTracker(3)
    # presentations: sample 0 right, wrong, right, wrong (2 events); 1 always wrong (never learned);
    # 2 wrong, right, right, wrong (1 event)
    sequences = [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]]
    for t in range(4):
        right = torch.tensor([s[t] for s in sequences], dtype=torch.bool)
        y = torch.zeros(3, dtype=torch.int64)
        logits = torch.stack([torch.tensor([1.0, 0.0]) if r else torch.tensor([0.0, 1.0]) for r in right])
        tracker._last = (logits, y)
        tracker.after_step(torch.arange(3))
    assert tracker.forgotten.tolist() == [2, 0, 1]
    assert tracker.learned.tolist() == [True, False, True]
    prio = dp.priority("forgetting", {"forgotten": tracker.forgotten, "learned": tracker.learned})
    assert prio.tolist() == [-2.0, float("-inf"), -1.0]  # never learned: pruned last


def test_priorities_match_the_thesis_formulas() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 50
    records = {
        "early_loss": torch.rand(n, generator=gen, dtype=torch.float64),
        "final_loss": torch.rand(n, generator=gen, dtype=torch.float64),
        "early_margin": torch.randn(n, generator=gen, dtype=torch.float64) * 3,
        "final_margin": torch.randn(n, generator=gen, dtype=torch.float64) * 3,
        "early_correct": torch.rand(n, generator=gen) < 0.7,
        "final_correct": torch.rand(n, generator=gen) < 0.8,
    }
    loss = dp.priority("eeprune-loss", records)
    assert torch.equal(loss, -(records["early_loss"] + records["final_loss"]))
    soft = dp.priority("eeprune-soft", records, ratio=0.2, soft_weights=(0.4, 0.2, 0.4, 0.001))
    pe, pf = torch.sigmoid(records["early_margin"]), torch.sigmoid(records["final_margin"])
    t = sorted(pe.tolist(), reverse=True)[9]  # 20% of 50 = 10 samples at or above it
    for i in range(n):
        want = (0.4 * float(records["early_correct"][i]) + 0.2 * float(records["final_correct"][i])
                + 0.4 * float(pe[i] >= t) + 0.001 * (float(pe[i]) + float(pf[i])))
        assert float(soft[i]) == pytest.approx(want)
    fixed = dp.priority("eeprune-soft", records, soft_weights=(0.0, 0.0, 1.0, 0.0), soft_threshold=0.9)
    assert torch.equal(fixed, (pe > 0.9).double())


def test_select_prunes_exactly_the_highest_priorities_and_reports_the_threshold() -> None:
    scores = torch.tensor([0.5, float("-inf"), 2.0, 1.0, -1.0, 3.0, float("-inf"), 0.0, 1.5, 2.5], dtype=torch.float64)
    labels = torch.arange(10) % 2
    sel = dp.select(scores, labels, 0.3, balanced=False, seed=0, method="eeprune")
    assert sel.pruned.tolist() == [2, 5, 9]  # 3.0, 2.5, 2.0
    assert sel.kept.tolist() == [0, 1, 3, 4, 6, 7, 8]
    assert sel.threshold == pytest.approx(1 / (1 + math.exp(-1.5)))  # the next one, 1.5, stays
    with pytest.raises(UsageError, match="only 8 of 10 samples"):
        dp.select(scores, labels, 0.9, balanced=False, seed=0, method="eeprune")


def test_select_balanced_takes_the_fraction_from_every_class_and_breaks_ties_by_seed() -> None:
    labels = torch.tensor([0] * 10 + [1] * 20)
    scores = torch.zeros(30, dtype=torch.float64)  # all tied
    a = dp.select(scores, labels, 0.5, balanced=True, seed=1)
    assert torch.bincount(labels[a.pruned]).tolist() == [5, 10]
    assert a.ties == 30  # every sample shares the boundary priority of its class
    again = dp.select(scores, labels, 0.5, balanced=True, seed=1)
    other = dp.select(scores, labels, 0.5, balanced=True, seed=2)
    assert torch.equal(a.pruned, again.pruned)
    assert not torch.equal(a.pruned, other.pruned)


def test_select_refuses_ratios_outside_0_1() -> None:
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(UsageError, match="--ratio"):
            dp.select(torch.zeros(4), torch.zeros(4, dtype=torch.int64), bad, balanced=False, seed=0)


def test_exit_locations_are_the_quartiles_of_the_exit_points(tiny_spec: ModelSpec) -> None:
    model = tiny_spec.build()
    assert [dp.exit_point(model, loc) for loc in ("before", "mid", "after")] == ["layer1.1", "layer2.1", "layer3.0"]
    assert dp.exit_point(model, "layer2.0") == "layer2.0"
    with pytest.raises(UsageError, match="not an exit point"):
        dp.exit_point(model, "layer9.9")


def test_the_early_exit_is_a_linear_layer_on_the_pooled_features_at_the_exit(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(0)
    net = dp.EarlyExitNetwork(tiny_spec.build(), "layer2.1", (1, 28, 28), 10).eval()
    x = torch.randn(3, 1, 28, 28)
    early, final = net(x)
    feats, logits = net.exit_model.features(x)
    assert torch.allclose(final, net.backbone(x), atol=1e-5)
    assert torch.allclose(early, F.linear(feats[0].mean((2, 3)), net.exit.weight, net.exit.bias), atol=1e-5)
    names = {n for n, _ in net.named_parameters()}
    assert "exit.weight" in names and any(n.startswith("backbone.") for n in names)


def test_fit_hands_the_tracker_every_position_once_per_epoch() -> None:
    data = easy_dataset(50)

    class Counter:
        def __init__(self) -> None:
            self.seen = torch.zeros(len(data), dtype=torch.int64)

        def after_step(self, positions: torch.Tensor) -> None:
            self.seen[positions] += 1

        def state_dict(self) -> dict[str, torch.Tensor]:
            return {"seen": self.seen}

        def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
            self.seen = state["seen"]

    counter = Counter()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    fit(model, data, Preprocess((1, 28, 28), [0.5], [0.5]), TrainConfig(epochs=3, batch_size=16, lr=0.01),
        tracker=counter)
    assert counter.seen.tolist() == [3] * len(data)
    budget = Counter()
    fit(model, data, Preprocess((1, 28, 28), [0.5], [0.5]), TrainConfig(samples=70, batch_size=16, lr=0.01),
        tracker=budget)
    assert int(budget.seen.sum()) == 70 and int(budget.seen.max()) == 2


def test_el2n_is_the_norm_of_softmax_minus_one_hot() -> None:
    data = easy_dataset(30)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    pre = Preprocess((1, 28, 28), [0.5], [0.5])
    scores = dp.el2n_scores(model, data, pre, torch.device("cpu"), batch_size=7)
    with torch.no_grad():
        probs = model(pre(data.images)).double().softmax(1)
    direct = (probs - F.one_hot(data.labels, 10).double()).norm(dim=1)
    assert torch.allclose(scores, direct)


def _phase(method: str, spec: ModelSpec, data: Dataset, **kw: object) -> dp.PhaseResult:
    settings = dp.PhaseSettings(method, TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=3), models=2)
    return dp.pruning_phase(settings, lambda _: spec.build(), data, Preprocess((1, 28, 28), [0.2], [0.3]),
                            num_classes=10, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["eeprune", "el2n", "forgetting"])
def test_a_pruning_phase_is_deterministic_and_resumes_exactly_after_an_interruption(
        method: str, tiny_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = easy_dataset(64)
    straight = _phase(method, tiny_spec, data)
    again = _phase(method, tiny_spec, data)
    for k, v in straight.records.items():
        assert torch.equal(v, again.records[k]), k
    # Interrupt after the first saved epoch, then resume from the state folder.
    real_save = training._save_state
    saves = {"n": 0}

    def save_then_stop(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)  # type: ignore[arg-type]
        saves["n"] += 1
        if saves["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_state", save_then_stop)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        _phase(method, tiny_spec, data, state_dir=str(state))
    resumed = _phase(method, tiny_spec, data, state_dir=str(state), resume=True)
    assert resumed.samples_seen == straight.samples_seen
    for k, v in straight.records.items():
        assert torch.allclose(v.double(), resumed.records[k].double()), k


def two_tones(n: int, seed: int = 0) -> Dataset:
    """Dark (class 0) and bright (class 1) images under light noise: far apart, learnt within an epoch."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    noise = torch.randint(-8, 9, (n, 1, 28, 28), generator=gen)
    images = (labels.view(n, 1, 1, 1) * 160 + 40 + noise).clamp(0, 255).to(torch.uint8)
    return Dataset("two-tones", "train", images, labels, [f"c{k}" for k in range(10)], "tests")


def test_eeprune_learns_what_is_easy(tiny_spec: ModelSpec) -> None:
    """On two classes that one number (the brightness) separates, both exits end up right on nearly every sample.

    Chance is half at each exit, and a network that answers one class for everything is right on exactly half the
    samples at both exits; the bounds sit far above those and far below what training reaches (every sample, on
    any seed measured), so other rounding (threads, BLAS) cannot move a result across them."""
    data = two_tones(200)
    settings = dp.PhaseSettings("eeprune", TrainConfig(epochs=3, batch_size=20, lr=0.05, augment=False, seed=0))
    result = dp.pruning_phase(settings, lambda _: tiny_spec.build(), data, Preprocess((1, 28, 28), [0.2], [0.3]),
                              num_classes=10)
    assert result.exit == "layer2.1"
    assert result.samples_seen == 600 and result.samples_scored == 200
    qualified = torch.isfinite(result.records["qualified"])
    assert float(qualified.double().mean()) > 0.8
    both = result.records["early_correct"] & result.records["final_correct"]
    assert float(both.double().mean()) > 0.8


def test_balanced_eeprune_names_the_class_that_cannot_give_its_share() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, float("-inf"), float("-inf"), float("-inf")], dtype=torch.float64)
    sel = dp.select(scores, labels, 0.25, balanced=True, seed=0, method="eeprune")
    assert sel.pruned.tolist() == [3, 4] and sel.threshold is None
    assert sel.class_thresholds == pytest.approx([1 / (1 + math.exp(-3.0)), 0.0])
    with pytest.raises(UsageError, match="only 1 of 4 samples of class 1"):
        dp.select(scores, labels, 0.5, balanced=True, seed=0, method="eeprune")
