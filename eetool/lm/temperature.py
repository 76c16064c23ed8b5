"""One temperature per head, fitted on held-out tokens by golden-section search over ln T (the NLL is convex in
1/T), so that a class-aware head's perplexity means something; it changes no prediction.

Method: docs/language-models.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eetool.core.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch

TEMPERATURE_MIN = 1e-3
TEMPERATURE_MAX = 1e6
LOG_TOLERANCE = 1e-4  # of ln T: the search stops when the bracket is this narrow
AUTO = "auto"
# --temperature auto fits on every HOLDOUT_EVERY-th evaluation context, at most HOLDOUT_MAX of them (1,016
# predictions at C = 128: plenty for one scalar, and their logits stay small: V x 1,016 floats per head).
HOLDOUT_EVERY = 10
HOLDOUT_MAX = 8
_GOLDEN = (math.sqrt(5) - 1) / 2


def parse_temperature(value: str) -> float | None:
    """``auto`` (None: fit it) or a positive finite number."""
    if value.strip().lower() == AUTO:
        return None
    try:
        t = float(value)
    except ValueError:
        raise UsageError(f"--temperature {value!r} is neither auto nor a number",
                         "pass --temperature auto (fitted on held-out tokens) or a number such as 1") from None
    if not (t > 0 and math.isfinite(t)):
        raise UsageError(f"--temperature {value} is not a positive number",
                         "pass --temperature auto or a number above 0 (1 leaves the logits as they are)")
    return t


def mean_nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Mean NLL (nats) of softmax(logits / temperature) at the targets."""
    import torch

    return float(torch.nn.functional.cross_entropy(logits / temperature, targets).double())


@dataclass
class TemperatureFit:
    temperature: float
    mean_nll: float  # at the fitted temperature, on the fitting tokens
    mean_nll_raw: float  # at T = 1, on the same tokens
    tokens: int  # fitted on (tokens whose target is impossible at every T are left out)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> TemperatureFit:
    """The T in [TEMPERATURE_MIN, TEMPERATURE_MAX] minimising the mean NLL of logits / T (golden-section search on
    ln T). A token whose target logit is -inf has infinite NLL at every T and is left out of the fit."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    finite = logits.gather(1, targets[:, None])[:, 0].isfinite()
    logits, targets = logits[finite], targets[finite]
    if not len(targets):
        raise InputError("no held-out token has a finite logit at its target, so no temperature can be fitted",
                         "give more text, or a fixed --temperature such as 1")

    def nll(log_t: float) -> float:
        return mean_nll(logits, targets, math.exp(log_t))

    lo, hi = math.log(TEMPERATURE_MIN), math.log(TEMPERATURE_MAX)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > LOG_TOLERANCE:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = nll(b)
    best, best_nll = (a, fa) if fa <= fb else (b, fb)
    return TemperatureFit(math.exp(best), best_nll, mean_nll(logits, targets, 1.0), len(targets))


def split_for_temperature(contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scored, fitted on): every HOLDOUT_EVERY-th context fits the temperatures, at most HOLDOUT_MAX, at least one;
    the rest are scored."""
    import torch

    if len(contexts) < 2:
        raise InputError(f"--temperature auto needs at least 2 contexts of {contexts.shape[1]} tokens (one to fit "
                         f"on, one to score), the text has {len(contexts)}",
                         "give more text, or a fixed --temperature such as 1")
    index = torch.arange(len(contexts))
    held = (index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) & (index < HOLDOUT_EVERY * HOLDOUT_MAX)
    if not held.any():
        held[-1] = True
    return contexts[~held], contexts[held]
