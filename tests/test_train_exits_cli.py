"""train-exits end to end on the tiny checkpoint and data: the artifact it writes, its JSON, E²CM distances
from a class-means artifact, joint training's new checkpoint, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import invoke, ok, one_error_line, sha256

from eetool.classification.exit_heads import load_heads
from eetool.core.checkpoint import load_checkpoint
from eetool.core.errors import ExitCode
from eetool.core.exits import build_exit_model

FAST = ("--batch-size", "48", "--no-augment", "--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def half_means(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str) -> Path:
    out = tmp_path_factory.mktemp("means") / "means-half.safetensors"
    ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", out, "-q",
              "--device", "cpu"))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("heads") / "heads.safetensors"
    result = ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "--eval-split",
                       "test", "-o", out, "--format", "json", *FAST))
    assert result.stderr.endswith(f"wrote {out}\n")
    return out, json.loads(result.stdout)


def test_writes_an_exit_heads_artifact_for_the_checkpoint(trained: tuple[Path, dict], tiny_checkpoint: str) -> None:
    out, _ = trained
    heads, prov = load_heads(str(out))
    ckpt = load_checkpoint(tiny_checkpoint)
    em = build_exit_model(ckpt.model, "half")
    assert prov.kind == "exit-heads" and prov.checkpoint_sha256 == sha256(tiny_checkpoint)
    assert prov.exits == heads.spec.exits == em.exits
    assert heads.spec.kind == "sdn" and not heads.spec.with_distances and heads.spec.weights == [1.0] * len(em.exits)
    assert heads.spec.in_shapes == [list(s) for s in em.exit_shapes(ckpt.spec.input_shape)]
    assert prov.inputs == {} and prov.args["training"]["samples_seen"] == 96


def test_json_output(trained: tuple[Path, dict]) -> None:
    out, doc = trained
    assert next(iter(doc)) == "schema" and doc["schema"] == "eetool/exit-heads@1"
    heads, _ = load_heads(str(out))
    assert [r["exit"] for r in doc["exits"]] == heads.spec.exits
    assert [r["head_macs"] for r in doc["exits"]] == heads.macs()
    assert not doc["joint"] and not doc["with_distances"] and doc["eval_split"] == "test"
    for row in doc["exits"]:
        assert 0 <= row["accuracy"] <= 1 and 0 < row["cost_normalised"]
    assert 0 <= doc["head_accuracy"] <= 1 and doc["samples_seen"] == 96


def test_text_output_lists_every_exit(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    result = ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", "h.safetensors",
                       "--head", "branchy", *FAST))
    heads, _ = load_heads("h.safetensors")
    assert heads.spec.kind == "branchy"
    for name, macs in zip(heads.spec.exits, heads.macs(), strict=True):
        assert any(line.split()[:2] == [name, f"{macs:,}"] for line in result.stdout.splitlines())


def test_means_for_the_same_exits_add_the_distances(half_means: Path, tiny_checkpoint: str, tiny_data: str,
                                                    workdir: Path) -> None:
    result = ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "--means",
                       half_means, "-o", "h.safetensors", "--format", "json", *FAST))
    heads, prov = load_heads("h.safetensors")
    assert heads.spec.with_distances and json.loads(result.stdout)["with_distances"]
    assert prov.inputs == {"class-means": sha256(half_means)}
    linear = heads.heads[0].linear
    assert linear.in_features > 10 and heads.macs()[0] >= linear.in_features * 10


def test_means_for_other_exits_are_refused(half_means: Path, tiny_checkpoint: str, tiny_data: str,
                                           workdir: Path) -> None:
    line = one_error_line(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "every",
                                 "--means", half_means, "-o", "h.safetensors", *FAST), ExitCode.PROVENANCE)
    assert "exits" in line
    assert not Path("h.safetensors").exists()


def test_joint_needs_a_backbone_output(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    one_error_line(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--joint", "-o", "h.safetensors",
                          *FAST), ExitCode.USAGE)
    one_error_line(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--backbone-output",
                          "b.safetensors", "-o", "h.safetensors", *FAST), ExitCode.USAGE)
    assert not Path("h.safetensors").exists()


def test_joint_writes_a_new_backbone_that_the_heads_record(tiny_checkpoint: str, tiny_data: str,
                                                           workdir: Path) -> None:
    result = ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "--joint",
                       "--backbone-output", "b.safetensors", "-o", "h.safetensors", "--format", "json", *FAST))
    assert json.loads(result.stdout)["joint"]
    _, prov = load_heads("h.safetensors")
    assert sha256("b.safetensors") != sha256(tiny_checkpoint)
    assert prov.checkpoint_sha256 == sha256("b.safetensors")
    backbone = load_checkpoint("b.safetensors")
    assert backbone.provenance.checkpoint_sha256 == sha256(tiny_checkpoint)


@pytest.mark.parametrize("weights", ["1,2", "1,1,1,1", "1,1,1,1,1,1", "a,b,c,d,e"])
def test_exit_weights_of_the_wrong_count_are_refused(weights: str, tiny_checkpoint: str, tiny_data: str,
                                                     workdir: Path) -> None:
    # --exits half on ResNet-20 gives five exits
    line = one_error_line(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half",
                                 "--exit-weights", weights, "-o", "h.safetensors", *FAST), ExitCode.USAGE)
    assert "--exit-weights" in line


def test_exit_weights_are_recorded(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "--exit-weights", "sdn",
              "-o", "h.safetensors", *FAST))
    heads, _ = load_heads("h.safetensors")
    assert len(heads.spec.exits) == 5 and heads.spec.weights == [0.15, 0.3, 0.45, 0.6, 0.75]


def test_existing_output_needs_force(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    Path("h.safetensors").write_text("keep me")
    one_error_line(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half",
                          "-o", "h.safetensors", *FAST), ExitCode.OUTPUT)
    assert Path("h.safetensors").read_text() == "keep me"
    ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", "h.safetensors",
              "--force", "-q", *FAST))
    assert load_heads("h.safetensors")[1].kind == "exit-heads"


def test_a_budget_in_samples(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    import json

    result = ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "--samples", 150,
                       "--batch-size", 64, "-o", "h.safetensors", "--format", "json", "-q"))
    doc = json.loads(result.stdout)
    assert doc["samples_seen"] == 150 and doc["epochs"] == 2  # 96 samples, then 54 of the second epoch


SCRATCH = ("--joint", "--from-scratch", "--arch", "resnet20", "--arch-args", "{width: 4}")


def test_from_scratch_trains_a_new_backbone_that_other_commands_read(tiny_data: str, workdir: Path) -> None:
    result = ok(invoke("train-exits", *SCRATCH, "-d", tiny_data, "--exits", "half", "--exit-weights", "sdn",
                       "--distill", "0.5", "--distill-temperature", "2", "--backbone-output", "b.safetensors",
                       "-o", "h.safetensors", "--format", "json", *FAST))
    doc = json.loads(result.stdout)
    assert doc["joint"] and doc["from_scratch"] and doc["distill"] == 0.5 and doc["distill_temperature"] == 2.0
    backbone = load_checkpoint("b.safetensors")
    assert backbone.spec.arch == "resnet20" and backbone.spec.arch_args == {"width": 4}
    assert backbone.spec.input_shape == (1, 28, 28) and len(backbone.spec.classes) == 10
    prov = backbone.provenance
    assert prov is not None and prov.kind == "checkpoint" and prov.checkpoint_sha256 == ""  # no parent
    assert prov.args["training"]["samples_seen"] == 96 and prov.args["distill"] == 0.5
    heads, heads_prov = load_heads("h.safetensors")
    assert heads_prov.checkpoint_sha256 == sha256("b.safetensors") and heads.spec.weights[0] == 0.15
    ok(invoke("fit-thresholds", "--method", "sdn", "--exit-heads", "h.safetensors", "-c", "b.safetensors",
              "-d", tiny_data, "--split", "train", "--budget", "0.6", "-o", "t.yaml", "-q"))
    ok(invoke("evaluate", "-c", "b.safetensors", "-d", tiny_data, "--split", "test", "--exit-heads",
              "h.safetensors", "--thresholds", "t.yaml", "--repeats", "1", "-q"))


def test_from_scratch_starts_from_the_weights_the_seed_gives(tiny_data: str, workdir: Path) -> None:
    def backbone(seed: int, name: str) -> str:
        ok(invoke("train-exits", *SCRATCH, "-d", tiny_data, "--exits", "half", "--samples", 48, "--seed", seed,
                  "--backbone-output", f"{name}.safetensors", "-o", f"{name}-heads.safetensors", "-q", *FAST))
        return load_checkpoint(f"{name}.safetensors").model_sha256

    assert backbone(3, "a") == backbone(3, "b") != backbone(4, "c")


def test_the_shipped_recipe_configures_training_from_scratch(tiny_data: str, workdir: Path) -> None:
    recipe = Path(__file__).parents[1] / "eetool" / "configs" / "train-resnet20-fashion-mnist.yaml"
    result = ok(invoke("train-exits", "--config", recipe, *SCRATCH, "-d", tiny_data, "--samples", 48,
                       "--backbone-output", "b.safetensors", "-o", "h.safetensors", "--format", "json", *FAST))
    args = load_checkpoint("b.safetensors").provenance.args
    assert (args["optimizer"], args["lr"], args["momentum"], args["warmup_epochs"]) == ("sgd", 0.1, 0.9, 1.0)
    assert json.loads(result.stdout)["from_scratch"] and args["epochs"] == 12  # the recipe's (unknown keys are refused)


def test_a_multi_scale_network_from_scratch_through_thresholds_evaluation_and_export(tiny_data: str,
                                                                                    workdir: Path) -> None:
    ok(invoke("train-exits", "--joint", "--from-scratch", "--arch", "msdnet", "--arch-args",
              "{width: 2, growth: 2, blocks: 3, layers: 1}", "-d", tiny_data, "--distill", "0.5",
              "--backbone-output", "m.safetensors", "-o", "h.safetensors", "-q", *FAST))
    heads, _ = load_heads("h.safetensors")
    assert heads.spec.exits == ["blocks.0", "blocks.1", "blocks.2"]
    # measured overheads time each stage, decision and compaction of the scales the stages hand on
    ok(invoke("fit-thresholds", "--method", "sdn", "--exit-heads", "h.safetensors", "-c", "m.safetensors",
              "-d", tiny_data, "--split", "train", "--budget", "0.9", "--overhead", "measured", "-o", "t.yaml", "-q"))
    result = ok(invoke("evaluate", "-c", "m.safetensors", "-d", tiny_data, "--split", "test", "--exit-heads",
                       "h.safetensors", "--thresholds", "t.yaml", "--repeats", "1", "--format", "json", "-q"))
    assert json.loads(result.stdout)["points"]
    pytest.importorskip("onnxscript")
    line = one_error_line(invoke("export", "-c", "m.safetensors", "--exit-heads", "h.safetensors", "--thresholds",
                                 "t.yaml", "-o", "bundle", "-q"), ExitCode.MODEL_MISMATCH)
    assert "several tensors" in line and not Path("bundle").exists()
