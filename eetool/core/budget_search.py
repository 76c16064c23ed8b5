"""Thresholds that meet a compute budget (``bisect``, the thesis's reference, or the ``greedy`` walk that gives every
budget's operating point at once), and the convex hull of a sweep (thesis 2.4.1).

Method: docs/exits-and-costs.md#threshold-searches
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import torch

from eetool.core.choices import SEARCHES
from eetool.core.errors import UsageError

BISECTION_STEPS = 24  # halvings of [0, 1] down to float32 resolution


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


def bisect(stats: ExitStats, budget: float, *, tol: float = 5e-4, max_rounds: int = 4,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The thesis's reference: per-component binary search with alternating optimisation.

    Each round searches each component in turn with the others held; the closest vector seen is
    returned when no round comes within ``tol``."""
    check_budget(stats, budget)
    j = stats.num_exits
    t = torch.rand(j, generator=generator, dtype=torch.float64).float()
    best, best_gap = t.clone(), math.inf

    def cost_of(thresholds: torch.Tensor) -> float:
        nonlocal best, best_gap
        cost, _ = operating_point(stats, thresholds)
        if abs(cost - budget) < best_gap:
            best, best_gap = thresholds.clone(), abs(cost - budget)
        return cost

    for _ in range(max_rounds):
        for k in range(j):
            # Bounds hold only while the others stay put, so each component is searched afresh: T_k goes to
            # the end of [0, 1] that moves the cost towards the budget, and stays there if even that end
            # does not reach it; otherwise the budget lies between that end and where T_k was.
            cost = cost_of(t)
            if abs(cost - budget) <= tol:
                return t
            too_dear = cost > budget
            lo, hi = (0.0, float(t[k])) if too_dear else (float(t[k]), 1.0)
            t[k] = lo if too_dear else hi
            cost = cost_of(t)
            if abs(cost - budget) <= tol:
                return t
            if (cost > budget) == too_dear:
                continue
            for _ in range(BISECTION_STEPS):
                t[k] = (lo + hi) / 2
                cost = cost_of(t)
                if abs(cost - budget) <= tol:
                    return t
                if cost > budget:  # too dear: lower T_k so that more samples leave at exit k
                    hi = float(t[k])
                else:
                    lo = float(t[k])
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

    def best_step_within(self, budgets: torch.Tensor) -> torch.Tensor:
        """For each budget, the most accurate step within it (the cheaper one on ties): moving samples
        to an exit where they are right can raise accuracy further down the walk."""
        return self.best_step_from(self.first_step_within(budgets))

    def best_step_from(self, steps: torch.Tensor) -> torch.Tensor:
        """For each of ``steps``, the most accurate step from it on (the later one on ties): where costs only
        fall along the walk, every later step is within a budget the given step is within."""
        acc = self.accuracies.tolist()
        best = list(range(len(acc)))
        for s in range(len(acc) - 2, -1, -1):  # best[s]: the most accurate step from s on
            if acc[best[s + 1]] >= acc[s]:
                best[s] = best[s + 1]
        return torch.tensor(best, dtype=torch.int64)[steps]

    def thresholds_at(self, steps: list[int], num_exits: int) -> list[torch.Tensor]:
        """Threshold vectors after each of ``steps``, replaying the moves once."""
        out: dict[int, torch.Tensor] = {}
        t = torch.ones(num_exits, dtype=self.values.dtype)
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
    correct_l = stats.correct.to(torch.int8).tolist()
    order_l = torch.argsort(conf, dim=0, descending=True, stable=True).T.tolist()  # J x N
    conf_l = conf.T.tolist()
    # The largest threshold below each confidence, in the confidences' own dtype: replayed, it lets
    # exactly that sample (and its ties) through and no other.
    below_l = torch.nextafter(conf, torch.tensor(-1.0, dtype=conf.dtype)).T.tolist()
    current = [j] * n  # each sample's exit
    pointer = [0] * j  # in exit k's order, every sample before pointer[k] leaves at k or earlier
    group: list[list[int]] = [[] for _ in range(j)]  # the samples exit k's queued move lets leave there
    version = [0] * j  # a heap entry is live while its version is its exit's latest
    total_cost = costs[j] * n
    total_correct = sum(row[j] for row in correct_l)
    heap: list[tuple[float, float, int, int]] = []

    def push(k: int) -> None:
        """Queue exit k's next move, replacing its earlier one: lowering T_k just below the highest confidence
        still passing exit k lets that sample and its ties leave at k."""
        p = pointer[k]
        col = order_l[k]
        while p < n and current[col[p]] <= k:
            p += 1
        pointer[k] = p
        version[k] += 1
        members = []
        saved = lost = 0.0
        q = p
        while q < n and conf_l[k][col[q]] == conf_l[k][col[p]]:
            i = col[q]
            if current[i] > k:  # a tie that already leaves earlier is not moved
                members.append(i)
                saved += costs[current[i]] - costs[k]
                lost += correct_l[i][current[i]] - correct_l[i][k]
            q += 1
        group[k] = members
        if members:
            # accuracy lost per cost saved; a move that saves nothing goes first if it gains, else last
            key = lost / saved if saved > 0 else (-math.inf if lost < 0 else math.inf)
            heapq.heappush(heap, (key, -saved, k, version[k]))

    for k in range(j):
        push(k)
    moved_exit, moved_value, path_cost, path_acc = [], [], [total_cost / n], [total_correct / n]
    while heap:
        _, _, k, ver = heapq.heappop(heap)
        if ver != version[k]:
            continue  # replaced by a later entry of the same exit
        moved = group[k]
        for i in moved:
            total_cost += costs[k] - costs[current[i]]
            total_correct += correct_l[i][k] - correct_l[i][current[i]]
            current[i] = k
        moved_exit.append(k)
        moved_value.append(below_l[k][moved[0]])
        path_cost.append(total_cost / n)
        path_acc.append(total_correct / n)
        # Other exits whose queued move involved these samples now have another move, or another key.
        left = set(moved)
        for m in range(j):
            if m == k or not left.isdisjoint(group[m]):
                push(m)
    return GreedyPath(torch.tensor(moved_exit, dtype=torch.int64), torch.tensor(moved_value, dtype=conf.dtype),
                      torch.tensor(path_cost, dtype=torch.float64), torch.tensor(path_acc, dtype=torch.float64))


def greedy(stats: ExitStats, budget: float, path: GreedyPath | None = None) -> torch.Tensor:
    """Thresholds of the most accurate point of the greedy walk whose cost is within the budget."""
    check_budget(stats, budget)
    path = path or greedy_path(stats)
    step = int(path.best_step_within(torch.tensor([budget]))[0])
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
        steps = path.best_step_within(torch.tensor(budgets, dtype=torch.float64)).tolist()
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
