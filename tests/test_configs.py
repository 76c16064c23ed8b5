"""Every shipped config (eetool/configs/<command>-<name>.yaml) names only options of its command."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml

from eetool.cli import app
from eetool.commands import COMMANDS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "eetool" / "configs").glob("*.yaml"))


def _command_of(path: Path) -> str:
    matches = [name for name in COMMANDS if path.stem.startswith(f"{name}-")]
    assert matches, f"{path.name} does not start with a command name"
    return max(matches, key=len)


def test_there_are_shipped_configs() -> None:
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_keys_are_options_of_its_command(path: Path) -> None:
    command = typer.main.get_command(app).commands[_command_of(path)]  # type: ignore[attr-defined]
    names = {p.name for p in command.params}
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and doc
    unknown = [k for k in doc if str(k).replace("-", "_") not in names]
    assert not unknown, f"{path.name}: {unknown} are not options of `eetool {_command_of(path)}`"


def test_the_training_recipe_runs_with_its_values(tmp_path: Path, tiny_data: str) -> None:
    """The recipe goes through --config with a tiny override: the run records the recipe's values."""
    from typer.testing import CliRunner

    from eetool.core.artifacts import read_safetensors

    recipe = next(p for p in CONFIGS if p.stem.startswith("train-"))
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(app, ["train", "--config", str(recipe), "--data", tiny_data, "--eval-split", "test",
                                      "--epochs", "1", "--arch-args", "{width: 4}", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    _, meta = read_safetensors(str(out))
    args = yaml.safe_load(meta["eetool.args"])
    doc = yaml.safe_load(recipe.read_text())
    for key in ("lr", "weight-decay", "batch-size", "schedule", "optimizer"):
        assert args[key.replace("-", "_")] == doc[key]
    assert args["epochs"] == 1  # the flag overrides the recipe
