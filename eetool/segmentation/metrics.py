"""Segmentation scores from one confusion matrix (int64, K x K, rows the ground truth): IoU per class, mIoU over
the classes that occur (in the ground truth or the predictions), pixel accuracy over labelled pixels."""

from __future__ import annotations

import torch

from eetool.segmentation import IGNORE


def confusion(predictions: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    labelled = masks != IGNORE
    truth = masks[labelled].long()
    pred = predictions[labelled].long()
    return torch.bincount(truth * num_classes + pred, minlength=num_classes * num_classes).view(num_classes,
                                                                                                num_classes)


def iou(matrix: torch.Tensor) -> torch.Tensor:
    """Per class; NaN for a class neither in the ground truth nor predicted."""
    tp = matrix.diag().to(torch.float64)
    union = matrix.sum(0).to(torch.float64) + matrix.sum(1).to(torch.float64) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(matrix: torch.Tensor) -> float:
    per_class = iou(matrix)
    return float(per_class[~per_class.isnan()].mean()) if bool((~per_class.isnan()).any()) else float("nan")


def pixel_accuracy(matrix: torch.Tensor) -> float:
    total = int(matrix.sum())
    return int(matrix.diag().sum()) / total if total else float("nan")
