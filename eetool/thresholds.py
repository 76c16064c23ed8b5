"""Thresholds that meet a compute budget, and the convex hull of a sweep (thesis 2.4.1).

A sample leaves at the first exit j whose confidence exceeds T_j; the mean normalised cost of
the calibration samples is monotone in each T_j. Two searches:

- ``bisect`` is the thesis's reference: T drawn uniformly from [0, 1]^J, then binary search on
  each component in turn (alternating optimisation): when the thresholds cost more than the
  budget the component is lowered, otherwise raised, until the cost is within ``tol``.
- ``greedy`` walks down from "nobody exits" one sample at a time: at each step, of the J moves
  that lower one threshold just below the highest confidence still passing that exit, it takes
  the one that loses the least calibration accuracy per unit of cost saved. Every step is a
  valid threshold vector, so one walk yields the operating points for every budget at once.

Both return threshold vectors; ``hull`` keeps the upper concave frontier of accuracy against cost.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

from eetool.errors import UsageError

SEARCHES = ("greedy", "bisect")


@dataclass
class ExitStats:
    """Per-sample confidences and correctness at each exit, and the cost of leaving at each exit."""

    confidence: torch.Tensor  # N x J
    correct: torch.Tensor  # N x (J + 1) bool; the last column is the model's own head
    costs: torch.Tensor  # J + 1, normalised (overheads included), non-decreasing

    @property
    def num_exits(self) -> int:
        return int(self.confidence.shape[1])

    def reachable(self) -> tuple[float, float]:
        """Cheapest (everyone leaves at the first exit) and dearest (nobody leaves early) mean cost."""
        return float(self.costs[0]), float(self.costs[-1])


def exit_index(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """First exit whose confidence exceeds its threshold; J where none does."""
    over = confidence > thresholds
    first = over.to(torch.uint8).argmax(1)
    return torch.where(over.any(1), first, torch.full_like(first, confidence.shape[1]))


def operating_point(stats: ExitStats, thresholds: torch.Tensor) -> tuple[float, float]:
    """(mean normalised cost, accuracy) of a threshold vector."""
    e = exit_index(stats.confidence, thresholds)
    cost = float(stats.costs[e].double().mean())
    acc = float(stats.correct.gather(1, e[:, None]).double().mean())
    return cost, acc


def check_budget(stats: ExitStats, budget: float) -> None:
    low, high = stats.reachable()
    if not low <= budget <= min(high, 1.0):
        raise UsageError(f"budget {budget:g} cannot be met: reachable budgets are {low:.4f} to {min(high, 1.0):.4f}",
                         "choose a budget in that range (the first exit's cost is the floor)")


def bisect(stats: ExitStats, budget: float, *, tol: float = 5e-4, max_rounds: int = 60,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The thesis's reference: per-component binary search with alternating optimisation."""
    check_budget(stats, budget)
    j = stats.num_exits
    t = torch.rand(j, generator=generator, dtype=torch.float64).float()
    lo, hi = torch.zeros(j), torch.ones(j)
    best, best_gap = t.clone(), float("inf")
    for _ in range(max_rounds):
        for k in range(j):
            cost, _ = operating_point(stats, t)
            gap = abs(cost - budget)
            if gap < best_gap:
                best, best_gap = t.clone(), gap
            if gap <= tol:
                return t
            if cost > budget:  # too dear: lower T_k so that more samples leave at exit k
                hi[k] = t[k]
                t[k] = (lo[k] + t[k]) / 2
            else:
                lo[k] = t[k]
                t[k] = (t[k] + hi[k]) / 2
    return best


@dataclass
class GreedyPath:
    """The greedy walk: after step s the thresholds are ``start`` with moves[:s] applied."""

    exits: torch.Tensor  # S: which exit's threshold moved
    values: torch.Tensor  # S: its new value
    costs: torch.Tensor  # S + 1: mean normalised cost after each step (index 0: nobody exits early)
    accuracies: torch.Tensor  # S + 1

    def first_step_within(self, budgets: torch.Tensor) -> torch.Tensor:
        """For each budget, the first step whose cost is within it (costs only fall along the walk)."""
        steps = torch.searchsorted(-self.costs, -budgets.double() - 1e-12, side="left")
        return steps.clamp_max(self.costs.numel() - 1)

    def thresholds_at(self, steps: list[int], num_exits: int) -> list[torch.Tensor]:
        """Threshold vectors after each of ``steps``, replaying the moves once."""
        out: dict[int, torch.Tensor] = {}
        t = torch.ones(num_exits)
        wanted = sorted(set(steps))
        moves = zip(self.exits.tolist(), self.values.tolist(), strict=True)
        done = 0
        for step in wanted:
            for e, v in itertools.islice(moves, step - done):
                t[e] = v
            done = step
            out[step] = t.clone()
        return [out[s] for s in steps]


def greedy_path(stats: ExitStats) -> GreedyPath:
    """One walk from cost c_J down to c_0 (see the module docstring)."""
    conf = stats.confidence
    n, j = conf.shape
    costs = stats.costs.tolist()
    correct = stats.correct.to(torch.int8)
    order = torch.argsort(conf, dim=0, descending=True, stable=True).T.contiguous()  # J x N
    order_l = order.tolist()
    conf_l = conf.T.tolist()
    correct_l = correct.tolist()
    current = [j] * n  # each sample's exit
    pointer = [0] * j
    total_cost = costs[j] * n
    total_correct = int(correct[:, j].sum())
    heap: list[tuple[float, float, int, int]] = []

    def push(k: int) -> None:
        """Queue exit k's next move: its highest-confidence sample that still passes it."""
        p = pointer[k]
        col = order_l[k]
        while p < n and current[col[p]] <= k:
            p += 1
        pointer[k] = p
        if p == n:
            return
        i = col[p]
        heapq.heappush(heap, (_key(k, i), costs[k] - costs[current[i]], k, i))

    def _key(k: int, i: int) -> float:
        """Accuracy lost per cost saved by letting sample i leave at exit k (ties: larger saving first)."""
        saved = costs[current[i]] - costs[k]
        lost = correct_l[i][current[i]] - correct_l[i][k]
        return lost / saved if saved > 0 else float("inf")

    for k in range(j):
        push(k)
    moved_exit, moved_value, path_cost, path_acc = [], [], [total_cost / n], [total_correct / n]
    while heap:
        key, _, k, i = heapq.heappop(heap)
        if pointer[k] >= n or order_l[k][pointer[k]] != i or current[i] <= k or key != _key(k, i):
            push(k)  # stale entry: the sample or its exit changed since it was queued
            continue
        old = current[i]
        total_cost += costs[k] - costs[old]
        total_correct += correct_l[i][k] - correct_l[i][old]
        current[i] = k
        pointer[k] += 1
        # T_k just below this sample's confidence: it leaves at k; every sample above already does.
        value = conf_l[k][i]
        nxt = pointer[k]
        while nxt < n and conf_l[k][order_l[k][nxt]] == value and current[order_l[k][nxt]] > k:
            # ties leave together, since a threshold cannot separate equal confidences
            i2 = order_l[k][nxt]
            total_cost += costs[k] - costs[current[i2]]
            total_correct += correct_l[i2][k] - correct_l[i2][current[i2]]
            current[i2] = k
            nxt += 1
        pointer[k] = nxt
        moved_exit.append(k)
        moved_value.append(float(torch.nextafter(torch.tensor(value), torch.tensor(-1.0))))
        path_cost.append(total_cost / n)
        path_acc.append(total_correct / n)
        push(k)
        for later in range(k + 1, old):  # exits sample i no longer passes may have a new candidate
            push(later)
    return GreedyPath(torch.tensor(moved_exit, dtype=torch.int64), torch.tensor(moved_value),
                      torch.tensor(path_cost, dtype=torch.float64), torch.tensor(path_acc, dtype=torch.float64))


def greedy(stats: ExitStats, budget: float, path: GreedyPath | None = None) -> torch.Tensor:
    """Thresholds of the first point of the greedy walk whose cost is within the budget."""
    check_budget(stats, budget)
    path = path or greedy_path(stats)
    step = int(path.first_step_within(torch.tensor([budget]))[0])
    return path.thresholds_at([step], stats.num_exits)[0]


@dataclass
class Point:
    budget: float
    cost: float
    accuracy: float
    thresholds: list[float]


def sweep(stats: ExitStats, budgets: list[float], search: str = "greedy", *, seed: int = 0,
          tol: float = 5e-4) -> list[Point]:
    """An operating point for every reachable budget."""
    if search not in SEARCHES:
        raise UsageError(f"unknown search {search!r}", f"use one of {', '.join(SEARCHES)}")
    low, high = stats.reachable()
    budgets = [b for b in budgets if low <= b <= min(high, 1.0)]
    points = []
    if search == "greedy":
        path = greedy_path(stats)
        steps = path.first_step_within(torch.tensor(budgets, dtype=torch.float64)).tolist()
        for b, s, t in zip(budgets, steps, path.thresholds_at(steps, stats.num_exits), strict=True):
            points.append(Point(b, float(path.costs[s]), float(path.accuracies[s]), t.tolist()))
    else:
        gen = torch.Generator().manual_seed(seed)
        for b in budgets:
            t = bisect(stats, b, tol=tol, generator=gen)
            points.append(Point(b, *operating_point(stats, t), t.tolist()))
    return points


def hull(points: list[Point]) -> list[Point]:
    """The upper concave frontier of accuracy against cost, from the cheapest point to the most accurate."""
    pts = sorted(points, key=lambda p: (p.cost, -p.accuracy))
    frontier: list[Point] = []
    for p in pts:
        if frontier and p.accuracy <= frontier[-1].accuracy:
            continue  # dearer and no more accurate: dominated
        while len(frontier) >= 2:
            a, b = frontier[-2], frontier[-1]
            # drop b when it lies on or below the segment from a to p
            if (b.accuracy - a.accuracy) * (p.cost - a.cost) <= (p.accuracy - a.accuracy) * (b.cost - a.cost):
                frontier.pop()
            else:
                break
        frontier.append(p)
    return frontier
