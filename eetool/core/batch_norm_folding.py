"""Batch norm folded into the convolution before it, for inference: a Conv2d whose output goes only into a
BatchNorm2d (in eval mode an affine map per channel) becomes one Conv2d with scaled weights and a bias, and the
batch norm an identity, so a pass reads each feature map once instead of twice. The network computes the same
function up to float rounding; a saved checkpoint is never changed (the folding works on a copy).

A pair is folded only where the data flow proves it: torch.fx traces each module the early-exit pass runs (the
units ``eetool.core.exits.chain_units`` splits a model into; the whole model, exits left as they are, where it
cannot be split), and a convolution is folded into the batch norm that is its output's only reader, each called
once, both plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` without hooks, and neither shared with another place in the
model. A pair across two units is left as it is: the exit between them reads the convolution's own output. A
module that cannot be traced is searched child by child.

Method: docs/predict-and-export.md#batch-norm-folded-at-inference
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from typing import cast

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from eetool.core.exits import HOOK, ExitModel, build_exit_model, chain_units


def fold_batch_norm(model: nn.Module, exits: Iterable[str] = ()) -> nn.Module:
    """An inference copy of ``model``, in eval mode, with every provable Conv2d -> BatchNorm2d pair folded.

    ``exits``: module names whose outputs are read by forward hooks (the exits of a model that cannot be split
    into units); the folding keeps each of their outputs what it was."""
    folded = copy.deepcopy(model).eval()
    units = chain_units(folded)
    kept = set(exits)
    if units is not None:
        for _, unit in units:
            _fold_in(folded, unit, set())
    else:
        _fold_in(folded, folded, kept)
    return folded


def fold_batch_norm_within(root: nn.Module, region: nn.Module, kept: Iterable[str] = ()) -> int:
    """Fold, in place, the provable pairs inside ``region`` (a module of ``root`` that is run as a whole, or module
    by module in its own order) and return how many were folded. ``kept``: names of modules of ``region`` whose
    outputs are read from outside (exits); each keeps its output. For a copy made for inference already."""
    before = folded_pairs(root)
    _fold_in(root, region, set(kept))
    return folded_pairs(root) - before


def folded_exit_model(exit_model: ExitModel) -> ExitModel:
    """The same exits on a folded copy of the exit model's network (see ``fold_batch_norm``)."""
    hooked = exit_model.exits if exit_model.mode == HOOK else ()
    return build_exit_model(fold_batch_norm(exit_model.model, hooked), ",".join(exit_model.exits))


def folded_pairs(model: nn.Module) -> int:
    """How many batch norms of ``model`` are folded away (nn.Identity where ``fold_batch_norm`` put them)."""
    return sum(isinstance(m, _FoldedBatchNorm) for m in model.modules())


class _FoldedBatchNorm(nn.Identity):
    """Where a batch norm was: its work is in the convolution before it."""


class _Tracer(fx.Tracer):
    """Traces through every module except torch's own layers and the exits, whose outputs must stay as they are."""

    def __init__(self, exits: set[str]) -> None:
        super().__init__()
        self.exits = exits

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.exits or super().is_leaf_module(m, module_qualified_name)


def _fold_in(root: nn.Module, region: nn.Module, exits: set[str]) -> None:
    """Fold the provable pairs inside ``region`` (a module of ``root``, or a unit made of root's modules) and,
    where it cannot be traced, inside each of its children. ``exits``: names relative to ``region``."""
    try:
        graph = _Tracer(exits).trace(region)
    except Exception:  # fx refuses data-dependent control flow and much else: search the children
        for name, child in region.named_children():
            _fold_in(root, child, _inside(name, exits))
        return
    modules = dict(region.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    owners = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[str(node.target)]) is not nn.BatchNorm2d:
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and type(modules[str(source.target)]) is nn.Conv2d):
            continue
        conv = cast(nn.Conv2d, modules[str(source.target)])
        bn = cast(nn.BatchNorm2d, modules[str(node.target)])
        if (len(source.users) == 1 and calls[source.target] == calls[node.target] == 1
                and str(source.target) not in exits and owners[id(conv)] == owners[id(bn)] == 1
                and _plain(conv) and _plain(bn) and bn.running_var is not None
                and bn.num_features == conv.out_channels):
            _replace(root, conv, fuse_conv_bn_eval(conv, bn))
            _replace(root, bn, _FoldedBatchNorm())
    # an exit that is a module of its own (not one of torch's layers) is folded inside, its output unchanged
    for name in exits:
        if name in modules and not fx.Tracer().is_leaf_module(modules[name], name):
            _fold_in(root, modules[name], _inside(name, exits))


def _inside(name: str, exits: set[str]) -> set[str]:
    """The exits within module ``name``, named relative to it."""
    return {e[len(name) + 1:] for e in exits if e.startswith(f"{name}.")}


def _plain(m: nn.Module) -> bool:
    """No hooks (pruning masks, parametrisations, observers): the module computes what its class says."""
    return not (m._forward_hooks or m._forward_pre_hooks or getattr(m, "parametrizations", None))


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` is in ``root`` (the one place: shared modules are not folded)."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise AssertionError("the module to replace is not in the model")
