"""Beyond the thesis: the accuracy-cost curve of a confidence threshold on an exit head, per token.

A token leaves at the exit after block K when the exit's largest softmax probability (at the head's
temperature) exceeds the threshold T; the others run on to the final head. The thresholds come from
eetool.core.budget_search (one exit: ExitStats with J = 1, the greedy walk, its convex hull), as for the
classification methods.

Cost is MACs per token, normalised to the whole model (L blocks and the final LM head): a token that
leaves pays K blocks and the exit head; one that goes on pays all L blocks, the exit head (it was
computed to decide) and the final head. The heads are V x D matmuls, as dear as several blocks on a small
model with a large vocabulary (SmolLM2-135M: 28.3M MACs each against 3.6M per block), so that no threshold
reaches K / L. A block's MACs are its Linear weights (one MAC per weight per token) and attention's QK^T and
AV products at the mean number of positions a token of a C-token context attends to, (C + 1) / 2.

Caveat: this evaluates the per-token exit decision only. In autoregressive decoding a token that leaves at
block K has no keys and values in blocks K+1..L for later tokens to attend to. The thesis (chapter 5) names the
problem and leaves it to the literature it cites [108-110]: CALM (Schuster et al. 2022) copies the exited
token's block-K state up into the skipped blocks to fill their caches, SkipDecode (Del Corro et al. 2023)
makes later tokens exit no deeper than earlier ones so that no entry is ever missing, and Bae et al. 2023
compute the skipped blocks later in parallel. Here every token's later blocks still run, so the final head's
predictions for the tokens that go on are the full model's, with no copied state.
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
