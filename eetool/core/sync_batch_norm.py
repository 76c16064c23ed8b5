"""Batch norm synchronised over torchrun's processes, on CPU (gloo) as on GPU (NCCL): in train mode each share
of a batch is normalised with the whole batch's mean and variance (float64 sums, gradients all-reduced); eval
mode is plain batch norm.

Method: docs/scale-out.md#how-the-processes-share-the-work
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.nn.modules.batchnorm import _BatchNorm

from eetool.core.distributed import PeerFailed


class _AllSum(torch.autograd.Function):
    """The sum over the ranks, whose gradient is the sum over the ranks of the gradients (each rank's loss
    depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx: FunctionCtx, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all processes (any input of at least 2 dimensions, channels second);
    outside a process group it is plain batch norm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_statistics or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        wide = input.to(torch.float64)
        local = torch.cat([wide.new_full((1,), input.numel() // channels),
                           wide.sum(dims), (wide * wide).sum(dims)])
        try:
            total = _AllSum.apply(local)
        except RuntimeError:  # a peer that has gone, as eetool.core.distributed reports it
            raise PeerFailed() from None
        count = total[0].detach()
        if float(count) <= 1:  # every rank sees the same count, so every rank refuses, as nn.BatchNorm2d does
            raise ValueError(f"expected more than 1 value per channel when training, got {int(count)} in all")
        mean = total[1:channels + 1] / count
        var = (total[channels + 1:] / count - mean * mean).clamp_min(0.0)  # biased, to normalise
        if self.training and self.track_running_stats:
            self._update_running_statistics(mean.detach(), var.detach() * count / (count - 1))
        shape = (1, channels) + (1,) * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(input.dtype).view(shape)
        out = (input - mean.to(input.dtype).view(shape)) * scale
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """As nn.BatchNorm2d: the momentum, or a cumulative average when the momentum is None."""
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)


def _synchronised(norm: _BatchNorm) -> SyncBatchNorm:
    """A SyncBatchNorm holding ``norm``'s own parameters and buffers (the same tensors: an optimizer made
    for ``norm`` trains it, its running statistics are ``norm``'s, and the state-dict keys are unchanged)."""
    sync = SyncBatchNorm(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                         device="meta")
    for name, param in norm.named_parameters(recurse=False):
        setattr(sync, name, param)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(sync, name, getattr(norm, name))
    sync.train(norm.training)
    return sync


@contextmanager
def synchronised_batch_norm(model: nn.Module) -> Iterator[bool]:
    """``model``'s batch norm modules replaced in place by SyncBatchNorm over the same tensors, and put back
    afterwards; yields whether there were any. A model that is itself a batch norm module is left alone."""
    swapped: list[tuple[nn.Module, str, nn.Module, SyncBatchNorm]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, SyncBatchNorm):
                sync = _synchronised(child)
                setattr(parent, name, sync)
                swapped.append((parent, name, child, sync))
    try:
        yield bool(swapped)
    finally:
        for parent, name, original, sync in swapped:
            original.train(sync.training)
            setattr(parent, name, original)
