"""calibrate-means, fit-thresholds and evaluate --means/--thresholds end to end on the tiny checkpoint and data:
what they write, what they print, and the provenance checks that refuse artifacts made for something else."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import invoke, ok, one_error_line, sha256
from typer.testing import Result

from eetool.classification.e2cm import ClassMeans, Pooling, distance_macs
from eetool.core.artifacts import Provenance
from eetool.core.budget_search import operating_point
from eetool.core.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.errors import ExitCode
from eetool.core.exits import build_exit_model

K = 10


def json_doc(result: Result) -> dict:
    doc = json.loads(ok(result).stdout)
    assert next(iter(doc)) == "schema"
    return doc


@dataclass
class Made:
    """Artifacts made once for the module."""

    folder: Path
    ckpt: str
    data: str
    means: Path  # --exits every, train split
    means_result: Result
    thresholds: Path  # --budget 0.5 from ``means``
    sweep: Path  # --sweep --step 0.05 from ``means``
    other_exits: Path  # class means of the same checkpoint and data for --exits half
    other_exits_doc: dict
    other_data: Path  # class means of the same checkpoint and exits on the test split
    other_ckpt: str  # the same architecture with other weights


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, tiny_spec: ModelSpec, tiny_checkpoint: str,
         tiny_data: str) -> Made:
    d = tmp_path_factory.mktemp("e2cm")
    means = d / "means.safetensors"
    means_result = ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", means,
                             "--batch-size", 32, "--device", "cpu"))
    thresholds = d / "thresholds.yaml"
    ok(invoke("fit-thresholds", "--means", means, "-o", thresholds, "--budget", 0.5, "-q"))
    sweep = d / "sweep.yaml"
    ok(invoke("fit-thresholds", "--means", means, "-o", sweep, "--sweep", "--step", 0.05, "-q"))
    other_exits = d / "means-half.safetensors"
    other_exits_doc = json_doc(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", other_exits,
                                      "--exits", "half", "--pool-spatial", 2, "--format", "json", "-q",
                                      "--device", "cpu"))
    other_data = d / "means-test.safetensors"
    ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "--split", "test", "-o", other_data, "-q",
              "--device", "cpu"))
    torch.manual_seed(1)
    other_ckpt = d / "other.safetensors"
    save_checkpoint(str(other_ckpt), tiny_spec.build(), tiny_spec, Provenance(kind="checkpoint"))
    return Made(d, tiny_checkpoint, tiny_data, means, means_result, thresholds, sweep, other_exits, other_exits_doc,
                other_data, str(other_ckpt))


def load_points(path: Path) -> tuple[dict, dict]:
    doc = yaml.safe_load(path.read_text())
    return doc, doc["provenance"]


# ---------------------------------------------------------------------------------------------
# calibrate-means


def test_calibrate_means_writes_the_class_means_of_the_checkpoint(made: Made) -> None:
    assert made.means_result.stderr == f"wrote {made.means}\n"
    cm = ClassMeans.load(str(made.means))
    prov = cm.provenance
    ckpt = load_checkpoint(made.ckpt)  # fresh, so that nothing the command did to its model can hide here
    em = build_exit_model(ckpt.model, "every")
    ds = load_dataset(made.data, "train")
    assert prov.kind == "class-means" and prov.checkpoint_sha256 == sha256(made.ckpt)
    assert prov.dataset == ds.fingerprint and prov.exits == cm.exits == em.exits
    assert prov.args["batch_size"] == 32 and prov.args["split"] == "train"
    with torch.no_grad():
        features, _ = em.features(Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)(ds.images))
    for got, f in zip(cm.means, features, strict=True):
        want = torch.stack([f[ds.labels == k].flatten(1).mean(0) for k in range(K)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert cm.calibration is not None and cm.calibration.confidence.shape == (96, len(cm.exits))


def test_calibrate_means_prints_a_table_per_exit(made: Made) -> None:
    cm = ClassMeans.load(str(made.means))
    lines = made.means_result.stdout.splitlines()
    assert re.match(r"^class means\s+\S+ \(96 samples of safetensors/train:[0-9a-f]{16}, split mode\)$", lines[0])
    header = next(i for i, line in enumerate(lines) if line.startswith("exit "))
    assert "means MB" in lines[header] and "overhead macs" in lines[header] and "exit cost" in lines[header]
    rows = [line.split() for line in lines[header + 2:]]
    assert [r[0] for r in rows] == cm.exits
    for row, m, over in zip(rows, cm.means, cm.cost_model().overhead_macs, strict=True):
        dim = m.shape[1]
        assert int(row[1]) == dim
        assert float(row[2]) == pytest.approx(K * dim * 4 / 2**20, abs=1e-4)  # means MB
        assert int(row[4].replace(",", "")) == over == distance_macs(dim, K)  # overhead in MACs


def test_calibrate_means_json(made: Made, tiny_checkpoint: str) -> None:
    doc = made.other_exits_doc
    assert doc["schema"] == "eetool/class-means@1"
    cm = ClassMeans.load(str(made.other_exits))
    prov = cm.provenance
    assert cm.pooling == Pooling(spatial=2) and prov.args["pool_spatial"] == 2
    em = build_exit_model(load_checkpoint(tiny_checkpoint).model, "half")
    rows = doc["exits"]
    assert [r["exit"] for r in rows] == em.exits == cm.exits
    shapes = em.exit_shapes((1, 28, 28))
    for r, shape in zip(rows, shapes, strict=True):
        assert r["dim"] == shape[0] * 2 * 2  # max-pooled to 2 x 2
        assert r["means_mb"] == round(K * r["dim"] * 4 / 2**20, 4)
        # the distances, plus one comparison per element of the exit's output for the pooling
        assert r["overhead_macs"] == distance_macs(r["dim"], K) + shape[0] * shape[1] * shape[2]
        assert 0 <= r["calibration_accuracy"] <= 1
        # auto: each exit predicts by the rule more accurate here (softmax on a tie), and says so
        assert r["predict"] == ("nearest" if r["nearest_accuracy"] > r["softmax_accuracy"] else "softmax")
        assert r["calibration_accuracy"] == r[f"{r['predict']}_accuracy"]
    assert cm.rules == [r["predict"] for r in rows] and doc["predict"] == "auto"
    costs = [r["cost_normalised"] for r in rows]
    assert costs == sorted(costs) and 0 < costs[0]
    assert doc["samples"] == 96 and doc["unit"] == "macs"
    assert doc["total_overhead_macs"] == sum(r["overhead_macs"] for r in rows)


@pytest.mark.parametrize("rule", ["softmax", "nearest"])
def test_calibrate_means_predicts_by_the_rule_asked(made: Made, workdir: Path, rule: str) -> None:
    doc = json_doc(invoke("calibrate-means", "-c", made.ckpt, "-d", made.data, "-o", "m.safetensors", "--predict",
                          rule, "--format", "json", "-q", "--device", "cpu"))
    cm = ClassMeans.load("m.safetensors")
    assert cm.rules == [rule] * len(cm.exits) and doc["predict"] == rule
    auto = ClassMeans.load(str(made.means))
    assert cm.calibration is not None and auto.calibration is not None
    for j, r in enumerate(doc["exits"]):
        assert r["predict"] == rule and r["calibration_accuracy"] == r[f"{rule}_accuracy"]
        if auto.rules[j] == rule:  # the cache holds the predictions of the exit's rule
            assert torch.equal(cm.calibration.prediction[:, j], auto.calibration.prediction[:, j])


def test_calibrate_means_refuses_an_unknown_prediction_rule(made: Made, workdir: Path) -> None:
    result = invoke("calibrate-means", "-c", made.ckpt, "-d", made.data, "-o", "m.safetensors", "--predict", "argmax")
    assert "--predict" in one_error_line(result, ExitCode.USAGE)
    assert not (workdir / "m.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# fit-thresholds


def test_fit_thresholds_for_a_budget(made: Made) -> None:
    doc, prov = load_points(made.thresholds)
    cm = ClassMeans.load(str(made.means))
    means_prov = cm.provenance
    assert doc["schema"] == "eetool/thresholds@1" and prov["kind"] == "thresholds"
    assert prov["inputs"] == {"class-means": sha256(made.means)}
    assert prov["checkpoint_sha256"] == sha256(made.ckpt) and prov["exits"] == cm.exits
    assert prov["dataset"] == doc["fitted_on"] == means_prov.dataset
    c = cm.calibration
    assert c is not None
    stats = cm.exit_stats(c.confidence, c.prediction, c.final_prediction, c.labels)
    low, high = stats.reachable()
    assert doc["reachable"] == [round(low, 6), round(min(high, 1.0), 6)]
    [point] = doc["points"]
    assert point["budget"] == 0.5 and point["cost"] <= 0.5
    assert len(point["thresholds"]) == len(cm.exits)
    # the written thresholds give back the fitted point on the calibration samples
    cost, acc = operating_point(stats, torch.tensor(point["thresholds"]))
    assert (round(cost, 6), round(acc, 6)) == (point["cost"], point["accuracy"])


def test_fit_thresholds_sweep_keeps_the_convex_hull(made: Made) -> None:
    doc, prov = load_points(made.sweep)
    low, high = doc["reachable"]
    grid = [round(i * 0.05, 10) for i in range(21)]
    assert doc["swept"] == len([b for b in grid if low <= b <= high])
    points = doc["points"]
    assert 1 <= len(points) <= doc["swept"]
    for a, b in zip(points, points[1:], strict=False):
        assert a["cost"] < b["cost"] and a["accuracy"] < b["accuracy"]
    assert all(p["cost"] <= p["budget"] + 1e-6 and p["budget"] in grid for p in points)
    assert prov["inputs"] == {"class-means": sha256(made.means)} and prov["args"]["step"] == 0.05


def test_fit_thresholds_json_and_bisect(made: Made, workdir: Path) -> None:
    doc = json_doc(invoke("fit-thresholds", "--means", made.means, "-o", "t.yaml", "--budget", 0.4, "--budget", 0.7,
                          "--search", "bisect", "--format", "json"))
    assert doc["schema"] == "eetool/thresholds@1" and doc["search"] == "bisect"
    assert [p["budget"] for p in doc["points"]] == [0.4, 0.7]
    written = yaml.safe_load((workdir / "t.yaml").read_text())
    assert written["points"] == doc["points"]


def test_fit_thresholds_refuses_an_unreachable_budget(made: Made, workdir: Path) -> None:
    cm = ClassMeans.load(str(made.means))
    first = cm.cost_model().normalised_exit_costs()[0]
    result = invoke("fit-thresholds", "--means", made.means, "-o", "t.yaml", "--budget", round(first / 2, 4))
    line = one_error_line(result, ExitCode.USAGE)
    assert f"reachable budgets are {first:.4f} to 1.0000" in line
    assert list(workdir.iterdir()) == []


def test_fit_thresholds_on_a_validation_split(made: Made, workdir: Path) -> None:
    result = ok(invoke("fit-thresholds", "--means", made.means, "-o", "t.yaml", "--budget", 0.6, "--validation",
                       "-c", made.ckpt, "-d", made.data, "--split", "test"))
    assert result.stderr == "wrote t.yaml\n"
    doc, prov = load_points(workdir / "t.yaml")
    test_fingerprint = load_dataset(made.data, "test").fingerprint
    assert prov["dataset"] == doc["fitted_on"] == test_fingerprint
    assert prov["inputs"] == {"class-means": sha256(made.means)}
    assert doc["points"][0]["cost"] <= 0.6
    same = ok(invoke("fit-thresholds", "--means", made.means, "-o", "u.yaml", "--budget", 0.6, "--validation",
                     "-c", made.ckpt, "-d", made.data, "--split", "train"))
    assert "not held out" in same.stderr


def test_fit_thresholds_refuses_to_overwrite_the_class_means(made: Made) -> None:
    before = sha256(made.means)
    result = invoke("fit-thresholds", "--means", made.means, "-o", made.means, "--budget", 0.5, "--force")
    assert "also an input" in one_error_line(result, ExitCode.OUTPUT)
    assert sha256(made.means) == before


# ---------------------------------------------------------------------------------------------
# evaluate with early exits


def test_evaluate_with_exits_reports_every_operating_point(made: Made) -> None:
    doc = json_doc(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", made.means, "--thresholds",
                          made.sweep, "--format", "json", "--batch-size", 32))
    cm = ClassMeans.load(str(made.means))
    fitted, _ = load_points(made.sweep)
    points = doc["points"]
    assert points[0]["name"] == "plain" and points[0]["cost"] == 1.0
    assert len(points) == 1 + len(fitted["points"])
    for i, (p, f) in enumerate(zip(points[1:], fitted["points"], strict=True)):
        assert p["name"] == f"{i}: budget {f['budget']:g}" and p["budget"] == f["budget"]
        shares = p["exit_shares"]
        assert list(shares) == [*cm.exits, "head"]
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
        counts = [round(s * doc["samples"]) for s in shares.values()]
        assert sum(counts) == doc["samples"]
        assert p["cost"] == pytest.approx(cm.cost_model().average(counts), abs=1e-6)
        assert 0 <= p["accuracy"] <= 1
    assert set(doc["per_class"]) == {p["name"] for p in points}


def test_evaluate_on_the_calibration_samples_reproduces_the_fitted_point(made: Made) -> None:
    doc = json_doc(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--split", "train", "--means", made.means,
                          "--thresholds", made.thresholds, "--format", "json", "--batch-size", 32))
    fitted, _ = load_points(made.thresholds)
    [point] = doc["points"][1:]
    costs = ClassMeans.load(str(made.means)).cost_model().normalised_exit_costs()
    # equal up to the samples whose confidences the thresholds sit just below (one per exit): evaluate's batches
    # round them differently
    boundary = len(fitted["points"][0]["thresholds"])
    assert point["accuracy"] == pytest.approx(fitted["points"][0]["accuracy"], abs=boundary / 96 + 1e-6)
    assert point["cost"] == pytest.approx(fitted["points"][0]["cost"], abs=boundary * max(costs) / 96 + 1e-6)


def test_evaluate_picks_operating_points(made: Made) -> None:
    doc = json_doc(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", made.means, "--thresholds",
                          made.sweep, "--point", "0", "--format", "json"))
    assert [p["name"].split(":")[0] for p in doc["points"]] == ["plain", "0"]
    result = invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", made.means, "--thresholds",
                    made.sweep, "--point", "99")
    assert "--point" in one_error_line(result, ExitCode.USAGE)


def test_evaluate_repeats_time_again_but_predict_once(made: Made) -> None:
    def evaluate(repeats: int) -> dict:
        return json_doc(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", made.means, "--thresholds",
                               made.sweep, "--repeats", repeats, "--format", "json", "-q"))

    once, thrice = evaluate(1), evaluate(3)
    assert (once["repeats"], thrice["repeats"]) == (1, 3)
    timed = ("throughput", "speedup", "speedup_min", "speedup_max", "seconds")
    for a, b in zip(once["points"], thrice["points"], strict=True):
        assert {k: v for k, v in a.items() if k not in timed} == {k: v for k, v in b.items() if k not in timed}
        assert len(a["seconds"]) == 1 and len(b["seconds"]) == 3
        assert b["speedup_min"] <= b["speedup"] <= b["speedup_max"]
    assert once["per_class"] == thrice["per_class"]


def fake_timings(monkeypatch: pytest.MonkeyPatch, plain: list[float], point: float) -> None:
    """Runs that take ``plain[r]`` seconds for the plain model in round r and ``point`` for every operating point;
    the warm-up (one batch of 16) keeps its own time."""
    import eetool.core.inference as inference

    real_predict, real_exits = inference.predict, inference.evaluate_exits
    plain_times = iter(plain)

    def predict(model, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_predict(model, data, *args, **kwargs)
        if len(data) > 16:
            result.seconds = next(plain_times)
        return result

    def evaluate_exits(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_exits(*args, **kwargs)
        result.seconds = point
        return result

    monkeypatch.setattr(inference, "predict", predict)
    monkeypatch.setattr(inference, "evaluate_exits", evaluate_exits)


def evaluate_timed(made: Made, repeats: int) -> Result:
    return ok(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", made.means, "--thresholds",
                     made.thresholds, "--repeats", repeats, "--batch-size", 16))


def speedup_column(result: Result) -> list[str]:
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("point "))
    rows = lines[header + 2:lines.index("", header)]
    return [row[lines[header].index("speedup") - 10:].strip() for row in rows]


def test_evaluate_shows_the_range_of_steady_speedups_without_a_warning(made: Made,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, [1.0, 1.0], 0.5)
    result = evaluate_timed(made, 2)
    assert speedup_column(result) == ["1.00x", "2.00x (2.00\u20132.00)"]
    assert "warning" not in result.stderr


def test_evaluate_warns_once_when_the_rounds_disagree(made: Made, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timings(monkeypatch, [1.0, 2.0, 1.0], 0.5)  # the machine was busy during round 2
    result = evaluate_timed(made, 3)
    assert speedup_column(result) == ["1.00x", "2.00x (2.00\u20134.00)"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "busy" in warnings[0] and "--repeats" in warnings[0]
    assert "warning" not in result.stdout


@pytest.mark.parametrize("given", ["--means", "--thresholds"])
def test_evaluate_needs_both_means_and_thresholds(made: Made, given: str) -> None:
    value = made.means if given == "--means" else made.thresholds
    result = invoke("evaluate", "-c", made.ckpt, "-d", made.data, given, value)
    assert "--means and --thresholds" in one_error_line(result, ExitCode.USAGE)


# ---------------------------------------------------------------------------------------------
# Provenance: artifacts made for something else are refused


def test_thresholds_of_other_class_means_are_refused(made: Made) -> None:
    for means in (made.other_exits, made.other_data):
        result = invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", means, "--thresholds",
                        made.thresholds)
        assert "made from another class-means artifact" in one_error_line(result, ExitCode.PROVENANCE)


def test_class_means_of_another_checkpoint_are_refused(made: Made, workdir: Path) -> None:
    evaluated = invoke("evaluate", "-c", made.other_ckpt, "-d", made.data, "--means", made.means, "--thresholds",
                       made.thresholds)
    line = one_error_line(evaluated, ExitCode.PROVENANCE)
    assert f"made from checkpoint {sha256(made.ckpt)[:12]}" in line
    fitted = invoke("fit-thresholds", "--means", made.means, "-o", "t.yaml", "--budget", 0.5, "--validation",
                    "-c", made.other_ckpt, "-d", made.data, "--split", "test")
    assert "made from checkpoint" in one_error_line(fitted, ExitCode.PROVENANCE)
    assert list(workdir.iterdir()) == []


def test_artifacts_of_the_wrong_kind_are_refused(made: Made, workdir: Path) -> None:
    means_as_thresholds = invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", made.means,
                                 "--thresholds", made.means)
    assert "is a class-means artifact, not thresholds" in one_error_line(means_as_thresholds, ExitCode.PROVENANCE)
    thresholds_as_means = invoke("fit-thresholds", "--means", made.thresholds, "-o", "t.yaml", "--budget", 0.5)
    assert "is a thresholds artifact, not class-means" in one_error_line(thresholds_as_means, ExitCode.PROVENANCE)
    checkpoint_as_means = invoke("fit-thresholds", "--means", made.ckpt, "-o", "t.yaml", "--budget", 0.5)
    assert "is a checkpoint artifact, not class-means" in one_error_line(checkpoint_as_means, ExitCode.PROVENANCE)
    assert list(workdir.iterdir()) == []


def test_evaluate_plots_accuracy_against_cost(made: Made, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    ok(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", made.means, "--thresholds", made.sweep,
              "--plot", png, "-q"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--means", made.means, "--thresholds", made.sweep,
                   "--plot", png)
    one_error_line(again, ExitCode.OUTPUT)  # an existing plot is kept without --force
    line = one_error_line(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--plot", "-"), ExitCode.USAGE)
    assert "--plot -" in line
    line = one_error_line(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "-o", "-", "--format", "json"),
                          ExitCode.USAGE)
    assert "--format json" in line
