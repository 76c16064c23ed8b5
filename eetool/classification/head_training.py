"""Training exit heads with the one training loop: what ``fit`` trains and the loss it minimises, with the
backbone frozen (eval mode, no gradients; optionally its final layer trained) or jointly (its cross-entropy
joins, and the final exit may teach the early ones).

Method: docs/trained-exits.md
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from eetool.classification.e2cm import ClassMeans, distances
from eetool.classification.exit_heads import ExitHeads
from eetool.classification.self_distillation import DEFAULT_TEMPERATURE, joint_exit_loss
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.distributed import World, all_sum
from eetool.core.exits import ExitModel


class ExitTrainer(nn.Module):
    def __init__(self, exit_model: ExitModel, heads: ExitHeads, means: ClassMeans | None, weights: list[float], *,
                 joint: bool, final_layer: nn.Linear | None = None, distill: float = 0.0,
                 temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        if joint and final_layer is not None:
            raise ValueError("jointly the final layer trains with the backbone already")
        if distill and not joint:
            raise ValueError("the final exit teaches the early ones only when they train together")
        self.distill = distill
        self.temperature = temperature
        self.final_layer = final_layer
        self.exit_model = exit_model
        self.backbone = exit_model.model
        self.heads = heads
        self.joint = joint
        self.weights = list(weights)
        self.means = means

    def train(self, mode: bool = True) -> ExitTrainer:
        super().train(mode)
        if not self.joint:
            self.backbone.eval()  # frozen: batch norm keeps the statistics the backbone was trained with
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        if self.joint:
            return self.parameters()
        final = self.final_layer.parameters() if self.final_layer is not None else iter(())
        return chain(self.heads.parameters(), final)

    @contextmanager
    def _final_input(self) -> Iterator[list[torch.Tensor]]:
        """The input the final layer receives in a forward pass of the backbone (when it trains on its own)."""
        seen: list[torch.Tensor] = []
        if self.final_layer is None:
            yield seen
            return
        handle = self.final_layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        try:
            yield seen
        finally:
            handle.remove()

    def _distances(self, features: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if self.means is None:
            return None
        out = []
        for j, f in enumerate(features):
            d = distances(self.means.pooling.apply(f), self.means.means[j].to(f.device))
            out.append(d / self.means.normalisers[j].to(f.device))
        return out

    def outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every head's logits and the model's own."""
        if self.joint:
            feats, logits = self.exit_model.features(x)
        else:
            with torch.no_grad(), self._final_input() as final_input:
                feats, logits = self.exit_model.features(x)
            if self.final_layer is not None:
                logits = self.final_layer(final_input[-1])
        return self.heads(feats, self._distances(feats)), logits

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.outputs(x)

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             mix: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted sum of the exits' cross-entropies, jointly with the final one's and any distillation
        (train-exits offers no mixup, so ``mix`` is None)."""
        outs, logits = model(x)  # this trainer, or DistributedDataParallel's wrapper of it under torchrun
        if self.joint:
            return joint_exit_loss(outs, logits, y, self.weights, distill=self.distill,
                                   temperature=self.temperature), outs[-1]
        loss = sum((w * F.cross_entropy(o, y) for w, o in zip(self.weights, outs, strict=True)),
                   torch.zeros((), device=x.device))
        if self.final_layer is not None:
            loss = loss + F.cross_entropy(logits, y)
        return loss, outs[-1]


@torch.no_grad()
def exit_accuracies(trainer: ExitTrainer, data: Dataset, preprocess: Preprocess, *, batch_size: int = 256,
                    device: torch.device | str = "cpu", world: World = World()) -> list[float]:
    """Accuracy of every head, then of the model's own head (under torchrun each rank scores its share of the
    batches and the counts are summed)."""
    trainer.eval()
    correct = torch.zeros(len(trainer.heads.heads) + 1, dtype=torch.int64)
    for images, labels, _ in data.batches(batch_size, world=world):
        outs, logits = trainer.outputs(preprocess(images, device))
        y = labels.to(logits.device)
        correct += torch.stack([(o.argmax(1) == y).sum() for o in [*outs, logits]]).cpu()
    return (all_sum(correct, world).double() / len(data)).tolist()
