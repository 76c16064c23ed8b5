"""Pruning early-exit networks (thesis 2.5): global unstructured L1 magnitude pruning in rounds, each followed
by fine-tuning, ``joint`` (thesis Approach 1) or ``ordered`` (Approach 2: backbone first, then the heads with the
final layer). Pruned weights stay zero through fine-tuning by a boolean mask per layer.

Method: docs/weight-pruning.md
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from eetool.classification.exit_heads import ExitHeads
from eetool.classification.head_training import ExitTrainer, exit_accuracies
from eetool.core.builders import first_conv, last_linear
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.exits import ExitModel
from eetool.core.reporting import Reporter
from eetool.core.training_loop import TrainConfig, TrainResult, accuracy, cross_entropy_step, fit

BACKBONE, HEADS = "backbone", "heads"
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Steps of a run: training the heads (no pruning), or a pruning round over these parts.
TRAIN_HEADS, JOINT_ROUND, BACKBONE_ROUND, HEADS_ROUND = "train-heads", "joint", "backbone", "heads"
ROUND_PARTS = {JOINT_ROUND: (BACKBONE, HEADS), BACKBONE_ROUND: (BACKBONE,), HEADS_ROUND: (HEADS,)}


@dataclass(frozen=True)
class Layer:
    """A convolution or linear layer whose weight can be pruned. ``key`` names it across both parts."""

    part: str
    name: str
    module: nn.Module
    takes_part: bool  # False for the first convolution or the final layer when they are left out
    final: bool = False  # the model's final layer (the final exit's head)

    @property
    def key(self) -> str:
        return f"{self.part}/{self.name}.weight"

    @property
    def weight(self) -> torch.Tensor:
        w: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return w


def prunable_layers(model: nn.Module, heads: ExitHeads | None = None, *, first_conv_in: bool = True,
                    final_layer_in: bool = True) -> list[Layer]:
    """Every convolution and linear layer of the backbone, then of the heads, in definition order."""
    stem = first_conv(model)
    final = last_linear(model)
    out_of_it = {id(m) for flag, found in ((first_conv_in, stem), (final_layer_in, final))
                 if not flag and found is not None for m in [found[1]]}
    final_id = id(final[1]) if final is not None else None
    layers = [Layer(BACKBONE, name, m, id(m) not in out_of_it, final=id(m) == final_id)
              for name, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if heads is not None:
        layers += [Layer(HEADS, name, m, True) for name, m in heads.named_modules() if isinstance(m, PRUNABLE)]
    return layers


def participating(layers: list[Layer], parts: tuple[str, ...]) -> list[Layer]:
    return [layer for layer in layers if layer.takes_part and layer.part in parts]


def nonzero_masks(layers: list[Layer]) -> dict[str, torch.Tensor]:
    """The masks a network's weights already imply: a weight that is exactly zero counts as pruned."""
    return {layer.key: layer.weight.detach().ne(0).cpu() for layer in layers}


def pruned_count(remaining: int, amount: float) -> int:
    """How many of the ``remaining`` weights one round prunes: ``round(amount * remaining)``."""
    return min(remaining, round(amount * remaining))


def remaining_after(total: int, amount: float, rounds: int) -> int:
    """Weights left of ``total`` after ``rounds`` rounds (the count each round prunes is rounded on its own)."""
    for _ in range(rounds):
        total -= pruned_count(total, amount)
    return total


def target_sparsity(amount: float, rounds: int) -> float:
    """The fraction pruned after ``rounds`` rounds of ``amount`` of the remaining weights (before rounding)."""
    return 1 - (1 - amount) ** rounds


def prune_round(layers: list[Layer], masks: dict[str, torch.Tensor], amount: float) -> int:
    """One round: global L1 magnitude pruning over ``layers`` of ``amount`` of their remaining weights.

    Updates ``masks`` and zeros the pruned weights in place (permanent, no reparametrisation left behind);
    returns how many weights it pruned."""
    remaining = sum(int(masks[layer.key].sum()) for layer in layers)
    count = pruned_count(remaining, amount)
    with masked(layers, masks):
        prune.global_unstructured([(layer.module, "weight") for layer in layers],
                                  pruning_method=prune.L1Unstructured, amount=count)
        for layer in layers:
            mask = getattr(layer.module, "weight_mask")  # noqa: B009 (made by torch.nn.utils.prune)
            masks[layer.key] = mask.detach().bool().cpu()
    return count


@contextmanager
def masked(layers: list[Layer], masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """The masks as torch's pruning reparametrisation while the block runs (a pruned weight stays zero however
    its stored value trains), then permanent again: each weight is its value times its mask."""
    for layer in layers:
        prune.custom_from_mask(layer.module, "weight", masks[layer.key].to(layer.weight.device))
    try:
        yield
    finally:
        for layer in layers:
            prune.remove(layer.module, "weight")


def layer_sparsity(layers: list[Layer]) -> list[dict[str, Any]]:
    """Per layer: its part, name, weights, zeros and sparsity (the thesis's Fig. 5a/6a)."""
    rows = []
    for layer in layers:
        n = layer.weight.numel()
        zeros = int((layer.weight == 0).sum())
        rows.append({"part": layer.part, "layer": layer.name, "weights": n, "zeros": zeros,
                     "sparsity": round(zeros / n, 6), "pruned": layer.takes_part})
    return rows


def sparsity_of(layers: list[Layer]) -> float:
    total = sum(layer.weight.numel() for layer in layers)
    return sum(int((layer.weight == 0).sum()) for layer in layers) / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# Masks, bit-packed: one bit per weight (numpy.packbits), the shapes in the metadata.

MASK_SHAPES_KEY = "eetool.mask_shapes"


def pack_masks(masks: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    packed = {k: torch.from_numpy(np.packbits(m.reshape(-1).numpy().astype(np.uint8))) for k, m in masks.items()}
    return packed, {MASK_SHAPES_KEY: json.dumps({k: list(m.shape) for k, m in masks.items()}, sort_keys=True)}


def unpack_masks(packed: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, torch.Tensor]:
    shapes = json.loads(meta[MASK_SHAPES_KEY])
    out = {}
    for key, bits in packed.items():
        shape = shapes[key]
        flat = np.unpackbits(bits.numpy(), count=math.prod(shape))
        out[key] = torch.from_numpy(flat.astype(bool)).reshape(shape)
    return out


# ---------------------------------------------------------------------------------------------
# The run: a plan of steps, each resumable.


@dataclass
class Settings:
    approach: str
    rounds: int
    amount: float
    finetune: TrainConfig  # one fine-tuning (its seed is varied per step)
    first_conv: bool = True
    final_layer: bool = True
    train_heads: bool = True  # joint: train the heads on the unpruned backbone first (ordered always trains them)
    final_phases: str = "both"  # ordered: the final layer takes part in both phases, or in the backbone's only


def plan(settings: Settings) -> list[tuple[str, int]]:
    """The steps of a run: (kind, round number; 0 for head training)."""
    rounds = range(1, settings.rounds + 1)
    if settings.approach == "joint":
        return [*([(TRAIN_HEADS, 0)] if settings.train_heads else []), *((JOINT_ROUND, r) for r in rounds)]
    return [*((BACKBONE_ROUND, r) for r in rounds), (TRAIN_HEADS, 0), *((HEADS_ROUND, r) for r in rounds)]


@dataclass
class Pruner:
    """An early-exit network being pruned: the backbone (through its exit model), the heads, the masks."""

    exit_model: ExitModel
    heads: ExitHeads
    weights: list[float]
    settings: Settings
    data: Dataset
    preprocess: Preprocess
    eval_data: Dataset | None = None
    device: torch.device | str = "cpu"
    reporter: Reporter = field(default_factory=Reporter)
    layers: list[Layer] = field(init=False)
    masks: dict[str, torch.Tensor] = field(init=False)
    records: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0  # steps finished
    # Each exit's accuracy before pruning (the thesis's black curves): the heads' once they are trained.
    baseline: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.layers = prunable_layers(self.exit_model.model, self.heads, first_conv_in=self.settings.first_conv,
                                      final_layer_in=self.settings.final_layer)
        self.masks = nonzero_masks(self.layers)

    @property
    def model(self) -> nn.Module:
        return self.exit_model.model

    def steps(self) -> list[tuple[str, int]]:
        return plan(self.settings)

    def run_step(self, index: int) -> dict[str, Any]:
        """Run step ``index`` (the next one) and return its record."""
        kind, round_no = self.steps()[index]
        # Every step starts from its own seed, so a resumed run draws what an uninterrupted one does.
        cfg = replace(self.settings.finetune, seed=self.settings.finetune.seed + index)
        torch.manual_seed(cfg.seed)
        pruned = 0
        if kind != TRAIN_HEADS:
            pruned = prune_round([la for la in self.round_layers(kind) if la.takes_part], self.masks,
                                 self.settings.amount)
        result = self._finetune(kind, cfg)
        record = {"step": index + 1, "phase": kind, "round": round_no or None, "pruned": pruned,
                  **self.summary(heads_trained=kind != BACKBONE_ROUND),
                  "loss": round(result.last.loss, 6), "samples_seen": result.samples_seen,
                  "seconds": round(result.seconds, 1)}
        self.records.append(record)
        self.done = index + 1
        return record

    def round_layers(self, kind: str) -> list[Layer]:
        """The layers a step of this kind trains (and, taking part, prunes), whether or not they take part."""
        final_too = kind == HEADS_ROUND and self.settings.final_phases == "both"
        return [layer for layer in self.layers if layer.part in ROUND_PARTS.get(kind, (HEADS,))
                or (final_too and layer.final)]

    def _finetune(self, kind: str, cfg: TrainConfig) -> TrainResult:
        if kind == BACKBONE_ROUND:
            with masked(self.round_layers(kind), self.masks):
                return fit(self.model, self.data, self.preprocess, cfg, device=self.device,
                           step=cross_entropy_step(cfg.label_smoothing), reporter=self.reporter)
        joint = kind == JOINT_ROUND
        final = next((la.module for la in self.round_layers(kind) if la.final and not joint), None)
        trainer = ExitTrainer(self.exit_model, self.heads, None, self.weights, joint=joint,
                              final_layer=final)  # type: ignore[arg-type]
        trained = self.round_layers(kind)
        with masked(trained, self.masks):
            return fit(trainer, self.data, self.preprocess, cfg, device=self.device,
                       params=trainer.trainable_parameters(), step=trainer.step, reporter=self.reporter)

    def exit_accuracies(self, heads_trained: bool = True) -> dict[str, float] | None:
        """Each exit's accuracy when every sample leaves there (thesis Fig. 5b), then the final exit's; the heads'
        only once they are trained."""
        if self.eval_data is None:
            return None
        if not heads_trained:
            acc = accuracy(self.model, self.eval_data, self.preprocess, torch.device(self.device))
            self.model.eval()
            return {"final": round(acc, 6)}
        trainer = ExitTrainer(self.exit_model, self.heads, None, self.weights, joint=False)
        accs = exit_accuracies(trainer, self.eval_data, self.preprocess, device=self.device)
        return {name: round(a, 6) for name, a in zip([*self.exit_model.exits, "final"], accs, strict=True)}

    def summary(self, heads_trained: bool = True) -> dict[str, Any]:
        taking_part = [layer for layer in self.layers if layer.takes_part]
        return {
            "sparsity": {
                "backbone": round(sparsity_of([la for la in self.layers if la.part == BACKBONE]), 6),
                "heads": round(sparsity_of([la for la in self.layers if la.part == HEADS]), 6),
                "taking_part": round(sparsity_of(taking_part), 6),
            },
            "accuracy": self.exit_accuracies(heads_trained),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "model": self.model.state_dict(), "heads": self.heads.state_dict(),
                "masks": dict(self.masks), "records": json.dumps(self.records), "baseline": json.dumps(self.baseline)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.masks = {k: v.bool() for k, v in state["masks"].items()}
        self.records = json.loads(state["records"])
        self.baseline = json.loads(state["baseline"])
        self.done = int(state["done"])

    def run(self, after_step: Callable[[Pruner], None] | None = None) -> list[dict[str, Any]]:
        """Every step not yet done; ``after_step`` (saving the state, say) runs after each."""
        if self.done == 0:  # heads given to the run are trained; heads made for it are not yet
            self.baseline = self.exit_accuracies(heads_trained=not self.settings.train_heads)
        for index in range(self.done, len(self.steps())):
            kind, round_no = self.steps()[index]
            what = "training the heads" if kind == TRAIN_HEADS else f"{kind} round {round_no}/{self.settings.rounds}"
            self.reporter.log(f"step {index + 1}/{len(self.steps())}: {what}")
            record = self.run_step(index)
            if index == 0 and kind == TRAIN_HEADS:  # joint: the heads just trained, nothing pruned yet
                self.baseline = record["accuracy"]
            self.reporter.log(f"  sparsity: backbone {record['sparsity']['backbone']:.4f}, heads "
                              f"{record['sparsity']['heads']:.4f}; accuracy {accuracies_text(record['accuracy'])}")
            if after_step is not None:
                after_step(self)
        return self.records


def accuracies_text(accuracies: dict[str, float] | None) -> str:
    """Each exit's accuracy for a log line: ``stem 0.7032, layer1.0 0.7122, ..., final 0.9375``."""
    if not accuracies:
        return "not evaluated"
    return ", ".join(f"{name} {accuracy:.4f}" for name, accuracy in accuracies.items())
