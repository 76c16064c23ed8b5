"""prune-weights end to end on the tiny checkpoint: the outputs it writes together, the masks against the written
zeros, the heads' provenance, and the pruned checkpoint read by inspect, fit-thresholds and evaluate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import invoke, ok, one_error_line, sha256
from safetensors import safe_open

from eetool.checkpoint import load_checkpoint
from eetool.errors import ExitCode
from eetool.heads import load_heads
from eetool.weight_pruning import pack_masks, unpack_masks

FAST = ("--batch-size", "32", "--no-augment", "--device", "cpu", "--no-progress", "--finetune-samples", "32",
        "--exits", "half")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("pruned")
    result = ok(invoke("prune-weights", "-c", tiny_checkpoint, "-d", tiny_data, "-o", d / "p.safetensors",
                       "--masks-output", d / "masks.safetensors", "--rounds", "2", "--amount", "0.3",
                       "--format", "json", *FAST))
    return d, json.loads(result.stdout)


def test_writes_every_output_and_reports_the_sparsity(pruned: tuple[Path, dict]) -> None:
    d, doc = pruned
    assert sorted(p.name for p in d.iterdir()) == ["masks.safetensors", "p-heads.safetensors", "p.safetensors",
                                                   "p.yaml"]
    assert doc["schema"] == "eetool/weight-pruning@1" and doc["requested_sparsity"] == pytest.approx(0.51)
    assert [s["phase"] for s in doc["steps"]] == ["train-heads", "joint", "joint"]
    assert abs(doc["sparsity"]["taking_part"] - 0.51) < 1e-3
    report = yaml.safe_load((d / "p.yaml").read_text())
    assert report["provenance"]["kind"] == "weight-pruning" and report["steps"] == doc["steps"]
    assert {row["part"] for row in report["layers"]} == {"backbone", "heads"}
    assert doc["costs"]["basis"] == "effective" and doc["costs"]["effective_model_macs"] < doc["costs"]["model_macs"]


def test_masks_are_the_zeros_of_the_written_checkpoint(pruned: tuple[Path, dict]) -> None:
    d, _ = pruned
    with safe_open(str(d / "masks.safetensors"), framework="pt") as f:
        meta = f.metadata()
        packed = {k: f.get_tensor(k) for k in f.keys()}
    masks = unpack_masks(packed, meta)
    ckpt = load_checkpoint(str(d / "p.safetensors"))
    heads, _ = load_heads(str(d / "p-heads.safetensors"))
    weights = {**{f"backbone/{k}": v for k, v in ckpt.model.state_dict().items()},
               **{f"heads/{k}": v for k, v in heads.state_dict().items()}}
    assert masks and all(torch_equal(masks[k], weights[k] != 0) for k in masks)
    # bit-packed: an eighth of a byte per weight, not a dense copy
    assert sum(p.numel() for p in packed.values()) == sum(-(-m.numel() // 8) for m in masks.values())
    assert pack_masks(masks)[0].keys() == packed.keys()


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]


def test_heads_name_the_pruned_checkpoint(pruned: tuple[Path, dict]) -> None:
    d, doc = pruned
    _, prov = load_heads(str(d / "p-heads.safetensors"))
    assert prov.checkpoint_sha256 == sha256(d / "p.safetensors") and prov.exits == doc["exits"]


def test_other_commands_read_the_pruned_checkpoint(pruned: tuple[Path, dict], tiny_data: str, workdir: Path) -> None:
    d, _ = pruned
    ckpt, heads = d / "p.safetensors", d / "p-heads.safetensors"
    info = json.loads(ok(invoke("inspect", "-c", ckpt, "--format", "json")).stdout)
    assert info["pruned"] and info["effective_model_cost"] < info["model_cost"]
    assert info["exits"][-1]["effective_macs"] == info["effective_model_cost"]
    fitted = json.loads(ok(invoke("fit-thresholds", "--method", "sdn", "--exit-heads", heads, "-c", ckpt, "-d",
                                  tiny_data, "--split", "test", "--budget", "0.5", "-o", "t.yaml", "--format", "json",
                                  "--no-progress")).stdout)
    assert fitted["cost_basis"] == "effective"
    point = fitted["points"][0]
    assert point["cost"] <= 0.5 + 1e-6 and point["dense_cost"] > point["cost"]
    result = json.loads(ok(invoke("evaluate", "-c", ckpt, "-d", tiny_data, "--exit-heads", heads, "--thresholds",
                                  "t.yaml", "--repeats", "1", "--format", "json", "--no-progress")).stdout)
    assert result["cost_basis"] == "effective" and "dense kernels" in result["speed_note"]
    plain, early = result["points"]
    assert plain["cost"] == 1.0 and plain["effective_cost"] < 1.0 and plain["throughput"] > 0
    assert early["effective_cost"] == pytest.approx(point["cost"], abs=1e-6)


def test_an_unpruned_checkpoint_keeps_its_dense_costs(tiny_checkpoint: str, tiny_data: str) -> None:
    info = json.loads(ok(invoke("inspect", "-c", tiny_checkpoint, "--format", "json")).stdout)
    assert not info["pruned"] and info["effective_model_cost"] == info["model_cost"]
    assert all(r["effective_macs"] == r["macs"] for r in info["exits"])
    result = json.loads(ok(invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "--repeats", "1",
                                  "--format", "json", "--no-progress")).stdout)
    assert result["cost_basis"] == "dense" and "speed_note" not in result
    assert result["points"][0]["effective_cost"] == 1.0


def test_ordered_with_a_plot(tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    pytest.importorskip("matplotlib")
    doc = json.loads(ok(invoke("prune-weights", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "o.safetensors",
                               "--approach", "ordered", "--rounds", "1", "--plot", "o.png", "--format", "json",
                               *FAST)).stdout)
    assert [s["phase"] for s in doc["steps"]] == ["backbone", "train-heads", "heads"]
    assert Path("o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not Path("o.safetensors.resume").exists()


def test_plot_without_matplotlib_is_refused_before_any_work(tiny_checkpoint: str, tiny_data: str, workdir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = one_error_line(invoke("prune-weights", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "p.safetensors",
                                 "--plot", "p.png", *FAST), ExitCode.USAGE)
    assert "pip install 'eetool[plot]'" in line
    assert list(workdir.iterdir()) == []


def test_resume_finishes_an_interrupted_run_as_an_uninterrupted_one(tiny_checkpoint: str, tiny_data: str,
                                                                    workdir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from eetool import weight_pruning as wp

    args = ("prune-weights", "-c", tiny_checkpoint, "-d", tiny_data, "--rounds", "2", "-q", *FAST)
    ok(invoke(*args, "-o", "whole.safetensors"))
    run_step = wp.Pruner.run_step

    def interrupted(self: wp.Pruner, index: int) -> dict:
        if index == 2:
            raise KeyboardInterrupt
        return run_step(self, index)

    monkeypatch.setattr(wp.Pruner, "run_step", interrupted)
    result = invoke(*args, "-o", "part.safetensors")
    assert result.exit_code == ExitCode.INTERRUPTED and "--resume" in result.stderr
    assert not Path("part.safetensors").exists() and Path("part.safetensors.resume/state.pt").is_file()
    monkeypatch.setattr(wp.Pruner, "run_step", run_step)
    ok(invoke(*args, "-o", "part.safetensors", "--resume"))
    whole, part = load_checkpoint("whole.safetensors"), load_checkpoint("part.safetensors")
    assert whole.model_sha256 == part.model_sha256
    assert not Path("part.safetensors.resume").exists()
