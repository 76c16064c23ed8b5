"""Euclidean distances from features to centres, shared by E²CM's class means and k-means."""

from __future__ import annotations

import torch


def distances(x: torch.Tensor, means: torch.Tensor, means_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances N x K by ||x||^2 - 2 x.c + ||c||^2 (one matrix product)."""
    if means_sq is None:
        means_sq = (means * means).sum(1)
    sq = (x * x).sum(1, keepdim=True) - 2 * (x @ means.T) + means_sq
    return sq.clamp_min_(0).sqrt_()
