"""The command line contract: help, output streams, JSON, --config, and each command end to end on tiny inputs.

typer's CliRunner keeps stdout and stderr apart (``result.stdout``, ``result.stderr``; ``result.output``
is both), so every test checks them separately.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from eetool import __version__
from eetool.cli import app
from eetool.commands import COMMANDS
from eetool.core.errors import ExitCode

runner = CliRunner()

COMMON_FLAGS = ("--quiet", "--verbose", "--format", "--no-progress", "--seed", "--device", "--threads", "--config",
                "--debug")
SCHEMA = re.compile(r"^eetool/[a-z][a-z-]*@1$")


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "(hint: " in lines[0], lines[0]
    return lines[0]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def json_doc(result: Result) -> dict:
    doc = json.loads(result.stdout)
    assert next(iter(doc)) == "schema", "the schema leads the JSON document"
    assert SCHEMA.match(doc["schema"]), doc["schema"]
    return doc


# ---------------------------------------------------------------------------------------------
# Help, version, and the cost of importing the CLI


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ")
    assert result.stderr == ""
    for name in COMMANDS:
        assert name in result.stdout


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"eetool {__version__}\n"
    assert result.stderr == ""


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_has_help_with_the_common_options(command: str, flag: str) -> None:
    result = invoke(command, flag)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"Usage: eetool {command} ")
    assert result.stderr == ""
    for option in COMMON_FLAGS:
        assert option in result.stdout, f"{command} --help lacks {option}"


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, eetool.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["inspect", "--help"], ["--version"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    """Through the real entry point, with the interpreter's own record of every import."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "eetool", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "typer" in imported  # the record is there at all
    assert "torch" not in imported
    assert "torchvision" not in imported


# ---------------------------------------------------------------------------------------------
# Shared results, made once: an evaluation written with -o, and a training run (interrupted, then resumed)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("evaluation") / "eval.yaml"
    result = invoke("evaluate", "-c", tiny_checkpoint, "-d", f"safetensors:{tiny_data}", "-o", out, "--batch-size", 32)
    assert result.exit_code == 0, result.stderr
    return result, out


TRAIN_FLAGS = ("--arch-args", "{width: 4}", "--epochs", "2", "--batch-size", "96", "--no-augment", "--lr", "0.05")


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory, tiny_data: str) -> dict[str, object]:
    """Epoch 1 of 2 with its options from --config (as the README shows), interrupted (Ctrl-C) once its state
    is saved; then --resume with the same options as flags and every common option.

    The resume refuses state saved with other settings or data, so it also checks that the config gave the
    same values as the flags."""
    import eetool.core.training_loop as training_module

    folder = tmp_path_factory.mktemp("train")
    out = folder / "model.safetensors"
    config = tmp_path_factory.mktemp("train-config") / "train.yaml"
    config.write_text(yaml.safe_dump({"data": tiny_data, "arch-args": {"width": 4}, "epochs": 2, "batch-size": 96,
                                      "augment": False, "lr": 0.05}))
    save_state = training_module._save_state

    def save_then_interrupt(*args: object, **kwargs: object) -> None:
        save_state(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_module, "_save_state", save_then_interrupt)
        interrupted = invoke("train", "--config", config, "-o", out)
    resume_exists = Path(f"{out}.resume.pt").is_file()
    resumed = invoke("train", "-d", tiny_data, "-o", out, *TRAIN_FLAGS, "--resume",
                     "-q", "-v", "--format", "json", "--no-progress", "--seed", "0", "--device", "cpu",
                     "--threads", "1", "--debug")
    return {"out": out, "interrupted": interrupted, "resume_exists": resume_exists, "resumed": resumed}


# ---------------------------------------------------------------------------------------------
# Common options after the subcommand, and JSON on stdout


@pytest.fixture(scope="module")
def class_means(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str) -> Path:
    out = tmp_path_factory.mktemp("class-means") / "means.safetensors"
    result = invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", out, "--batch-size", 48, "-q")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def tiny_lm_and_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama-style model folder and an exit head made for it."""
    from tests.lm_helpers import make_tiny_lm

    folder = make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))
    head = folder.parent / "head.safetensors"
    result = invoke("init-exit-head", "-m", folder, "-t", LM_TEXT, "--context", 32, "-o", head, "-q")
    assert result.exit_code == 0, result.stderr
    return folder, head


LM_TEXT = str(Path(__file__).parent / "data" / "hamlet-act1.txt")


@pytest.fixture()
def command_args(tiny_checkpoint: str, tiny_data: str, class_means: Path, tmp_path: Path,
                 tiny_lm_and_head: tuple[Path, Path]) -> dict[str, list[str]]:
    lm, head = (str(p) for p in tiny_lm_and_head)
    return {
        "archs": [],
        "env": [],
        "inspect": ["--checkpoint", tiny_checkpoint],
        "import": ["-c", tiny_checkpoint, "-o", str(tmp_path / "imported.safetensors")],
        "evaluate": ["-c", tiny_checkpoint, "-d", tiny_data],
        "predict": ["-c", tiny_checkpoint, "-d", tiny_data],
        "export": ["-c", tiny_checkpoint, "-o", str(tmp_path / "bundle"), "--check-samples", "8"],
        "calibrate-means": ["-c", tiny_checkpoint, "-d", tiny_data, "-o", str(tmp_path / "means.safetensors")],
        "fit-thresholds": ["--means", str(class_means), "-o", str(tmp_path / "thresholds.yaml"), "--budget", "0.5"],
        "train-exits": ["-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "--no-augment",
                        "-o", str(tmp_path / "heads.safetensors")],
        "prune-dataset": ["-c", tiny_checkpoint, "-d", tiny_data, "--method", "random", "--ratio", "0.25",
                          "-o", str(tmp_path / "kept.safetensors")],
        "prune-weights": ["-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "--rounds", "1",
                          "--finetune-samples", "16", "--no-augment", "-o", str(tmp_path / "pruned.safetensors")],
        "init-exit-head": ["-m", lm, "-t", LM_TEXT, "--context", "32", "-o", str(tmp_path / "head.safetensors")],
        "evaluate-lm": ["-m", lm, "-t", LM_TEXT, "--context", "32", "--head", head],
        "train-exit-head": ["-m", lm, "-t", LM_TEXT, "--context", "32", "--head", head, "--steps", "2",
                            "-o", str(tmp_path / "trained.safetensors")],
    }


# The kind in each command's JSON schema, where it is not the command's name.
SCHEMA_KINDS = {"evaluate": "evaluation", "calibrate-means": "class-means", "fit-thresholds": "thresholds",
                "train-exits": "exit-heads", "prune-dataset": "indices", "import": "checkpoint",
                "prune-weights": "weight-pruning", "init-exit-head": "lm-exit-head", "evaluate-lm": "lm-evaluation",
                "train-exit-head": "lm-training"}


def test_the_table_below_covers_every_command(command_args: dict[str, list[str]]) -> None:
    assert set(command_args) | {"train"} == set(COMMANDS)


@pytest.mark.parametrize("command", ["archs", "env", "inspect", "import", "evaluate", "calibrate-means",
                                     "fit-thresholds", "train-exits", "prune-dataset", "prune-weights",
                                     "init-exit-head", "evaluate-lm", "train-exit-head", "export"])
def test_common_options_after_the_subcommand(command: str, command_args: dict[str, list[str]]) -> None:
    result = invoke(command, *command_args[command], "-q", "-v", "--format", "json", "--no-progress", "--seed", "3",
                    "--device", "cpu", "--threads", "1", "--debug")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # -q: nothing but data
    doc = json_doc(result)
    assert doc["schema"] == f"eetool/{SCHEMA_KINDS.get(command, command)}@1"


def test_predict_takes_the_common_options_with_its_own_formats(command_args: dict[str, list[str]]) -> None:
    """predict's records are JSON Lines (or CSV, TSV), not a document with a schema."""
    result = invoke("predict", *command_args["predict"], "-q", "-v", "--format", "jsonl", "--no-progress", "--seed",
                    "3", "--device", "cpu", "--threads", "1", "--debug")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()][:2] == ["safetensors/test#0",
                                                                                      "safetensors/test#1"]
    assert invoke("predict", *command_args["predict"], "--format", "json").exit_code == ExitCode.USAGE


def test_train_accepts_the_common_options_and_emits_json(training: dict[str, object]) -> None:
    resumed = training["resumed"]
    assert isinstance(resumed, Result)
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stderr == ""
    doc = json_doc(resumed)
    assert doc["schema"] == "eetool/train@1"


def test_text_output_has_only_data_on_stdout(tiny_checkpoint: str) -> None:
    result = invoke("inspect", "--checkpoint", tiny_checkpoint)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith("checkpoint ")
    assert lines[-1].split()[0] == "head" and lines[-1].split()[-1] == "1.0000"
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_logs_go_to_stderr_and_quiet_silences_them(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    loud = invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "a.yaml")
    assert loud.exit_code == 0, loud.stderr
    assert loud.stderr == "wrote a.yaml\n"
    assert "wrote" not in loud.stdout and loud.stdout.startswith("checkpoint ")
    quiet = invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "b.yaml", "-q")
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == ""
    assert quiet.stdout.startswith("checkpoint ")
    assert (workdir / "b.yaml").is_file()


# ---------------------------------------------------------------------------------------------
# --config


def test_config_values_apply(tiny_checkpoint: str, workdir: Path) -> None:
    (workdir / "c.yaml").write_text("format: json\ncount: flops\nexits: half\nthreads: 1\ndevice: cpu\n")
    result = invoke("inspect", "--checkpoint", tiny_checkpoint, "--config", "c.yaml")
    assert result.exit_code == 0, result.stderr
    doc = json_doc(result)
    assert doc["unit"] == "flops"
    assert [r["exit"] for r in doc["exits"]] == ["layer1.0", "layer1.2", "layer2.1", "layer3.0", "layer3.2", "head"]


def test_config_lists_and_mappings_become_flag_values(tiny_checkpoint: str, workdir: Path) -> None:
    (workdir / "c.yaml").write_text("format: json\nmean: [0.25]\nstd: [0.5]\ninput-shape: [1, 32, 32]\n")
    doc = json_doc(invoke("inspect", "--checkpoint", tiny_checkpoint, "--config", "c.yaml"))
    assert doc["mean"] == [0.25] and doc["std"] == [0.5] and doc["input_shape"] == [1, 32, 32]


def test_explicit_flags_override_the_config(tiny_checkpoint: str, workdir: Path) -> None:
    (workdir / "c.yaml").write_text("format: json\ncount: flops\n")
    result = invoke("inspect", "--checkpoint", tiny_checkpoint, "--config", "c.yaml", "--format", "text",
                    "--count", "macs")
    assert result.exit_code == 0, result.stderr
    assert "cumulative macs" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_config_can_give_required_options(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    (workdir / "c.yaml").write_text(yaml.safe_dump({"checkpoint": tiny_checkpoint, "data": tiny_data,
                                                    "format": "json", "batch-size": 16}))
    result = invoke("evaluate", "--config", "c.yaml")
    assert result.exit_code == 0, result.stderr
    assert json_doc(result)["samples"] == 64


def test_required_option_missing_everywhere_is_one_usage_line(tiny_checkpoint: str) -> None:
    result = invoke("evaluate", "-c", tiny_checkpoint)
    assert result.exit_code == ExitCode.USAGE
    assert "--data" in one_error_line(result)
    assert result.stdout == ""


def test_unknown_config_key_is_a_usage_error(tiny_checkpoint: str, workdir: Path) -> None:
    (workdir / "c.yaml").write_text("format: json\nepochs: 3\n")
    result = invoke("inspect", "--checkpoint", tiny_checkpoint, "--config", "c.yaml")
    assert result.exit_code == ExitCode.USAGE
    line = one_error_line(result)
    assert "'epochs'" in line and "known keys" in line
    assert result.stdout == ""


def test_bad_config_value_is_a_usage_error(tiny_checkpoint: str, workdir: Path) -> None:
    (workdir / "c.yaml").write_text("format: xml\n")
    result = invoke("inspect", "--checkpoint", tiny_checkpoint, "--config", "c.yaml")
    assert result.exit_code == ExitCode.USAGE
    assert "'format'" in one_error_line(result)


def test_debug_in_config_shows_the_traceback(workdir: Path) -> None:
    (workdir / "c.yaml").write_text("debug: true\n")
    result = invoke("inspect", "missing.yaml", "--config", "c.yaml")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: ")


# ---------------------------------------------------------------------------------------------
# env, archs, inspect


def test_env_lists_versions() -> None:
    import torch

    result = invoke("env", "--format", "json", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    doc = json_doc(result)
    assert doc["eetool"] == __version__
    assert doc["torch"] == torch.__version__
    assert doc["python"] == sys.version.split()[0]
    assert doc["device"] == "cpu"
    text = invoke("env", "--device", "cpu")
    assert text.exit_code == 0
    assert re.search(rf"^eetool\s+{re.escape(__version__)}$", text.stdout, re.M)
    assert re.search(r"^torch\s+\S+", text.stdout, re.M)


def test_archs_lists_architectures_and_sources() -> None:
    doc = json_doc(invoke("archs", "--format", "json"))
    assert "resnet20" in doc["eetool"] and "resnet18" in doc["torchvision"] and "safetensors" in doc["datasets"]


def test_inspect_checkpoint_lists_exits_with_costs_ending_at_one(tiny_checkpoint: str) -> None:
    result = invoke("inspect", "--checkpoint", tiny_checkpoint, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json_doc(result)
    assert doc["schema"] == "eetool/inspect@1"
    assert doc["sha256"] == sha256(tiny_checkpoint)
    assert doc["arch"] == "resnet20" and doc["input_shape"] == [1, 28, 28] and doc["mode"] == "split"
    rows = doc["exits"]
    assert rows[0]["exit"] == "stem" and rows[-1]["exit"] == "head"
    costs = [r["normalised"] for r in rows]
    assert costs[-1] == 1.0
    assert all(0 < a < b for a, b in zip(costs, costs[1:], strict=False))
    macs = [r["macs"] for r in rows]
    assert macs[-1] == doc["model_cost"] and macs == sorted(macs)
    assert rows[-1]["shape"] == [10]


def test_inspect_counts_flops_as_twice_the_macs(tiny_checkpoint: str) -> None:
    macs = json_doc(invoke("inspect", "--checkpoint", tiny_checkpoint, "--format", "json"))
    flops = json_doc(invoke("inspect", "--checkpoint", tiny_checkpoint, "--format", "json", "--count", "flops"))
    assert flops["model_cost"] == 2 * macs["model_cost"]


def test_inspect_file_that_is_a_checkpoint(tiny_checkpoint: str) -> None:
    doc = json_doc(invoke("inspect", tiny_checkpoint, "--format", "json"))
    assert doc["schema"] == "eetool/inspect@1" and doc["exits"][-1]["normalised"] == 1.0


def test_inspect_artifact_shows_its_provenance(evaluation: tuple[Result, Path], tiny_checkpoint: str) -> None:
    _, path = evaluation
    result = invoke("inspect", path, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json_doc(result)
    prov = doc["provenance"]
    assert prov["kind"] == "evaluation" and prov["schema"] == 1 and prov["eetool_version"] == __version__
    assert prov["checkpoint_sha256"] == sha256(tiny_checkpoint)
    assert {c["name"] for c in doc["contents"]} >= {"points", "per_class"}
    text = invoke("inspect", path)
    assert text.exit_code == 0 and text.stderr == ""
    assert re.search(r"^kind\s+evaluation$", text.stdout, re.M)
    assert re.search(rf"^checkpoint_sha256\s+{sha256(tiny_checkpoint)}$", text.stdout, re.M)
    assert "batch_size=32" in text.stdout


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_writes_yaml_with_provenance(evaluation: tuple[Result, Path], tiny_checkpoint: str,
                                              tiny_data: str) -> None:
    result, path = evaluation
    assert result.stderr == f"wrote {path}\n"
    doc = yaml.safe_load(path.read_text())
    assert next(iter(doc)) == "schema" and doc["schema"] == "eetool/evaluation@1"
    prov = doc["provenance"]
    assert prov["kind"] == "evaluation"
    assert prov["checkpoint_sha256"] == doc["checkpoint_sha256"] == sha256(tiny_checkpoint)
    assert re.fullmatch(r"safetensors/test:[0-9a-f]{16}", prov["dataset"]) and prov["dataset"] == doc["dataset"]
    args = prov["args"]
    assert args["checkpoint"] == tiny_checkpoint and args["data"] == f"safetensors:{tiny_data}"
    assert args["split"] == "test" and args["batch_size"] == 32 and args["seed"] == 0
    assert doc["samples"] == 64
    point = doc["points"][0]
    assert 0 <= point["accuracy"] <= 1 and point["cost"] == 1.0 and point["macs"] > 0
    assert list(doc["per_class"]) == ["plain"]
    assert list(doc["per_class"]["plain"]) == [f"c{k}" for k in range(10)]
    assert path.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left


def test_evaluate_text_and_json_agree(tiny_checkpoint: str, tiny_data: str) -> None:
    doc = json_doc(invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "--format", "json"))
    text = invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data)
    assert text.exit_code == 0 and text.stderr == ""
    assert f"{doc['points'][0]['accuracy']:.4f}" in text.stdout
    assert doc["dataset"] in text.stdout


def test_evaluate_refuses_to_overwrite_without_force(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    out = workdir / "out.yaml"
    out.write_text("precious\n")
    result = invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-o", out)
    assert result.exit_code == ExitCode.OUTPUT
    assert "--force" in one_error_line(result)
    assert out.read_text() == "precious\n"
    forced = invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-o", out, "--force", "-q")
    assert forced.exit_code == 0, forced.stderr
    assert yaml.safe_load(out.read_text())["schema"] == "eetool/evaluation@1"
    assert sorted(p.name for p in workdir.iterdir()) == ["out.yaml"]


@pytest.mark.parametrize("which", ["checkpoint", "data"])
def test_evaluate_refuses_output_equal_to_an_input(which: str, tiny_checkpoint: str, tiny_data: str) -> None:
    target = tiny_checkpoint if which == "checkpoint" else tiny_data
    before = sha256(target)
    result = invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-o", target, "--force")
    assert result.exit_code == ExitCode.OUTPUT
    assert "also an input" in one_error_line(result)
    assert sha256(target) == before


def test_evaluate_to_stdout_writes_only_yaml(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    result = invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("schema: eetool/evaluation@1\n")
    doc = yaml.safe_load(result.stdout)  # the whole of stdout is one YAML document
    assert list(doc)[-1] == "provenance" and doc["provenance"]["kind"] == "evaluation"
    assert "accuracy  " not in result.stdout  # no text table after it
    assert list(workdir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# train


def test_train_interrupted_leaves_resume_state_and_no_output(training: dict[str, object]) -> None:
    interrupted = training["interrupted"]
    assert isinstance(interrupted, Result)
    assert interrupted.exit_code == ExitCode.INTERRUPTED
    last = interrupted.stderr.splitlines()[-1]
    assert last.startswith("interrupted:") and last.endswith(".resume.pt: rerun with --resume)")
    assert "Traceback" not in interrupted.stderr
    assert interrupted.stdout == ""
    assert training["resume_exists"]


def test_train_resumes_and_writes_a_complete_checkpoint(training: dict[str, object], tiny_data: str) -> None:
    from safetensors import safe_open

    from eetool.core.checkpoint import SPEC_KEY, ModelSpec

    out = training["out"]
    assert isinstance(out, Path) and out.is_file()
    assert not Path(f"{out}.resume.pt").exists(), "the resume state is removed once the checkpoint is written"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    resumed = training["resumed"]
    assert isinstance(resumed, Result)
    doc = json_doc(resumed)
    assert [h["epoch"] for h in doc["history"]] == [1, 2]  # epoch 1 came from the saved state
    assert doc["samples_seen"] == 2 * 96
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    spec = ModelSpec.from_json(meta[SPEC_KEY])
    assert spec.arch == "resnet20" and spec.arch_args == {"width": 4}
    assert spec.input_shape == (1, 28, 28) and spec.num_classes == 10
    assert len(spec.mean) == len(spec.std) == 1 and 0.4 < spec.mean[0] < 0.6 and 0.2 < spec.std[0] < 0.4
    assert spec.classes == [f"c{k}" for k in range(10)]
    assert meta["eetool.kind"] == "checkpoint" and meta["eetool.version"] == __version__
    assert meta["eetool.dataset"].startswith("safetensors/train:")
    args = json.loads(meta["eetool.args"])
    assert args["epochs"] == 2 and args["data"] == tiny_data and args["training"]["samples_seen"] == 2 * 96
    # The checkpoint is self-describing: inspect needs no other flag.
    inspected = json_doc(invoke("inspect", "--checkpoint", out, "--format", "json"))
    assert inspected["training"]["epochs"] == 2 and inspected["input_shape"] == [1, 28, 28]


def test_train_resume_without_state(tiny_data: str, workdir: Path) -> None:
    result = invoke("train", "-d", tiny_data, "-o", "m.safetensors", "--resume", *TRAIN_FLAGS)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "resumable" in one_error_line(result)
    assert list(workdir.iterdir()) == []
