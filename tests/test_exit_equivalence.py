"""The faster early-exit inference (index compaction, inference mode, channels-last and sum-pooling kernels in the
exit heads) against a reference kept here: the implementation it replaced, on the shipped checkpoint and the
first 512 demo test images, for every exit method, at a large batch and at batch 1. Predictions, exit indices and the
rules' confidences must be the same for every sample, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eetool.classification.e2cm import ClassMeans, MeansRule, Pooling, calibrate, decide, distances
from eetool.classification.exit_heads import ExitHead, ExitHeads, HeadsSpec
from eetool.classification.rules import HeadsRule, Thresholded
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Dataset, Preprocess, load_dataset
from eetool.core.exits import ExitModel, build_exit_model
from eetool.core.inference import Decision, evaluate_exits


@torch.no_grad()
def reference_run_early_exit(exit_model: ExitModel, x: torch.Tensor, decide: Decision
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-mode loop as it was: boolean masks for every gather and scatter."""
    assert exit_model.stages is not None
    n = x.shape[0]
    predictions = torch.empty(n, dtype=torch.int64)
    exit_index = torch.full((n,), len(exit_model.exits), dtype=torch.int64)
    remaining = torch.arange(n)
    h = x
    for j, stage in enumerate(exit_model.stages[:-1]):
        h = stage(h)
        leave, pred = decide(j, h)
        if bool(leave.any()):
            predictions[remaining[leave]] = pred[leave]
            exit_index[remaining[leave]] = j
            stay = ~leave
            remaining, h = remaining[stay], h[stay]
            if remaining.numel() == 0:
                return predictions, exit_index
    predictions[remaining] = exit_model.stages[-1](h).argmax(1)
    return predictions, exit_index


def reference_head(head: ExitHead, x: torch.Tensor, normalised: torch.Tensor | None) -> torch.Tensor:
    """An SDN head as it was: the adaptive NCHW pooling kernels."""
    size = head.pool.size
    if x.shape[-1] > size or x.shape[-2] > size:
        alpha = torch.sigmoid(head.pool.mix)
        x = alpha * F.adaptive_max_pool2d(x, size) + (1 - alpha) * F.adaptive_avg_pool2d(x, size)
    z = x.flatten(1)
    if normalised is not None:
        z = torch.cat([z, normalised], 1)
    return head.linear(z)


class ReferenceHeadsRule:
    """``HeadsRule.scores`` as it was, on the reference heads."""

    def __init__(self, rule: HeadsRule) -> None:
        self.rule = rule

    @torch.no_grad()
    def scores(self, j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, normalised = self.rule, None
        if r.means_rule is not None:
            m = r.means_rule
            normalised = distances(m.pooling.apply(h), m.means[j], m.means_sq[j]) / m.normalisers[j]
        head = r.heads.heads[j]
        assert isinstance(head, ExitHead)
        p = torch.softmax(reference_head(head, h, normalised if r.heads.spec.with_distances else None), dim=1)
        if r.method == "entropy":
            entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
            conf, pred = 1 - entropy / math.log(p.shape[1]), p.argmax(1)
        else:
            conf, pred = p.max(1)
        if r.method == "e2cm+sdn":
            assert normalised is not None
            e2cm_conf, _ = decide(normalised, torch.ones_like(normalised[0]))
            conf = torch.minimum(conf, e2cm_conf) if r.combine == "and" else torch.maximum(conf, e2cm_conf)
        return conf, pred


@pytest.fixture(scope="module")
def demo() -> tuple[ExitModel, Preprocess, Dataset, ClassMeans, int]:
    ck = load_checkpoint("demo")
    ck.model.eval()
    pre = Preprocess(ck.spec.input_shape, ck.spec.mean, ck.spec.std)
    em = build_exit_model(ck.model)
    train = load_dataset("demo", "train").subset(torch.arange(300))
    calib = calibrate(em, train, pre, ck.spec.num_classes)
    cm = ClassMeans(list(em.exits), calib.means, calib.normalisers, calib.counts, Pooling(), [1] * (len(em.exits) + 1))
    return em, pre, load_dataset("demo", "test").subset(torch.arange(512)), cm, ck.spec.num_classes


def heads_for(em: ExitModel, num_classes: int, with_distances: bool) -> ExitHeads:
    """Seeded untrained heads whose pooling mixes (alpha away from 1/2) and whose confidences spread."""
    torch.manual_seed(3)
    spec = HeadsSpec("sdn", list(em.exits), [list(s) for s in em.exit_shapes((1, 28, 28))], num_classes,
                     with_distances=with_distances)
    heads = ExitHeads(spec).eval()
    with torch.no_grad():
        for head in heads.heads:
            assert isinstance(head, ExitHead)
            head.pool.mix.fill_(0.7)
            head.linear.weight.mul_(30)
    return heads


def thresholds_letting_some_leave(rule: MeansRule | ReferenceHeadsRule, em: ExitModel, x: torch.Tensor
                                  ) -> list[float]:
    """Per exit, the 70% quantile of the confidences there: about a third of the samples leave at each exit."""
    with torch.no_grad():
        feats, _ = em.features(x)
        return [float(rule.scores(j, f)[0].quantile(0.7)) for j, f in enumerate(feats)]


@pytest.mark.parametrize("method", ["e2cm", "sdn", "entropy", "e2cm+sdn and", "e2cm+sdn or", "sdn with distances"])
def test_predictions_exits_and_confidences_match_the_reference(
        demo: tuple[ExitModel, Preprocess, Dataset, ClassMeans, int], method: str) -> None:
    em, pre, test, cm, num_classes = demo
    name, _, combine = method.partition(" ")
    rule: MeansRule | HeadsRule
    if name == "e2cm":
        rule = MeansRule(cm)
        reference: MeansRule | ReferenceHeadsRule = rule  # E²CM's decision is unchanged: the same object
    else:
        heads = heads_for(em, num_classes, with_distances=combine == "with distances")
        rule = HeadsRule(heads, name, cm if name == "e2cm+sdn" or combine == "with distances" else None,
                         combine if combine in ("and", "or") else "and")
        reference = ReferenceHeadsRule(rule)
    x = pre(test.images[:256])
    thresholds = thresholds_letting_some_leave(reference, em, x)
    with torch.inference_mode():
        feats, _ = em.features(x)
        for j, f in enumerate(feats):
            conf, pred = rule.scores(j, f)
            ref_conf, ref_pred = reference.scores(j, f)
            assert torch.equal(conf, ref_conf) and torch.equal(pred, ref_pred), f"exit {j}"

    run = evaluate_exits(em, test, pre, Thresholded(rule, thresholds), batch_size=256)
    want = [reference_run_early_exit(em, pre(images), Thresholded(reference, thresholds))  # type: ignore[arg-type]
            for images, _, _ in test.batches(256)]
    assert torch.equal(run.predictions, torch.cat([p for p, _ in want]))
    assert torch.equal(run.exit_index, torch.cat([e for _, e in want]))
    counts = torch.bincount(run.exit_index, minlength=len(em.exits) + 1)
    assert int((counts > 0).sum()) >= 3, counts  # samples leave at several exits: compaction is exercised

    one = test.subset(torch.arange(24))
    run = evaluate_exits(em, one, pre, Thresholded(rule, thresholds), batch_size=1)
    want = [reference_run_early_exit(em, pre(images), Thresholded(reference, thresholds))  # type: ignore[arg-type]
            for images, _, _ in one.batches(1)]
    assert torch.equal(run.predictions, torch.cat([p for p, _ in want]))
    assert torch.equal(run.exit_index, torch.cat([e for _, e in want]))
