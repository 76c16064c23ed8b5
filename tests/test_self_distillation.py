"""Self-distillation ("Be Your Own Teacher"): the joint loss against a direct re-computation on small tensors,
its plain form at weight 0, the teacher's detachment, and the trainer's step using it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eetool.classification.exit_heads import ExitHeads, HeadsSpec
from eetool.classification.head_training import ExitTrainer
from eetool.classification.self_distillation import check_distillation, distillation_term, joint_exit_loss
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.errors import UsageError
from eetool.core.exits import build_exit_model


def direct_loss(exits: list[torch.Tensor], final: torch.Tensor, labels: torch.Tensor, weights: list[float],
                a: float, t: float) -> float:
    """The loss written out sample by sample and class by class, in float64."""
    def log_softmax(row: list[float], temp: float) -> list[float]:
        top = max(v / temp for v in row)
        log_z = top + math.log(sum(math.exp(v / temp - top) for v in row))
        return [v / temp - log_z for v in row]

    n = len(labels)
    total = 0.0
    for w, z in zip(weights, exits, strict=True):
        ce = kl = 0.0
        for i in range(n):
            row, teacher_row, y = z[i].tolist(), final[i].tolist(), int(labels[i])
            ce -= log_softmax(row, 1.0)[y] / n
            log_q, log_p = log_softmax(row, t), log_softmax(teacher_row, t)
            kl += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True)) / n
        total += w * ((1 - a) * ce + a * t * t * kl)
    final_ce = -sum(log_softmax(final[i].tolist(), 1.0)[int(labels[i])] for i in range(n)) / n
    return total + final_ce


def small_case(seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    exits = [torch.randn(6, 5, generator=gen) * 3 for _ in range(3)]
    final = torch.randn(6, 5, generator=gen) * 3
    labels = torch.randint(0, 5, (6,), generator=gen)
    return exits, final, labels, [0.15, 0.3, 0.45]


@pytest.mark.parametrize(("seed", "weight", "temperature"), [(0, 0.5, 3.0), (1, 1.0, 1.0), (2, 0.3, 7.5),
                                                             (3, 0.0, 3.0)])
def test_matches_a_direct_recomputation(seed: int, weight: float, temperature: float) -> None:
    exits, final, labels, weights = small_case(seed)
    got = joint_exit_loss(exits, final, labels, weights, distill=weight, temperature=temperature)
    want = direct_loss(exits, final, labels, weights, weight, temperature)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_weight_zero_is_the_plain_joint_loss() -> None:
    exits, final, labels, weights = small_case(4)
    plain = sum(w * F.cross_entropy(z, labels) for w, z in zip(weights, exits, strict=True)) \
        + F.cross_entropy(final, labels)
    got = joint_exit_loss(exits, final, labels, weights, distill=0.0, temperature=3.0)
    assert torch.equal(got, torch.as_tensor(plain))
    # and distillation does change it, by more than rounding
    assert abs(float(joint_exit_loss(exits, final, labels, weights, distill=0.5)) - float(plain)) > 1e-2


def test_the_teacher_learns_from_the_labels_only() -> None:
    exits, final, labels, weights = small_case(5)
    exits = [z.requires_grad_() for z in exits]
    taught, plain = final.clone().requires_grad_(), final.clone().requires_grad_()
    joint_exit_loss(exits, taught, labels, weights, distill=0.7).backward()
    F.cross_entropy(plain, labels).backward()
    assert taught.grad is not None and plain.grad is not None
    assert torch.allclose(taught.grad, plain.grad, atol=1e-7)  # the final exit's gradient: its own CE alone
    assert all(z.grad is not None and float(z.grad.abs().sum()) > 0 for z in exits)


def test_distillation_term_vanishes_when_the_exit_agrees_with_the_teacher() -> None:
    _, final, _, _ = small_case(6)
    assert float(distillation_term(final.clone(), final, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_term(-final, final, 3.0)) > 0.1


@pytest.mark.parametrize(("weight", "temperature"), [(-0.1, 3.0), (1.5, 3.0), (math.nan, 3.0), (0.5, 0.0),
                                                     (0.5, -1.0), (0.5, math.inf), (0.5, 1e6)])
def test_out_of_range_settings_are_usage_errors(weight: float, temperature: float) -> None:
    with pytest.raises(UsageError):
        check_distillation(weight, temperature)


def test_the_joint_trainer_steps_on_the_distillation_loss(tiny_checkpoint: str, tiny_data: str) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    em = build_exit_model(ckpt.model, "half")
    shapes = [list(s) for s in em.exit_shapes(ckpt.spec.input_shape)]
    torch.manual_seed(0)
    heads = ExitHeads(HeadsSpec("sdn", list(em.exits), shapes, ckpt.spec.num_classes))
    weights = [0.5 + j for j in range(len(em.exits))]
    trainer = ExitTrainer(em, heads, None, weights, joint=True, distill=0.6, temperature=2.0)
    trainer.eval()  # batch norm on its running statistics: the two passes below see the same model
    ds = load_dataset(tiny_data, "train")
    pre = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    x, y = pre(ds.images[:16]), ds.labels[:16]
    loss, _ = trainer.step(trainer, x, y, None)
    with torch.no_grad():
        outs, logits = trainer.outputs(x)
    want = direct_loss(outs, logits, y, weights, 0.6, 2.0)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError):
        ExitTrainer(em, heads, None, weights, joint=False, distill=0.5)
