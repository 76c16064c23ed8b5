"""The joint loss of an early-exit network, with the final exit teaching the early ones ("Be Your Own Teacher",
Zhang et al. 2019): each early exit adds w_j [(1 - a) CE + a T^2 KL(final / T || exit / T)], the final exit
its plain cross-entropy.

Method: docs/trained-exits.md
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eetool.core.errors import UsageError

DEFAULT_TEMPERATURE = 3.0
# A temperature beyond this flattens every softmax to uniform in float32: the soft targets carry nothing.
MAX_TEMPERATURE = 1000.0


def check_distillation(weight: float, temperature: float) -> None:
    """--distill and --distill-temperature within their ranges, before any data is read."""
    if not (math.isfinite(weight) and 0 <= weight <= 1):
        raise UsageError(f"--distill must be a weight from 0 to 1, not {weight}",
                         "e.g. --distill 0.5, or 0 for the plain joint loss")
    if not (math.isfinite(temperature) and 0 < temperature <= MAX_TEMPERATURE):
        raise UsageError(f"--distill-temperature must be positive and at most {MAX_TEMPERATURE:g}, not {temperature}",
                         f"e.g. --distill-temperature {DEFAULT_TEMPERATURE:g}")


def distillation_term(exit_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(exit / T)), the batch's mean over samples; no gradient reaches
    the teacher."""
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    student = F.log_softmax(exit_logits / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean") * temperature ** 2


def joint_exit_loss(exit_logits: Sequence[torch.Tensor], final_logits: torch.Tensor, labels: torch.Tensor,
                    weights: Sequence[float], *, distill: float = 0.0,
                    temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """The loss of backbone and exits trained together (see the module docstring)."""
    def exit_loss(logits: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(logits, labels)
        if not distill:
            return hard
        return (1 - distill) * hard + distill * distillation_term(logits, final_logits, temperature)

    early = sum((w * exit_loss(o) for w, o in zip(weights, exit_logits, strict=True)),
                torch.zeros((), device=final_logits.device))
    return early + F.cross_entropy(final_logits, labels)
