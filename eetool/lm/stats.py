"""Forward passes: the hidden state after decoder block K, and the per-token statistics of eq. 5.4.

The statistics pass runs only the first K blocks: a forward hook on block K keeps its output and stops
the forward there, so nothing after block K is computed. Sums are float64 (V x D), gathered with
``index_add_`` over whole batches; there is no loop over tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eetool.core.reporting import Reporter

if TYPE_CHECKING:
    import torch

    from eetool.lm.models import LanguageModel

GROUPINGS = ("next", "current")


class _Stop(Exception):
    """Raised by the hook on block K to end a forward pass that needs nothing after it."""


@contextmanager
def block_output(lm: LanguageModel, layer: int, *, stop: bool) -> Iterator[list[torch.Tensor]]:
    """While open, every forward pass appends the output of decoder block ``layer`` (1-based) to the list;
    with ``stop`` the pass ends there (callers catch nothing: use ``run_to_block``)."""
    kept: list[torch.Tensor] = []

    def hook(module: object, args: object, output: object) -> None:
        kept.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type]
        if stop:
            raise _Stop

    handle = lm.blocks[layer - 1].register_forward_hook(hook)
    try:
        yield kept
    finally:
        handle.remove()


def run_to_block(lm: LanguageModel, layer: int, input_ids: torch.Tensor, *, final_norm: bool) -> torch.Tensor:
    """B x C x D: the output of decoder block ``layer`` (only blocks 1..layer run), normed by the model's final
    norm when ``final_norm``."""
    import torch

    with torch.inference_mode(), block_output(lm, layer, stop=True) as kept:
        try:
            lm.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        states = kept[0]
        return lm.final_norm(states) if final_norm else states


@dataclass
class TokenStats:
    """Per-token sums of the layer-K states and their counts: the means M_v of eq. 5.4 and the P(v) of eq. 5.6."""

    sums: torch.Tensor  # V x D, float64
    counts: torch.Tensor  # V, int64: how many states were grouped under each token
    square_norms: float  # sum of ||R||^2 over every grouped state (for the within-token variance)
    layer: int
    grouping: str  # "current": the state at position i under T_i (eq. 5.4); "next": under T_{i+1}
    final_norm: bool
    seconds: float = 0.0  # of the pass

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def means(self) -> torch.Tensor:
        """M_v (V x D, float64), zero for a token never seen."""
        return self.sums / self.counts.clamp(min=1).unsqueeze(1).to(self.sums.dtype)

    @property
    def seen(self) -> torch.Tensor:
        return self.counts > 0

    def noise_power(self) -> float:
        """The maximum-likelihood N0 of eq. 5.5: twice the within-token variance per dimension."""
        import torch

        between = float((self.sums.pow(2).sum(1) / self.counts.clamp(min=1).to(torch.float64)).sum())
        dims = self.sums.shape[1]
        return 2.0 * max(self.square_norms - between, 0.0) / (self.total * dims)

    @property
    def bytes(self) -> int:
        return self.sums.numel() * self.sums.element_size() + self.counts.numel() * self.counts.element_size()


def grouped(states: torch.Tensor, input_ids: torch.Tensor, grouping: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The states (n x D) and the token each is grouped under (n): the token at that position, or the next."""
    if grouping == "next":
        return states[:, :-1].reshape(-1, states.shape[-1]), input_ids[:, 1:].reshape(-1)
    return states.reshape(-1, states.shape[-1]), input_ids.reshape(-1)


def collect_stats(lm: LanguageModel, contexts: torch.Tensor, layer: int, *, grouping: str, final_norm: bool,
                  batch_size: int = 8, device: torch.device | None = None,
                  reporter: Reporter | None = None) -> TokenStats:
    """One streaming pass over the contexts through the first ``layer`` blocks, summing the states per token."""
    return collect_variants(lm, contexts, layer, [(grouping, final_norm)], batch_size=batch_size, device=device,
                            reporter=reporter)[0]


def collect_variants(lm: LanguageModel, contexts: torch.Tensor, layer: int, variants: list[tuple[str, bool]], *,
                     batch_size: int = 8, device: torch.device | None = None,
                     reporter: Reporter | None = None) -> list[TokenStats]:
    """The statistics of several (grouping, final norm) variants from the same pass: the states are computed once."""
    import torch

    reporter = reporter or Reporter()
    device = device or torch.device("cpu")
    sums = [torch.zeros(lm.vocab_size, lm.hidden_size, dtype=torch.float64, device=device) for _ in variants]
    counts = [torch.zeros(lm.vocab_size, dtype=torch.int64, device=device) for _ in variants]
    square_norms = [torch.zeros((), dtype=torch.float64, device=device) for _ in variants]
    start = time.perf_counter()
    with reporter.bar(len(contexts), f"statistics after block {layer}") as bar, torch.inference_mode():
        for batch in contexts.split(batch_size):
            ids = batch.to(device)
            raw = run_to_block(lm, layer, ids, final_norm=False)
            normed = lm.final_norm(raw) if any(norm for _, norm in variants) else raw
            for i, (grouping, norm) in enumerate(variants):
                states, tokens = grouped(normed if norm else raw, ids, grouping)
                states = states.double()
                sums[i].index_add_(0, tokens, states)
                counts[i] += torch.bincount(tokens, minlength=lm.vocab_size)
                square_norms[i] += states.pow(2).sum()
            bar.advance(len(batch))
    seconds = time.perf_counter() - start
    return [TokenStats(sums[i].cpu(), counts[i].cpu(), float(square_norms[i]), layer, grouping, norm, seconds)
            for i, (grouping, norm) in enumerate(variants)]


def full_forward_seconds(lm: LanguageModel, contexts: torch.Tensor, batch_size: int,
                         device: torch.device | None = None) -> float:
    """Seconds of a plain forward pass of the whole model over the contexts (to compare with the K-block pass)."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in contexts.split(batch_size):
            lm.model(input_ids=batch.to(device or torch.device("cpu")), use_cache=False)
    return time.perf_counter() - start
