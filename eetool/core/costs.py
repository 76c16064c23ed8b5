"""The one cost model: MACs of each stage from ptflops at the real input shape, the exits' decision overheads
(``with_overheads``), and a pruned network's effective cost (MACs times each layer's non-zero fraction).

Method: docs/exits-and-costs.md; pruned networks: docs/weight-pruning.md#costs-of-a-pruned-network
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from eetool.core.errors import UsageError
from eetool.core.exits import HOOK, Carried, ExitModel

UNITS = ("macs", "flops")
DENSE, EFFECTIVE = "dense", "effective"
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# The fraction of exact zeros among convolution and linear weights from which a network counts as pruned.
PRUNED_FRACTION = 0.01


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass of a single sample, from ptflops (which must not print to stdout)."""
    from ptflops import get_model_complexity_info

    # Each module gets its own mode back afterwards: module.train(was_training) would give every submodule
    # the container's mode, and a stage container (in training mode, as nn.Sequential starts) shares the
    # model's BatchNorm layers, whose running statistics the next forward pass would then overwrite.
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        # ptflops reports its own failures with print() and a traceback; keep both off the terminal
        # and raise one error instead.
        report = io.StringIO()
        with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
            # Module rules only: with functional counting on, ptflops counts nn.ReLU and pooling modules
            # twice (module hook and patched F.relu), and hook mode could not agree with split mode.
            macs, _ = get_model_complexity_info(module, tuple(input_shape), as_strings=False,
                                                print_per_layer_stat=False, verbose=False, backend="pytorch",
                                                backend_specific_config={"count_functional": False})
        if macs is None:
            with torch.no_grad():  # a failing forward pass: raise its own error rather than ptflops' report
                module(torch.zeros(1, *input_shape))
            lines = [line for line in report.getvalue().splitlines() if line.strip()]
            reason = lines[-1] if lines else "no reason given"
            raise RuntimeError(f"ptflops could not count {type(module).__name__}: {reason}")
    finally:
        for m, mode in modes:
            m.training = mode
    return int(macs)


@dataclass
class CostModel:
    exits: list[str]
    stage_macs: list[int]  # len(exits) + 1: backbone MACs of each stage, the last ending at the model's head
    overhead_macs: list[int] = field(default_factory=list)  # per exit: MACs of deciding whether to leave there
    mode: str = "split"
    reference_macs: int = 0  # what normalised costs divide by: the dense model's MACs (0: this model's)
    basis: str = DENSE  # dense MACs, or effective ones (a pruned network's)

    def __post_init__(self) -> None:
        if not self.overhead_macs:
            self.overhead_macs = [0] * len(self.exits)

    @property
    def model_macs(self) -> int:
        return sum(self.stage_macs)

    def with_overheads(self, overhead_macs: list[int]) -> CostModel:
        return replace(self, overhead_macs=list(overhead_macs))

    def backbone_cumulative(self) -> list[int]:
        """Backbone MACs to reach each exit, then the whole model."""
        out, total = [], 0
        for m in self.stage_macs:
            total += m
            out.append(total)
        return out

    def exit_costs(self) -> list[int]:
        """What a sample leaving at exit j costs (j = len(exits) is the model's own head), overheads included."""
        backbone = self.backbone_cumulative()
        out, overhead = [], 0
        for j in range(len(self.exits)):
            overhead += self.overhead_macs[j]
            out.append(backbone[j] + overhead)
        out.append(backbone[-1] + overhead)
        return out

    def normalised_exit_costs(self) -> list[float]:
        reference = self.reference_macs or self.model_macs
        return [c / reference for c in self.exit_costs()]

    def average(self, exit_counts: torch.Tensor | list[int]) -> float:
        """Normalised mean cost of samples distributed over the exits (last entry: the model's head)."""
        counts = torch.as_tensor(exit_counts, dtype=torch.float64)
        costs = torch.tensor(self.normalised_exit_costs(), dtype=torch.float64)
        return float((counts * costs).sum() / counts.sum())


def in_unit(macs: float, unit: str) -> float:
    return macs * 2 if unit == "flops" else macs


def measure(exit_model: ExitModel, input_shape: tuple[int, int, int]) -> CostModel:
    """Stage MACs at the real shapes (split mode), or analytic per-module accounting (hook mode)."""
    if exit_model.mode == HOOK:
        return _measure_hooked(exit_model, input_shape)
    assert exit_model.stages is not None
    macs = []
    x: Carried = torch.zeros(1, *input_shape)
    # The stages share the model's modules: run them in eval mode and leave a training model training.
    was_training = exit_model.model.training
    exit_model.model.eval()
    try:
        with torch.no_grad():
            for stage in exit_model.stages:
                if isinstance(x, torch.Tensor):
                    macs.append(count_macs(stage, tuple(x.shape[1:])))
                    x = stage(x)
                else:  # several scales in: ptflops feeds a module one tensor, so its rules are applied here
                    with _counted_by_module_rules(stage) as counted:
                        x = stage(x)
                    macs.append(counted[0])
    finally:
        exit_model.model.train(was_training)
    return CostModel(list(exit_model.exits), macs, mode=exit_model.mode)


@contextlib.contextmanager
def _counted_by_module_rules(module: nn.Module) -> Iterator[list[int]]:
    """MACs of the leaf modules of ``module`` that run meanwhile, by ptflops' per-module rules (those
    ``count_macs`` counts with), summed into the one entry of the list it yields."""
    from ptflops.pytorch_ops import MODULES_MAPPING

    running = [0]

    def leaf_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        module.__flops__ = 0  # type: ignore[assignment]
        MODULES_MAPPING[type(module)](module, inputs, output)
        running[0] += int(module.__flops__)  # type: ignore[arg-type]
        del module.__flops__

    handles = [m.register_forward_hook(leaf_hook) for m in module.modules()
               if type(m) in MODULES_MAPPING and not list(m.children())]
    try:
        yield running
    finally:
        for h in handles:
            h.remove()


def _measure_hooked(exit_model: ExitModel, input_shape: tuple[int, int, int]) -> CostModel:
    """MACs of every leaf module in execution order (ptflops' per-module rules), summed up to each exit."""
    model = exit_model.model
    at_exit: dict[str, int] = {}

    def exit_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            at_exit[name] = running[0]
        return hook

    modules = dict(model.named_modules())
    handles = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _counted_by_module_rules(model) as running:
            # after the leaves' hooks: an exit at a leaf module counts that module's MACs
            handles = [modules[name].register_forward_hook(exit_hook(name)) for name in exit_model.exits]
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [name for name in exit_model.exits if name not in at_exit]
    if missing:
        raise UsageError(f"exit {missing[0]} does not run in the model's forward pass", "choose modules that run")
    cumulative = [at_exit[name] for name in exit_model.exits] + [running[0]]
    if any(b < a for a, b in zip(cumulative, cumulative[1:], strict=False)):
        raise UsageError(f"exits {','.join(exit_model.exits)} are not in execution order",
                         "list them in the order the model runs them")
    stages = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:], strict=False)]
    return CostModel(list(exit_model.exits), stages, mode=HOOK)


def zero_fraction(modules: Iterable[nn.Module]) -> float:
    """The fraction of exact zeros among the weights of the convolutions and linear layers in ``modules``."""
    total = zeros = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, WEIGHTED):
                total += m.weight.numel()
                zeros += int((m.weight == 0).sum())
    return zeros / total if total else 0.0


def is_pruned(*modules: nn.Module) -> bool:
    return zero_fraction(modules) >= PRUNED_FRACTION


def density(module: nn.Module) -> float:
    """The fraction of a layer's weights that are not zero."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return int((w != 0).sum()) / w.numel()


def layer_macs(exit_model: ExitModel, input_shape: tuple[int, int, int]) -> list[list[tuple[nn.Module, int]]]:
    """Per stage (the exits', then the rest to the model's head): each convolution and linear layer that runs in it
    and its MACs by ptflops' rule for it, bias included."""
    from ptflops.pytorch_ops import MODULES_MAPPING

    model = exit_model.model
    found: list[list[tuple[nn.Module, int]]] = [[] for _ in range(len(exit_model.exits) + 1)]
    stage = [0]

    def leaf_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        module.__flops__ = 0  # type: ignore[assignment]
        MODULES_MAPPING[type(module)](module, inputs, output)
        found[stage[0]].append((module, int(module.__flops__)))  # type: ignore[arg-type]
        del module.__flops__

    def next_stage(module: nn.Module, inputs: object, output: object) -> None:
        stage[0] += 1

    handles = [m.register_forward_hook(leaf_hook) for m in model.modules() if isinstance(m, WEIGHTED)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_shape)
            if exit_model.stages is not None:
                for j, s in enumerate(exit_model.stages):
                    stage[0] = j
                    x = s(x)
            else:
                modules = dict(model.named_modules())
                handles += [modules[name].register_forward_hook(next_stage) for name in exit_model.exits]
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def effective_stage_macs(stage_macs: list[int], exit_model: ExitModel, input_shape: tuple[int, int, int]
                         ) -> list[int]:
    """Each stage's MACs with its convolutions and linear layers at their MACs times their density."""
    saved = [sum(round(macs * (1 - density(m))) for m, macs in stage)
             for stage in layer_macs(exit_model, input_shape)]
    return [m - s for m, s in zip(stage_macs, saved, strict=True)]


def effective(costs: CostModel, exit_model: ExitModel, input_shape: tuple[int, int, int]) -> CostModel:
    """The backbone's cost model at effective MACs, normalised by its dense MACs; ``costs`` itself when the
    backbone is not pruned (see the module docstring)."""
    if not is_pruned(exit_model.model):
        return costs
    return replace(costs, stage_macs=effective_stage_macs(costs.stage_macs, exit_model, input_shape),
                   reference_macs=costs.reference_macs or costs.model_macs, basis=EFFECTIVE)


def effective_macs(model: nn.Module, input_shape: tuple[int, int, int], dense_macs: int) -> int:
    """A whole model's effective MACs: ``dense_macs`` (ptflops' count) less what its zero weights save."""
    layers = layer_macs(ExitModel(model, HOOK, []), input_shape)[0]
    return dense_macs - sum(round(macs * (1 - density(m))) for m, macs in layers)
