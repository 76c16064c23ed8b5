"""Next-token accuracy and perplexity of exit heads and of the model's own (final) head on held-out contexts."""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eetool.reporting import Reporter

if TYPE_CHECKING:
    import torch

    from eetool.lm.head import ExitHead
    from eetool.lm.models import LanguageModel


@dataclass
class Score:
    """Next-token predictions of one head: position i predicts token i + 1 of its context."""

    name: str
    correct: int = 0
    tokens: int = 0
    nll: float = 0.0  # summed, natural log

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        if not self.tokens:
            return math.nan
        mean = self.nll / self.tokens
        return math.exp(mean) if mean < 700 else math.inf

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        import torch

        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        self.correct += int((logits.argmax(-1) == targets).sum())
        self.tokens += int(targets.numel())
        self.nll += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").double())


def evaluate_heads(lm: LanguageModel, contexts: torch.Tensor, heads: dict[str, ExitHead], *, batch_size: int = 8,
                   device: torch.device | None = None, reporter: Reporter | None = None) -> list[Score]:
    """The scores of each exit head and, last, of the final head, from one full forward pass per batch."""
    import torch

    from eetool.lm.stats import block_output

    reporter = reporter or Reporter()
    device = device or torch.device("cpu")
    scores = {name: Score(name) for name in [*heads, "final"]}
    on_device = {name: (h.weight.to(device), h.bias.to(device)) for name, h in heads.items()}
    layers = sorted({h.layer for h in heads.values()})
    with reporter.bar(len(contexts), "evaluating") as bar:
        for batch in contexts.split(batch_size):
            ids = batch.to(device)
            targets = ids[:, 1:]
            with torch.inference_mode(), ExitStack() as stack:
                kept = {k: stack.enter_context(block_output(lm, k, stop=False)) for k in layers}
                logits = lm.model(input_ids=ids, use_cache=False).logits
                scores["final"].add(logits[:, :-1], targets)
                for name, head in heads.items():
                    states = kept[head.layer][0][:, :-1]
                    if head.final_norm:
                        states = lm.final_norm(states)
                    weight, bias = on_device[name]
                    scores[name].add(states @ weight.T + bias, targets)
            bar.advance(len(batch))
    return list(scores.values())
