"""The training option group (eetool.core.options.training_options): a command's one parameter becomes the flags
it offers, with its own defaults, from the command line or --config; the command gets them back as one
TrainingOptions, and provenance (run.args) records every flag as a separate option did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from eetool.core.options import Run, TrainingOptions, eetool_command, training_options

received: dict[str, Any] = {}


@eetool_command("probe")
def probe(run: Run, training: TrainingOptions = training_options("momentum", optimizer="adamw", lr=1e-3)) -> None:
    received["training"] = training
    received["args"] = dict(run.args)


def invoke(*args: str) -> Any:
    app = typer.Typer()
    app.command("probe")(probe)
    app.command("other")(lambda: None)  # two commands, so that typer keeps the name `probe`
    received.clear()
    return CliRunner().invoke(app, ["probe", *args])


def test_the_defaults_are_the_commands_and_only_the_offered_flags_exist() -> None:
    result = invoke()
    assert result.exit_code == 0, result.output
    assert received["training"] == TrainingOptions(optimizer="adamw", lr=1e-3, momentum=0.9, weight_decay=5e-4,
                                                   schedule="cosine", augment=True)
    assert received["training"].given() == {"optimizer": "adamw", "lr": 1e-3, "momentum": 0.9,
                                            "weight_decay": 5e-4, "schedule": "cosine", "augment": True}
    assert received["training"].given("augment").keys() == {"optimizer", "lr", "momentum", "weight_decay",
                                                            "schedule"}
    refused = invoke("--mixup", "0.2")  # not offered by this command
    assert refused.exit_code == 2 and "--mixup" in refused.output


def test_flags_and_config_reach_the_group_and_provenance(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.05\nschedule: constant\n")
    result = invoke("--momentum", "0.5", "--no-augment", "--config", str(config), "--lr", "0.2")
    assert result.exit_code == 0, result.output
    training = received["training"]
    assert (training.lr, training.momentum, training.schedule, training.augment) == (0.2, 0.5, "constant", False)
    assert training.warmup_epochs is None and "warmup_epochs" not in training.given()
    args = received["args"]
    assert (args["lr"], args["momentum"], args["schedule"], args["augment"], args["optimizer"]) == (
        0.2, 0.5, "constant", False, "adamw")
    assert "training" not in args


def test_a_name_that_is_not_a_training_option_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="not training options"):
        training_options("epochs")
    with pytest.raises(TypeError, match="not training options"):
        training_options(learning_rate=0.1)
