"""Cluster centres for unsupervised E²CM, checked against brute force."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eetool.classification.clustering import best_mapping, clustering_accuracy, hungarian, kmeans
from eetool.classification.e2cm import ClassMeans, distances
from eetool.cli import app


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_hungarian_finds_the_cheapest_assignment(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    for _ in range(10):
        cost = torch.randint(0, 30, (n, n), generator=gen).float()
        got = hungarian(cost)
        assert sorted(got) == list(range(n))
        best = min(sum(float(cost[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))
        assert sum(float(cost[i, got[i]]) for i in range(n)) == best


def test_clustering_accuracy_is_the_best_relabelling() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=gen)
    clusters = torch.randint(0, 4, (200,), generator=gen)
    brute = max(float((torch.tensor(p)[clusters] == labels).double().mean())
                for p in itertools.permutations(range(4)))
    assert clustering_accuracy(clusters, labels, 4) == pytest.approx(brute)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(best_mapping(perm[labels], labels, 4)[perm], torch.arange(4))


def test_kmeans_finds_separated_blobs_and_is_a_fixed_point() -> None:
    gen = torch.Generator().manual_seed(0)
    centres_true = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    x = torch.cat([torch.randn(50, 2, generator=gen) + c for c in centres_true])
    labels = torch.arange(4).repeat_interleave(50)
    centres = kmeans(x, 4, generator=torch.Generator().manual_seed(1))
    assign = distances(x, centres).argmin(1)
    assert clustering_accuracy(assign, labels, 4) == 1.0
    # Lloyd's fixed point: every centre is the mean of the points assigned to it
    for k in range(4):
        assert torch.allclose(centres[k], x[assign == k].mean(0), atol=1e-4)


def test_calibrate_means_with_clusters_needs_no_labels(tiny_checkpoint: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "unlabelled.safetensors"
    save_file({"train.images": torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8, generator=gen)}, str(data),
              metadata={"format": "pt"})
    out = tmp_path / "centres.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate-means", "-c", tiny_checkpoint, "-d", f"safetensors:{data}", "--clusters",
                                 "10", "--pool-spatial", "2", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    cm = ClassMeans.load(str(out))
    assert cm.clusters and cm.calibration is not None
    assert int(cm.counts.sum()) == 60  # cluster sizes as the head assigns them
    # without labels, an exit is right when it agrees with the head
    c = cm.calibration
    stats = cm.exit_stats(c.confidence, c.prediction, c.final_prediction, c.labels)
    assert torch.equal(stats.correct[:, :-1], c.prediction == c.final_prediction[:, None])
    assert bool(stats.correct[:, -1].all())
    wrong = runner.invoke(app, ["calibrate-means", "-c", tiny_checkpoint, "-d", f"safetensors:{data}", "--clusters",
                                "7", "-o", str(tmp_path / "x.safetensors")])
    assert wrong.exit_code == 2 and "--clusters 10" in wrong.stderr
