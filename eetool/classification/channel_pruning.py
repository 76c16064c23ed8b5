"""Structured (channel) pruning: a smaller dense network that really runs faster. L1-norm filter pruning with
Torch-Pruning's dependency graph (an optional extra, imported only here), heads rebuilt for the channels their
exits keep; ``ChannelPruner`` runs the rounds of ``eetool prune-weights --structure channel``.

Method: docs/weight-pruning.md#channel-pruning
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import torch
from torch import nn

from eetool.classification.exit_heads import ExitHead, ExitHeads
from eetool.classification.head_training import ExitTrainer, exit_accuracies
from eetool.core.architectures import CIFAR_RESNET_DEPTHS
from eetool.core.builders import BasicBlock, CifarResNet, last_linear
from eetool.core.checkpoint import ModelSpec
from eetool.core.costs import count_macs
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.errors import ModelMismatchError, UsageError
from eetool.core.exits import ExitModel, build_exit_model
from eetool.core.reporting import Reporter
from eetool.core.training_loop import TrainConfig, fit

PIP_HINT = "pip install 'eetool[prune]'"
# The step of the per-layer ratio on the way to a MACs target: 2% of each layer's channels (finer than one
# channel of a 16-channel stage, in fewer steps than the graph would take one by one).
RATIO_STEPS = 50
MAX_RATIO = 0.98


def require_torch_pruning() -> ModuleType:
    """Torch-Pruning, or a one-line error naming the pip command that installs it."""
    try:
        import torch_pruning
    except ImportError:
        raise UsageError("channel pruning needs Torch-Pruning, which is not installed", PIP_HINT) from None
    return torch_pruning


def check_savable(spec: ModelSpec) -> None:
    """Refuse, before any work, an architecture whose channel-pruned widths a checkpoint cannot record."""
    if spec.arch not in CIFAR_RESNET_DEPTHS:
        raise ModelMismatchError(f"a channel-pruned {spec.arch} cannot be saved: eetool records pruned widths only "
                                 "for its CIFAR ResNets",
                                 f"use one of {', '.join(CIFAR_RESNET_DEPTHS)}, or unstructured pruning")


@dataclass
class ChannelPruning:
    """A channel-pruned copy of a model (the original is untouched) and what it costs."""

    model: nn.Module  # eval mode
    heads: ExitHeads | None  # rebuilt for the pruned exits (eval mode); None when none were given
    dense_macs: int  # backbone MACs of one sample, eetool's cost model (costs.count_macs)
    pruned_macs: int
    channel_ratio: float  # the fraction of each layer's channels removed

    @property
    def macs_fraction(self) -> float:
        return self.pruned_macs / self.dense_macs


def prune_channels(model: nn.Module, input_shape: tuple[int, int, int], *, target_macs: float | None = None,
                   channel_ratio: float | None = None, heads: ExitHeads | None = None,
                   round_to: int | None = None) -> ChannelPruning:
    """L1-norm channel pruning of a copy of ``model`` to ``target_macs`` (a fraction of its MACs, every layer's
    removed share rising 2% at a time) or by ``channel_ratio``. The classifier keeps its outputs, the stem its
    inputs; ``heads`` are rebuilt to their exits' channels; ``round_to`` rounds the channel counts."""
    if (target_macs is None) == (channel_ratio is None):
        raise UsageError("give a MACs target or a channel ratio, not both or neither", "e.g. target_macs=0.5")
    for name, value in (("target MACs", target_macs), ("channel ratio", channel_ratio)):
        if value is not None and not 0 < value < 1:
            raise UsageError(f"the {name} must be a fraction between 0 and 1, not {value}", "e.g. 0.5")
    if round_to is not None and not (isinstance(round_to, int) and round_to >= 1):
        raise UsageError(f"round_to must be a positive whole number, not {round_to!r}", "e.g. 4, or none")
    tp = require_torch_pruning()
    model = copy.deepcopy(model).eval()
    exit_names = list(heads.spec.exits) if heads is not None else []
    exit_model = build_exit_model(model, ",".join(exit_names)) if exit_names else None
    shapes = exit_model.exit_shapes(input_shape) if exit_model is not None else []
    if heads is not None and [list(s) for s in shapes] != [list(s) for s in heads.spec.in_shapes]:
        raise UsageError("the exit heads do not fit this model's exits", "give heads trained for this checkpoint")
    _refuse_unprunable(tp, model)
    probes = nn.ModuleList(_identity_probe(s[0]) for s in shapes)
    graph = _ProbedModel(model, exit_model, probes)
    dense_macs = count_macs(model, input_shape)
    positions = _output_positions(model, input_shape)
    dense_weighted = _weighted_macs(positions)
    classifier = last_linear(model)
    ignored = [graph.probes, *([classifier[1]] if classifier is not None else [])]
    steps = 1 if channel_ratio is not None else RATIO_STEPS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes on the graph it traced are not the user's concern
            pruner = tp.pruner.MetaPruner(
                graph, torch.zeros(1, *input_shape), importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=channel_ratio if channel_ratio is not None else MAX_RATIO, iterative_steps=steps,
                ignored_layers=ignored, round_to=round_to, output_transform=_sum_outputs)
            macs, ratio = dense_macs, 0.0
            for step in range(steps):
                pruner.step()
                ratio = channel_ratio if channel_ratio is not None else MAX_RATIO * (step + 1) / steps
                # The weighted layers' MACs (cheap, from shapes) tell when the full count is worth making.
                if target_macs is None or _weighted_macs(positions) <= target_macs * dense_weighted:
                    macs = count_macs(model, input_shape)
                    if target_macs is None or macs <= target_macs * dense_macs:
                        break
    except UsageError:
        raise
    except Exception as e:  # Torch-Pruning's own failures: the model has something its graph cannot follow
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"Torch-Pruning cannot prune this model ({type(e).__name__}: {reason})",
                         "prune a model of a family eetool splits (eetool's CIFAR ResNets, say)") from None
    if target_macs is not None and macs > target_macs * dense_macs:
        reached = count_macs(model, input_shape) / dense_macs  # ``macs`` is counted only once a step gets close
        raise UsageError(f"channel pruning reaches {reached:.1%} of the MACs at most (removing {MAX_RATIO:.0%} of "
                         f"every layer's channels{f' in multiples of {round_to}' if round_to else ''}), not "
                         f"{target_macs:.1%}", "prune less: a smaller --amount per round, or a smaller --round-to")
    new_heads = None
    if heads is not None and exit_model is not None:
        new_shapes = exit_model.exit_shapes(input_shape)
        kept = [_kept_channels(p) for p in probes if isinstance(p, nn.Conv2d)]
        new_heads = _rebuild_heads(heads, new_shapes, kept)
    return ChannelPruning(model.eval(), new_heads, dense_macs, macs, ratio)


def recalibrate_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every batch norm's running statistics as the plain average over ``batches`` (preprocessed
    inputs; forward passes only, no gradients). Pruning changes what reaches each batch norm, and stale
    statistics can leave a pruned network at chance accuracy before any fine-tuning."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts alike
    model.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()


def pruned_spec(spec: ModelSpec, model: nn.Module) -> ModelSpec:
    """The spec that rebuilds a channel-pruned CIFAR ResNet: its widths in ``arch_args`` (see CifarResNet)."""
    check_savable(spec)
    arch_args = {k: v for k, v in spec.arch_args.items() if k not in ("width", "stage_widths", "block_widths")}
    return replace(spec, arch_args={**arch_args, **widths(model)})


class _ProbedModel(nn.Module):
    """What the dependency graph sees: the model's logits and a 1x1 probe on every exit's features."""

    def __init__(self, model: nn.Module, exit_model: Any, probes: nn.ModuleList) -> None:
        super().__init__()
        self.model, self.probes = model, probes
        self._exit_model = exit_model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._exit_model is None:
            return [self.model(x)]
        features, logits = self._exit_model.features(x)
        return [*(probe(f) for probe, f in zip(self.probes, features, strict=True)), logits]


def _output_positions(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[nn.Module, int]:
    """Where each convolution and linear layer applies its weights (output positions per sample): channel
    pruning never changes them, so each layer's MACs are its weights' count times this."""
    positions: dict[nn.Module, int] = {}

    def record(module: nn.Module, args: object, output: torch.Tensor) -> None:
        positions[module] = math.prod(output.shape[2:]) if isinstance(module, nn.Conv2d) else 1

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return positions


def _weighted_macs(positions: dict[nn.Module, int]) -> int:
    return sum(int(m.weight.numel()) * n for m, n in positions.items() if isinstance(m.weight, torch.Tensor))


def _sum_outputs(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([o.sum() for o in outputs]).sum()


def _identity_probe(channels: int) -> nn.Conv2d:
    probe = nn.Conv2d(channels, channels, 1, bias=False)
    with torch.no_grad():
        probe.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return probe


def _kept_channels(probe: nn.Conv2d) -> torch.Tensor:
    """The original indices of the channels an exit kept: the rows of the identity left in each column."""
    kept = probe.weight[:, :, 0, 0].argmax(0)
    assert bool((probe.weight[:, :, 0, 0].sum(0) == 1).all()) and kept.unique().numel() == kept.numel()
    return kept


def _refuse_unprunable(tp: ModuleType, model: nn.Module) -> None:
    """A layer with weights of a type Torch-Pruning has no rule for would be pruned by guesswork (or not at all)."""
    prunable = set(tp.DependencyGraph().REGISTERED_PRUNERS) - {tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.PARAMETER}
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) and tp.ops.module2type(module) not in prunable:
            raise UsageError(f"Torch-Pruning cannot prune layer {name!r} ({type(module).__name__}): it has no rule "
                             "for its weights", "channel-prune models built of standard layers (convolutions, "
                             "linear and normalisation layers)")


def _rebuild_heads(heads: ExitHeads, shapes: list[tuple[int, ...]], kept: list[torch.Tensor]) -> ExitHeads:
    """Heads of the same spec for the pruned exits' shapes, with the kept channels' slices of the old weights."""
    spec = replace(heads.spec, in_shapes=[list(s) for s in shapes])
    new = ExitHeads(spec).eval()
    state = {}
    for j, (old, shape, channels) in enumerate(zip(heads.heads, heads.spec.in_shapes, kept, strict=True)):
        assert isinstance(old, ExitHead)
        for key, value in _head_state(old, tuple(shape), channels).items():
            state[f"heads.{j}.{key}"] = value
    new.load_state_dict(state)
    return new


def _head_state(head: ExitHead, in_shape: tuple[int, ...], channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One head's weights for its exit's kept ``channels``. A BranchyNet branch (c -> c) keeps as many of its own
    output channels, chosen by the L1 norm of its filters as everywhere else."""
    state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    pooled = channels  # the channels that reach the pooling, and so the linear layer
    if isinstance(head.branch, nn.Sequential):
        conv = head.branch[0]
        assert isinstance(conv, nn.Conv2d)
        pooled = conv.weight.detach().abs().sum((1, 2, 3)).topk(len(channels)).indices.sort().values
        state["branch.0.weight"] = state["branch.0.weight"][pooled][:, channels]
        for key in ("weight", "bias", "running_mean", "running_var"):
            state[f"branch.1.{key}"] = state[f"branch.1.{key}"][pooled]
    # The linear layer reads the pooled map flattened channel by channel, then any E²CM distances.
    sides = in_shape[1:]
    cells = head.pool.size ** 2 if sides and max(sides) > head.pool.size else math.prod(sides)
    weight = state["linear.weight"]
    split = in_shape[0] * cells
    from_features = weight[:, :split].reshape(weight.shape[0], in_shape[0], cells)[:, pooled]
    state["linear.weight"] = torch.cat([from_features.reshape(weight.shape[0], -1), weight[:, split:]], 1)
    return state


# ---------------------------------------------------------------------------------------------
# Rounds of channel pruning and fine-tuning, resumable.

TRAIN_HEADS, CHANNEL_ROUND = "train-heads", "channel"
# Batch norm is re-estimated on the first samples of the training data (in order, not augmented): enough for
# stable statistics, few enough to cost little beside the fine-tuning.
RECALIBRATION_SAMPLES = 1024


@dataclass
class ChannelSettings:
    rounds: int
    amount: float  # round k prunes to (1 - amount)^k of the unpruned MACs
    finetune: TrainConfig  # one fine-tuning (its seed is varied per step)
    train_heads: bool = True  # heads made for the run are trained on the unpruned backbone first
    round_to: int | None = None


def round_targets(amount: float, rounds: int) -> list[float]:
    """The fraction of the unpruned backbone's MACs that each round prunes to: (1 - amount)^k for round k."""
    return [(1 - amount) ** k for k in range(1, rounds + 1)]


def widths(model: nn.Module) -> dict[str, Any]:
    """A CIFAR ResNet's stage widths (the residual stream of each stage) and block widths (each block's inner
    convolution), as ``pruned_spec`` records them."""
    assert isinstance(model, CifarResNet)
    stages = [[block for block in stage if isinstance(block, BasicBlock)]
              for stage in (model.layer1, model.layer2, model.layer3)]
    return {"stage_widths": [stage[0].conv2.out_channels for stage in stages],
            "block_widths": [[block.conv1.out_channels for block in stage] for stage in stages]}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class ChannelPruner:
    """An early-exit network (a CIFAR ResNet and its exit heads) being channel-pruned in rounds; ``model`` and
    ``heads`` are replaced by smaller ones every round, ``spec`` with them."""

    spec: ModelSpec
    model: nn.Module
    heads: ExitHeads
    weights: list[float]
    settings: ChannelSettings
    data: Dataset
    preprocess: Preprocess
    eval_data: Dataset | None = None
    device: torch.device | str = "cpu"
    reporter: Reporter = field(default_factory=Reporter)
    records: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0  # steps finished
    baseline: dict[str, float] | None = None  # each exit's accuracy before pruning (heads trained)
    dense_macs: int = field(init=False)  # the unpruned backbone's

    def __post_init__(self) -> None:
        check_savable(self.spec)
        self.dense_macs = count_macs(self.model, self.spec.input_shape)

    @property
    def exit_model(self) -> ExitModel:
        return build_exit_model(self.model, ",".join(self.heads.spec.exits))

    def steps(self) -> list[tuple[str, int]]:
        rounds = [(CHANNEL_ROUND, r) for r in range(1, self.settings.rounds + 1)]
        return [*([(TRAIN_HEADS, 0)] if self.settings.train_heads else []), *rounds]

    def run_step(self, index: int) -> dict[str, Any]:
        """Run step ``index`` (the next one) and return its record."""
        kind, round_no = self.steps()[index]
        # Every step starts from its own seed, so a resumed run draws what an uninterrupted one does.
        cfg = replace(self.settings.finetune, seed=self.settings.finetune.seed + index)
        torch.manual_seed(cfg.seed)
        target = round_targets(self.settings.amount, self.settings.rounds)[round_no - 1] if round_no else None
        if target is not None:
            self._prune_to(target)
        trainer = ExitTrainer(self.exit_model, self.heads, None, self.weights, joint=kind == CHANNEL_ROUND)
        result = fit(trainer, self.data, self.preprocess, cfg, device=self.device,
                     params=trainer.trainable_parameters(), step=trainer.step, reporter=self.reporter)
        self.model.eval()
        self.heads.eval()
        record = {"step": index + 1, "phase": kind, "round": round_no or None,
                  "target_macs_fraction": None if target is None else round(target, 6), **self.summary(),
                  "loss": round(result.last.loss, 6), "samples_seen": result.samples_seen,
                  "seconds": round(result.seconds, 1)}
        self.records.append(record)
        self.done = index + 1
        return record

    def check_first_round(self) -> None:
        """Refuse, before any training, an --amount (and --round-to) that the first round cannot reach: it prunes a
        copy of the unpruned backbone to its target."""
        prune_channels(self.model, self.spec.input_shape, target_macs=round_targets(self.settings.amount, 1)[0],
                       heads=self.heads, round_to=self.settings.round_to)

    def _prune_to(self, target: float) -> None:
        """Prune the backbone (heads rebuilt) to ``target`` of the unpruned MACs, then re-estimate batch norm."""
        self.model.cpu().eval()
        self.heads.cpu().eval()
        current = count_macs(self.model, self.spec.input_shape)
        if current <= target * self.dense_macs:  # an earlier round overshot this one's target: nothing to remove
            return
        pruned = prune_channels(self.model, self.spec.input_shape, target_macs=target * self.dense_macs / current,
                                heads=self.heads, round_to=self.settings.round_to)
        assert pruned.heads is not None
        self.model, self.heads = pruned.model, pruned.heads
        self.spec = pruned_spec(self.spec, self.model)
        n = min(len(self.data), RECALIBRATION_SAMPLES)
        batches = (self.preprocess(images, "cpu")
                   for images, _, _ in self.data.subset(torch.arange(n)).batches(self.settings.finetune.batch_size))
        recalibrate_batch_norm(self.model, batches)

    def exit_accuracies(self) -> dict[str, float] | None:
        """Each exit's accuracy when every sample leaves there, then the final exit's."""
        if self.eval_data is None:
            return None
        trainer = ExitTrainer(self.exit_model, self.heads, None, self.weights, joint=False)
        accs = exit_accuracies(trainer, self.eval_data, self.preprocess, device=self.device)
        self.model.eval()
        return {name: round(a, 6) for name, a in zip([*self.heads.spec.exits, "final"], accs, strict=True)}

    def summary(self) -> dict[str, Any]:
        macs = count_macs(self.model.cpu(), self.spec.input_shape)
        return {"macs": macs, "macs_fraction": round(macs / self.dense_macs, 6),
                "parameters": parameter_count(self.model), "widths": widths(self.model),
                "accuracy": self.exit_accuracies()}

    def state_dict(self) -> dict[str, Any]:
        # The widths and the heads' input shapes rebuild the (pruned) architecture the weights belong to.
        return {"done": self.done, "arch_args": json.dumps(self.spec.arch_args, sort_keys=True),
                "heads_in_shapes": json.dumps(self.heads.spec.in_shapes), "model": self.model.state_dict(),
                "heads": self.heads.state_dict(), "records": json.dumps(self.records),
                "baseline": json.dumps(self.baseline)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spec = replace(self.spec, arch_args=json.loads(state["arch_args"]))
        self.model = self.spec.build()
        self.model.load_state_dict(state["model"])
        self.heads = ExitHeads(replace(self.heads.spec, in_shapes=json.loads(state["heads_in_shapes"])))
        self.heads.load_state_dict(state["heads"])
        self.model.eval()
        self.heads.eval()
        self.records = json.loads(state["records"])
        self.baseline = json.loads(state["baseline"])
        self.done = int(state["done"])

    def run(self, after_step: Callable[[ChannelPruner], None] | None = None) -> list[dict[str, Any]]:
        """Every step not yet done; ``after_step`` (saving the state, say) runs after each."""
        if self.done == 0 and not self.settings.train_heads:  # heads given to the run are trained already
            self.baseline = self.exit_accuracies()
        for index in range(self.done, len(self.steps())):
            kind, round_no = self.steps()[index]
            what = ("training the heads" if kind == TRAIN_HEADS
                    else f"channel round {round_no}/{self.settings.rounds}")
            self.reporter.log(f"step {index + 1}/{len(self.steps())}: {what}")
            record = self.run_step(index)
            if kind == TRAIN_HEADS:  # the heads just trained, nothing pruned yet
                self.baseline = record["accuracy"]
            accuracies = record["accuracy"] or {}
            self.reporter.log(f"  MACs {record['macs_fraction']:.1%} of the unpruned network's, widths "
                              f"{'/'.join(map(str, record['widths']['stage_widths']))}; accuracy "
                              + (", ".join(f"{name} {a:.4f}" for name, a in accuracies.items()) or "not evaluated"))
            if after_step is not None:
                after_step(self)
        return self.records
