"""reproduce/weight_pruning.py: its table and curve reading on a tiny fake report (no pruning is run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def wp(load_script: Callable[[str], ModuleType]) -> ModuleType:
    return load_script("reproduce/weight_pruning.py")


def layer(part: str, name: str, weights: int, zeros: int) -> dict[str, Any]:
    return {"part": part, "layer": name, "weights": weights, "zeros": zeros, "sparsity": zeros / weights,
            "pruned": True}


def report(final_acc: float, head_zeros: int) -> dict[str, Any]:
    """Two exits and the final one; six backbone convs (two per depth third) and the final linear layer."""
    convs = [layer("backbone", f"conv{i}", 100, z) for i, z in enumerate((10, 30, 40, 60, 70, 90))]
    return {
        "sparsity": {"backbone": 0.5, "heads": 0.6, "taking_part": 0.55},
        "accuracy": {"e1": 0.70, "e2": 0.80, "final": final_acc},
        "baseline_accuracy": {"e1": 0.60, "e2": 0.85, "final": 0.90},
        "costs": {"model_macs": 1000, "effective_model_macs": 400,
                  "exits": [{"exit": "e1", "dense": 0.3, "effective": 0.1},
                            {"exit": "e2", "dense": 0.6, "effective": 0.25},
                            {"exit": "final", "dense": 1.0, "effective": 0.4}]},
        "layers": [*convs, layer("backbone", "fc", 10, 1),
                   layer("heads", "heads.0.linear", 10, head_zeros), layer("heads", "heads.1.linear", 10, 9)],
    }


def sweep(*points: tuple[float, float]) -> dict[str, Any]:
    return {"points": [{"cost": c, "accuracy": a} for c, a in points]}


def test_accuracy_at_interpolates_the_hull_and_holds_its_best_beyond_it(wp: ModuleType) -> None:
    pts = sweep((0.2, 0.6), (0.6, 0.8), (1.0, 0.9))["points"]
    assert wp.accuracy_at(pts, 0.4) == pytest.approx(0.7)
    assert wp.accuracy_at(pts, 0.6) == pytest.approx(0.8)
    assert wp.accuracy_at(pts, 1.5) == pytest.approx(0.9)
    assert wp.accuracy_at(pts, 0.1) is None


def test_cost_to_reach_is_the_lowest_cost_on_the_hull(wp: ModuleType) -> None:
    pts = sweep((1.0, 0.9), (0.2, 0.6), (0.6, 0.8))["points"]  # in any order
    assert wp.cost_to_reach(pts, 0.7) == pytest.approx(0.4)
    assert wp.cost_to_reach(pts, 0.5) == pytest.approx(0.2)
    assert wp.cost_to_reach(pts, 0.95) is None


def test_depth_thirds_leave_the_final_layer_out(wp: ModuleType) -> None:
    assert wp.depth_thirds(report(0.9, 5)["layers"]) == pytest.approx([0.2, 0.5, 0.8])


def test_table_has_every_exit_and_network(wp: ModuleType) -> None:
    reports = {"joint": report(0.88, 5), "ordered": report(0.86, 2)}
    sweeps = {"unpruned": sweep((0.3, 0.6), (1.0, 0.9)), "joint": sweep((0.1, 0.7), (0.4, 0.88)),
              "ordered": sweep((0.1, 0.65), (0.4, 0.86))}
    table = wp.tabulate(reports, sweeps)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # exit rows: unpruned, joint and its effective cost, ordered and its effective cost
    assert rows["e1"] == "| e1 | 0.300 | 60.00% | 70.00% | 0.100 | 70.00% | 0.100 | – | – |"
    assert rows["final"] == "| final | 1.000 | 90.00% | 88.00% | 0.400 | 86.00% | 0.400 | – | – |"
    assert rows["unpruned"].startswith("| unpruned | – | – | – | – | 1.000 | 90.00% | ")
    assert rows["unpruned"].endswith(" | 1.00x |")
    # joint: depth thirds 20/50/80%, final linear 10%, heads 50% -> 90%, full cost 0.4; best 88%; at costs 0.1,
    # 0.15, 0.2 on the line from (0.1, 70%) to (0.4, 88%), 88% beyond it at 0.5; 86% (unpruned best minus 4
    # points) reached at cost 0.3667
    assert rows["joint"] == ("| joint | 55.0% (50.0%; 60.0%) | 20.0% / 50.0% / 80.0% | 10.0% | 50.0% → 90.0% | "
                             "0.400 | 88.00% | 70.00% | 73.00% | 76.00% | 88.00% | 0.367 | – |")
    assert rows["ordered"].startswith("| ordered | 55.0% (50.0%; 60.0%) | 20.0% / 50.0% / 80.0% | 10.0% | "
                                      "20.0% → 90.0% | 0.400 | 86.00% | ")
    assert rows["ordered"].endswith(" | 0.400 | – |")


def channel_report(final_acc: float) -> dict[str, Any]:
    """A network channel-pruned to 0.5 of the MACs: per-exit costs of the unpruned network's MACs, no sparsity."""
    return {
        "structure": "channel", "macs_fraction": 0.5,
        "accuracy": {"e1": 0.65, "e2": 0.75, "final": final_acc},
        "baseline_accuracy": {"e1": 0.60, "e2": 0.85, "final": 0.90},
        "original": {"widths": {"stage_widths": [16, 32, 64]}}, "pruned": {"widths": {"stage_widths": [12, 22, 46]}},
        "costs": {"basis": "dense", "exits": [{"exit": "e1", "macs": 150, "of_original": 0.15},
                                              {"exit": "e2", "macs": 300, "of_original": 0.3},
                                              {"exit": "final", "macs": 500, "of_original": 0.5}]},
    }


def test_channel_row_scales_its_curve_to_the_unpruned_macs_and_shows_its_speed(wp: ModuleType) -> None:
    reports = {"joint": report(0.88, 5), "ordered": None, "channel": channel_report(0.87)}
    # The channel network's own sweep is in its own MACs: cost 0.4 of it is 0.2 of the unpruned network's.
    sweeps = {"unpruned": sweep((0.3, 0.6), (1.0, 0.9)), "channel": sweep((0.2, 0.7), (0.4, 0.8), (1.0, 0.87))}
    speeds = {"channel": {"points": [{"speedup_vs_baseline": 1.81, "speedup_vs_baseline_min": 1.7,
                                      "speedup_vs_baseline_max": 1.9}]}}
    table = wp.tabulate(reports, sweeps, speeds)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["e2"].endswith(" | 75.00% | 0.300 |")  # channel accuracy and its cost of the unpruned MACs
    # best 87%; at 0.1 nothing yet (its cheapest point is 0.2 x 0.5 = 0.1: 70%), at 0.15 between (0.1, 70%) and
    # (0.2, 80%): 75%; at 0.2: 80%; at 0.5 (its last point, cost 0.5): 87%; 86% (unpruned best minus 4 points)
    # at 0.2 + 6/7 x 0.3 = 0.457
    assert rows["channel"] == ("| channel | widths 12/22/46 of 16/32/64 | dense | dense | dense | 0.500 | 87.00% | "
                               "70.00% | 75.00% | 80.00% | 87.00% | 0.457 | 1.81x (1.70–1.90) |")


def test_table_says_when_a_network_never_reaches_the_mark(wp: ModuleType) -> None:
    table = wp.tabulate({"joint": report(0.8, 5), "ordered": None},
                        {"unpruned": sweep((1.0, 0.9)), "joint": sweep((0.4, 0.8))})
    joint = next(line for line in table.splitlines() if line.startswith("| joint "))
    assert joint.endswith(" | never | – |")
    assert not any(line.startswith("| ordered ") for line in table.splitlines())


def test_plot_writes_the_three_figures(wp: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    reports = {"joint": report(0.88, 5), "ordered": report(0.86, 2)}
    sweeps = {"unpruned": sweep((0.3, 0.6), (1.0, 0.9)), "joint": sweep((0.1, 0.7), (0.4, 0.88)), "ordered": None}
    written = wp.plot(reports, sweeps, tmp_path / "wp")
    assert [p.name for p in written] == ["wp-sparsity.png", "wp-exits.png", "wp-cost.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_the_results_page_gets_the_pages_headers_and_exit_numbers(wp: ModuleType) -> None:
    reports = {"joint": report(0.88, 5), "ordered": report(0.86, 2), "channel": channel_report(0.87)}
    for r in reports.values():  # the shipped ResNet-20's exit names: the stem first, the final exit last
        r["costs"]["exits"][0]["exit"] = "stem"
        for key in ("accuracy", "baseline_accuracy"):
            r[key]["stem"] = r[key].pop("e1")
    sweeps = {"unpruned": sweep((0.3, 0.6), (1.0, 0.9)), "joint": sweep((0.1, 0.7), (0.4, 0.88))}
    parts = wp.page_parts(reports, sweeps, {})
    page = (Path(__file__).resolve().parents[1] / "docs/results/weight-pruning.md").read_text()
    exits, networks = parts["exit_table"].splitlines(), parts["network_table"].splitlines()
    assert exits[0] in page and exits[1] in page
    assert [row.split(" | ")[0] for row in exits[2:]] == ["| 1 (stem)", "| 2", "| final"]
    assert exits[2] == "| 1 (stem) | 0.300 | 60.00% | 70.00% | 0.100 | 70.00% | 0.100 | 65.00% | 0.150 |"
    # the header names the accuracy mark: the unpruned network's best (90%) less 4 points
    assert networks[0] in page.replace("(89.84%)", "(86.00%)")
    assert networks[3] == ("| joint | 55.0% (50.0%; 60.0%) | 20.0% / 50.0% / 80.0% | 10.0% | 50.0% → 90.0% | "
                           "0.400 | 88.00% | 70.00% | 73.00% | 76.00% | 88.00% | 0.367 | – |")
