"""reproduce/segmentation.py: its equal-mIoU reading and its table on small fake evaluations (nothing is run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def seg(load_script: Callable[[str], ModuleType]) -> ModuleType:
    return load_script("reproduce/segmentation.py")


def evaluation(miou: float, cost: float, anytime: list[tuple[float, float]]) -> dict[str, Any]:
    exits = ("exit1", "exit2", "exit3", "final")
    plain = {"miou": 0.5, "pixel_accuracy": 0.9, "cost": 1.0, "gflops": 0.04, "throughput": 100.0}
    early = {"miou": miou, "pixel_accuracy": 0.88, "cost": cost, "gflops": 0.04 * cost, "speedup": 0.5,
             "exit_shares": dict(zip(exits, (0.7, 0.1, 0.1, 0.1), strict=True)),
             "anytime": {e: {"miou": m, "gflops": g} for e, (m, g) in zip(exits, anytime, strict=True)}}
    return {"points": [plain, early]}


def fit(alpha: float, thresholds: list[float], spread: float) -> dict[str, Any]:
    return {"alpha": alpha, "beta": 0.998, "classes": ["bg", "a", "b"], "thresholds": [thresholds] * 3,
            "spread": spread, "statistics": {"scores": [0.9, 0.2, None], "pixels": {"bg": 900, "a": 90, "b": 0}}}


def test_cost_at_miou_interpolates_the_cheapest_segment(seg: ModuleType) -> None:
    curve = [(0.40, 0.60), (0.44, 0.70), (0.46, 0.90)]  # (mIoU, cost) of three thresholds
    assert seg.cost_at_miou(curve, 0.42) == pytest.approx(0.65)
    assert seg.cost_at_miou(curve, 0.45) == pytest.approx(0.80)
    assert seg.cost_at_miou(curve, 0.40) == pytest.approx(0.60)
    assert seg.cost_at_miou(curve, 0.47) is None and seg.cost_at_miou(curve, 0.39) is None
    # a curve that dips: the cheaper of the two segments reaching the mIoU
    dipping = [(0.40, 0.5), (0.46, 0.6), (0.42, 0.7), (0.47, 0.8)]
    assert seg.cost_at_miou(dipping, 0.44) == pytest.approx(0.5 + 0.1 * 2 / 3)


def test_table_puts_this_run_beside_the_thesis_and_checks_its_claims(seg: ModuleType) -> None:
    evals = {name: None for name, _, _ in seg.METHODS}
    evals["adpc-0.998"] = evaluation(0.46, 0.90, [(0.20, 0.01), (0.30, 0.02), (0.44, 0.03), (0.46, 0.036)])
    evals["adpc-0.9"] = evaluation(0.40, 0.60, [(0.20, 0.01), (0.28, 0.015), (0.38, 0.02), (0.40, 0.024)])
    evals["cbt-0.99"] = evaluation(0.45, 0.72, [(0.20, 0.01), (0.29, 0.018), (0.42, 0.024), (0.45, 0.0288)])
    evals["cbt-0.9"] = evaluation(0.39, 0.65, [(0.20, 0.01), (0.27, 0.016), (0.37, 0.021), (0.39, 0.026)])
    fits = {name: None for name, _, _ in seg.METHODS}
    fits["cbt-0.99"] = fit(0.99, [0.99, 0.998, 0.998], 0.0038)
    table = seg.tabulate(evals, fits)
    assert "| eeseg (this run) | CBT [0.99, 0.998] | 20.00 | 0.0100 | 29.00 | 0.0180 | 42.00 | 0.0240 | 45.00 | " \
           "0.0288 |" in table
    assert "| HRNetV2-W48 | CBT [0.99, 0.998] | 44.34 | 41.92 | 59.85 | 84.02 | 76.29 | 206.89 | 80.69 | 299.10 |" \
           in table
    assert "| HRNetV2-W18 | CBT [0.7, 0.998] | 4.89 | 5.88 |" in table  # Table IV
    assert "-20.0% cost for -1.00 mIoU" in table  # CBT [0.99, 0.998] against ADP-C at the last exit
    assert "-10.0% and -20.0%" in table  # exits 2 and 3 against ADP-C
    # on ADP-C's line from (0.40, 0.60) to (0.46, 0.90), mIoU 0.45 costs 0.85: CBT's 0.72 is 15.3% less
    assert "cbt-0.99 0.7200 against 0.8500 (-15.3%)" in table
    # below ADP-C's least mIoU the curve cannot be read, but ADP-C 0.9 is more accurate and cheaper
    assert "cbt-0.9 0.6500: dominated by adpc-0.9" in table
    assert "| b | 0 | absent | 0.9980 |" in table and "| σ | | | 0.0038 |" in table


def test_the_plan_calibrates_once_and_fits_every_cbt_row_from_the_file(seg: ModuleType, tmp_path: Path) -> None:
    import argparse

    a = argparse.Namespace(data="brain-atlas", width=32, head_width=64, epochs=60, lr=0.003, batch_size=4,
                           eval_batch_size=8, seed=0, threads=1, repeats=1, train_scenes=0, calibration_scenes=0,
                           test_scenes=0)
    steps = {s.name: s for s in seg.plan(tmp_path, a)}
    passes = [s for s in steps.values() if s.argv[3:4] == ["calibrate-means"]]
    assert [s.name for s in passes] == ["calibrate"]
    assert passes[0].argv[passes[0].argv.index("--batch-size") + 1] == "8"
    statistics = str(passes[0].output)
    for name, _, method in seg.METHODS:
        fit = steps[f"fit-{name}"]
        if method[1] == "adp-c":
            assert "--means" not in fit.argv and fit.needs == ["train"]
        else:
            assert fit.argv[fit.argv.index("--means") + 1] == statistics and fit.needs == ["calibrate"]
        assert "--data" not in fit.argv  # no fit reads the data again
        assert "brain-atlas" in steps[f"eval-{name}"].argv
