"""Exits on trained heads (sdn, entropy, e2cm+sdn), checked against direct re-computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from eetool.classification.exit_heads import ExitHeads, HeadsSpec
from eetool.classification.rules import HeadsRule, Thresholded
from eetool.cli import app
from eetool.core.errors import ExitCode, UsageError

runner = CliRunner()


def heads_for(shapes: list[list[int]], k: int = 5) -> ExitHeads:
    torch.manual_seed(0)
    return ExitHeads(HeadsSpec("sdn", [f"e{j}" for j in range(len(shapes))], shapes, k)).eval()


@pytest.mark.parametrize("method", ["sdn", "entropy"])
def test_head_confidences_match_a_direct_computation(method: str) -> None:
    heads = heads_for([[4, 6, 6], [8, 3, 3]])
    rule = HeadsRule(heads, method)
    h = torch.randn(7, 4, 6, 6)
    conf, pred = rule.scores(0, h)
    p = torch.softmax(heads.heads[0](h), 1)
    for i in range(7):
        probs = p[i].tolist()
        if method == "sdn":
            want = max(probs)
        else:
            want = 1 - (-sum(q * math.log(q) for q in probs)) / math.log(len(probs))
        assert conf[i].item() == pytest.approx(want, abs=1e-5)
        assert pred[i].item() == probs.index(max(probs))
    assert bool(((conf >= 0) & (conf <= 1 + 1e-6)).all())


@pytest.mark.parametrize("combine", ["and", "or"])
def test_e2cm_plus_sdn_takes_the_lower_or_higher_confidence(combine: str) -> None:
    from eetool.classification.e2cm import ClassMeans, Pooling, decide, distances

    heads = heads_for([[4, 6, 6]])
    means = ClassMeans(["e0"], [torch.randn(5, 144)], torch.rand(1, 5) + 0.5, torch.ones(5, dtype=torch.int64),
                       Pooling(), [10, 10])
    rule = HeadsRule(heads, "e2cm+sdn", means, combine)
    h = torch.randn(9, 4, 6, 6)
    conf, pred = rule.scores(0, h)
    head_conf, head_pred = torch.softmax(heads.heads[0](h), 1).max(1)
    e2cm_conf, _ = decide(distances(h.flatten(1), means.means[0]), means.normalisers[0])
    want = torch.minimum(head_conf, e2cm_conf) if combine == "and" else torch.maximum(head_conf, e2cm_conf)
    assert torch.allclose(conf, want, atol=1e-6)
    assert torch.equal(pred, head_pred)  # the prediction is always the head's
    leave, _ = Thresholded(rule, [0.5])(0, h)
    assert torch.equal(leave, want > 0.5)


def test_combined_rules_need_the_class_means() -> None:
    with pytest.raises(UsageError):
        HeadsRule(heads_for([[4, 6, 6]]), "e2cm+sdn")
    with pytest.raises(UsageError):
        HeadsRule(heads_for([[4, 6, 6]]), "magic")


def test_cost_model_counts_each_head_and_the_distances() -> None:
    from eetool.classification.e2cm import ClassMeans, Pooling, distance_macs

    heads = heads_for([[4, 6, 6], [8, 3, 3]])
    plain = HeadsRule(heads, "sdn").cost_model([100, 200, 300])
    assert plain.overhead_macs == heads.macs()
    means = ClassMeans(["e0", "e1"], [torch.randn(5, 144), torch.randn(5, 72)], torch.ones(2, 5),
                       torch.ones(5, dtype=torch.int64), Pooling(), [100, 200, 300])
    combined = HeadsRule(heads, "e2cm+sdn", means).cost_model([100, 200, 300])
    assert combined.overhead_macs == [m + distance_macs(d, 5) for m, d in zip(heads.macs(), (144, 72), strict=True)]


def test_fit_and_evaluate_on_heads_through_the_cli(tiny_checkpoint: str, tiny_data: str, tmp_path: Path) -> None:
    heads = tmp_path / "heads.safetensors"
    means = tmp_path / "means.safetensors"

    def ok(*args: object) -> str:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stderr
        return result.stdout

    ok("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", heads, "-q")
    ok("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", means, "-q")
    fitted = tmp_path / "sdn.yaml"
    ok("fit-thresholds", "--method", "entropy", "--exit-heads", heads, "-c", tiny_checkpoint, "-d", tiny_data,
       "--budget", "0.6", "-o", fitted, "-q")
    doc = yaml.safe_load(fitted.read_text())
    assert doc["method"] == "entropy" and set(doc["provenance"]["inputs"]) == {"exit-heads"}
    assert doc["points"][0]["cost"] <= 0.6 + 1e-9
    out = ok("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "--split", "train", "--exit-heads", heads,
             "--thresholds", fitted, "--format", "json", "-q")
    import json

    evaluated = json.loads(out)
    point = evaluated["points"][1]
    # the fitted point, run again on the data it was fitted on, lands where the fit said, up to the samples whose
    # scores the thresholds sit just below (one per exit): evaluate's batches round them differently, and each
    # moves the mean cost by less than 2 / n (no exit costs twice the plain network here)
    fitted_point = doc["points"][0]
    n, boundary = evaluated["samples"], len(fitted_point["thresholds"])
    assert point["cost"] == pytest.approx(fitted_point["cost"], abs=2 * boundary / n + 1e-6)
    assert point["accuracy"] == pytest.approx(fitted_point["accuracy"], abs=boundary / n + 1e-6)
    combined = tmp_path / "combined.yaml"
    ok("fit-thresholds", "--method", "e2cm+sdn", "--combine", "or", "--exit-heads", heads, "--means", means,
       "-c", tiny_checkpoint, "-d", tiny_data, "--budget", "0.6", "-o", combined, "-q")
    assert yaml.safe_load(combined.read_text())["combine"] == "or"
    missing = runner.invoke(app, ["evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "--exit-heads", str(heads),
                                  "--thresholds", str(combined)])
    assert missing.exit_code == ExitCode.USAGE and "--means" in missing.stderr
    no_heads = runner.invoke(app, ["fit-thresholds", "--method", "sdn", "--means", str(means), "--budget", "0.5",
                                   "-o", str(tmp_path / "x.yaml")])
    assert no_heads.exit_code == ExitCode.USAGE and "--exit-heads" in no_heads.stderr


def test_heads_of_another_checkpoint_are_refused(tiny_spec, tiny_checkpoint: str, tiny_data: str,  # type: ignore[no-untyped-def]
                                                 tmp_path: Path) -> None:
    from eetool.core.artifacts import Provenance
    from eetool.core.checkpoint import save_checkpoint

    torch.manual_seed(3)
    other = tmp_path / "other.safetensors"
    save_checkpoint(str(other), tiny_spec.build(), tiny_spec, Provenance(kind="checkpoint"))
    heads = tmp_path / "heads.safetensors"
    made = runner.invoke(app, ["train-exits", "-c", str(other), "-d", tiny_data, "--exits", "half", "-o", str(heads),
                               "-q"])
    assert made.exit_code == 0, made.stderr
    result = runner.invoke(app, ["fit-thresholds", "--method", "sdn", "--exit-heads", str(heads), "-c", tiny_checkpoint,
                                 "-d", tiny_data, "--budget", "0.6", "-o", str(tmp_path / "t.yaml")])
    assert result.exit_code == ExitCode.PROVENANCE, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "checkpoint" in result.stderr
    assert not (tmp_path / "t.yaml").exists()


def test_exits_checkpoint_is_another_name_for_exit_heads() -> None:
    import typer

    for name in ("fit-thresholds", "evaluate"):
        command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
        option = next(p for p in command.params if p.name == "exit_heads")
        assert {"--exit-heads", "--exits-checkpoint"} <= set(option.opts)
