"""Batched inference that really stops: after each exit the samples that leave drop out of the batch and the
rest move on; in hook mode the whole model runs and the same decisions are applied after.

Method: docs/exits-and-costs.md
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from eetool.core.datasets import Dataset, Preprocess
from eetool.core.exits import Carried, ExitModel, exit_input, select_rows
from eetool.core.reporting import Reporter

# decide(exit index, features of the remaining samples) -> (leave mask, predicted labels)
Decision = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Result = TypeVar("Result")
# Round-to-round variation (max/min) above which the machine was too busy for the speed-ups to be trusted.
BUSY_SPREAD = 1.25


@dataclass
class ExitRun:
    predictions: torch.Tensor  # int64, per sample
    exit_index: torch.Tensor  # int64, per sample; len(exits) means the model's own head
    seconds: float


@dataclass
class ExitBatch:
    """A batch on its way through the stages: what the samples that left got, and the samples still in it."""

    predictions: torch.Tensor  # int64, per sample of the batch
    exit_index: torch.Tensor  # int64, per sample; len(exits) until the sample leaves
    remaining: torch.Tensor  # positions in the batch of the samples still in it
    h: Carried  # their features (several tensors where the stages carry several scales)

    @classmethod
    def start(cls, x: Carried, n_exits: int) -> ExitBatch:
        first = exit_input(x)
        n, device = first.shape[0], first.device
        return cls(torch.empty(n, dtype=torch.int64, device=device),
                   torch.full((n,), n_exits, dtype=torch.int64, device=device), torch.arange(n, device=device), x)

    def take_leavers(self, j: int, leave: torch.Tensor, pred: torch.Tensor) -> bool:
        """Records the samples that ``leave`` at exit j with their ``pred`` and compacts the batch to the others,
        so that exited samples stop costing compute; True when none remain.

        The leave mask becomes positions once (``nonzero``), which every gather and scatter then uses: a boolean
        mask would be turned into positions again by each indexing operation."""
        if not bool(leave.any()):  # cheaper than ``nonzero`` where nothing leaves, as at batch 1 mostly
            return False
        left = leave.nonzero().squeeze(1)
        gone = self.remaining.index_select(0, left)
        self.predictions.index_copy_(0, gone, pred.index_select(0, left))
        self.exit_index.index_fill_(0, gone, j)
        if left.numel() == self.remaining.numel():
            return True
        stay = (~leave).nonzero().squeeze(1)
        self.remaining, self.h = self.remaining.index_select(0, stay), select_rows(self.h, stay)
        return False


@torch.inference_mode()
def run_early_exit(exit_model: ExitModel, x: torch.Tensor, decide: Decision) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and exit indices for one batch."""
    n_exits = len(exit_model.exits)
    if exit_model.stages is None:  # hook mode: everything is computed, decisions are applied in order
        predictions = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        exit_index = torch.full((x.shape[0],), n_exits, dtype=torch.int64, device=x.device)
        remaining = torch.arange(x.shape[0], device=x.device)
        feats, logits = exit_model.features(x)
        for j, f in enumerate(feats):
            leave, pred = decide(j, f[remaining])
            predictions[remaining[leave]] = pred[leave]
            exit_index[remaining[leave]] = j
            remaining = remaining[~leave]
        predictions[remaining] = logits[remaining].argmax(1)
        return predictions, exit_index
    batch = ExitBatch.start(x, n_exits)
    for j, stage in enumerate(exit_model.stages[:-1]):
        batch.h = stage(batch.h)
        if batch.take_leavers(j, *decide(j, exit_input(batch.h))):
            return batch.predictions, batch.exit_index
    batch.predictions.index_copy_(0, batch.remaining, exit_model.stages[-1](batch.h).argmax(1))
    return batch.predictions, batch.exit_index


def evaluate_exits(exit_model: ExitModel, data: Dataset, preprocess: Preprocess, decide: Decision, *,
                   batch_size: int = 256, device: torch.device | str = "cpu",
                   reporter: Reporter | None = None) -> ExitRun:
    reporter = reporter or Reporter()
    # As in ``predict``; in training mode BatchNorm would also make a sample's result depend on its batch.
    exit_model.model.eval().to(device)
    preds, exits = [], []
    start = time.perf_counter()
    with torch.inference_mode(), reporter.bar(-(-len(data) // batch_size), "early-exit inference") as bar:
        for images, _, _ in data.batches(batch_size):
            p, e = run_early_exit(exit_model, preprocess(images, device), decide)
            preds.append(p.cpu())
            exits.append(e.cpu())
            bar.advance()
    return ExitRun(torch.cat(preds), torch.cat(exits), time.perf_counter() - start)


@dataclass
class PlainRun:
    predictions: torch.Tensor
    seconds: float


@torch.inference_mode()
def predict(model: torch.nn.Module, data: Dataset, preprocess: Preprocess, *, batch_size: int = 256,
            device: torch.device | str = "cpu", reporter: Reporter | None = None) -> PlainRun:
    """The plain model on every sample: the baseline for accuracy and throughput."""
    reporter = reporter or Reporter()
    model.eval().to(device)
    preds = []
    start = time.perf_counter()
    with reporter.bar(-(-len(data) // batch_size), "inference") as bar:
        for images, _, _ in data.batches(batch_size):
            preds.append(model(preprocess(images, device)).argmax(1).cpu())
            bar.advance()
    return PlainRun(torch.cat(preds), time.perf_counter() - start)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class (NaN for a class with no samples), from bincounts: no per-sample loop."""
    mask = labels >= 0
    total = torch.bincount(labels[mask], minlength=num_classes).to(torch.float64)
    correct = torch.bincount(labels[mask][predictions[mask] == labels[mask]], minlength=num_classes).to(torch.float64)
    return correct / total


def interleaved(runs: Sequence[Callable[[], Result]], repeats: int) -> list[list[Result]]:
    """``repeats`` rounds, each calling every one of ``runs`` in turn (plain, p0, p1, ..., plain, p0, ...),
    so that a change of load on the machine hits every run alike. Returns results[round][run]."""
    return [[run() for run in runs] for _ in range(repeats)]


@dataclass
class Speed:
    """Timing of one run over the rounds, against the first run (the plain model) of the same round."""

    seconds: list[float]  # per round
    throughput: float  # samples/s, median over rounds
    speedup: float  # median over rounds of plain seconds / these seconds
    speedup_min: float
    speedup_max: float


def speeds(seconds: Sequence[Sequence[float]], samples: int) -> list[Speed]:
    """Per run, from ``seconds[round][run]`` where run 0 is the plain model: the speed-up of each round
    compares runs of that round only, so load that changes between rounds cancels out."""
    out = []
    for run in range(len(seconds[0])):
        times = [float(r[run]) for r in seconds]
        ups = [float(r[0]) / float(r[run]) for r in seconds]
        out.append(Speed(times, statistics.median(samples / t for t in times), statistics.median(ups),
                         min(ups), max(ups)))
    return out


def timing_spread(found: Sequence[Speed]) -> float:
    """How much the rounds disagree: the largest max/min ratio of the plain model's round times
    (``found[0]``) and of each operating point's speed-ups; 1.0 for one round or perfectly steady runs."""
    plain = found[0].seconds
    return max([max(plain) / min(plain), *(s.speedup_max / s.speedup_min for s in found[1:])])
