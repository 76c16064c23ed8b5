"""reproduce/budgeted.py: collecting evaluations into points, the plain family's envelope, the gaps at each budget and
the sentences, on small fake evaluations (nothing is trained or timed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def bt(load_script: Callable[[str], ModuleType]) -> ModuleType:
    return load_script("reproduce/budgeted.py")


FAMILY = {"sha-w16": "plain-resnet20-w16.safetensors", "sha-w8": "plain-resnet20-w8.safetensors",
          "sha-w4": "plain-resnet20-w4.safetensors"}


def evaluation(sha: str, points: list[tuple[str, float, int, list[float]]],
               compared: list[tuple[str, str, float, int, list[float]]]) -> dict[str, Any]:
    """An evaluate -o document with only what the script reads: (name, accuracy, macs, seconds per round)."""
    return {"checkpoint_sha256": sha, "unit": "macs", "samples": 100, "repeats": 2,
            "points": [{"name": n, "accuracy": a, "macs": m, "seconds": s} for n, a, m, s in points],
            "compared": [{"name": n, "checkpoint_sha256": h, "accuracy": a, "macs": m, "seconds": s}
                         for n, h, a, m, s in compared]}


def test_speed_ups_are_medians_of_ratios_within_rounds(bt: ModuleType) -> None:
    # the second round is twice as slow for both: the ratio is the same in each round
    assert bt.speedups([2.0, 4.0, 3.0], [1.0, 2.0, 1.0]) == (2.0, 2.0, 3.0)


def test_collect_against_the_reference_in_the_same_run(bt: ModuleType) -> None:
    """The width-16 network compared (exits on the width-8 one): points against its seconds, MACs against its."""
    doc = evaluation("sha-w8", [("plain", 0.90, 250, [1.0, 2.0]), ("0: budget 0.5", 0.85, 125, [0.5, 1.25])],
                     [("plain-resnet20-w16.safetensors", "sha-w16", 0.93, 1000, [4.0, 8.0]),
                      ("plain-resnet20-w4.safetensors", "sha-w4", 0.88, 70, [0.4, 0.8]),
                      ("someone-else.safetensors", "sha-other", 0.5, 10, [0.1, 0.2])])
    method, family = bt.collect("E²CM on w8", doc, "sha-w16", FAMILY)
    assert [p.name for p in method] == ["0: budget 0.5"]  # the plain width-8 network is the family's
    (point,) = method
    assert point.method == "E²CM on w8" and point.accuracy == 0.85 and point.macs_cost == pytest.approx(0.125)
    assert (point.speedup, point.speedup_min, point.speedup_max) == pytest.approx((7.2, 6.4, 8.0))
    assert point.wall_cost == pytest.approx(1 / 7.2)
    assert sorted(p.name for p in family) == sorted(FAMILY.values())  # someone else's network is left out
    w16 = next(p for p in family if p.name == FAMILY["sha-w16"])
    assert w16.speedup == 1.0 and w16.macs_cost == 1.0
    w4 = next(p for p in family if p.name == FAMILY["sha-w4"])
    assert w4.speedup == pytest.approx(10.0) and w4.macs_cost == pytest.approx(0.07)


def test_a_network_outside_the_family_is_a_point_of_its_method(bt: ModuleType) -> None:
    """A channel-pruned network evaluated plain: its plain row is the method's point; the reference is compared."""
    doc = evaluation("sha-pruned", [("plain", 0.91, 500, [2.0, 2.0])],
                     [("plain-resnet20-w16.safetensors", "sha-w16", 0.93, 1000, [3.0, 3.0])])
    method, family = bt.collect("channel 50%", doc, "sha-w16", FAMILY)
    assert [(p.name, p.macs_cost, p.speedup) for p in method] == [("plain", 0.5, 1.5)]
    assert [p.name for p in family] == [FAMILY["sha-w16"]]


def test_collect_needs_the_reference_and_macs(bt: ModuleType) -> None:
    doc = evaluation("sha-w8", [("plain", 0.9, 250, [1.0])], [])
    with pytest.raises(ValueError, match="reference network"):
        bt.collect("m", doc, "sha-w16", FAMILY)
    with pytest.raises(ValueError, match="not macs"):
        bt.collect("m", {**doc, "unit": "gmacs"}, "sha-w8", FAMILY)


def point(bt: ModuleType, wall_cost: float, accuracy: float, name: str = "p") -> Any:
    return bt.Point("m", name, accuracy, wall_cost, 1 / wall_cost, 1 / wall_cost, 1 / wall_cost)


def test_the_envelope_is_the_upper_concave_hull(bt: ModuleType) -> None:
    family = [point(bt, c, a) for c, a in ((0.1, 0.80), (0.2, 0.82), (0.25, 0.90), (0.5, 0.92), (1.0, 0.94),
                                            (1.6, 0.93), (0.3, 0.85))]
    hull = bt.envelope(family)
    # (0.2, 0.82) lies under the chord from (0.1, 0.80) to (0.25, 0.90); (0.3, 0.85) and (1.6, 0.93) are dominated
    assert [c for c, _ in hull] == pytest.approx([0.1, 0.25, 0.5, 1.0])
    assert [a for _, a in hull] == [0.80, 0.90, 0.92, 0.94]
    assert bt.curve_accuracy(hull, 0.05) is None
    assert bt.curve_accuracy(hull, 0.2) == pytest.approx(0.80 + 0.10 * (0.1 / 0.15))
    assert bt.curve_accuracy(hull, 0.75) == pytest.approx(0.93)
    assert bt.curve_accuracy(hull, 2.0) == pytest.approx(0.94)
    # a member on the chord of its neighbours adds nothing (numbers exact in binary: no rounding decides it)
    assert bt.envelope([point(bt, 0.25, 0.5), point(bt, 0.5, 0.625), point(bt, 1.0, 0.875)]) == [(0.25, 0.5),
                                                                                                 (1.0, 0.875)]


def test_gaps_take_the_best_point_within_each_budget(bt: ModuleType) -> None:
    hull = [(0.1, 0.80), (0.5, 0.90)]
    early = [point(bt, 0.12, 0.86, "a"), point(bt, 0.18, 0.84, "b"), point(bt, 0.45, 0.87, "c")]
    found = {g.budget: g for g in bt.gaps(early, hull, budgets=(0.1, 0.15, 0.2, 0.5))}
    assert found[0.1].accuracy is None and found[0.1].points is None  # no point that fast
    assert found[0.15].point == "a" and found[0.15].points == pytest.approx(100 * (0.86 - 0.8125))
    assert found[0.2].point == "a" and found[0.2].plain == pytest.approx(0.825)
    assert found[0.5].point == "c" and found[0.5].points == pytest.approx(-3.0)


def gap(bt: ModuleType, budget: float, accuracy: float | None, plain: float | None) -> Any:
    return bt.Gap(budget, accuracy, None if accuracy is None else "p", plain)


def test_one_sentence_says_where_ahead_level_and_behind(bt: ModuleType) -> None:
    found = [gap(bt, 0.1, None, 0.8), gap(bt, 0.15, 0.85, None), gap(bt, 0.2, 0.87, 0.85),
             gap(bt, 0.25, 0.86, 0.85), gap(bt, 0.3, 0.861, 0.858), gap(bt, 0.4, 0.85, 0.88),
             gap(bt, 0.5, 0.85, 0.89), gap(bt, 0.6, 0.88, 0.883)]
    assert bt.verdict("E²CM", found) == (
        "E²CM: ahead of the plain curve at 0.2\u20130.25 (by up to 2.0 points, at 0.2); level with it (within 0.5 "
        "points) at 0.3 and 0.6; behind it at 0.4\u20130.5 (by up to 4.0 points, at 0.5); faster than every plain "
        "network at 0.15; no point that fast at 0.1.")
    assert bt.verdict("x", [gap(bt, 0.1, 0.8, 0.9)]) == ("x: behind the plain curve at 0.1 (by up to 10.0 points, "
                                                         "at 0.1).")
    assert bt.verdict("y", [gap(bt, 0.1, None, 0.9)]) == "y: no point that fast at 0.1."


def test_best_of_all_is_the_method_furthest_ahead_at_each_budget(bt: ModuleType) -> None:
    budgets = bt.GAP_BUDGETS
    by_method = {"a": [gap(bt, b, 0.80, 0.85) for b in budgets],
                 "b": [gap(bt, b, 0.90 if b < 0.3 else None, 0.85) for b in budgets]}
    best = bt.best_of_all(by_method)
    assert [g.point.split(":")[0] for g in best] == ["b" if b < 0.3 else "a" for b in budgets]
    assert best[0].points == pytest.approx(5.0) and best[-1].points == pytest.approx(-5.0)


def test_load_range_reads_uptime_lines(bt: ModuleType) -> None:
    text = (" 10:47:11 up 17 min,  0 user,  load average: 8.78, 7.36, 4.19\n"
            " 10:57:03 up 27 min,  0 user,  load average: 13.93, 11.40, 7.58\n")
    assert bt.load_range(text) == (8.78, 13.93) and bt.load_range("") is None


def test_the_page_holds_the_tables_the_sentences_and_the_goal(bt: ModuleType, tmp_path: Path) -> None:
    family = [point(bt, 0.1, 0.85, "plain-resnet20-w4.safetensors"), point(bt, 1.0, 0.93, REFERENCE_NAME)]
    early = [point(bt, 0.2, 0.90, "0: budget 0.2")]
    hull = bt.envelope(family)
    by_method = {"m": bt.gaps(early, hull)}
    sentences = [bt.verdict("m", by_method["m"])]
    recipe = {"data": "Fashion-MNIST", "samples": 10000, "config": "eetool/configs/x.yaml", "epochs": 12, "threads": 1,
              "repeats": 3, "cpus": 2, "load": (1.5, 2.5), "figure": "../budgeted.png",
              "family": ["ResNet-20 width 4", "ResNet-20 width 16"], "missing_family": [], "missing_methods": []}
    text = bt.page(family, early, by_method, bt.gaps([], hull), sentences, recipe)
    assert "left out" not in text  # a run of everything the Makefile makes
    assert "12 epochs" in text and "eetool/configs/x.yaml" in text and "1.50 to 2.50" in text
    assert "| m | 0: budget 0.2 | 90.00% |" in text and f"- {sentences[0]}" in text
    assert "![accuracy against wall time and MACs](../budgeted.png)" in text
    # at 0.2 the curve is at 0.85 + 0.08 * 0.1 / 0.9: the point is ahead there; it has none at 0.1 and 0.15
    assert "falls short" not in text
    assert "on or above the plain family's curve (within 0.5 points) at 0.2\u20130.6" in text
    pytest.importorskip("matplotlib")
    bt.plot(tmp_path / "f.png", family, hull, {"m": early})
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


REFERENCE_NAME = "plain-resnet20-w16.safetensors"


def test_main_writes_the_page_from_the_evaluations_found(bt: ModuleType, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder as make budgeted leaves it (the networks stand for themselves by their bytes' sha256), one
    method's evaluation missing and one the script has no label for."""
    import hashlib

    import yaml

    folder = tmp_path / "budgeted"
    folder.mkdir()
    sha = {}
    for name in ("plain-resnet20-w16", "plain-resnet20-w8"):
        (folder / f"{name}.safetensors").write_bytes(name.encode())
        sha[name] = hashlib.sha256(name.encode()).hexdigest()
    w16 = ("plain-resnet20-w16.safetensors", sha["plain-resnet20-w16"], 0.93, 1000, [4.0, 4.0])
    w8 = ("plain-resnet20-w8.safetensors", sha["plain-resnet20-w8"], 0.92, 250, [1.5, 1.5])
    docs = {"family": evaluation(sha["plain-resnet20-w16"], [("plain", 0.93, 1000, [4.0, 4.0])], [w8[:5]]),
            "sdn": evaluation(sha["plain-resnet20-w16"], [("plain", 0.93, 1000, [4.0, 4.0]),
                                                          ("0: budget 0.25", 0.925, 260, [1.2, 1.2])], [w8]),
            "new-method": evaluation("sha-new", [("plain", 0.90, 300, [1.0, 1.0])], [w16, w8])}
    for name, doc in docs.items():
        (folder / f"eval-{name}.yaml").write_text(yaml.safe_dump(doc))
    (folder / "load.txt").write_text(" 10:00:00 up 1 min,  0 user,  load average: 1.00, 1.00, 1.00\n")
    page, figure = tmp_path / "docs" / "results" / "budgeted.md", tmp_path / "docs" / "budgeted.png"
    page.parent.mkdir(parents=True)
    pytest.importorskip("matplotlib")
    monkeypatch.setattr("sys.argv", ["budgeted.py", str(folder), "--epochs", "3", "--page", str(page),
                                     "--figure", str(figure)])
    bt.main()
    text = page.read_text()
    # SDN heads (labelled) before the unlabelled method; its 0.3 of the time reaches 92.5% where the family's
    # envelope, from the width-8 network at 0.375, has no network at all
    assert "| SDN heads | 0: budget 0.25 | 92.50% | 0.260 | 3.33x (3.33\u20133.33) | 0.300 |" in text
    assert "| new-method | plain | 90.00% | 0.300 | 4.00x" in text
    assert text.index("- SDN heads:") < text.index("- new-method:")
    assert ("SDN heads: level with the plain curve (within 0.5 points) at 0.4\u20130.6; faster than every plain "
            "network at 0.3; no point that fast at 0.1\u20130.25.") in text and "3 epochs" in text
    assert "![accuracy against wall time and MACs](../budgeted.png)" in text and figure.is_file()
    # a partial run says what it left out: five of the seven plain networks and every method but SDN heads
    assert "3 epochs): ResNet-20 width 8, ResNet-20 width 16. This run left out: ResNet-20 width 4;" in text
    assert "ResNet-32 width 16; E²CM, softmax rule;" in text and "SDN heads;" not in text


def test_a_run_timed_beside_part_of_the_family_is_named_with_what_it_lacks(bt: ModuleType) -> None:
    """An evaluation from before the family grew: the page names it and the members its run did not time."""
    family = [point(bt, 0.1, 0.85, "plain-resnet20-w4.safetensors"),
              point(bt, 0.6, 0.92, "plain-resnet20-w12.safetensors"), point(bt, 1.0, 0.93, REFERENCE_NAME),
              point(bt, 1.6, 0.935, "plain-resnet32-w16.safetensors")]
    stale, whole = [family[0], family[2]], family
    partial = bt.partial_runs(family, {"old": stale, "new": whole})
    assert partial == {"old": ["plain-resnet20-w12.safetensors", "plain-resnet32-w16.safetensors"]}
    text = bt.partial_text(partial)
    assert "old (without ResNet-20 width 12, ResNet-32 width 16)" in text and "new" not in text
    assert bt.partial_text({}) == ""
    # the stale run's curve at 0.6 is the chord from width 4 to width 16, 2.6 points under the whole family's
    assert 100 * (bt.curve_accuracy(bt.envelope(whole), 0.6) - bt.curve_accuracy(bt.envelope(stale), 0.6)) > 2
    early = [point(bt, 0.5, 0.90, "0: budget 0.5")]
    by_method = {"old": bt.gaps(early, bt.envelope(stale))}
    recipe = {"data": "Fashion-MNIST", "samples": 10000, "config": "c.yaml", "epochs": 3, "threads": 1,
              "repeats": 1, "cpus": 2, "load": None, "figure": None, "family": [], "missing_family": [],
              "missing_methods": []}
    page = bt.page(family, early, by_method, bt.gaps([], bt.envelope(family)), ["old: ..."], recipe, partial)
    assert text in page and page.index(text) < page.index("The best early-exit configuration")


def test_the_page_says_how_many_epochs_this_runs_heads_were_trained(bt: ModuleType, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    heads = tmp_path / "heads.safetensors"
    save_file({"w": torch.zeros(1)}, str(heads), metadata={"format": "pt", "eetool.args": '{"epochs": 1}'})
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(1)}, str(bare), metadata={"format": "pt"})
    assert bt.recorded_epochs(heads) == 1
    assert bt.recorded_epochs(bare) is None
    assert bt.head_epochs_text({}) == ""
    text = bt.head_epochs_text({"width 16": 1, "width 8": 6})
    assert text.endswith("trained for: width 16 1 epoch, width 8 6 epochs.")


def bundles_doc(runs: list[tuple[str, str, str, str, float, float, list[float]]]) -> dict[str, Any]:
    """A bundles.yaml (reproduce/budgeted_bundles.py): (bundle, method, kind, name, accuracy, macs, seconds)."""
    return {"runtime": "onnxruntime 1.0", "threads": 1, "batch": 256, "rounds": 2, "samples": 100,
            "reference": "bundle-plain-resnet20-w16", "load": [1.0, 2.0],
            "runs": [{"bundle": b, "method": m, "kind": k, "name": n, "accuracy": a, "macs": c, "seconds": s}
                     for b, m, k, n, a, c, s in runs]}


def test_bundles_are_set_against_the_exported_family_round_by_round(bt: ModuleType) -> None:
    doc = bundles_doc([
        ("bundle-plain-resnet20-w16", "family", "family", "bundle-plain-resnet20-w16", 0.93, 1000.0, [2.0, 4.0]),
        ("bundle-plain-resnet20-w8", "family", "family", "bundle-plain-resnet20-w8", 0.90, 250.0, [0.5, 1.0]),
        ("bundle-sdn", "sdn (float)", "point", "0: budget 0.25", 0.91, 260.0, [0.5, 2.0]),
        ("bundle-sdn-int8", "sdn (int8)", "point", "0: budget 0.25", 0.904, 260.0, [0.25, 0.5]),
    ])  # methods named by make budgeted's stem and the bundle's precision
    family, methods = bt.bundle_points(doc)
    assert [p.name for p in family] == ["plain-resnet20-w16.safetensors", "plain-resnet20-w8.safetensors"]
    assert family[1].speedup == 4.0 and family[1].macs_cost == 0.25
    # round by round: 2/0.5 = 4 and 4/2 = 2, median 3; int8 8x in both rounds
    assert methods["SDN heads, float bundle"][0].speedup == 3.0
    assert methods["SDN heads, int8 bundle"][0].speedup == 8.0
    text = bt.bundles_section(doc)
    assert "| SDN heads, int8 bundle | 0: budget 0.25 | 90.40% | 0.260 | 8.00x" in text
    # int8 at wall cost 0.125, 90.4%: the curve runs from the width-8 bundle (0.25, 90%) to the width-16 one (1, 93%),
    # 90.2% at 0.3, 90.6% at 0.4, 91.0% at 0.5, 91.4% at 0.6; below 0.25 no plain bundle is that fast
    assert ("SDN heads, int8 bundle: level with the plain curve (within 0.5 points) at 0.25\u20130.4; "
            "behind it at 0.5\u20130.6 (by up to 1.0 points, at 0.6); faster than every plain network at "
            "0.15\u20130.2; no point that fast at 0.1.") in text
    assert bt.bundles_section(None) == ""


def test_bundles_need_their_reference(bt: ModuleType) -> None:
    doc = bundles_doc([("bundle-plain-resnet20-w8", "family", "family", "x", 0.9, 250.0, [1.0])])
    with pytest.raises(ValueError, match="reference bundle"):
        bt.bundle_points(doc)
