"""E²CM, early exit via class means (thesis chapter 2): calibration.

For exit j and class k the class mean c_jk is the mean of exit j's (optionally max-pooled)
features over the calibration samples of class k (eq. 2.2). A sample's distances
d_jk = ||x_j - c_jk||_2 (eq. 2.3) are divided by the mean of d_jk over all N calibration
samples (eq. 2.4) and turned into probabilities by softmax(-d) (eq. 2.5); the sample leaves at
exit j when max_k P(k) > T_j (eq. 2.6) with label argmax_k P(k) (eq. 2.7).

Accumulations are float64 sums and counts that add across shards, so calibration can later be
spread over processes and combined with an all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eetool.datasets import Dataset, Preprocess
from eetool.errors import InputError, UsageError
from eetool.exits import ExitModel
from eetool.reporting import Reporter


@dataclass(frozen=True)
class Pooling:
    """Feature reduction before the means: spatial max-pooling to ``spatial`` x ``spatial`` and
    channel max-pooling in groups down to ``channels`` (the thesis pools 14x14x80 to 7x7x10)."""

    spatial: int | None = None
    channels: int | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """N x ... features to N x D (float32)."""
        if x.dim() == 4:
            if self.channels and self.channels < x.shape[1]:
                if x.shape[1] % self.channels:
                    raise UsageError(f"--pool-channels {self.channels} does not divide {x.shape[1]} channels",
                                     "choose a divisor of every pooled exit's channel count")
                n, c, h, w = x.shape
                x = x.view(n, self.channels, c // self.channels, h, w).amax(2)
            if self.spatial and (x.shape[2] > self.spatial or x.shape[3] > self.spatial):
                x = F.adaptive_max_pool2d(x, self.spatial)
        return x.flatten(1).float()

    def out_dim(self, shape: tuple[int, ...]) -> int:
        return int(self.apply(torch.zeros(1, *shape)).shape[1])


class ClassMeanSums:
    """Per exit, float64 sums of features per class and the class counts; shards add up."""

    def __init__(self, dims: list[int], num_classes: int) -> None:
        self.sums = [torch.zeros(num_classes, d, dtype=torch.float64) for d in dims]
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, features: list[torch.Tensor], labels: torch.Tensor) -> None:
        labels = labels.to(features[0].device)
        for s, f in zip(self.sums, features, strict=True):
            s.index_add_(0, labels.cpu(), f.double().cpu())
        self.counts += torch.bincount(labels.cpu(), minlength=self.counts.numel())

    def merge(self, other: ClassMeanSums) -> None:
        for s, o in zip(self.sums, other.sums, strict=True):
            s += o
        self.counts += other.counts

    def means(self) -> list[torch.Tensor]:
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise InputError(f"no calibration samples of class {empty[0]} ({len(empty)} classes empty)",
                             "calibrate on data with every class, e.g. the training split")
        return [(s / self.counts[:, None]).float() for s in self.sums]


def distances(x: torch.Tensor, means: torch.Tensor, means_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances N x K by ||x||^2 - 2 x.c + ||c||^2 (one matrix product)."""
    if means_sq is None:
        means_sq = (means * means).sum(1)
    sq = (x * x).sum(1, keepdim=True) - 2 * (x @ means.T) + means_sq
    return sq.clamp_min_(0).sqrt_()


def decide(d: torch.Tensor, normaliser: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence max_k softmax(-d/normaliser) and its argmax, per sample."""
    p = torch.softmax(-d / normaliser, dim=1)
    conf, pred = p.max(1)
    return conf, pred


def distance_macs(dim: int, num_classes: int) -> int:
    """MACs of one sample's decision at an exit: K dot products of length D, plus the norms, the
    normalisation and the softmax (a few operations per class)."""
    return num_classes * dim + dim + 4 * num_classes


@dataclass
class Calibration:
    """What calibrate-means computes: means, normalisers, and the per-sample cache fit-thresholds uses."""

    means: list[torch.Tensor]  # per exit: K x D
    normalisers: torch.Tensor  # J x K: mean distance to each class mean over all samples
    counts: torch.Tensor  # K
    confidence: torch.Tensor  # N x J
    prediction: torch.Tensor  # N x J
    final_prediction: torch.Tensor  # N: the model's own head
    labels: torch.Tensor  # N
    dims: list[int]
    seconds: tuple[float, float]  # pass 1 (means), pass 2 (normalisers and cache)


@torch.no_grad()
def calibrate(exit_model: ExitModel, data: Dataset, preprocess: Preprocess, num_classes: int, *,
              pooling: Pooling = Pooling(), batch_size: int = 256, device: torch.device | str = "cpu",
              reporter: Reporter | None = None) -> Calibration:
    """Two streaming passes: class means; then normalisers, confidences and predictions."""
    import time

    reporter = reporter or Reporter()
    if bool((data.labels < 0).any()):
        raise InputError(f"{data.spec} has unlabelled samples", "class means need labels (or use --clusters)")
    shapes = exit_model.exit_shapes(preprocess.input_shape)
    dims = [pooling.out_dim(s) for s in shapes]
    sums = ClassMeanSums(dims, num_classes)
    batches = -(-len(data) // batch_size)
    t0 = time.perf_counter()
    with reporter.bar(batches, "class means") as bar:
        for images, labels, _ in data.batches(batch_size):
            feats, _ = exit_model.features(preprocess(images, device))
            sums.update([pooling.apply(f) for f in feats], labels)
            bar.advance()
    t1 = time.perf_counter()
    means = [m.to(device) for m in sums.means()]
    means_sq = [(m * m).sum(1) for m in means]
    n, j = len(data), len(dims)
    dist_sum = torch.zeros(j, num_classes, dtype=torch.float64)
    # The raw distances are kept (N x J x K) because the normalisers need every sample first.
    raw = torch.empty(n, j, num_classes, dtype=torch.float32)
    final = torch.empty(n, dtype=torch.int64)
    with reporter.bar(batches, "distances") as bar:
        for images, _, pos in data.batches(batch_size):
            feats, logits = exit_model.features(preprocess(images, device))
            for e, f in enumerate(feats):
                d = distances(pooling.apply(f), means[e], means_sq[e])
                dist_sum[e] += d.double().sum(0).cpu()
                raw[pos, e] = d.cpu()
            final[pos] = logits.argmax(1).cpu()
            bar.advance()
    normalisers = (dist_sum / n).float()
    conf, pred = decide(raw.view(n * j, num_classes), normalisers.repeat(n, 1))
    t2 = time.perf_counter()
    return Calibration([m.cpu() for m in means], normalisers, sums.counts, conf.view(n, j), pred.view(n, j),
                       final, data.labels.clone(), dims, (t1 - t0, t2 - t1))
