"""Pixel exit thresholds: ADP-C (one for every pixel), CBT (one per class, thesis eq. 3.1-3.3) and CBT-ns
(one per exit and class). Thresholds are a tensor of early exits x classes; ``ClassStats`` streams CBT's sums.

Method (equations, edge cases the thesis leaves open):
docs/methods/segmentation-inference.md#pixel-thresholds-adp-c-cbt-and-cbt-ns
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from eetool.core.errors import UsageError
from eetool.segmentation import IGNORE


@dataclass
class ClassStats:
    """Streaming sums for eq. 3.1: per exit and ground-truth class, the sum of the pixels' softmax vectors."""

    sums: torch.Tensor  # exits x K x K, float64
    counts: torch.Tensor  # K, int64: pixels of each ground-truth class

    @classmethod
    def empty(cls, exits: int, num_classes: int) -> ClassStats:
        return cls(torch.zeros(exits, num_classes, num_classes, dtype=torch.float64),
                   torch.zeros(num_classes, dtype=torch.int64))

    def update(self, probabilities: list[torch.Tensor], masks: torch.Tensor) -> None:
        """Add a batch: one B x K x H x W softmax per exit and the B x H x W ground truth (IGNORE left out), as one
        matrix product per exit of the one-hot truth and the probabilities, added to float64 totals (rounding stays
        that of one batch's sum)."""
        k = self.counts.shape[0]
        batch = masks.shape[0]
        labelled = (masks != IGNORE).reshape(batch, 1, -1)
        truth = masks.reshape(batch, 1, -1).long().clamp_min(0)
        self.counts += torch.bincount(truth[labelled].cpu(), minlength=k)
        first = probabilities[0]
        one_hot = torch.zeros(batch, k, truth.shape[-1], dtype=first.dtype, device=first.device)
        one_hot.scatter_(1, truth.to(first.device), labelled.to(one_hot))
        for n, probs in enumerate(probabilities):
            flat = probs.reshape(batch, k, -1)
            self.sums[n] += torch.bmm(one_hot, flat.transpose(1, 2)).sum(0).to(torch.float64).cpu()

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    def exit_means(self) -> torch.Tensor:
        """p_{n,k} (eq. 3.1): exits x K x K; rows of absent classes are NaN."""
        return self.sums / self.counts.to(torch.float64)[None, :, None]


def margins(means: torch.Tensor) -> torch.Tensor:
    """top1 - top2 of each mean probability vector (the last dimension)."""
    top = means.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def scale(scores: torch.Tensor, present: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 3.3 over the present classes; absent classes, and all classes when the scores are all equal, get beta."""
    out = torch.full_like(scores, beta)
    if not bool(present.any()):
        return out
    known = scores[present]
    low, high = known.min(), known.max()
    if float(high - low) > 0:
        out[present] = (1 - (known - low) / (high - low)) * (beta - alpha) + alpha
    return out


def check_range(alpha: float, beta: float) -> None:
    for name, value in (("--alpha", alpha), ("--beta", beta)):
        if not 0 <= value <= 1:  # NaN fails too
            raise UsageError(f"{name} {value} is outside [0, 1]", "thresholds are probabilities, e.g. --alpha 0.9 "
                             "--beta 0.998")
    if not alpha < beta:
        raise UsageError(f"--alpha {alpha} is not below --beta {beta}", "CBT scales the thresholds into [alpha, beta] "
                         "with alpha < beta, e.g. --alpha 0.9 --beta 0.998")


def cbt(stats: ClassStats, alpha: float, beta: float, early_exits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CBT: one threshold per class, shared by every early exit. Returns (early exits x K thresholds, the K
    confidence scores c_k of P_k)."""
    check_range(alpha, beta)
    shared = stats.exit_means().mean(0)  # P_k, eq. 3.2
    scores = margins(shared)
    return scale(scores, stats.present, alpha, beta).expand(early_exits, -1).clone(), scores


def cbt_ns(stats: ClassStats, alpha: float, beta: float, early_exits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CBT-ns: eq. 3.3 on each early exit's own p_{n,k}. Returns (early exits x K thresholds, their scores)."""
    check_range(alpha, beta)
    scores = margins(stats.exit_means()[:early_exits])
    return torch.stack([scale(s, stats.present, alpha, beta) for s in scores]), scores


def adp_c(threshold: float, early_exits: int, num_classes: int) -> torch.Tensor:
    if not 0 <= threshold <= 1:
        raise UsageError(f"--threshold {threshold} is outside [0, 1]", "e.g. --threshold 0.998 (ADP-C's)")
    return torch.full((early_exits, num_classes), float(threshold), dtype=torch.float64)


# Bisection for a budget stops when the bracket on alpha (or on ADP-C's threshold) is this narrow.
BUDGET_TOLERANCE = 1e-3


@dataclass(frozen=True)
class BudgetFit:
    """What the search for a budget found: ``value`` meets it (``cost`` <= budget); ``over``, the nearest value
    tried above it, does not (``over_cost`` > budget), or is None when every value tried met it."""

    budget: float
    value: float
    cost: float
    over: float | None
    over_cost: float | None
    evaluations: int


def budget_evaluations(low: float, high: float, tol: float = BUDGET_TOLERANCE) -> int:
    """How many costs ``fit_budget`` computes: the lower end, then one per halving of the bracket."""
    return 1 + max(0, math.ceil(math.log2((high - low) / tol)))


def fit_budget(cost_of: Callable[[float], float], budget: float, low: float, high: float,
               unmet: Callable[[float], UsageError], tol: float = BUDGET_TOLERANCE) -> BudgetFit:
    """The largest value in [low, high) whose mean cost is at most ``budget``, by bisection on a bracket whose
    lower end meets the budget and whose upper end does not, down to ``tol``; ``high`` is never tried. A budget
    that ``low`` misses raises ``unmet(cost at low)``."""
    if not (math.isfinite(budget) and budget > 0):
        raise UsageError(f"--budget {budget} is not a positive cost", "budgets are fractions of the plain "
                         "network's cost, e.g. --budget 0.7")
    cost = cost_of(low)
    if cost > budget:
        raise unmet(cost)
    value, over, over_cost, evaluations = low, high, None, 1
    while over - value > tol:
        middle = (value + over) / 2
        c = cost_of(middle)
        evaluations += 1
        if c <= budget:
            value, cost = middle, c
        else:
            over, over_cost = middle, c
    return BudgetFit(budget, value, cost, over if over_cost is not None else None, over_cost, evaluations)
