"""Exit points and stages: a model of a known family is split into a chain of units whose composition is the
model, and the chosen exits cut it into stages, so inference really stops at an exit; other models run whole
with hooked features ("hook" mode).

Method: docs/exits-and-costs.md
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eetool.core.builders import CifarResNet
from eetool.core.choices import EXIT_SELECTIONS
from eetool.core.errors import ModelMismatchError, UsageError

SPLIT, HOOK = "split", "hook"
SELECTIONS = EXIT_SELECTIONS

Unit = tuple[str, nn.Module]
# What a stage hands the next: one tensor, or several (a multi-scale network's scales, finest first).
Carried = torch.Tensor | tuple[torch.Tensor, ...]


def exit_input(h: Carried) -> torch.Tensor:
    """What the exit after a stage reads of its output: the output itself, or the last (coarsest) of several."""
    return h[-1] if isinstance(h, tuple) else h


def select_rows(h: Carried, rows: torch.Tensor) -> Carried:
    """The samples at positions ``rows`` of every tensor a stage hands on."""
    if isinstance(h, tuple):
        return tuple(t.index_select(0, rows) for t in h)
    return h.index_select(0, rows)


def chain_units(model: nn.Module) -> list[Unit] | None:
    """The model as a chain ``[(name, module), ..., ("head", head)]``, or None if it cannot be split."""
    import torchvision.models as tvm

    own_units = getattr(model, "eetool_units", None)
    if callable(own_units):
        units: list[Unit] = list(own_units())
        return units
    if isinstance(model, CifarResNet):
        blocks = _blocks(model, ("layer1", "layer2", "layer3"))
        return [("stem", model.stem), *blocks, ("head", nn.Sequential(model.pool, nn.Flatten(1), model.fc))]
    if isinstance(model, tvm.ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = _blocks(model, ("layer1", "layer2", "layer3", "layer4"))
        return [("stem", stem), *blocks, ("head", nn.Sequential(model.avgpool, nn.Flatten(1), model.fc))]
    if isinstance(model, (tvm.MobileNetV3, tvm.EfficientNet)):
        units = []
        for i, child in enumerate(model.features):
            # EfficientNet groups its MBConv blocks in Sequentials; MobileNetV3 lists them directly.
            if isinstance(child, nn.Sequential) and all(type(c).__name__ == "MBConv" for c in child):
                units += [(f"features.{i}.{j}", block) for j, block in enumerate(child)]
            else:
                units.append((f"features.{i}", child))
        return [*units, ("head", nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier))]
    if isinstance(model, tvm.VGG):
        units, start = [], 0
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.MaxPool2d):  # a VGG stage ends at its pooling layer
                units.append((f"features.{i}", nn.Sequential(*model.features[start:i + 1])))
                start = i + 1
        return [*units, ("head", nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier))]
    if isinstance(model, nn.Sequential) and len(model) >= 2:
        children = list(model.named_children())
        return [*children[:-1], ("head", children[-1][1])]
    return None


def _blocks(model: nn.Module, layers: tuple[str, ...]) -> list[Unit]:
    return [(f"{layer}.{j}", block) for layer in layers for j, block in enumerate(getattr(model, layer))]


def candidate_exits(model: nn.Module) -> tuple[str, list[str]]:
    """The mode and the exit points ``--exits every`` picks: after every unit (the stem and each block),
    as the thesis places E²CM exits after every ResNet block."""
    units = chain_units(model)
    if units is not None:
        return SPLIT, [name for name, _ in units[:-1]]
    return HOOK, [name for name, _ in list(model.named_children())[:-1]]


def select_exits(candidates: list[str], selection: str, model: nn.Module) -> list[str]:
    """``every``, ``half`` (every second), ``quartiles`` (at 1/4, 1/2, 3/4 of the list) or names."""
    if selection == "every":
        chosen = list(candidates)
    elif selection == "half":
        chosen = candidates[1::2]
    elif selection == "quartiles":
        n = len(candidates)
        chosen = sorted({candidates[max(0, min(n - 1, round(q * (n + 1)) - 1))] for q in (0.25, 0.5, 0.75)},
                        key=candidates.index) if n else []
    else:
        chosen = [name.strip() for name in selection.split(",") if name.strip()]
        known = dict(model.named_modules())
        for name in chosen:
            if name not in candidates and (candidates and _is_split(model) or name not in known):
                raise UsageError(f"{name!r} is not an exit point of this model",
                                 f"choose from {', '.join(candidates[:8])}{', ...' if len(candidates) > 8 else ''} "
                                 "(`eetool inspect --checkpoint ...` lists them)")
        if len(set(chosen)) != len(chosen):
            raise UsageError(f"--exits {selection!r} names an exit twice", "list each exit once")
        if _is_split(model):
            order = [candidates.index(n) for n in chosen]
            if order != sorted(order):
                raise UsageError(f"--exits {selection!r} is not in network order",
                                 f"write them as {','.join(sorted(chosen, key=candidates.index))}")
    if not chosen:
        raise UsageError(f"--exits {selection!r} selects no exit", "use every, half, quartiles or module names")
    return chosen


def _is_split(model: nn.Module) -> bool:
    return chain_units(model) is not None


@dataclass
class ExitModel:
    """A model with exits: ``features`` gives every exit's output and the logits in one pass."""

    model: nn.Module
    mode: str
    exits: list[str]
    stages: nn.ModuleList | None = None  # split mode: len(exits) + 1 consecutive stages

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.stages is not None:
            outs = []
            carried: Carried = x
            for stage in self.stages[:-1]:
                carried = stage(carried)
                outs.append(exit_input(carried))
                # the next stage may start in place (ReLU(inplace=True)) and overwrite the exit's output
                carried = (*carried[:-1], carried[-1].clone()) if isinstance(carried, tuple) else carried.clone()
            return outs, self.stages[-1](carried)
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        handles = [modules[name].register_forward_hook(_capture(captured, name)) for name in self.exits]
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return [captured[name] for name in self.exits], logits

    def exit_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        # In eval mode: a training model's BatchNorm statistics must not learn from this dummy batch.
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                outs, _ = self.features(torch.zeros(1, *input_shape))
        finally:
            self.model.train(was_training)
        return [tuple(o.shape[1:]) for o in outs]


def _capture(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: object, output: Carried) -> None:
        # cloned: a later in-place op (ReLU(inplace=True)) would overwrite the output
        store[name] = exit_input(output).clone()

    return hook


def has_pixel_exits(model: nn.Module) -> bool:
    """A segmentation network with per-pixel exits of its own marks its class with ``pixel_exits = True``."""
    return getattr(type(model), "pixel_exits", False) is True


def build_exit_model(model: nn.Module, selection: str = "every") -> ExitModel:
    if has_pixel_exits(model):  # per-pixel exits of its own; class means and exit heads are for classifiers
        raise ModelMismatchError("this command is for classifiers, and the checkpoint is a segmentation network "
                                 "with per-pixel exits",
                                 "use `eetool fit-thresholds --method cbt|cbt-ns|adp-c` and `eetool evaluate`")
    mode, candidates = candidate_exits(model)
    exits = select_exits(candidates, selection, model)
    if mode == HOOK:
        return ExitModel(model, HOOK, exits)
    units = chain_units(model)
    assert units is not None
    stages: list[nn.Module] = []
    current: list[nn.Module] = []
    wanted = set(exits)
    for name, module in units:
        current.append(module)
        if name in wanted:
            stages.append(nn.Sequential(*current))
            current = []
    stages.append(nn.Sequential(*current))
    return ExitModel(model, SPLIT, exits, nn.ModuleList(stages))
