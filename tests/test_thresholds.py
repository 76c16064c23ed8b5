"""Threshold search on synthetic exit statistics: the operating point of a threshold vector, the thesis's
bisection, the greedy walk, the sweep and the convex hull, each against a direct re-computation."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from eetool.core.budget_search import (
    ExitStats,
    Point,
    bisect,
    check_budget,
    exit_index,
    greedy,
    greedy_path,
    hull,
    operating_point,
    sweep,
)
from eetool.core.errors import UsageError


def synthetic(n: int, j: int, seed: int, *, ties: bool = False, dtype: torch.dtype = torch.float32) -> ExitStats:
    """Samples of varying difficulty: deeper exits are right more often, and confidence goes with being right.
    With ``ties``, confidences are rounded to a coarse grid so that many are equal."""
    gen = torch.Generator().manual_seed(seed)
    difficulty = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    ability = torch.linspace(-1.0, 1.5, j + 1, dtype=torch.float64)
    logit = ability - difficulty + 0.5 * torch.randn(n, j + 1, generator=gen, dtype=torch.float64)
    correct = torch.rand(n, j + 1, generator=gen, dtype=torch.float64) < torch.sigmoid(2 * logit)
    noise = 0.7 * torch.randn(n, j, generator=gen, dtype=torch.float64)
    conf = 0.1 + 0.9 * torch.sigmoid(2 * logit[:, :j] + noise)
    if ties:
        conf = (conf * 20).round() / 20
    stages = torch.rand(j + 1, generator=gen, dtype=torch.float64) + 0.2
    backbone = stages.cumsum(0) / stages.sum()
    overheads = (0.01 * torch.rand(j, generator=gen, dtype=torch.float64)).cumsum(0)
    costs = torch.cat([backbone[:j] + overheads, backbone[-1:] + overheads[-1:]])
    return ExitStats(conf.to(dtype), correct, costs)


def first_exit_by_loop(conf: torch.Tensor, thresholds: torch.Tensor) -> list[int]:
    out = []
    for row in conf.tolist():
        exits = [e for e, c in enumerate(row) if c > float(thresholds[e])]
        out.append(exits[0] if exits else len(row))
    return out


def random_thresholds(stats: ExitStats, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(stats.num_exits, generator=gen).to(stats.confidence.dtype) * 0.9 + 0.1


# ---------------------------------------------------------------------------------------------
# Operating points


@pytest.mark.parametrize("ties", [False, True])
def test_exit_index_is_the_first_exit_over_its_threshold(ties: bool) -> None:
    stats = synthetic(500, 5, 0, ties=ties)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        t = random_thresholds(stats, gen)
        assert exit_index(stats.confidence, t).tolist() == first_exit_by_loop(stats.confidence, t)
    j = stats.num_exits
    assert exit_index(stats.confidence, torch.ones(j)).tolist() == [j] * 500
    assert exit_index(stats.confidence, torch.zeros(j)).tolist() == [0] * 500


def test_operating_point_is_the_mean_cost_and_accuracy() -> None:
    stats = synthetic(700, 4, 2)
    gen = torch.Generator().manual_seed(3)
    costs, correct = stats.costs.tolist(), stats.correct.tolist()
    for _ in range(5):
        t = random_thresholds(stats, gen)
        exits = first_exit_by_loop(stats.confidence, t)
        cost, acc = operating_point(stats, t)
        assert cost == pytest.approx(sum(costs[e] for e in exits) / 700, abs=1e-12)
        assert acc == pytest.approx(sum(correct[i][e] for i, e in enumerate(exits)) / 700, abs=1e-12)


def test_cost_never_rises_when_a_threshold_falls() -> None:
    gen = torch.Generator().manual_seed(4)
    rng = random.Random(4)
    for seed in range(5):
        stats = synthetic(600, 5, seed, ties=seed % 2 == 1)
        for _ in range(40):
            t = random_thresholds(stats, gen)
            k = rng.randrange(stats.num_exits)
            lower = t.clone()
            lower[k] = lower[k] * rng.random()
            assert operating_point(stats, lower)[0] <= operating_point(stats, t)[0] + 1e-12


# ---------------------------------------------------------------------------------------------
# Budgets and the thesis's bisection


def test_budgets_outside_the_reachable_range_are_refused() -> None:
    stats = synthetic(300, 4, 5)
    low, high = stats.reachable()
    assert (low, high) == (float(stats.costs[0]), float(stats.costs[-1])) and high > 1.0
    for budget in (low / 2, low - 1e-6, 1.0 + 1e-6, 1.5, -0.1):
        with pytest.raises(UsageError) as err:
            check_budget(stats, budget)
        assert f"{low:.4f} to {1.0:.4f}" in str(err.value)
        with pytest.raises(UsageError):
            bisect(stats, budget)
        with pytest.raises(UsageError):
            greedy(stats, budget)
    for budget in (low, (low + 1) / 2, 1.0):
        check_budget(stats, budget)


def test_the_reachable_range_ends_at_the_dearest_exit_when_that_is_below_one() -> None:
    stats = synthetic(300, 4, 6)
    stats.costs = stats.costs / stats.costs[-1] * 0.9  # a model whose head costs less than the budget unit
    low, high = stats.reachable()
    with pytest.raises(UsageError) as err:
        check_budget(stats, 0.95)
    assert f"{low:.4f} to {high:.4f}" in str(err.value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bisect_reaches_the_budget(seed: int) -> None:
    stats = synthetic(3000, 5, seed)
    low, _ = stats.reachable()
    gen = torch.Generator().manual_seed(seed)
    for budget in (low + 0.01, 0.3, 0.5, 0.7, 0.9, 1.0):
        if budget < low:
            continue
        t = bisect(stats, budget, tol=5e-4, generator=gen)
        cost, _ = operating_point(stats, t)
        assert abs(cost - budget) <= 5e-4, (budget, cost)
        assert bool(((t >= 0) & (t <= 1)).all())


def test_bisect_reaches_reachable_budgets_past_big_jumps_in_cost() -> None:
    """Saturated confidences (every one above 0.8 is 1.0) make the cost jump wherever a threshold crosses 1.0.
    Wherever the greedy walk shows a vector within tol/2 of a budget, bisect must find one within tol."""
    checked = 0
    for seed in range(6):
        stats = synthetic(2000, 5, seed)
        stats.confidence[stats.confidence > 0.8] = 1.0
        path = greedy_path(stats)
        gen = torch.Generator().manual_seed(seed)
        for budget in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            if budget < stats.reachable()[0] or float((path.costs - budget).abs().min()) > 2.5e-4:
                continue
            cost, _ = operating_point(stats, bisect(stats, budget, tol=5e-4, generator=gen))
            assert abs(cost - budget) <= 5e-4, (seed, budget, cost)
            checked += 1
    assert checked >= 20


# ---------------------------------------------------------------------------------------------
# The greedy walk


@pytest.mark.parametrize(("ties", "dtype"), [(False, torch.float32), (True, torch.float32),
                                             (False, torch.float64), (True, torch.float64)])
def test_every_step_of_the_greedy_walk_replays_to_its_recorded_point(ties: bool, dtype: torch.dtype) -> None:
    stats = synthetic(400, 4, 7, ties=ties, dtype=dtype)
    path = greedy_path(stats)
    steps = list(range(len(path.costs)))
    assert len(path.exits) == len(path.values) == len(steps) - 1
    for step, t in zip(steps, path.thresholds_at(steps, stats.num_exits), strict=True):
        cost, acc = operating_point(stats, t)
        assert cost == pytest.approx(float(path.costs[step]), abs=1e-12), step
        assert acc == pytest.approx(float(path.accuracies[step]), abs=1e-12), step
    # from "nobody leaves early" to "everyone leaves at the first exit", never dearer on the way
    assert float(path.costs[0]) == pytest.approx(float(stats.costs[-1]))
    assert float(path.accuracies[0]) == pytest.approx(float(stats.correct[:, -1].double().mean()))
    assert float(path.costs[-1]) == pytest.approx(float(stats.costs[0]))
    assert bool((path.costs[1:] <= path.costs[:-1] + 1e-12).all())


def test_greedy_thresholds_separate_confidences_closer_than_float32_resolution() -> None:
    """float64 confidences 1e-12 apart: each step's threshold must let exactly its own sample through."""
    conf = torch.tensor([[0.5], [0.5 + 1e-12], [0.5 + 2e-12], [0.25]], dtype=torch.float64)
    correct = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    stats = ExitStats(conf, correct, torch.tensor([0.2, 1.0], dtype=torch.float64))
    path = greedy_path(stats)
    assert path.values.dtype == torch.float64
    steps = list(range(len(path.costs)))
    assert len(steps) == 5  # one sample at a time: no two confidences are equal
    for step, t in zip(steps, path.thresholds_at(steps, 1), strict=True):
        assert operating_point(stats, t) == pytest.approx((float(path.costs[step]), float(path.accuracies[step])))
        assert int((conf[:, 0] > t[0]).sum()) == step


def move_ratios(stats: ExitStats, exits: list[int]) -> dict[int, float]:
    """For samples at ``exits``: per exit k, accuracy lost per cost saved by lowering T_k just below the highest
    confidence of the samples still passing k (they and their ties leave at k)."""
    conf, correct, costs = stats.confidence.tolist(), stats.correct.tolist(), stats.costs.tolist()
    ratios = {}
    for k in range(stats.num_exits):
        passing = [i for i, e in enumerate(exits) if e > k]
        if not passing:
            continue
        top = max(conf[i][k] for i in passing)
        group = [i for i in passing if conf[i][k] == top]
        saved = sum(costs[exits[i]] - costs[k] for i in group)
        lost = sum(correct[i][exits[i]] - correct[i][k] for i in group)
        ratios[k] = lost / saved
    return ratios


@pytest.mark.parametrize("seed", range(6))
def test_each_greedy_step_takes_the_move_losing_least_accuracy_per_cost_saved(seed: int) -> None:
    stats = synthetic(60, 4, 200 + seed, ties=seed % 2 == 1)
    path = greedy_path(stats)
    steps = list(range(len(path.exits)))
    for step, t in zip(steps, path.thresholds_at(steps, stats.num_exits), strict=True):
        ratios = move_ratios(stats, exit_index(stats.confidence, t).tolist())
        taken = int(path.exits[step])
        assert ratios[taken] == pytest.approx(min(ratios.values()), abs=1e-12), (step, taken, ratios)


def test_replaying_steps_in_any_order_gives_the_same_thresholds() -> None:
    stats = synthetic(300, 4, 8)
    path = greedy_path(stats)
    steps = [len(path.costs) - 1, 0, 17, 5, 17]
    got = path.thresholds_at(steps, stats.num_exits)
    one_by_one = [path.thresholds_at([s], stats.num_exits)[0] for s in steps]
    assert all(torch.equal(a, b) for a, b in zip(got, one_by_one, strict=True))


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_takes_the_most_accurate_step_within_the_budget(seed: int) -> None:
    stats = synthetic(800, 5, seed, ties=seed == 1)
    path = greedy_path(stats)
    low, _ = stats.reachable()
    costs, accs = path.costs.tolist(), path.accuracies.tolist()
    for budget in (low, 0.25, 0.4, 0.55, 0.8, 1.0):
        if budget < low:
            continue
        t = greedy(stats, budget, path)
        within = [s for s, c in enumerate(costs) if c <= budget + 1e-12]
        best_acc = max(accs[s] for s in within)
        best = max(s for s in within if accs[s] == best_acc)  # the cheapest of the most accurate
        assert torch.equal(t, path.thresholds_at([best], stats.num_exits)[0])
        cost, acc = operating_point(stats, t)
        assert cost <= budget + 1e-12
        assert acc == best_acc
        assert torch.equal(t, greedy(stats, budget))  # the same without a precomputed walk


def test_greedy_is_at_least_as_accurate_as_bisect_on_average() -> None:
    """The greedy walk against the thesis's reference at the same budgets (three random starts each)."""
    greedy_acc, bisect_acc = [], []
    for seed in range(8):
        stats = synthetic(1500, 5, 100 + seed)
        path = greedy_path(stats)
        low, _ = stats.reachable()
        for budget in (0.3, 0.5, 0.7, 0.9):
            if budget < low:
                continue
            greedy_acc.append(operating_point(stats, greedy(stats, budget, path))[1])
            starts = [torch.Generator().manual_seed(r) for r in range(3)]
            bisect_acc.append(statistics.mean(operating_point(stats, bisect(stats, budget, generator=g))[1]
                                              for g in starts))
    assert len(greedy_acc) >= 20
    assert statistics.mean(greedy_acc) >= statistics.mean(bisect_acc) - 0.005


# ---------------------------------------------------------------------------------------------
# Sweep


@pytest.mark.parametrize("search", ["greedy", "bisect"])
def test_sweep_gives_a_point_for_exactly_the_reachable_budgets(search: str) -> None:
    stats = synthetic(1000, 4, 9)
    low, high = stats.reachable()
    grid = [round(i * 0.05, 10) for i in range(21)]
    points = sweep(stats, grid, search, seed=3)
    assert [p.budget for p in points] == [b for b in grid if low <= b <= min(high, 1.0)]
    assert 0 < len(points) < len(grid)  # the cheapest budgets are below the first exit
    for p in points:
        t = torch.tensor(p.thresholds, dtype=stats.confidence.dtype)
        assert operating_point(stats, t) == pytest.approx((p.cost, p.accuracy), abs=1e-12)
        if search == "greedy":
            assert p.cost <= p.budget + 1e-12
        else:
            assert abs(p.cost - p.budget) <= 5e-4


def test_sweep_refuses_an_unknown_search() -> None:
    with pytest.raises(UsageError, match="unknown search"):
        sweep(synthetic(50, 2, 0), [0.5], "anneal")


# ---------------------------------------------------------------------------------------------
# Convex hull


def frontier_at(points: list[Point], cost: float) -> float:
    """The hull's piecewise-linear accuracy at ``cost`` (within its cost range)."""
    for a, b in zip(points, points[1:], strict=False):
        if a.cost <= cost <= b.cost:
            return a.accuracy + (b.accuracy - a.accuracy) * (cost - a.cost) / (b.cost - a.cost)
    assert len(points) == 1 and cost == points[0].cost
    return points[0].accuracy


def best_time_sharing(points: list[Point], cost: float) -> float:
    """Brute force: the best accuracy at ``cost`` from one point or from mixing any two points."""
    best = max((p.accuracy for p in points if p.cost == cost), default=-1.0)
    for a in points:
        for b in points:
            if a.cost < cost < b.cost:
                best = max(best, a.accuracy + (b.accuracy - a.accuracy) * (cost - a.cost) / (b.cost - a.cost))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_hull_is_the_upper_concave_frontier(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 25)
    grid = seed % 2 == 0  # on a coarse grid there are equal costs, equal accuracies and collinear points
    points = [Point(0.5, round(rng.random(), 1) if grid else rng.random(), round(rng.random(), 1) if grid
                    else rng.random(), []) for _ in range(n)]
    frontier = hull(points)
    assert frontier and all(any(f is p for p in points) for f in frontier)
    assert frontier[0].cost == min(p.cost for p in points)
    assert frontier[-1].accuracy == max(p.accuracy for p in points)
    for a, b in zip(frontier, frontier[1:], strict=False):
        assert a.cost < b.cost and a.accuracy < b.accuracy
    slopes = [(b.accuracy - a.accuracy) / (b.cost - a.cost) for a, b in zip(frontier, frontier[1:], strict=False)]
    assert all(s1 > s2 for s1, s2 in zip(slopes, slopes[1:], strict=False)), "concave, without collinear points"
    lo, hi = frontier[0].cost, frontier[-1].cost
    for p in points:
        if lo <= p.cost <= hi:
            assert p.accuracy <= frontier_at(frontier, p.cost) + 1e-12
            assert frontier_at(frontier, p.cost) == pytest.approx(best_time_sharing(points, p.cost), abs=1e-12)
        else:
            assert p.accuracy <= frontier[-1].accuracy


def test_hull_of_a_greedy_sweep_is_no_worse_than_any_swept_point() -> None:
    stats = synthetic(1000, 5, 10)
    swept = sweep(stats, [i / 100 for i in range(101)])
    frontier = hull(swept)
    assert 2 <= len(frontier) <= len(swept)
    for p in swept:
        if frontier[0].cost <= p.cost <= frontier[-1].cost:
            assert p.accuracy <= frontier_at(frontier, p.cost) + 1e-12
