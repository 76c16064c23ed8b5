"""The one cost model: MACs of each stage from ptflops at the real input shape.

A sample that leaves at exit j pays the backbone up to exit j plus the decision overhead of
every exit it passed (exits 0..j); a sample that reaches the end pays the whole model plus
all exits' overheads. Methods add their own overhead terms (a class-means head, a linear
classifier) with ``with_overheads``. ``--count flops`` reports 2 x MACs; normalised costs
divide by the whole model's cost (= 1.0).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from eetool.errors import UsageError
from eetool.exits import HOOK, ExitModel

UNITS = ("macs", "flops")


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
        return [c / self.model_macs for c in self.exit_costs()]

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
    x = torch.zeros(1, *input_shape)
    # The stages share the model's modules: run them in eval mode and leave a training model training.
    was_training = exit_model.model.training
    exit_model.model.eval()
    try:
        with torch.no_grad():
            for stage in exit_model.stages:
                macs.append(count_macs(stage, tuple(x.shape[1:])))
                x = stage(x)
    finally:
        exit_model.model.train(was_training)
    return CostModel(list(exit_model.exits), macs, mode=exit_model.mode)


def _measure_hooked(exit_model: ExitModel, input_shape: tuple[int, int, int]) -> CostModel:
    """MACs of every leaf module in execution order (ptflops' per-module rules), summed up to each exit."""
    from ptflops.pytorch_ops import MODULES_MAPPING

    model = exit_model.model
    running = [0]
    at_exit: dict[str, int] = {}
    handles = []

    def leaf_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        module.__flops__ = 0  # type: ignore[assignment]
        MODULES_MAPPING[type(module)](module, inputs, output)
        running[0] += int(module.__flops__)  # type: ignore[arg-type]
        del module.__flops__

    def exit_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            at_exit[name] = running[0]
        return hook

    modules = dict(model.named_modules())
    for m in model.modules():
        if type(m) in MODULES_MAPPING and not list(m.children()):
            handles.append(m.register_forward_hook(leaf_hook))
    for name in exit_model.exits:
        handles.append(modules[name].register_forward_hook(exit_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
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
