"""The thresholds artifact owns its format: what it saves, it loads unchanged; what it loads, it checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eetool.classification.thresholds_artifact import KIND, ExitThresholds, OperatingPoint
from eetool.core.artifacts import Provenance
from eetool.core.errors import InputError, UsageError


def made(points: list[OperatingPoint], method: str = "e2cm+sdn") -> ExitThresholds:
    return ExitThresholds(method=method, combine="or", search="greedy", cost_basis="dense", fitted_on="demo/train:x",
                          reachable=(0.21, 1.0), swept=0, points=points,
                          provenance=Provenance(kind=KIND, checkpoint_sha256="a" * 64, exits=["e1", "e2"]))


POINTS = [OperatingPoint(budget=0.5, cost=0.49, accuracy=0.9, thresholds=[0.1234567891234, 2.0]),
          OperatingPoint(budget=0.8, cost=0.8, accuracy=0.95, thresholds=[0.5, 0.25])]


def test_what_it_saves_it_loads_unchanged(tmp_path: Path) -> None:
    path = str(tmp_path / "t.yaml")
    made(POINTS).save(path)
    loaded = ExitThresholds.load(path)
    assert loaded.to_doc() == made(POINTS).to_doc()
    assert loaded.points[0]["thresholds"][0] == 0.1234567891234  # unrounded: the fitted point exactly
    assert loaded.provenance.exits == ["e1", "e2"] and loaded.provenance.kind == KIND
    on_disk = yaml.safe_load(Path(path).read_text())
    assert on_disk["combine"] == "or" and on_disk["provenance"]["kind"] == KIND


def test_combine_is_recorded_only_for_methods_that_combine() -> None:
    assert made(POINTS, "e2cm+sdn").to_doc()["combine"] == "or"
    assert all("combine" not in made(POINTS, m).to_doc() for m in ("e2cm", "sdn", "entropy"))


def test_pick_names_points_by_index() -> None:
    t = made(POINTS)
    assert [i for i, _ in t.pick("all")] == [0, 1]
    assert t.pick("1") == [(1, POINTS[1])]
    for bad in ("2", "-1", "x", "0,"):
        with pytest.raises(UsageError):
            t.pick(bad)


@pytest.mark.parametrize(("points", "says"), [
    ([{"budget": 0.5, "thresholds": [0.1]}], "has 1 thresholds for 2 exits"),
    ([{"budget": 0.5, "thresholds": "0.1"}], "no list of thresholds"),
    ([{"budget": 0.5, "thresholds": [0.1, float("nan")]}], "not finite numbers"),
    ([{"budget": 0.5, "thresholds": [0.1, "x"]}], "not finite numbers"),
    ([{"budget": None, "thresholds": [0.1, 0.2]}], "no budget"),
])
def test_check_refuses_points_a_model_cannot_run(tmp_path: Path, points: list[dict[str, object]],
                                                  says: str) -> None:
    path = str(tmp_path / "t.yaml")
    made([OperatingPoint(**p) for p in points]).save(path)  # type: ignore[typeddict-item]
    loaded = ExitThresholds.load(path)
    with pytest.raises(InputError, match=says):
        loaded.check(2)


@pytest.mark.parametrize("change", [{"points": []}, {"points": [1]}, {"method": "magic"}])
def test_load_refuses_what_no_model_could_run(tmp_path: Path, change: dict[str, object]) -> None:
    path = tmp_path / "t.yaml"
    made(POINTS).save(str(path))
    doc = yaml.safe_load(path.read_text())
    doc.update(change)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError):
        ExitThresholds.load(str(path))
