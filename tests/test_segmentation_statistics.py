"""CBT's class statistics as an artifact: `calibrate-means` on a segmentation checkpoint writes eq. 3.1's sums and
counts with their provenance, and `fit-thresholds --method cbt|cbt-ns --means` fits from them what it fits from a
pass over the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_segmentation import trained_like, write_mask_file
from typer.testing import CliRunner

from eetool.cli import app
from eetool.core.artifacts import read_tensors, sha256_file
from eetool.core.checkpoint import ModelSpec, save_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.reporting import Reporter
from eetool.segmentation import IGNORE
from eetool.segmentation.inputs import class_statistics
from eetool.segmentation.statistics import KIND

runner = CliRunner()
SPEC = ModelSpec(arch="eeseg", num_classes=3, input_shape=(1, 16, 16), mean=[0.5], std=[0.25],
                 arch_args={"width": 8, "head_width": 8}, classes=["bg", "square", "bar"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """A network that is not trivial in eval mode, its mask data, and the statistics `calibrate-means` wrote."""
    from eetool.core.artifacts import Provenance

    d = tmp_path_factory.mktemp("statistics")
    write_mask_file(d / "seg-data.safetensors")
    torch.manual_seed(2)
    save_checkpoint(str(d / "seg.safetensors"), trained_like(SPEC.build(), seed=2), SPEC,
                    Provenance(kind="checkpoint"))
    data = f"segmentation:{d / 'seg-data.safetensors'}"
    made = runner.invoke(app, ["calibrate-means", "-c", str(d / "seg.safetensors"), "-d", data, "--batch-size", "8",
                               "-o", str(d / "stats.safetensors"), "-q", "--format", "json"])
    assert made.exit_code == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["schema"] == f"eetool/{KIND}@1" and summary["pixels"] > 0
    return d / "seg.safetensors", data, d / "stats.safetensors"


def test_the_file_holds_the_statistics_of_one_pass_with_their_provenance(
        inputs: tuple[Path, str, Path]) -> None:
    from eetool.core.checkpoint import load_checkpoint

    ckpt, data, stats_file = inputs
    tensors, prov, meta = read_tensors(str(stats_file), KIND)
    ds = load_dataset(data, "train")
    direct = class_statistics(load_checkpoint(str(ckpt)).model, ds, Preprocess((1, 16, 16), [0.5], [0.25]), 8,
                              torch.device("cpu"), Reporter())
    assert tensors["sums"].dtype == torch.float64 and tensors["sums"].shape == (4, 3, 3)
    assert torch.equal(tensors["sums"], direct.sums) and torch.equal(tensors["counts"], direct.counts)
    # every labelled pixel is counted once, and each exit's softmax rows sum to one per pixel
    assert int(direct.counts.sum()) == int((ds.labels != IGNORE).sum())
    assert torch.allclose(tensors["sums"].sum(-1), direct.counts.double().expand(4, -1), rtol=1e-5)
    assert prov.kind == KIND and prov.schema == 1 and prov.checkpoint_sha256 == sha256_file(ckpt)
    assert prov.dataset == ds.fingerprint and prov.args["split"] == "train"
    assert prov.exits == ["exit1", "exit2", "exit3", "final"]
    assert json.loads(meta["eetool.classes"]) == ["bg", "square", "bar"]


@pytest.mark.parametrize(("method", "extra"), [("cbt", ["--alpha", "0.5", "--beta", "0.9"]),
                                               ("cbt-ns", ["--alpha", "0.9", "--beta", "0.998"])])
def test_thresholds_from_the_file_are_those_fitted_on_the_data(tmp_path: Path, inputs: tuple[Path, str, Path],
                                                               method: str, extra: list[str]) -> None:
    ckpt, data, stats_file = inputs
    fit = ["fit-thresholds", "--method", method, "-c", str(ckpt), "--batch-size", "8", "-q", *extra]
    direct = runner.invoke(app, [*fit, "-d", data, "-o", str(tmp_path / "direct.yaml")])
    from_file = runner.invoke(app, [*fit, "--means", str(stats_file), "-o", str(tmp_path / "file.yaml")])
    assert direct.exit_code == 0, direct.stderr
    assert from_file.exit_code == 0, from_file.stderr
    a, b = (yaml.safe_load((tmp_path / f"{n}.yaml").read_text()) for n in ("direct", "file"))
    assert a["thresholds"] == b["thresholds"] and a["spread"] == b["spread"]
    assert a["statistics"] == b["statistics"]
    assert len({round(v, 6) for v in b["thresholds"][0]}) > 1  # the classes are told apart: not all at beta
    assert b["fitted_on"] == b["calibrated_on"] == a["fitted_on"]
    assert b["provenance"]["inputs"] == {KIND: sha256_file(stats_file)}


def test_a_budget_takes_the_statistics_from_the_file(tmp_path: Path, inputs: tuple[Path, str, Path]) -> None:
    ckpt, data, stats_file = inputs
    fit = ["fit-thresholds", "--method", "cbt", "--budget", "0.8", "-c", str(ckpt), "-d", data, "--batch-size", "8",
           "-q"]
    direct = runner.invoke(app, [*fit, "-o", str(tmp_path / "direct.yaml")])
    from_file = runner.invoke(app, [*fit, "--means", str(stats_file), "-o", str(tmp_path / "file.yaml")])
    assert direct.exit_code == 0, direct.stderr
    assert from_file.exit_code == 0, from_file.stderr
    a, b = (yaml.safe_load((tmp_path / f"{n}.yaml").read_text()) for n in ("direct", "file"))
    assert a["thresholds"] == b["thresholds"] and a["alpha"] == b["alpha"] and a["budget"] == b["budget"]


def test_every_data_option_names_every_source() -> None:
    """--data's help lists what its completion offers, the segmentation sources included."""
    import typer

    from eetool.core.sources import SOURCES

    group = typer.main.get_command(app)
    commands = getattr(group, "commands", {})
    helps = {name: param.help or "" for name, command in commands.items() for param in command.params
             if "--data" in getattr(param, "opts", [])}
    assert "fit-thresholds" in helps and "calibrate-means" in helps
    for name, text in helps.items():
        missing = [s for s in SOURCES if s not in text]
        assert not missing, f"{name} --data does not name {missing}"
