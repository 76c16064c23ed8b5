"""k-means, Hungarian matching and clustering accuracy (DEC, Xie et al. 2016), for unsupervised early exits:
``calibrate-means --clusters K`` (thesis 2.4.4).

Method: docs/e2cm.md
"""

from __future__ import annotations

import torch

from eetool.classification.distances import distances


def kmeans(x: torch.Tensor, k: int, *, iterations: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ initialisation then Lloyd iterations; returns k x D centres (float32)."""
    n = x.shape[0]
    if n < k:
        from eetool.core.errors import InputError

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
