"""Next-token accuracy and perplexity of exit heads and of the model's own (final) head on held-out contexts, the
perplexity at each head's temperature, and each prediction's confidence and correctness (for the accuracy-cost
curve of eetool.lm.curve)."""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eetool.core.reporting import Reporter

if TYPE_CHECKING:
    import torch

    from eetool.lm.class_aware_head import ExitHead
    from eetool.lm.models import LanguageModel
    from eetool.lm.temperature import TemperatureFit


def _perplexity(nll: float, tokens: int) -> float:
    if not tokens:
        return math.nan
    mean = nll / tokens
    return math.exp(mean) if mean < 700 else math.inf


@dataclass
class Score:
    """Next-token predictions of one head: position i predicts token i + 1 of its context."""

    name: str
    temperature: float = 1.0  # the logits are divided by it for the scaled NLL and the confidences
    correct: int = 0
    tokens: int = 0
    nll: float = 0.0  # summed, natural log, at T = 1
    scaled_nll: float = 0.0  # summed, at the temperature
    confidences: list[torch.Tensor] = field(default_factory=list)  # per prediction: the largest probability at T
    hits: list[torch.Tensor] = field(default_factory=list)  # per prediction: whether the argmax is the target

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return _perplexity(self.nll, self.tokens)

    @property
    def scaled_perplexity(self) -> float:
        return _perplexity(self.scaled_nll, self.tokens)

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(confidence, correct) of every prediction, in order."""
        import torch

        return torch.cat(self.confidences), torch.cat(self.hits)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        import torch

        logits, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
        hit = logits.argmax(-1) == targets
        self.correct += int(hit.sum())
        self.tokens += int(targets.numel())
        self.nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double())
        scaled = logits / self.temperature
        log_z = scaled.logsumexp(-1)
        self.scaled_nll += float((log_z - scaled.gather(1, targets[:, None])[:, 0]).double().sum())
        self.confidences.append((scaled.max(-1).values - log_z).exp().cpu())
        self.hits.append(hit.cpu())


def evaluate_heads(lm: LanguageModel, contexts: torch.Tensor, heads: dict[str, ExitHead], *, batch_size: int = 8,
                   device: torch.device | None = None, reporter: Reporter | None = None,
                   temperatures: dict[str, float] | None = None) -> list[Score]:
    """The scores of each exit head and, last, of the final head ("final"), from one full forward pass per batch;
    ``temperatures`` by head name (1 where not given)."""
    import torch

    from eetool.lm.stats import block_output

    reporter = reporter or Reporter()
    device = device or torch.device("cpu")
    temperatures = temperatures or {}
    scores = {name: Score(name, temperatures.get(name, 1.0)) for name in [*heads, "final"]}
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


def fit_temperatures(lm: LanguageModel, contexts: torch.Tensor, heads: dict[str, ExitHead], *, batch_size: int = 8,
                     device: torch.device | None = None) -> dict[str, TemperatureFit]:
    """Each exit head's temperature and, under "final", the final head's, fitted on the predictions in ``contexts``
    (eetool.lm.temperature). One forward pass keeps the block-K states (small) and the final logits; each exit
    head's logits are then made and fitted one head at a time, so that only one V x n block is held."""
    import torch

    from eetool.lm.stats import block_output
    from eetool.lm.temperature import fit_temperature

    device = device or torch.device("cpu")
    layers = sorted({h.layer for h in heads.values()})
    states: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    final: list[torch.Tensor] = []
    for batch in contexts.split(batch_size):
        ids = batch.to(device)
        with torch.inference_mode(), ExitStack() as stack:
            kept = {k: stack.enter_context(block_output(lm, k, stop=False)) for k in layers}
            final.append(lm.model(input_ids=ids, use_cache=False).logits[:, :-1].reshape(-1, lm.vocab_size))
            for k in layers:
                states[k].append(kept[k][0][:, :-1].reshape(-1, lm.hidden_size))
    targets = contexts[:, 1:].reshape(-1).to(device)
    fits = {}
    with torch.inference_mode():
        for name, head in heads.items():
            s = torch.cat(states[head.layer])
            if head.final_norm:
                s = lm.final_norm(s)
            fits[name] = fit_temperature(s @ head.weight.to(s.device).T + head.bias.to(s.device), targets)
        fits["final"] = fit_temperature(torch.cat(final), targets)
    return fits
