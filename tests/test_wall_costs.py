"""fit-thresholds --overhead: exit costs in MACs (the default) or in measured wall time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import invoke, ok

from eetool.checkpoint import load_checkpoint
from eetool.datasets import Preprocess, load_dataset
from eetool.exits import build_exit_model
from eetool.heads import load_heads
from eetool.rules import HeadsRule
from eetool.wall_costs import WallCosts, measure_wall_costs


@pytest.fixture(scope="module")
def heads_and_means(tiny_checkpoint: str, tiny_data: str, tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("overhead")
    heads, means = d / "heads.safetensors", d / "means.safetensors"
    ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", heads, "-q"))
    ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", means, "-q"))
    return heads, means


def test_wall_costs_add_up_stages_and_the_decisions_passed() -> None:
    wall = WallCosts([1.0, 2.0, 1.0], [0.5, 0.25], batch_size=8, threads=1, batches=1, repeats=1)
    # exit 0: stage 0 and its decision; exit 1: stages 0-1 and both decisions; head: every stage and decision
    assert wall.normalised_exit_costs() == [1.5 / 4, 3.75 / 4, 4.75 / 4]


def test_wall_costs_add_the_compaction_after_each_decision_passed() -> None:
    wall = WallCosts([1.0, 2.0, 1.0], [0.5, 0.25], batch_size=8, threads=1, batches=1, repeats=1,
                     compaction_seconds=[0.25, 0.5])
    assert wall.normalised_exit_costs() == [1.75 / 4, 4.5 / 4, 5.5 / 4]


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
    assert len(wall.stage_seconds) == j + 1 and len(wall.decision_seconds) == len(wall.compaction_seconds) == j
    assert all(s > 0 for s in wall.stage_seconds + wall.decision_seconds + wall.compaction_seconds)
    assert (wall.batch_size, wall.batches, wall.threads) == (32, 2, torch.get_num_threads())
    costs = wall.normalised_exit_costs()
    assert all(a < b for a, b in zip(costs, costs[1:], strict=False))
    assert costs[0] > 0
    # the head pays the whole plain model (1) plus every decision and compaction
    overheads = sum(wall.decision_seconds) + sum(wall.compaction_seconds)
    assert costs[-1] == pytest.approx(1 + overheads / wall.plain_seconds, rel=1e-9)
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
    assert "timing stages and exit decisions at batch 32" in result.stderr
    doc = yaml.safe_load(fitted.read_text())
    assert doc["cost_basis"] == "wall-time"
    wall = doc["wall_time"]
    assert (wall["batch_size"], wall["threads"]) == (32, torch.get_num_threads())
    assert len(wall["stage_seconds"]) == len(wall["decision_seconds"]) + 1 == len(doc["provenance"]["exits"]) + 1
    assert wall["plain_seconds"] == pytest.approx(sum(wall["stage_seconds"]), rel=1e-4)
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
