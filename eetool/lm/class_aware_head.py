"""The class-aware exit head of eq. 5.4-5.8 (logits ``R @ W.T + b``, W's rows the per-token means), its
baselines and mixes, and its artifact (kind ``lm-exit-head``).

Method: docs/language-models.md
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eetool.core.errors import InputError, ModelMismatchError, ProvenanceError

if TYPE_CHECKING:
    import torch

    from eetool.core.artifacts import Provenance
    from eetool.lm.stats import TokenStats

UNSEEN_POLICIES = ("copy", "impossible")
MIXES = ("random", "copy")
KIND = "lm-exit-head"
# N0 auto: the maximum-likelihood N0 (twice the within-token variance) times these, and 0, tried on held-out tokens
N0_FACTORS = tuple(2.0**e for e in range(-4, 9))  # 1/16 .. 256: on SmolLM2 the best was 16x and above


def log_prior(counts: torch.Tensor, unseen: str) -> torch.Tensor:
    """ln P(v) from the counts (float64). A token never seen gets ln(1 / (2 N)) under ``copy`` (half a count,
    so that its copied row can still win) and -inf under ``impossible``."""
    import torch

    total = float(counts.sum())
    p = counts.to(torch.float64) / total
    floor = math.log(0.5 / total) if unseen == "copy" else -math.inf
    return torch.where(counts > 0, p.log(), torch.full_like(p, floor))


def class_aware_head(stats: TokenStats, n0: float, unseen: str, backbone: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """W (V x D) and b (V), float64, by eq. 5.4, 5.6 and 5.7. A token never seen has no mean: ``copy`` gives
    it the backbone LM head's row (and eq. 5.6's bias with that row as its mean), ``impossible`` a zero row and
    bias -inf, so the exit never predicts it."""
    import torch

    seen = stats.seen
    weight = stats.means.clone()
    if unseen == "copy":
        weight[~seen] = backbone.detach().to(torch.float64).cpu()[~seen]
    else:
        weight[~seen] = 0.0
    bias = n0 / 2 * log_prior(stats.counts, unseen) - 0.5 * weight.pow(2).sum(1)
    if unseen == "impossible":
        bias[~seen] = -math.inf
    return weight, bias


def baseline_head(mix: str, backbone: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """W_B and b_B of eq. 5.8 (float64): torch's default Linear initialisation, or a copy of the LM head."""
    import torch

    vocab, dims = backbone.shape
    if mix == "copy":
        return backbone.detach().to(torch.float64).cpu().clone(), torch.zeros(vocab, dtype=torch.float64)
    bound = 1 / math.sqrt(dims)
    weight = (torch.rand(vocab, dims, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    bias = (torch.rand(vocab, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return weight, bias


def mixed(alpha: float, head: tuple[torch.Tensor, torch.Tensor], base: tuple[torch.Tensor, torch.Tensor]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5.8 on the weight and the bias. alpha = 0 is the baseline itself (no -inf from the class-aware bias)."""
    if alpha == 0:
        return base[0].clone(), base[1].clone()
    return alpha * head[0] + (1 - alpha) * base[0], alpha * head[1] + (1 - alpha) * base[1]


@dataclass
class N0Choice:
    n0: float
    maximum_likelihood: float  # twice the within-token variance per dimension, from the statistics
    tried: list[dict[str, float]] = field(default_factory=list)  # n0, held-out accuracy and mean NLL of each


def choose_n0(stats: TokenStats, unseen: str, backbone: torch.Tensor, states: torch.Tensor, targets: torch.Tensor,
              chunk: int = 512) -> N0Choice:
    """``--n0 auto``: the N0 of the grid (0 and the maximum-likelihood N0 times N0_FACTORS) with the best
    next-token accuracy on held-out states (ties: the lower mean NLL, then the smaller N0)."""
    import torch

    ml = stats.noise_power()
    grid = [0.0, *(ml * f for f in N0_FACTORS)] if ml > 0 else [0.0]
    weight, bias0 = class_aware_head(stats, 0.0, unseen, backbone)
    prior = log_prior(stats.counts, unseen)
    weight32 = weight.float()
    correct = torch.zeros(len(grid), dtype=torch.float64)
    nll = torch.zeros(len(grid), dtype=torch.float64)
    for s, t in zip(states.split(chunk), targets.split(chunk), strict=True):
        base = (s.float() @ weight32.T).double() + bias0
        for i, n0 in enumerate(grid):
            logits = base + n0 / 2 * prior if n0 else base
            correct[i] += float((logits.argmax(1) == t).sum())
            nll[i] += float(torch.nn.functional.cross_entropy(logits, t, reduction="sum"))
    n = len(targets)
    tried = [{"n0": n0, "accuracy": float(correct[i]) / n, "mean_nll": float(nll[i]) / n} for i, n0 in enumerate(grid)]
    best = min(tried, key=lambda r: (-r["accuracy"], r["mean_nll"], r["n0"]))
    return N0Choice(best["n0"], ml, tried)


@dataclass
class ExitHead:
    """An early-exit LM head after decoder block ``layer``: logits = norm?(R_K) @ weight.T + bias."""

    weight: torch.Tensor  # V x D, float32
    bias: torch.Tensor  # V, float32
    layer: int
    final_norm: bool
    info: dict[str, Any] = field(default_factory=dict)  # init, n0, grouping, unseen, alpha, tokens seen ...

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return states @ self.weight.T + self.bias

    def save(self, path: str, prov: Provenance) -> None:
        from eetool.core.artifacts import write_tensors

        # .contiguous().clone(): a copied tied LM head must not share storage with the embedding in the file
        write_tensors(path, {"weight": self.weight.contiguous().clone(), "bias": self.bias.contiguous().clone()},
                      prov, {"eetool.lm_head": json.dumps({"layer": self.layer, "final_norm": self.final_norm,
                                                           **self.info}, sort_keys=True)})

    @classmethod
    def load(cls, path: str) -> tuple[ExitHead, Provenance]:
        from eetool.core.artifacts import read_tensors

        tensors, prov, meta = read_tensors(path, KIND)
        remake = "re-make it with `eetool init-exit-head`"
        try:
            info = json.loads(meta["eetool.lm_head"])
            layer, final_norm = int(info.pop("layer")), bool(info.pop("final_norm"))
            weight, bias = tensors["weight"].float(), tensors["bias"].float()
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProvenanceError(f"{path} is a malformed exit head ({type(e).__name__}: {e})", remake) from None
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise ProvenanceError(f"{path} holds a weight {tuple(weight.shape)} and bias {tuple(bias.shape)} that "
                                  "do not make a head", remake)
        for name, values in (("weight", weight), ("bias", bias)):
            # -inf is a bias's way of saying a token never follows (the class-aware head of unseen tokens)
            broken = values.isnan() | (values == math.inf) if name == "bias" else ~values.isfinite()
            if bool(broken.any()):
                raise InputError(f"{path} holds a {name} that is not finite numbers", remake)
        return cls(weight, bias, layer, final_norm, info), prov

    def check_fits(self, path: str, vocab: int, dims: int, num_layers: int) -> None:
        if tuple(self.weight.shape) != (vocab, dims) or not 1 <= self.layer < num_layers:
            raise ModelMismatchError(f"{path} is a {tuple(self.weight.shape)} head after block {self.layer}, which "
                                     f"does not fit this model ({vocab} tokens, {dims} dims, {num_layers} blocks)",
                                     "re-make it for this model with `eetool init-exit-head`")
