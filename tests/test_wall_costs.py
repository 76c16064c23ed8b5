"""fit-thresholds --overhead: exit costs in MACs (the default) or in measured wall time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import invoke, ok

from eetool.classification.exit_heads import load_heads
from eetool.classification.rules import HeadsRule
from eetool.classification.wall_costs import (
    MAX_FITS,
    PartSeconds,
    WallCosts,
    measure_wall_costs,
    measured_batch_sizes,
    reach_fractions,
    sweep_wall,
)
from eetool.core.budget_search import ExitStats, exit_index, greedy, sweep
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.exits import build_exit_model


@pytest.fixture(scope="module")
def heads_and_means(tiny_checkpoint: str, tiny_data: str, tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("overhead")
    heads, means = d / "heads.safetensors", d / "means.safetensors"
    ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", heads, "-q"))
    ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", means, "-q"))
    return heads, means


def _single(stages: list[float], decisions: list[float], compactions: list[float], size: int = 8) -> WallCosts:
    return WallCosts([PartSeconds(size, stages, decisions, compactions)], threads=1, batches=1, repeats=1)


def test_wall_costs_add_up_stages_and_the_decisions_passed() -> None:
    wall = _single([1.0, 2.0, 1.0], [0.5, 0.25], [0.0, 0.0])
    # exit 0: stage 0 and its decision; exit 1: stages 0-1 and both decisions; head: every stage and decision
    assert wall.normalised_exit_costs() == pytest.approx([1.5 / 4, 3.75 / 4, 4.75 / 4], rel=1e-12)


def test_wall_costs_add_the_compaction_after_each_decision_passed() -> None:
    wall = _single([1.0, 2.0, 1.0], [0.5, 0.25], [0.25, 0.5])
    assert wall.normalised_exit_costs() == pytest.approx([1.75 / 4, 4.5 / 4, 5.5 / 4], rel=1e-12)


def test_the_pass_bookkeeping_is_paid_once_per_batch_by_every_sample() -> None:
    wall = WallCosts([PartSeconds(8, [1.0, 2.0, 1.0], [0.5, 0.25], [0.0, 0.0], pass_seconds=0.5)], threads=1,
                     batches=1, repeats=1)
    # every exit cost carries the pass's 0.5 once; the plain model (the stages, 4) does not
    assert wall.normalised_exit_costs() == pytest.approx([2.0 / 4, 4.25 / 4, 5.25 / 4], rel=1e-12)
    everyone_at_exit_0 = torch.zeros(8, dtype=torch.int64)
    assert wall.model_cost(everyone_at_exit_0) == pytest.approx(2.0 / 4, rel=1e-12)


def test_measured_batch_sizes() -> None:
    assert measured_batch_sizes(256) == [1, 16, 64, 128, 256]
    assert measured_batch_sizes(32) == [1, 2, 8, 16, 32]
    assert measured_batch_sizes(1) == [1]


# Seconds per batch at batch sizes 1, 4 and 16 of two exits' stages, decisions and compactions and the head: each
# already non-decreasing in the batch size and non-increasing per sample, so that the model is plain interpolation.
SIZES = [1, 4, 16]
STAGES = [[0.2, 0.5, 1.6], [0.4, 1.2, 4.0], [0.3, 0.9, 3.2]]
DECISIONS = [[0.3, 0.4, 0.8], [0.2, 0.3, 0.6]]
COMPACTIONS = [[0.01, 0.02, 0.05], [0.01, 0.02, 0.04]]


def _table() -> WallCosts:
    return WallCosts([PartSeconds(n, [s[k] for s in STAGES], [d[k] for d in DECISIONS], [c[k] for c in COMPACTIONS])
                      for k, n in enumerate(SIZES)], threads=1, batches=1, repeats=1)


def _direct_cost(exits: torch.Tensor) -> float:
    """The model cost recomputed from the table: each step's time at the batch size reaching it, over the plain
    model's stages at 16."""
    steps = [[s + d + c for s, d, c in zip(*parts, strict=True)]
             for parts in zip(STAGES, DECISIONS, COMPACTIONS, strict=False)] + [STAGES[-1]]
    total = 0.0
    for j, times in enumerate(steps):
        n = float((exits >= j).double().mean()) * 16
        total += float(np.interp(n, [0, *SIZES], [0, *times]))
    return total / sum(s[-1] for s in STAGES)


def _stats(n: int = 300, seed: int = 0) -> ExitStats:
    gen = torch.Generator().manual_seed(seed)
    confidence = torch.rand(n, 2, generator=gen)
    correct = torch.rand(n, 3, generator=gen) < torch.tensor([0.5, 0.7, 0.9])
    return ExitStats(confidence, correct, torch.zeros(3, dtype=torch.float64))


def test_made_monotone_keeps_the_dearer_reading() -> None:
    # batch 4 measured faster than batch 1 (noise), and batch 16 dearer per sample than batch 4 (the caches)
    wall = WallCosts([PartSeconds(1, [1.0], [], []), PartSeconds(4, [0.8], [], []), PartSeconds(16, [6.0], [], [])],
                     threads=1, batches=1, repeats=1)
    (times,) = wall.step_seconds()
    assert times == [1.0, 1.0, 6.0]  # a larger batch never faster; the per-sample times as measured otherwise


def test_costs_are_monotone() -> None:
    wall = _table()
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        reach = [1.0, *sorted(torch.rand(2, generator=gen).tolist(), reverse=True)]
        costs = wall.exit_costs(reach)
        assert all(a < b for a, b in zip(costs, costs[1:], strict=False))  # later exits cost more
        # fewer samples reaching the later steps: each costs as much or more per sample (the table's
        # per-sample times fall with the batch size)
        fewer = [reach[0], *(r * float(torch.rand(1, generator=gen)) for r in reach[1:])]
        assert all(a <= b + 1e-12 for a, b in zip(costs, wall.exit_costs(fewer), strict=True))
    # letting samples leave earlier never raises the model cost
    exits = torch.randint(0, 3, (200,), generator=gen)
    for _ in range(50):
        i = int(torch.randint(0, 200, (1,), generator=gen))
        earlier = exits.clone()
        earlier[i] = max(0, int(exits[i]) - 1)
        assert wall.model_cost(earlier) <= wall.model_cost(exits) + 1e-12
        exits = earlier
    assert wall.normalised_exit_costs() == pytest.approx(wall.exit_costs([1.0, 1.0, 1.0]))


def test_per_sample_costs_rise_as_fewer_samples_reach_a_step() -> None:
    wall = _table()
    full, half, sixteenth = (wall.exit_costs([1.0, r, r]) for r in (1.0, 0.5, 1 / 16))
    assert full[0] == half[0] == sixteenth[0]  # everyone reaches the first step
    assert full[1] < half[1] < sixteenth[1] and full[2] < half[2] < sixteenth[2]


def test_model_cost_is_the_mean_of_the_exit_costs_at_its_own_reach() -> None:
    wall = _table()
    exits = torch.randint(0, 3, (500,), generator=torch.Generator().manual_seed(2))
    costs = torch.tensor(wall.exit_costs(reach_fractions(exits, 2)), dtype=torch.float64)
    assert wall.model_cost(exits) == pytest.approx(float(costs[exits].mean()), rel=1e-12)
    assert wall.model_cost(exits) == pytest.approx(_direct_cost(exits), rel=1e-12)
    assert wall.model_cost(torch.full((10,), 2)) == pytest.approx(wall.normalised_exit_costs()[-1], rel=1e-12)


@pytest.mark.parametrize("search", ["greedy", "bisect"])
def test_fitted_points_are_the_direct_recomputation_and_within_budget(search: str) -> None:
    stats, wall = _stats(), _table()
    budgets = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    points = sweep_wall(stats, wall, budgets, search)
    assert [p.budget for p in points] == budgets  # the floor is 0.3 / 0.6 of the table's first step at 16
    slack = 5e-4 if search == "bisect" else 0.0  # bisect stops within its tolerance, on either side
    for p in points:
        exits = exit_index(stats.confidence, torch.tensor(p.thresholds))
        assert p.cost == pytest.approx(_direct_cost(exits), rel=1e-12)
        assert p.cost <= p.budget + slack
        assert p.accuracy == pytest.approx(float(stats.correct.gather(1, exits[:, None]).double().mean()))
        assert 1 <= p.fits <= MAX_FITS
    # the budgets are used: at the looser ones fewer samples leave early, and the points grow dearer
    assert points[0].cost < points[-2].cost
    if search == "greedy":  # bisect starts each fit at random thresholds, and so seldom repeats itself exactly
        assert sum(p.converged for p in points) >= len(points) // 2


def test_the_fit_within_the_model_replaces_one_over_budget() -> None:
    """One fit only, on the full batch's per-sample costs: under the model (smaller batches later) the greedy point
    for the budget is over it, and the point kept is the walk's step within it."""
    stats, wall = _stats(), _table()
    full = ExitStats(stats.confidence, stats.correct, torch.tensor(wall.normalised_exit_costs(), dtype=torch.float64))
    naive = greedy(full, 0.7)
    assert wall.model_cost(exit_index(stats.confidence, naive)) > 0.7 + 0.01
    (point,) = sweep_wall(stats, wall, [0.7], max_fits=1)
    assert point.cost <= 0.7 and point.cost == pytest.approx(
        _direct_cost(exit_index(stats.confidence, torch.tensor(point.thresholds))), rel=1e-12)
    assert point.cost > 0.7 - 0.05  # the budget is used, not undershot by far


def test_at_batch_one_the_first_fit_is_the_fixed_point() -> None:
    stats = _stats()
    wall = _single([0.2, 0.4, 0.3], [0.3, 0.2], [0.01, 0.01], size=1)
    costed = ExitStats(stats.confidence, stats.correct,
                       torch.tensor(wall.normalised_exit_costs(), dtype=torch.float64))
    for point, plain in zip(sweep_wall(stats, wall, [0.6, 0.8, 1.0]), sweep(costed, [0.6, 0.8, 1.0]), strict=True):
        assert point.thresholds == plain.thresholds and point.cost == pytest.approx(plain.cost, rel=1e-12)
        assert point.converged and point.fits == 2  # the second fit, on the first's costs, repeats it


def test_measured_costs_are_positive_cumulative_and_the_plain_model_is_one(tiny_checkpoint: str, tiny_data: str,
                                                                          heads_and_means: tuple[Path, Path]) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    heads, _ = load_heads(str(heads_and_means[0]))
    em = build_exit_model(ckpt.model, ",".join(heads.spec.exits))
    rule = HeadsRule(heads, "sdn")
    data = load_dataset(f"safetensors:{tiny_data}", "train")
    pre = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    wall = measure_wall_costs(em, rule.scores, data, pre, batch_size=32, batches=2, repeats=3)
    j = len(em.exits)
    assert [p.batch_size for p in wall.by_batch_size] == [1, 2, 8, 16, 32]
    for part in wall.by_batch_size:
        assert len(part.stage_seconds) == j + 1 and len(part.decision_seconds) == len(part.compaction_seconds) == j
        assert all(s > 0 for s in [*part.stage_seconds, *part.decision_seconds, *part.compaction_seconds,
                                   part.pass_seconds])
    assert (wall.batch_size, wall.batches, wall.threads) == (32, 2, torch.get_num_threads())
    costs = wall.normalised_exit_costs()
    assert all(a < b for a, b in zip(costs, costs[1:], strict=False))
    assert costs[0] > 0
    # the head pays the whole plain model (1) plus every decision and compaction, or more where a smaller batch
    # was measured slower than the full one (the dearer reading is kept)
    full = wall.full
    overheads = sum(full.decision_seconds) + sum(full.compaction_seconds) + full.pass_seconds
    assert costs[-1] >= 1 + overheads / wall.plain_seconds - 1e-9
    assert costs[-1] > 1


def _without_provenance(path: Path) -> dict[str, object]:
    doc = yaml.safe_load(path.read_text())
    doc.pop("provenance")
    return doc


def test_analytic_overhead_is_the_default(tiny_checkpoint: str, tiny_data: str, heads_and_means: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    fit = ["fit-thresholds", "--method", "sdn", "--exit-heads", heads_and_means[0], "-c", tiny_checkpoint, "-d",
           tiny_data, "--budget", "0.6", "--budget", "0.8", "-q"]
    ok(invoke(*fit, "-o", tmp_path / "default.yaml"))
    ok(invoke(*fit, "--overhead", "analytic", "-o", tmp_path / "analytic.yaml"))
    default = _without_provenance(tmp_path / "default.yaml")
    assert default == _without_provenance(tmp_path / "analytic.yaml")
    assert default["cost_basis"] == "dense" and "wall_time" not in default


def test_measured_overhead_through_the_cli(tiny_checkpoint: str, tiny_data: str, heads_and_means: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    heads, means = heads_and_means
    fitted = tmp_path / "measured.yaml"
    result = ok(invoke("fit-thresholds", "--method", "sdn", "--exit-heads", heads, "-c", tiny_checkpoint, "-d",
                       tiny_data, "--sweep", "--step", "0.05", "--overhead", "measured", "--batch-size", "32",
                       "-o", fitted))
    assert "measured wall time" in result.stdout and "MACs cost" in result.stdout
    assert "timing stages and exit decisions at batch 32 and at 1, 2, 8, 16" in result.stderr
    doc = yaml.safe_load(fitted.read_text())
    assert doc["cost_basis"] == "wall-time"
    wall = doc["wall_time"]
    assert (wall["batch_size"], wall["threads"]) == (32, torch.get_num_threads())
    assert len(wall["stage_seconds"]) == len(wall["decision_seconds"]) + 1 == len(doc["provenance"]["exits"]) + 1
    assert wall["plain_seconds"] == pytest.approx(sum(wall["stage_seconds"]), rel=1e-4)
    # every batch size timed, the full one's parts also at the top level
    assert wall["batch_sizes"] == [b["batch_size"] for b in wall["by_batch_size"]] == [1, 2, 8, 16, 32]
    assert wall["by_batch_size"][-1]["stage_seconds"] == wall["stage_seconds"]
    assert all(1 <= p["fits"] <= MAX_FITS and isinstance(p["converged"], bool) for p in doc["points"])
    # a sweep, so that no budget depends on how fast this machine runs the decisions
    assert doc["points"] and all(0 < p["cost"] <= p["budget"] + 1e-9 and p["macs_cost"] > 0 for p in doc["points"])
    evaluated = json.loads(ok(invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "--exit-heads", heads,
                                     "--thresholds", fitted, "--point", "0", "--repeats", "1", "--format", "json",
                                     "-q")).stdout)
    assert evaluated["thresholds_cost_basis"] == "wall-time"
    assert evaluated["thresholds_wall_time"]["batch_size"] == 32
    assert len(evaluated["points"]) == 2
    # E²CM fitted on its calibration cache: --checkpoint and --data are then used for the timing only
    e2cm = tmp_path / "e2cm.yaml"
    ok(invoke("fit-thresholds", "--means", means, "-c", tiny_checkpoint, "-d", tiny_data, "--sweep", "--step", "0.05",
              "--overhead", "measured", "-o", e2cm, "-q"))
    assert yaml.safe_load(e2cm.read_text())["cost_basis"] == "wall-time"
