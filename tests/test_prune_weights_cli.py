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

from eetool.classification.exit_heads import load_heads
from eetool.classification.weight_pruning import pack_masks, unpack_masks
from eetool.core.checkpoint import load_checkpoint
from eetool.core.errors import ExitCode

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
    # E²CM on the pruned network: budgets fitted on its effective costs, recorded by calibrate-means
    means = json.loads(ok(invoke("calibrate-means", "-c", ckpt, "-d", tiny_data, "--exits", "half", "-o",
                                 "m.safetensors", "--format", "json", "--no-progress")).stdout)
    assert means["cost_basis"] == "effective"
    fitted = json.loads(ok(invoke("fit-thresholds", "--means", "m.safetensors", "--budget", "0.6", "-o", "e.yaml",
                                  "--format", "json")).stdout)
    assert fitted["cost_basis"] == "effective"
    e2cm_point = fitted["points"][0]
    assert e2cm_point["cost"] <= 0.6 + 1e-6 and e2cm_point["dense_cost"] > e2cm_point["cost"]
    e2cm = json.loads(ok(invoke("evaluate", "-c", ckpt, "-d", tiny_data, "--means", "m.safetensors", "--thresholds",
                                "e.yaml", "--repeats", "1", "--format", "json", "--no-progress")).stdout)
    assert e2cm["cost_basis"] == "effective"
    assert 0 < e2cm["points"][1]["effective_cost"] < e2cm["points"][1]["cost"]


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
    assert doc["final_layer_phases"] == "both"
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
    from eetool.classification import weight_pruning as wp

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


@pytest.mark.parametrize("stop_at", [1, 4], ids=["after-backbone-round-1", "after-heads-round-1"])
def test_ordered_resume_finishes_an_interrupted_run_as_an_uninterrupted_one(
        stop_at: int, tiny_checkpoint: str, tiny_data: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--approach ordered, 2 rounds: backbone rounds 1 and 2, the heads trained, heads rounds 1 and 2. Interrupted in
    either phase after its round 1 and resumed, it writes the weights, heads, masks and steps an uninterrupted run
    writes, bit for bit."""
    from eetool.classification import weight_pruning as wp

    args = ("prune-weights", "-c", tiny_checkpoint, "-d", tiny_data, "--approach", "ordered", "--rounds", "2",
            "--amount", "0.3", "--format", "json", *FAST)
    whole_doc = json.loads(ok(invoke(*args, "-o", "whole.safetensors", "--masks-output", "whole-masks.safetensors"))
                           .stdout)
    run_step = wp.Pruner.run_step

    def interrupted(self: wp.Pruner, index: int) -> dict:
        if index == stop_at:
            raise KeyboardInterrupt
        return run_step(self, index)

    monkeypatch.setattr(wp.Pruner, "run_step", interrupted)
    result = invoke(*args, "-o", "part.safetensors", "--masks-output", "part-masks.safetensors")
    assert result.exit_code == ExitCode.INTERRUPTED and "--resume" in result.stderr
    assert not Path("part.safetensors").exists() and Path("part.safetensors.resume/state.pt").is_file()
    monkeypatch.setattr(wp.Pruner, "run_step", run_step)
    part_doc = json.loads(ok(invoke(*args, "-o", "part.safetensors", "--masks-output", "part-masks.safetensors",
                                    "--resume")).stdout)
    whole, part = load_checkpoint("whole.safetensors"), load_checkpoint("part.safetensors")
    assert whole.model_sha256 == part.model_sha256
    assert torch_equal_states(Path("whole-heads.safetensors"), Path("part-heads.safetensors"))
    with safe_open("whole-masks.safetensors", "pt") as a, safe_open("part-masks.safetensors", "pt") as b:
        assert a.keys() == b.keys() and all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())

    assert [s["phase"] for s in part_doc["steps"]] == ["backbone", "backbone", "train-heads", "heads", "heads"]
    assert without_times(part_doc) == without_times(whole_doc)
    assert not Path("part.safetensors.resume").exists()


# ---------------------------------------------------------------------------------------------
# --structure channel: a smaller dense network, its heads rebuilt

CHANNEL = ("--structure", "channel", "--rounds", "2", "--amount", "0.3", *FAST)


@pytest.fixture(scope="module")
def channel_pruned(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str
                   ) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("channel")
    result = ok(invoke("prune-weights", "-c", tiny_checkpoint, "-d", tiny_data, "-o", d / "c.safetensors",
                       "--format", "json", *CHANNEL))
    return d, json.loads(result.stdout)


def test_channel_rounds_reach_their_macs_targets(channel_pruned: tuple[Path, dict], tiny_checkpoint: str) -> None:
    from eetool.core.costs import count_macs

    d, doc = channel_pruned
    assert sorted(p.name for p in d.iterdir()) == ["c-heads.safetensors", "c.safetensors", "c.yaml"]
    assert [s["phase"] for s in doc["steps"]] == ["train-heads", "channel", "channel"]
    original = load_checkpoint(tiny_checkpoint)
    assert doc["original"]["macs"] == count_macs(original.model, original.spec.input_shape)
    # round k prunes to (1 - 0.3)^k of the unpruned MACs: at or under it, by less than a channel per layer
    for step, target in zip(doc["steps"][1:], [0.7, 0.49], strict=True):
        assert step["target_macs_fraction"] == pytest.approx(target)
        assert target - 0.15 < step["macs_fraction"] <= target
    assert doc["pruned"]["macs"] < doc["original"]["macs"] and doc["pruned"]["parameters"] < doc["original"][
        "parameters"]
    assert set(doc["accuracy"]) == {*doc["exits"], "final"} and doc["baseline_accuracy"].keys() == doc[
        "accuracy"].keys()
    report = yaml.safe_load((d / "c.yaml").read_text())
    assert report["provenance"]["kind"] == "weight-pruning" and report["steps"] == doc["steps"]


def test_a_channel_pruned_checkpoint_reloads_smaller_and_dense(channel_pruned: tuple[Path, dict]) -> None:
    from eetool.core.costs import count_macs, is_pruned
    from eetool.core.exits import build_exit_model

    d, doc = channel_pruned
    ckpt = load_checkpoint(str(d / "c.safetensors"))
    assert ckpt.spec.arch_args["stage_widths"] == doc["pruned"]["widths"]["stage_widths"]
    assert ckpt.spec.arch_args["block_widths"] == doc["pruned"]["widths"]["block_widths"]
    assert count_macs(ckpt.model, ckpt.spec.input_shape) == doc["pruned"]["macs"] and not is_pruned(ckpt.model)
    heads, prov = load_heads(str(d / "c-heads.safetensors"))
    assert prov.checkpoint_sha256 == sha256(d / "c.safetensors") and prov.model_sha256 == ckpt.model_sha256
    shapes = build_exit_model(ckpt.model, ",".join(heads.spec.exits)).exit_shapes(ckpt.spec.input_shape)
    assert [list(s) for s in shapes] == heads.spec.in_shapes


def test_fit_thresholds_and_evaluate_read_the_channel_pruned_network(channel_pruned: tuple[Path, dict],
                                                                      tiny_data: str, workdir: Path) -> None:
    d, doc = channel_pruned
    ckpt, heads = d / "c.safetensors", d / "c-heads.safetensors"
    ok(invoke("fit-thresholds", "--method", "sdn", "--exit-heads", heads, "-c", ckpt, "-d", tiny_data, "--split",
              "test", "--budget", "0.5", "-o", "t.yaml", "-q"))
    result = json.loads(ok(invoke("evaluate", "-c", ckpt, "-d", tiny_data, "--exit-heads", heads, "--thresholds",
                                  "t.yaml", "--repeats", "1", "--format", "json", "--no-progress")).stdout)
    plain, early = result["points"]
    assert result["cost_basis"] == "dense" and plain["macs"] == doc["pruned"]["macs"]
    assert plain["accuracy"] == pytest.approx(doc["accuracy"]["final"])
    assert early["cost"] <= 0.5 + 1e-6


def test_channel_resume_finishes_an_interrupted_run_as_an_uninterrupted_one(
        channel_pruned: tuple[Path, dict], tiny_checkpoint: str, tiny_data: str, workdir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from eetool.classification import channel_pruning as cp

    d, whole_doc = channel_pruned
    args = ("prune-weights", "-c", tiny_checkpoint, "-d", tiny_data, "-q", "-o", "part.safetensors", *CHANNEL)
    run_step = cp.ChannelPruner.run_step

    def interrupted(self: cp.ChannelPruner, index: int) -> dict:
        if index == 2:  # after the first channel round: the state holds a pruned architecture
            raise KeyboardInterrupt
        return run_step(self, index)

    monkeypatch.setattr(cp.ChannelPruner, "run_step", interrupted)
    result = invoke(*args)
    assert result.exit_code == ExitCode.INTERRUPTED and "--resume" in result.stderr
    assert not Path("part.safetensors").exists() and Path("part.safetensors.resume/state.pt").is_file()
    monkeypatch.setattr(cp.ChannelPruner, "run_step", run_step)
    part_doc = json.loads(ok(invoke(*args, "--resume", "--format", "json")).stdout)
    whole, part = load_checkpoint(str(d / "c.safetensors")), load_checkpoint("part.safetensors")
    assert whole.spec.arch_args == part.spec.arch_args and whole.model_sha256 == part.model_sha256
    assert torch_equal_states(d / "c-heads.safetensors", Path("part-heads.safetensors"))
    assert without_times(part_doc) == without_times(whole_doc) and len(part_doc["steps"]) == 3
    assert not Path("part.safetensors.resume").exists()


def without_times(doc: dict) -> list[dict]:
    """A run's step records without their wall times, which no two runs share."""
    return [{k: v for k, v in step.items() if k != "seconds"} for step in doc["steps"]]


def torch_equal_states(a: Path, b: Path) -> bool:
    import torch

    first, second = load_heads(str(a))[0].state_dict(), load_heads(str(b))[0].state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------------------------------------
# evaluate --baseline: the speed-up against the unpruned network, timed in the same rounds (times injected)


def fake_times_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each plain run takes one second per 10,000 parameters of its model: speed-ups are parameter ratios."""
    import eetool.core.inference as inference

    real_predict = inference.predict

    def predict(model, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_predict(model, data, *args, **kwargs)
        result.seconds = sum(p.numel() for p in model.parameters()) / 10_000
        return result

    monkeypatch.setattr(inference, "predict", predict)


def test_evaluate_against_a_baseline(channel_pruned: tuple[Path, dict], tiny_checkpoint: str, tiny_data: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    d, doc = channel_pruned
    fake_times_by_size(monkeypatch)
    args = ("evaluate", "-c", d / "c.safetensors", "-d", tiny_data, "--repeats", "2", "--no-progress")
    result = json.loads(ok(invoke(*args, "--baseline", tiny_checkpoint, "--format", "json")).stdout)
    base, plain = result["baseline"], result["points"][0]
    unpruned = load_checkpoint(tiny_checkpoint)
    assert base["checkpoint_sha256"] == sha256(Path(tiny_checkpoint)) and base["macs"] == doc["original"]["macs"]
    assert 0 <= base["accuracy"] <= 1 and len(base["seconds"]) == 2
    # the parameters of the networks evaluate times: each with its batch norms folded (the default)
    from eetool.core.batch_norm_folding import fold_batch_norm

    pruned = load_checkpoint(str(d / "c.safetensors"))
    params = (sum(p.numel() for p in fold_batch_norm(unpruned.model).parameters())
              / sum(p.numel() for p in fold_batch_norm(pruned.model).parameters()))
    assert plain["speedup_vs_baseline"] == pytest.approx(params, rel=1e-3)
    assert plain["speedup_vs_baseline_min"] == pytest.approx(params, rel=1e-3)
    assert plain["macs_ratio"] == pytest.approx(doc["original"]["macs"] / doc["pruned"]["macs"], rel=1e-3)
    assert plain["speedup_per_macs_ratio"] == pytest.approx(params / plain["macs_ratio"], rel=1e-3)
    assert plain["speedup"] == 1.0  # against itself, as without --baseline
    text = ok(invoke(*args, "--baseline", tiny_checkpoint)).stdout
    assert "vs baseline" in text and "speed-up / ratio" in text and f"{params:.2f}x" in text
    alone = json.loads(ok(invoke(*args, "--format", "json")).stdout)
    assert "baseline" not in alone and not any(k.startswith("speedup_vs") for k in alone["points"][0])
    assert "vs baseline" not in ok(invoke(*args)).stdout
