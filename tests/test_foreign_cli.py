"""Foreign checkpoints through every command: a torchvision ResNet-18 state dict, as a plain PyTorch script
saves it, with the same options everywhere; its provenance is the weights plus those options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import invoke, ok, one_error_line
from torch import nn

from eetool.core.errors import ExitCode

NORM = ["--mean", "0.3", "--std", "0.35"]
FOREIGN = ["--arch", "resnet18", "--input-shape", "1,28,28", *NORM]


@pytest.fixture(scope="module")
def resnet18_pt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """torchvision resnet18(num_classes=10) with a one-channel first convolution, saved as a state dict."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    path = tmp_path_factory.mktemp("foreign") / "resnet18-fmnist.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, resnet18_pt: str, tiny_data: str) -> Path:
    """Class means and thresholds made from the foreign file and its options."""
    d = tmp_path_factory.mktemp("made")
    ok(invoke("calibrate-means", "-c", resnet18_pt, *FOREIGN, "-d", tiny_data, "--exits", "quartiles",
              "-o", d / "means.safetensors", "-q"))
    ok(invoke("fit-thresholds", "--means", d / "means.safetensors", "--budget", "0.6", "-o", d / "t.yaml", "-q"))
    return d


def test_the_e2cm_pipeline_takes_foreign_weights(made: Path, resnet18_pt: str, tiny_data: str) -> None:
    result = ok(invoke("evaluate", "-c", resnet18_pt, *FOREIGN, "-d", tiny_data, "--means", made / "means.safetensors",
                       "--thresholds", made / "t.yaml", "--format", "json"))
    assert '"name": "0: budget 0.6"' in result.stdout


def test_other_options_are_another_checkpoint(made: Path, resnet18_pt: str, tiny_data: str) -> None:
    other = ["--arch", "resnet18", "--input-shape", "1,28,28", "--mean", "0.5", "--std", "0.35"]
    line = one_error_line(invoke("evaluate", "-c", resnet18_pt, *other, "-d", tiny_data, "--means",
                                 made / "means.safetensors", "--thresholds", made / "t.yaml"), ExitCode.PROVENANCE)
    assert "made from checkpoint" in line


def test_import_once_then_only_checkpoint(made: Path, resnet18_pt: str, tiny_data: str, workdir: Path) -> None:
    result = ok(invoke("import", "-c", resnet18_pt, *FOREIGN, "--classes", ",".join(f"k{i}" for i in range(10)),
                       "-o", "imported.safetensors", "--format", "json"))
    assert '"num_classes": 10' in result.stdout
    described = ok(invoke("inspect", "--checkpoint", "imported.safetensors", "--format", "json"))
    assert '"arch": "resnet18"' in described.stdout and '"k9"' in described.stdout
    # artifacts made from the foreign file are accepted for its import, and the other way round
    ok(invoke("evaluate", "-c", "imported.safetensors", "-d", tiny_data, "--means", made / "means.safetensors",
              "--thresholds", made / "t.yaml", "-q"))
    ok(invoke("calibrate-means", "-c", "imported.safetensors", "-d", tiny_data, "--exits", "quartiles",
              "-o", "means.safetensors", "-q"))
    ok(invoke("fit-thresholds", "--means", "means.safetensors", "--budget", "0.6", "-o", "t.yaml", "-q"))
    ok(invoke("evaluate", "-c", resnet18_pt, *FOREIGN, "-d", tiny_data, "--means", "means.safetensors",
              "--thresholds", "t.yaml", "-q"))
    doc = yaml.safe_load(Path("t.yaml").read_text())
    assert doc["provenance"]["model_sha256"]


def test_import_refuses_what_it_cannot_write(resnet18_pt: str, workdir: Path) -> None:
    one_error_line(invoke("import", "-c", resnet18_pt, *FOREIGN, "-o", "-"), ExitCode.USAGE)
    one_error_line(invoke("import", "-c", resnet18_pt, *FOREIGN, "-o", "x.safetensors", "--classes", "a,b"),
                   ExitCode.USAGE)
    line = one_error_line(invoke("import", "-c", resnet18_pt, "-o", "x.safetensors"), ExitCode.USAGE)
    assert "--arch" in line
    assert list(workdir.iterdir()) == []


def test_train_fine_tunes_foreign_weights(resnet18_pt: str, tiny_data: str, workdir: Path) -> None:
    ok(invoke("train", "-c", resnet18_pt, *FOREIGN, "-d", tiny_data, "--epochs", "1", "--no-augment",
              "-o", "tuned.safetensors", "-q"))
    doc = ok(invoke("inspect", "--checkpoint", "tuned.safetensors", "--format", "json")).stdout
    assert '"arch": "resnet18"' in doc and '"c0"' in doc  # the classes named after the data


def test_every_checkpoint_reader_takes_the_options(resnet18_pt: str, tiny_data: str, made: Path,
                                                   workdir: Path) -> None:
    ok(invoke("inspect", "-c", resnet18_pt, *FOREIGN, "-q"))
    ok(invoke("fit-thresholds", "--means", made / "means.safetensors", "--validation", "-c", resnet18_pt, *FOREIGN,
              "-d", tiny_data, "--split", "test", "--budget", "0.6", "-o", "v.yaml", "-q"))
    ok(invoke("train-exits", "-c", resnet18_pt, *FOREIGN, "-d", tiny_data, "--exits", "quartiles", "--no-augment",
              "--samples", "32", "-o", "heads.safetensors", "-q"))
    ok(invoke("prune-dataset", "-c", resnet18_pt, *FOREIGN, "-d", tiny_data, "-m", "random", "--ratio", "0.5",
              "-o", "kept.safetensors", "-q"))


def test_config_may_name_the_architecture(resnet18_pt: str, tiny_data: str, workdir: Path) -> None:
    Path("c.yaml").write_text(yaml.safe_dump({"arch": "resnet18", "input-shape": [1, 28, 28], "mean": [0.3],
                                              "std": [0.35], "format": "json"}))
    result = ok(invoke("inspect", "-c", resnet18_pt, "--config", "c.yaml"))
    assert '"input_shape": [\n    1,\n    28,\n    28\n  ]' in result.stdout
