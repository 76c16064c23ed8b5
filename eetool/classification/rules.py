"""Exit rules beside E²CM's: trained heads alone (``sdn``, ``entropy``) or with E²CM (``e2cm+sdn``), and the
rule of any registered method (eetool.core.exit_methods). A rule gives a confidence in [0, 1] and a prediction
per sample at each exit; the sample leaves when the confidence exceeds T_j.

Method: docs/trained-exits.md
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol, cast

import torch

from eetool.classification.e2cm import ClassMeans, MeansRule, distance_macs, distances
from eetool.classification.exit_heads import ExitHeads, ExitHeadsArtifact
from eetool.core.choices import COMBINES
from eetool.core.costs import EFFECTIVE, CostModel, effective_stage_macs, is_pruned, measure
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.errors import UsageError
from eetool.core.exit_methods import CLASSIFICATION_METHODS, EXIT_METHODS, HEADS, MEANS, reads
from eetool.core.exits import ExitModel, build_exit_model
from eetool.core.reporting import Reporter

if TYPE_CHECKING:
    from eetool.core.checkpoint import Checkpoint

HEAD_METHODS = tuple(m for m in CLASSIFICATION_METHODS if reads(m, HEADS))


class ExitRule(Protocol):
    """What ``Thresholded`` and the threshold search need of an exit method (registered in
    eetool.core.exit_methods): at exit j, a confidence in [0, 1] and a prediction for each sample of features h."""

    def scores(self, j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def max_probability(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDN's confidence: the largest softmax probability, and its class."""
    conf, pred = p.max(1)
    return conf, pred


def normalised_entropy(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BranchyNet's rule as a confidence: 1 - H(p) / log K, and the most probable class."""
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
    return 1 - entropy / math.log(p.shape[1]), p.argmax(1)


# the registrations' ``confidence`` names
CONFIDENCES: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "max-probability": max_probability, "normalised-entropy": normalised_entropy}


class HeadsRule:
    """Confidences of trained exit heads, optionally combined with E²CM's."""

    def __init__(self, heads: ExitHeads, method: str, means: ClassMeans | None = None, combine: str = "and",
                 device: torch.device | str = "cpu") -> None:
        if method not in HEAD_METHODS:
            raise UsageError(f"unknown method {method!r} for exit heads", f"use one of {', '.join(HEAD_METHODS)}")
        if combine not in COMBINES:
            raise UsageError(f"unknown --combine {combine!r}", "use and or or")
        if means is None and (reads(method, MEANS) or heads.spec.with_distances):
            raise UsageError(f"{method} with these heads needs the class means", "pass --means")
        self.heads = heads.to(device).eval()
        self.method, self.combine = method, combine
        info = EXIT_METHODS.get(method).info
        self.confidence = CONFIDENCES[info["confidence"]]
        self.with_means = bool(info.get("with_means"))
        self.means = means
        self.means_rule = MeansRule(means, device) if means is not None else None

    def scores(self, j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalised = None
        if self.means_rule is not None:
            r = self.means_rule
            normalised = distances(r.pooling.apply(h), r.means[j], r.means_sq[j]) / r.normalisers[j]
        logits = self.heads.heads[j](h, normalised if self.heads.spec.with_distances else None)
        conf, pred = self.confidence(torch.softmax(logits, dim=1))
        if self.with_means:
            assert normalised is not None
            e2cm_conf, _ = torch.softmax(-normalised, dim=-1).max(-1)  # decide() with normaliser 1: the same values
            conf = torch.minimum(conf, e2cm_conf) if self.combine == "and" else torch.maximum(conf, e2cm_conf)
        return conf, pred

    def cost_model(self, stage_macs: list[int], effective_heads: bool = False) -> CostModel:
        """The backbone, each head, and E²CM's distances where they are computed; ``effective_heads``: the heads
        at their effective MACs (pruned heads, see eetool.core.costs)."""
        overheads = self.heads.macs(effective=effective_heads)
        if self.means is not None:
            overheads = [o + distance_macs(int(m.shape[1]), self.means.num_classes)
                         for o, m in zip(overheads, self.means.means, strict=True)]
        return CostModel(list(self.heads.spec.exits), list(stage_macs), overheads)


def cost_models(rule: HeadsRule, exit_model: ExitModel, input_shape: tuple[int, int, int]
                ) -> tuple[CostModel, CostModel]:
    """The dense and the effective cost model of a network with exit heads: the same one twice unless the backbone
    and heads together are pruned (eetool.core.costs.PRUNED_FRACTION); the effective one is normalised by the dense
    model's MACs, so that its costs read as fractions of the unpruned network's."""
    stage_macs = measure(exit_model, input_shape).stage_macs
    dense = rule.cost_model(stage_macs)
    if not is_pruned(exit_model.model, rule.heads):
        return dense, dense
    sparse = rule.cost_model(effective_stage_macs(stage_macs, exit_model, input_shape), effective_heads=True)
    return dense, replace(sparse, reference_macs=dense.model_macs, basis=EFFECTIVE)


class Thresholded:
    """A rule at thresholds: leave at exit j when the confidence exceeds T_j."""

    def __init__(self, rule: HeadsRule | MeansRule, thresholds: list[float]) -> None:
        self.rule, self.thresholds = rule, list(thresholds)

    def __call__(self, j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conf, pred = self.rule.scores(j, h)
        return conf > self.thresholds[j], pred


@torch.no_grad()
def rule_scores(exit_model: ExitModel, data: Dataset, preprocess: Preprocess, rule: HeadsRule | MeansRule, *,
                batch_size: int = 256, device: torch.device | str = "cpu", reporter: Reporter | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidences and predictions at every exit, and the model's own prediction, for every sample (one pass)."""
    reporter = reporter or Reporter()
    n, j = len(data), len(exit_model.exits)
    conf = torch.empty(n, j)
    pred = torch.empty(n, j, dtype=torch.int64)
    final = torch.empty(n, dtype=torch.int64)
    with reporter.bar(-(-n // batch_size), "exit scores") as bar:
        for images, _, pos in data.batches(batch_size):
            feats, logits = exit_model.features(preprocess(images, device))
            for e, f in enumerate(feats):
                c, p = rule.scores(e, f)
                conf[pos, e], pred[pos, e] = c.cpu(), p.cpu()
            final[pos] = logits.argmax(1).cpu()
            bar.advance()
    return conf, pred, final


def exit_rule(ckpt: Checkpoint, method: str, combine: str, means: ClassMeans | None, heads: ExitHeadsArtifact | None,
              device: torch.device | str) -> tuple[ExitModel, HeadsRule | MeansRule]:
    """The exit model and the (unthresholded) rule of a method, after checking that the class means and
    exit heads were made for this checkpoint and for the same exits."""
    from eetool.core.artifacts import sha256_file

    if heads is not None:
        exits = list(heads.heads.spec.exits)
    else:
        assert means is not None, "a method reads class means, exit heads or both"
        exits = list(means.exits)
    if means is not None:
        means.verify(checkpoint=ckpt.identity, exits=exits)
    if heads is not None:
        heads.verify(checkpoint=ckpt.identity)
        if heads.heads.spec.with_distances and means is not None:
            heads.verify(inputs={"class-means": sha256_file(means.source)})
    em = build_exit_model(ckpt.model.to(device), ",".join(exits))
    make = cast("Callable[..., HeadsRule | MeansRule]", EXIT_METHODS.get(method).load())
    return em, make(method, means, heads.heads if heads is not None else None, combine, device)


# The factories eetool.core.exit_methods registers, called as make(method, means, heads, combine, device).
def means_rule(method: str, means: ClassMeans, heads: ExitHeads | None, combine: str, device: torch.device | str
               ) -> MeansRule:
    return MeansRule(means, device)


def heads_rule(method: str, means: ClassMeans | None, heads: ExitHeads, combine: str, device: torch.device | str
               ) -> HeadsRule:
    return HeadsRule(heads, method, means, combine, device)
