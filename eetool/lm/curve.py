"""Beyond the thesis: the accuracy-cost curve of a confidence threshold on an exit head, per token.

A token leaves after block K when the exit's largest softmax probability (at the head's temperature) exceeds the
threshold; cost is MACs per token, normalised to the whole model. Per-token decisions only: no KV-cache repair.

Method: docs/language-models.md (the accuracy-cost curve)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from eetool.core.budget_search import ExitStats
    from eetool.lm.models import LanguageModel


@dataclass
class TokenCosts:
    """MACs per token of one decoder block and of one LM head (V x D)."""

    block: float
    head: float
    blocks: int  # L

    @property
    def full(self) -> float:
        return self.blocks * self.block + self.head

    def exit_costs(self, layer: int) -> tuple[float, float]:
        """(leaving after block ``layer``, going on to the final head), normalised to the whole model."""
        leave = layer * self.block + self.head
        return leave / self.full, (self.full + self.head) / self.full


def token_costs(lm: LanguageModel, context: int) -> TokenCosts:
    """MACs per token of a block (its Linear weights, and attention over (C + 1) / 2 positions) and of the LM head."""
    import torch

    block = lm.blocks[0]
    linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    config: Any = lm.model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or lm.hidden_size // heads)
    attention = 2 * heads * head_dim * (context + 1) / 2  # QK^T and AV
    return TokenCosts(float(linear + attention), float(lm.vocab_size * lm.hidden_size), lm.num_layers)


def exit_stats(confidence: torch.Tensor, exit_correct: torch.Tensor, final_correct: torch.Tensor,
               costs: tuple[float, float]) -> ExitStats:
    """One exit's per-token confidences and correctness, and the final head's, as core.budget_search wants them."""
    import torch

    from eetool.core.budget_search import ExitStats

    return ExitStats(confidence.float()[:, None], torch.stack([exit_correct.bool(), final_correct.bool()], 1),
                     torch.tensor(costs, dtype=torch.float64))


@dataclass
class CurvePoint:
    budget: float | None  # None: a point of the sweep's convex hull
    threshold: float
    cost: float
    exit_share: float  # of the tokens, those the exit answers
    exit_accuracy: float  # of those, the share it gets right
    accuracy: float  # overall: the exit's answers and the final head's for the rest

    def row(self) -> dict[str, Any]:
        return {"budget": None if self.budget is None else round(self.budget, 6), "threshold": self.threshold,
                "cost": round(self.cost, 6), "exit_share": round(self.exit_share, 6),
                "exit_accuracy": round(self.exit_accuracy, 6), "accuracy": round(self.accuracy, 6)}


def point_at(stats: ExitStats, threshold: float, budget: float | None = None) -> CurvePoint:
    """The operating point of one threshold, recomputed from the per-token data."""
    import math

    from eetool.core.budget_search import operating_point

    t = stats.confidence.new_tensor([threshold])
    cost, accuracy = operating_point(stats, t)
    leaves = stats.confidence[:, 0] > t[0]
    n_leave = int(leaves.sum())
    exit_accuracy = float(stats.correct[leaves, 0].double().mean()) if n_leave else math.nan
    return CurvePoint(budget, threshold, cost, n_leave / len(leaves), exit_accuracy, accuracy)


def curve(stats: ExitStats, budgets: list[float], *, sweep_step: float | None = None) -> list[CurvePoint]:
    """Operating points for the budgets (each checked reachable), and with ``sweep_step`` the convex hull of a
    sweep over every budget from 0 to 1 in those steps; in cost order."""
    from eetool.core.budget_search import check_budget, hull, sweep

    for b in budgets:
        check_budget(stats, b)
    points = [point_at(stats, p.thresholds[0], p.budget) for p in sweep(stats, sorted(set(budgets)))]
    if sweep_step is not None:
        grid = [round(i * sweep_step, 10) for i in range(int(round(1 / sweep_step)) + 1)]
        points += [point_at(stats, p.thresholds[0]) for p in hull(sweep(stats, grid))]
    return sorted(points, key=lambda p: (p.cost, p.budget is None))
