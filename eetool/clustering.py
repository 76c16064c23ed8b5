"""Cluster centres for unsupervised early exits, and clustering accuracy.

With ``calibrate-means --clusters K`` the centres of k-means at each exit stand in for the class
means (the thesis uses early exits for deep clustering, section 2.4.4). Clustering accuracy is
the accuracy under the best one-to-one mapping of clusters to labels (Hungarian matching), as in
DEC (Xie et al. 2016).
"""

from __future__ import annotations

import torch

from eetool.datasets import Dataset, Preprocess
from eetool.distributed import World, gather_rows, shard_batches
from eetool.e2cm import Pooling, distances
from eetool.exits import ExitModel
from eetool.reporting import Reporter


def kmeans(x: torch.Tensor, k: int, *, iterations: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ initialisation then Lloyd iterations; returns k x D centres (float32)."""
    n = x.shape[0]
    if n < k:
        from eetool.errors import InputError

        raise InputError(f"{n} samples cannot make {k} clusters", "use more samples or fewer --clusters")
    x = x.float()
    centres = torch.empty(k, x.shape[1])
    centres[0] = x[int(torch.randint(n, (1,), generator=generator))]
    closest = distances(x, centres[:1]).squeeze(1) ** 2
    for c in range(1, k):
        # the next centre with probability proportional to the squared distance to the nearest one
        weights = closest / closest.sum() if float(closest.sum()) > 0 else torch.full((n,), 1.0 / n)
        centres[c] = x[int(torch.multinomial(weights, 1, generator=generator))]
        closest = torch.minimum(closest, distances(x, centres[c:c + 1]).squeeze(1) ** 2)
    for _ in range(iterations):
        d = distances(x, centres)
        assign = d.argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        new = sums / counts.clamp_min(1)[:, None]
        if bool(empty.any()):  # an empty cluster restarts at the points farthest from their centres
            far = d.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            new[empty] = x[far]
        if torch.allclose(new, centres):
            return new
        centres = new
    return centres


def hungarian(cost: torch.Tensor) -> list[int]:
    """Minimum-cost assignment of rows to columns of a square matrix: ``out[row] = column``.

    The shortest augmenting path form of the Hungarian method, O(n^3)."""
    n = cost.shape[0]
    a = cost.double().tolist()
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match = [0] * (n + 1)  # match[column] = row, 1-based; 0 = free
    way = [0] * (n + 1)
    for row in range(1, n + 1):
        match[0] = row
        col0 = 0
        minv = [inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[col0] = True
            r0, delta, col1 = match[col0], inf, 0
            for col in range(1, n + 1):
                if not used[col]:
                    cur = a[r0 - 1][col - 1] - u[r0] - v[col]
                    if cur < minv[col]:
                        minv[col], way[col] = cur, col0
                    if minv[col] < delta:
                        delta, col1 = minv[col], col
            for col in range(n + 1):
                if used[col]:
                    u[match[col]] += delta
                    v[col] -= delta
                else:
                    minv[col] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            match[col0] = match[col1]
            col0 = col1
    out = [0] * n
    for col in range(1, n + 1):
        out[match[col] - 1] = col - 1
    return out


def best_mapping(clusters: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The one-to-one map from cluster ids to labels that agrees on the most samples (k x k counts)."""
    counts = torch.bincount(clusters * k + labels, minlength=k * k).view(k, k)
    return torch.tensor(hungarian(-counts), dtype=torch.int64)


def clustering_accuracy(clusters: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    mapping = best_mapping(clusters, labels, k)
    return float((mapping[clusters] == labels).double().mean())


@torch.no_grad()
def cluster_centres(exit_model: ExitModel, data: Dataset, preprocess: Preprocess, k: int, *, pooling: Pooling,
                    batch_size: int = 256, device: torch.device | str = "cpu", iterations: int = 50,
                    generator: torch.Generator | None = None, max_bytes: int = 2 * 2**30,
                    reporter: Reporter | None = None, world: World = World()
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """k-means centres at every exit, numbered like the model's own outputs, and the head's predictions.

    No labels are used. Exit j's clusters are matched one-to-one to the head's predicted classes
    (Hungarian matching on how often they co-occur), so that every exit predicts in the head's terms.

    Under torchrun (a ``world`` of several processes) each rank computes the features of its share of the
    batches and the rows are gathered in order; every rank then runs the same k-means on the same features,
    so the centres are one process's (the network's pass is the costly part; the features are bounded by
    ``max_bytes`` already).
    """
    from eetool.errors import UsageError

    reporter = reporter or Reporter()
    dims = [pooling.out_dim(s) for s in exit_model.exit_shapes(preprocess.input_shape)]
    need = len(data) * sum(dims) * 4
    if need > max_bytes:
        raise UsageError(f"k-means would hold {need / 2**30:.1f} GiB of features in memory",
                         "pool them (--pool-spatial 2, --pool-channels) or cluster fewer samples (--indices)")
    feats: list[list[torch.Tensor]] = [[torch.empty(0, d)] for d in dims]
    head = [torch.empty(0, dtype=torch.int64)]
    positions = [torch.empty(0, dtype=torch.int64)]
    n = len(data)
    with reporter.bar(len(shard_batches(list(range(-(-n // batch_size))), world)), "features") as bar:
        for images, _, pos in data.batches(batch_size, world=world):
            outs, logits = exit_model.features(preprocess(images, device))
            for store, f in zip(feats, outs, strict=True):
                store.append(pooling.apply(f).cpu())
            head.append(logits.argmax(1).cpu())
            positions.append(pos)
            bar.advance()
    mine = torch.cat(positions)
    head_pred = gather_rows(torch.cat(head), mine, n, world)
    centres = []
    for store in feats:
        x = gather_rows(torch.cat(store), mine, n, world)
        c = kmeans(x, k, iterations=iterations, generator=generator)
        assign = distances(x, c).argmin(1)
        mapping = best_mapping(assign, head_pred, k)  # cluster -> head class
        ordered = torch.empty_like(c)
        ordered[mapping] = c
        centres.append(ordered)
    return centres, head_pred
