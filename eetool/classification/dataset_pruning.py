"""Dataset pruning: EEPrune (thesis chapter 4), its variants ``eeprune-loss`` and ``eeprune-soft``, and the baselines
``random``, ``el2n``, ``forgetting`` and ``svp``. Each method turns a short training phase into per-sample records
and the records into a priority (highest pruned); the records are kept, so another ratio needs no training.

Method: docs/dataset-pruning.md
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from eetool.core.choices import EEPRUNE_FAMILY, PRUNING_BASELINES
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.distributed import World, all_sum
from eetool.core.errors import UsageError
from eetool.core.exits import ExitModel, build_exit_model, candidate_exits, select_exits
from eetool.core.owned_folders import make_owned_folder
from eetool.core.reporting import Reporter
from eetool.core.training_loop import Mix, Tracker, TrainConfig, fit, read_state, write_state

BASELINES = PRUNING_BASELINES
METHODS = EEPRUNE_FAMILY + BASELINES
EXIT_LOCATIONS = {"before": 0.25, "mid": 0.5, "after": 0.75}
# The thesis's settings: E = 10 for CIFAR/KMNIST, EL2N 10 models x 15 epochs, forgetting over the
# full 200-epoch run, SVP 50 epochs of a smaller model.
DEFAULT_EPOCHS = {"eeprune": 10, "eeprune-loss": 10, "eeprune-soft": 10, "el2n": 15, "forgetting": 200, "svp": 50,
                  "random": 0}
SOFT_WEIGHTS = (0.4, 0.2, 0.4, 0.001)


def records_family(method: str) -> str:
    """Methods whose records are interchangeable: the EEPrune family shares one training phase."""
    return "eeprune" if method in EEPRUNE_FAMILY else method


# ---------------------------------------------------------------------------------------------
# Confidence as log-odds


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of the largest softmax probability p, in float64, without saturating at p = 1."""
    z = logits.double()
    top = z.argmax(1, keepdim=True)
    others = z.scatter(1, top, float("-inf"))
    return z.gather(1, top).squeeze(1) - torch.logsumexp(others, 1)


def confidence(margin: torch.Tensor) -> torch.Tensor:
    """The probability a log-odds value stands for."""
    return torch.sigmoid(margin.double())


# ---------------------------------------------------------------------------------------------
# The early-exit network EEPrune trains


def exit_point(model: nn.Module, location: str) -> str:
    """``before``, ``mid`` or ``after`` (quartiles of the exit points, as ``--exits quartiles``), or a name."""
    _, candidates = candidate_exits(model)
    if location in EXIT_LOCATIONS:
        if not candidates:
            raise UsageError("this model has no exit points", "use a model with several blocks")
        n = len(candidates)
        return candidates[max(0, min(n - 1, round(EXIT_LOCATIONS[location] * (n + 1)) - 1))]
    chosen = select_exits(candidates, location, model)
    if len(chosen) != 1:
        raise UsageError(f"--exit {location!r} names {len(chosen)} exits", "EEPrune uses one early exit: name one")
    return chosen[0]


class EarlyExitNetwork(nn.Module):
    """The backbone plus one linear exit (global average pooling, then a linear layer) at ``exit``."""

    def __init__(self, backbone: nn.Module, exit: str, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.exit_model: ExitModel = build_exit_model(backbone, exit)
        self.stages = self.exit_model.stages  # registered, so .to() and .parameters() see split stages' modules
        channels = self.exit_model.exit_shapes(input_shape)[0][0]
        self.exit = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (feature,), final = self.exit_model.features(x)
        pooled = feature.flatten(2).mean(2) if feature.dim() > 2 else feature
        return self.exit(pooled), final


# ---------------------------------------------------------------------------------------------
# Per-sample bookkeeping during training


class SampleTracker(Tracker, Protocol):
    """A training step that keeps its outputs, so that ``after_step`` can record them per sample."""

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             mix: Mix | None) -> tuple[torch.Tensor, torch.Tensor]: ...


class QualificationTracker:
    """EEPrune's three conditions at every training step: the highest early-exit log-odds at which a
    sample was right at both exits (-inf while it never was)."""

    def __init__(self, n: int) -> None:
        self.qualified = torch.full((n,), float("-inf"), dtype=torch.float64)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             mix: Mix | None) -> tuple[torch.Tensor, torch.Tensor]:
        early, final = model(x)
        loss = F.cross_entropy(early, y) + F.cross_entropy(final, y)  # J of Algorithm 2
        self._last = (early.detach(), final.detach(), y)
        return loss, final

    def after_step(self, positions: torch.Tensor) -> None:
        assert self._last is not None
        early, final, y = self._last
        right = (early.argmax(1) == y) & (final.argmax(1) == y)
        margin = torch.where(right, log_odds(early), float("-inf")).cpu()
        self.qualified[positions] = torch.maximum(self.qualified[positions], margin)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"qualified": self.qualified}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.qualified = state["qualified"].clone()


class ForgettingTracker:
    """Forgetting events (right at one presentation, wrong at the next) per sample, from the training batches."""

    def __init__(self, n: int) -> None:
        self.previous = torch.zeros(n, dtype=torch.bool)
        self.learned = torch.zeros(n, dtype=torch.bool)
        self.forgotten = torch.zeros(n, dtype=torch.int64)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             mix: Mix | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        self._last = (logits.detach(), y)
        return F.cross_entropy(logits, y), logits

    def after_step(self, positions: torch.Tensor) -> None:
        assert self._last is not None
        logits, y = self._last
        right = (logits.argmax(1) == y).cpu()
        self.forgotten[positions] += (self.previous[positions] & ~right).long()
        self.learned[positions] |= right
        self.previous[positions] = right

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"previous": self.previous, "learned": self.learned, "forgotten": self.forgotten}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.previous, self.learned, self.forgotten = (state[k].clone() for k in ("previous", "learned", "forgotten"))


# ---------------------------------------------------------------------------------------------
# Passes over the training set after training (eval mode, no augmentation)


@torch.no_grad()
def after_training_records(network: EarlyExitNetwork, data: Dataset, preprocess: Preprocess,
                           device: torch.device, batch_size: int = 512,
                           world: World = World()) -> dict[str, torch.Tensor]:
    """Each exit's loss, correctness and confidence per sample once the E epochs are over (under torchrun each
    rank scores its share of the batches and the rows are gathered)."""
    network.eval()
    n = len(data)
    out = {k: torch.zeros(n, dtype=torch.float64) for k in ("early_loss", "final_loss", "early_margin",
                                                             "final_margin")}
    out.update({k: torch.zeros(n, dtype=torch.bool) for k in ("early_correct", "final_correct")})
    for images, labels, pos in data.batches(batch_size, world=world):
        y = labels.to(device)
        early, final = network(preprocess(images, device))
        for name, logits in (("early", early), ("final", final)):
            out[f"{name}_loss"][pos] = F.cross_entropy(logits.double(), y, reduction="none").cpu()
            out[f"{name}_margin"][pos] = log_odds(logits).cpu()
            out[f"{name}_correct"][pos] = (logits.argmax(1) == y).cpu()
    # rows this rank did not score are zeros (false), so the sum over the ranks is every rank's rows
    return {k: all_sum(v.to(torch.float64), world).to(v.dtype) for k, v in out.items()}


@torch.no_grad()
def el2n_scores(model: nn.Module, data: Dataset, preprocess: Preprocess, device: torch.device,
                batch_size: int = 512, world: World = World()) -> torch.Tensor:
    """‖softmax(f(x)) - onehot(y)‖₂ per sample (under torchrun each rank scores its share, then the rows are
    gathered)."""
    model.eval()
    scores = torch.zeros(len(data), dtype=torch.float64)
    for images, labels, pos in data.batches(batch_size, world=world):
        probs = model(preprocess(images, device)).double().softmax(1)
        target = F.one_hot(labels.to(device), probs.shape[1]).double()
        scores[pos] = (probs - target).norm(dim=1).cpu()
    return all_sum(scores, world)  # rows this rank did not score are zeros


# ---------------------------------------------------------------------------------------------
# Priorities: the highest are pruned


def priority(method: str, records: dict[str, torch.Tensor], *, ratio: float = 0.0,
             soft_weights: Sequence[float] = SOFT_WEIGHTS,
             soft_threshold: float | None = None) -> torch.Tensor:
    if method == "eeprune":
        return records["qualified"].clone()
    if method == "eeprune-loss":
        return -(records["early_loss"] + records["final_loss"])
    if method == "eeprune-soft":
        w1, w2, w3, w4 = soft_weights
        margin = records["early_margin"]
        if soft_threshold is None:
            confident = top_fraction_mask(margin, ratio)
        else:
            confident = confidence(margin) > soft_threshold
        return (w1 * records["early_correct"].double() + w2 * records["final_correct"].double()
                + w3 * confident.double()
                + w4 * (confidence(margin) + confidence(records["final_margin"])))
    if method == "random":
        return records["random"].clone()
    if method == "el2n":
        return -records["el2n"]
    if method in ("forgetting", "svp"):
        never = ~records["learned"]
        return torch.where(never, float("-inf"), -records["forgotten"].double())
    raise UsageError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")


def top_fraction_mask(values: torch.Tensor, ratio: float) -> torch.Tensor:
    """The samples at or above the k-th largest value, k = round(ratio·N): eeprune-soft's "confident"."""
    k = round(ratio * values.numel())
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    if k:
        t = torch.sort(values, descending=True).values[k - 1]
        mask = values >= t
    return mask


def rank(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Positions by descending priority; ties in a seeded random order (so no method prefers low indices)."""
    shuffle = torch.randperm(scores.numel(), generator=generator)
    order = torch.sort(scores[shuffle], descending=True, stable=True).indices
    return shuffle[order]


@dataclass
class Selection:
    pruned: torch.Tensor  # positions, ascending
    kept: torch.Tensor
    threshold: float | None = None  # EEPrune: the confidence t implied by the ratio
    class_thresholds: list[float | None] = field(default_factory=list)  # EEPrune with --balanced
    ties: int = 0  # samples sharing the boundary priority, split between pruned and kept by the seeded order


def select(scores: torch.Tensor, labels: torch.Tensor, ratio: float, *, balanced: bool, seed: int,
           method: str = "") -> Selection:
    """Prune round(ratio·N) samples of highest priority (per class with ``balanced``)."""
    if not 0 < ratio < 1:
        raise UsageError(f"--ratio must be between 0 and 1, not {ratio}", "e.g. --ratio 0.3 prunes 30%")
    n = scores.numel()
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist() if balanced else [None]
    groups = [torch.nonzero(labels == c).squeeze(1) if c is not None else torch.arange(n) for c in classes]
    pruned_parts: list[torch.Tensor] = []
    class_thresholds: list[float | None] = []
    ties = 0
    for c, group in zip(classes, groups, strict=True):
        k = round(ratio * group.numel())
        s = scores[group]
        order = rank(s, gen)
        chosen = order[:k]
        if method == "eeprune" and k and bool(torch.isinf(s[chosen[-1]])):
            qualified = int(torch.isfinite(s).sum())
            where = f" of class {c}" if c is not None else ""
            raise UsageError(
                f"only {qualified} of {group.numel()} samples{where} ({qualified / group.numel():.1%}) ever met all "
                f"three EEPrune conditions, fewer than --ratio {ratio} asks for",
                "train longer (--epochs), lower --ratio, or use --method eeprune-soft",
            )
        if k:
            boundary = s[chosen[-1]]
            ties += int((s == boundary).sum()) if k < group.numel() and bool(s[order[k]] == boundary) else 0
        if method == "eeprune":
            class_thresholds.append(_implied_threshold(s, order, k))
        pruned_parts.append(group[chosen])
    pruned = torch.sort(torch.cat(pruned_parts)).values
    keep = torch.ones(n, dtype=torch.bool)
    keep[pruned] = False
    threshold = None
    if method == "eeprune":
        threshold = class_thresholds[0] if not balanced else None
    return Selection(pruned, torch.nonzero(keep).squeeze(1), threshold,
                     class_thresholds if balanced else [], ties)


def _implied_threshold(scores: torch.Tensor, order: torch.Tensor, k: int) -> float | None:
    """The largest t with exactly the chosen samples above it: the confidence of the first sample kept."""
    if k >= scores.numel():
        return None
    below = scores[order[k]]
    return 0.0 if bool(torch.isinf(below)) else float(confidence(below))


def class_counts(labels: torch.Tensor, positions: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels[positions], minlength=num_classes).tolist()


# ---------------------------------------------------------------------------------------------
# The pruning phase: training runs that produce the records, resumable per epoch


@dataclass
class PhaseSettings:
    method: str
    config: TrainConfig
    exit: str = "mid"  # EEPrune family
    models: int = 10  # EL2N ensemble size


@dataclass
class PhaseResult:
    records: dict[str, torch.Tensor]
    samples_seen: int = 0  # training samples, summed over every run
    samples_scored: int = 0  # forward-only passes after training
    seconds: float = 0.0
    runs: int = 0
    exit: str | None = None


BuildModel = Callable[[int], nn.Module]  # run number -> a model to train (fresh, or from the checkpoint)


def pruning_phase(settings: PhaseSettings, build: BuildModel, data: Dataset, preprocess: Preprocess, *,
                  num_classes: int, device: torch.device | str = "cpu", state_dir: str | None = None,
                  resume: bool = False, reporter: Reporter | None = None, world: World = World()) -> PhaseResult:
    """Run the training that a method's records come from. With ``state_dir`` every epoch is saved there,
    and every finished run; ``resume`` continues from them. Under torchrun (a ``world`` of several processes)
    each run trains under DistributedDataParallel (``training.fit``) and every rank ends with every sample's
    records; rank 0 alone writes the state."""
    reporter = reporter or Reporter()
    device = torch.device(device)
    method = records_family(settings.method)
    n = len(data)
    if method == "random":
        gen = torch.Generator().manual_seed(settings.config.seed)
        return PhaseResult({"random": torch.rand(n, generator=gen, dtype=torch.float64)})
    if state_dir and world.main and not Path(state_dir).is_dir():
        make_owned_folder(state_dir, "dataset-pruning-state")
    runs = settings.models if method == "el2n" else 1
    result = PhaseResult({})
    el2n_sum = torch.zeros(n, dtype=torch.float64)
    for run in range(runs):
        done_path = Path(state_dir, f"run{run}.done.pt") if state_dir else None
        cfg = TrainConfig(**{**vars(settings.config), "seed": settings.config.seed + run})
        signature = {"config": vars(cfg), "data": data.fingerprint, "method": method, "exit": settings.exit}
        if resume and done_path is not None and done_path.is_file():
            done = read_state(done_path, {"signature": signature})
            reporter.log(f"run {run + 1}/{runs} already finished; reusing it")
        else:
            done = _one_run(run, runs, method, settings, cfg, build, data, preprocess, num_classes, device,
                            state_dir, resume, reporter, world)
            if done_path is not None and world.main:
                write_state(str(done_path), {**done, "signature": signature})
        result.samples_seen += done["samples_seen"]
        result.samples_scored += done["samples_scored"]
        result.seconds += done["seconds"]
        result.runs += 1
        result.exit = done.get("exit")
        if method == "el2n":
            el2n_sum += done["records"]["el2n"]
        else:
            result.records = done["records"]
    if method == "el2n":
        result.records = {"el2n": el2n_sum / runs}
    return result


def _one_run(run: int, runs: int, method: str, settings: PhaseSettings, cfg: TrainConfig, build: BuildModel,
             data: Dataset, preprocess: Preprocess, num_classes: int, device: torch.device, state_dir: str | None,
             resume: bool, reporter: Reporter, world: World) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)  # the fresh initialisation of this run
    model = build(run)
    exit_name = None
    tracker: SampleTracker | None = None  # EL2N keeps no record while training: it scores the trained model
    if method == "eeprune":
        exit_name = exit_point(model, settings.exit)
        model = EarlyExitNetwork(model, exit_name, preprocess.input_shape, num_classes)
        tracker = QualificationTracker(len(data))
    elif method in ("forgetting", "svp"):
        tracker = ForgettingTracker(len(data))
    resume_path = str(Path(state_dir, f"run{run}.pt")) if state_dir else None
    resuming = resume and resume_path is not None and Path(resume_path).is_file()
    label = f"{method} run {run + 1}/{runs}" if runs > 1 else method
    reporter.log(f"{label}: training {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} on {len(data)} samples"
                 + (f" with an exit after {exit_name}" if exit_name else ""))
    trained = fit(model, data, preprocess, cfg, device=device, step=tracker.step if tracker else None, tracker=tracker,
                  resume_path=resume_path, resume=resuming, reporter=reporter, world=world)
    scored = 0
    scoring_started = time.perf_counter()
    if method == "eeprune":
        assert isinstance(model, EarlyExitNetwork) and isinstance(tracker, QualificationTracker)
        records = {"qualified": tracker.qualified,
                   **after_training_records(model, data, preprocess, device, world=world)}
        scored = len(data)
    elif method == "el2n":
        records = {"el2n": el2n_scores(model, data, preprocess, device, world=world)}
        scored = len(data)
    else:
        assert isinstance(tracker, ForgettingTracker)
        records = {"forgotten": tracker.forgotten, "learned": tracker.learned}
    seconds = trained.seconds + time.perf_counter() - scoring_started
    return {"records": records, "samples_seen": trained.samples_seen, "samples_scored": scored,
            "seconds": seconds, "exit": exit_name}
