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
    assert "Exit 4 of CBT [0.95, 0.998]" not in table  # no CBT [0.95, 0.998] evaluation
    # on ADP-C's line from (0.40, 0.60) to (0.46, 0.90), mIoU 0.45 costs 0.85: CBT's 0.72 is 15.3% less
    assert "cbt-0.99 0.7200 against 0.8500 (-15.3%)" in table
    # below ADP-C's least mIoU the curve cannot be read, but ADP-C 0.9 is more accurate and cheaper
    assert "cbt-0.9 0.6500: dominated by adpc-0.9" in table
    assert "| b | 0 | absent | 0.9980 |" in table and "| σ | | | 0.0038 |" in table


def test_the_plan_calibrates_once_and_fits_every_cbt_row_from_the_file(seg: ModuleType, tmp_path: Path) -> None:
    a = plan_args(data="brain-atlas", width=32, head_width=64, epochs=60, batch_size=4, eval_batch_size=8)
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


def plan_args(**changes: Any) -> Any:
    import argparse

    a = argparse.Namespace(data="fashion-mnist-scenes", arch="eeseg", width=16, head_width=32, epochs=4, lr=0.003,
                           batch_size=16, exit_epochs=3, exit_lr=0.003, eval_batch_size=256, seed=0, threads=1,
                           repeats=1, train_scenes=0, calibration_scenes=0, test_scenes=0)
    vars(a).update(changes)
    return a


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_eesegs_plan_trains_it_with_its_exits_and_nothing_more(seg: ModuleType, tmp_path: Path) -> None:
    steps = seg.plan(tmp_path, plan_args())
    assert [s.name for s in steps[:2]] == ["train", "calibrate"]
    assert not any(s.name == "train-exits" or s.argv[3] == "train-exits" for s in steps)
    train = steps[0]
    assert train.argv[3:] == [
        "train", "--data", "fashion-mnist-scenes", "--split", "train", "--arch", "eeseg",
        "--arch-args", '{"width": 16, "head_width": 32}', "--epochs", "4", "--optimizer", "adamw", "--lr", "0.003",
        "--weight-decay", "0.0001", "--batch-size", "16", "--schedule", "cosine", "--no-augment", "--eval-split",
        "test", "--seed", "0", "-o", str(tmp_path / "eeseg.safetensors"), "--force", "--threads", "1",
        "--no-progress", "-q"]
    model = str(tmp_path / "eeseg.safetensors")
    for s in steps[1:]:
        assert option(s.argv, "-c") == model
    assert steps[1].needs == ["train"]
    assert {tuple(s.needs) for s in steps if s.name.startswith("fit-adpc")} == {("train",)}


def test_a_torchvision_plan_trains_the_network_then_its_exit_heads(seg: ModuleType, tmp_path: Path) -> None:
    arch = "lraspp_mobilenet_v3_large"
    (tmp_path / "train-scenes.txt").write_text("0\n1\n")
    steps = seg.plan(tmp_path, plan_args(arch=arch, epochs=6, lr=0.002, exit_epochs=2, exit_lr=0.004,
                                         train_scenes=2))
    by_name = {s.name: s for s in steps}
    assert [s.name for s in steps[:3]] == ["train", "train-exits", "calibrate"]
    plain, with_exits = tmp_path / f"{arch}.safetensors", tmp_path / f"{arch}-exits.safetensors"
    train = by_name["train"]
    assert train.argv[3] == "train" and option(train.argv, "--arch") == arch
    assert "--arch-args" not in train.argv  # eeseg's width and head width are not torchvision's arguments
    assert (option(train.argv, "--epochs"), option(train.argv, "--lr"), option(train.argv, "-o")) == (
        "6", "0.002", str(plain))
    assert train.output == plain and train.needs == []
    heads = by_name["train-exits"]
    assert heads.argv[3] == "train-exits" and heads.needs == ["train"] and heads.output == with_exits
    assert (option(heads.argv, "-c"), option(heads.argv, "--data"), option(heads.argv, "--epochs"),
            option(heads.argv, "--lr"), option(heads.argv, "-o"), option(heads.argv, "--indices")) == (
        str(plain), "fashion-mnist-scenes", "2", "0.004", str(with_exits), str(tmp_path / "train-scenes.txt"))
    assert "--joint" not in heads.argv  # the backbone stays frozen: train-exits' default
    # calibration, every fit and every evaluation read the checkpoint with the exit heads, and wait for it
    for s in steps[2:]:
        assert option(s.argv, "-c") == str(with_exits)
    assert by_name["calibrate"].needs == ["train-exits"]
    for name, _, method in seg.METHODS:  # the feature-level rows too, as for eeseg
        assert by_name[f"fit-{name}"].needs == (["train-exits"] if method[1] == "adp-c" else ["calibrate"])
        assert by_name[f"eval-{name}"].needs == [f"fit-{name}"]
    # the same steps after training as eeseg's, argument for argument but the checkpoint
    eeseg = seg.plan(tmp_path, plan_args(train_scenes=2))
    assert [s.name for s in eeseg[1:]] == [s.name for s in steps[2:]]
    for ours, theirs in zip(steps[2:], eeseg[1:], strict=True):
        assert [str(with_exits) if x == str(tmp_path / "eeseg.safetensors") else x for x in theirs.argv] == ours.argv


def test_the_table_names_the_network(seg: ModuleType) -> None:
    evals = {name: None for name, _, _ in seg.METHODS}
    evals["cbt-0.99"] = evaluation(0.45, 0.72, [(0.20, 0.01), (0.29, 0.018), (0.42, 0.024), (0.45, 0.0288)])
    evals["cbt-0.99"]["points"][1]["executed_cost"] = 0.81
    evals["cbt-0.99"]["per_class_iou"] = {"plain": {"bg": 0.9, "a": 0.25, "b": None}}
    table = seg.tabulate(evals, {name: None for name, _, _ in seg.METHODS}, model="lraspp_mobilenet_v3_large")
    assert "| lraspp_mobilenet_v3_large (this run) | CBT [0.99, 0.998] | 20.00 | 0.0100 |" in table
    assert "eeseg" not in table
    assert "IoU (%) per class: bg 90.0, a 25.0, absent." in table
    assert "| CBT [0.99, 0.998] | 45.00 | 88.00 | 0.7200 | 0.8100 | 0.0288 |" in table


def test_matching_adp_cs_exit_3_at_a_higher_cost_does_not_reproduce_the_claim(seg: ModuleType) -> None:
    evals = {name: None for name, _, _ in seg.METHODS}
    evals["adpc-0.998"] = evaluation(0.46, 0.90, [(0.20, 0.01), (0.30, 0.02), (0.40, 0.03), (0.46, 0.036)])
    fits = {name: None for name, _, _ in seg.METHODS}
    # exit 4 of CBT [0.95, 0.998] above ADP-C's exit 3 in mIoU, once dearer and once cheaper than it
    evals["cbt-0.95"] = evaluation(0.44, 0.80, [(0.20, 0.01), (0.29, 0.018), (0.35, 0.024), (0.44, 0.045)])
    assert "44.00 against 40.00 mIoU (matches it) at +50.0% GFLOPs: not reproduced." in seg.tabulate(evals, fits)
    evals["cbt-0.95"] = evaluation(0.44, 0.80, [(0.20, 0.01), (0.29, 0.018), (0.35, 0.024), (0.44, 0.027)])
    assert "44.00 against 40.00 mIoU (matches it) at -10.0% GFLOPs: agrees." in seg.tabulate(evals, fits)
