"""torchrun: two processes with gloo on CPU give the single-process results; one rank's failure is one error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from eetool.core.artifacts import read_tensors
from eetool.core.distributed import World, join, shard_positions
from eetool.core.errors import UsageError
from tests.cli_helpers import invoke, ok, one_error_line
from tests.test_streaming import mixed_folder

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 -m eetool ARGS`` (one thread per process, as torchrun sets)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "eetool", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize(("n", "batch_size", "size"), [(96, 20, 2), (96, 16, 2), (10, 4, 3), (5, 8, 2)])
def test_shards_cover_every_sample_once_in_whole_batches(n: int, batch_size: int, size: int) -> None:
    shards = [shard_positions(n, batch_size, World(rank, size)) for rank in range(size)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))  # no sample twice, none left out
    batches = list(torch.arange(n).split(batch_size))
    for rank, shard in enumerate(shards):  # whole batches: every sample in the batch it has in one process
        assert torch.equal(shard, torch.cat(batches[rank::size]) if batches[rank::size] else torch.empty(0))


def test_world_from_torchruns_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert World.from_env() == World(1, 2, 1, 2) and not World.from_env().main
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UsageError, match="not a rank"):
        World.from_env()


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="2 processes on this machine, which has 1 CUDA device") as caught:
        join(World(0, 2, 0, 2), "cuda")
    assert caught.value.hint is not None and "--nproc-per-node 1" in caught.value.hint


@pytest.mark.parametrize("rank", ["0", "1"])
def test_commands_without_torchrun_support_refuse_it(rank: str, monkeypatch: pytest.MonkeyPatch, workdir: Path,
                                                     tiny_checkpoint: str, tiny_data: str) -> None:
    """Refused before the processes meet, identically on every rank: rank 0 alone says so."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("prune-weights", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "m.safetensors")
    if rank == "0":
        assert "error: prune-weights does not run under torchrun" in one_error_line(result, 2)  # not its kind
    else:
        assert result.exit_code == 2 and result.stderr == "" and result.stdout == ""
    assert not (workdir / "m.safetensors").exists()


def test_two_processes_equal_one(tmp_path: Path, tiny_checkpoint: str, tiny_data: str) -> None:
    """96 samples in batches of 20: 5 batches, 3 on rank 0 and 2 on rank 1 (the last one short). Class means,
    normalisers, confidences and predictions are bit-identical to one process on one thread (torchrun gives each
    process one), and so are evaluate's accuracies and fit-thresholds' thresholds; only rank 0 prints and writes."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", one, "-b", "20", "--threads", "1",
              "-q"))
    result = torchrun("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", two, "-b", "20",
                      "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 96  # one document: rank 1 printed nothing
    assert result.stderr.count(f"wrote {two}") == 1
    (single, made_by_one, _), (double, made_by_two, _) = (read_tensors(str(one), "class-means"),
                                                          read_tensors(str(two), "class-means"))
    assert (made_by_one.processes, made_by_two.processes) == (1, 2)  # the provenance says how many made it
    assert single.keys() == double.keys()
    for key in single:
        assert torch.equal(single[key], double[key]), key

    plain = ok(invoke("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "--split", "train", "-b", "20",
                      "--threads", "1", "--repeats", "1", "--format", "json"))
    result = torchrun("evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "--split", "train", "-b", "20",
                      "--repeats", "1", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    single_doc, double_doc = json.loads(plain.stdout), json.loads(result.stdout)
    assert single_doc["points"][0]["accuracy"] == double_doc["points"][0]["accuracy"]
    assert single_doc["per_class"] == double_doc["per_class"]

    # fit-thresholds' scoring pass on held-out data: the same confidences, so the same thresholds
    fit = ["fit-thresholds", "--means", one, "--validation", "-c", tiny_checkpoint, "-d", tiny_data, "--split", "test",
           "-b", "20", "--budget", "0.5", "--budget", "0.8", "--format", "json"]
    single_fit = ok(invoke(*fit, "-o", tmp_path / "one.yaml", "--threads", "1"))
    result = torchrun(*fit, "-o", tmp_path / "two.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    single_doc, double_doc = json.loads(single_fit.stdout), json.loads(result.stdout)
    assert single_doc["points"] == double_doc["points"] and len(single_doc["points"]) == 2
    assert yaml.safe_load((tmp_path / "two.yaml").read_text())["provenance"]["processes"] == 2


def test_a_failing_rank_brings_the_other_down(tmp_path: Path, tiny_checkpoint: str) -> None:
    """A corrupt image in rank 1's batches: rank 1's one error line, rank 0 ends silently, no artifact."""
    root = mixed_folder(tmp_path / "data", classes=10, repeats=3)  # 3 images a class; batches of 4
    # c0's three, then c1's 1.jpg, 11.png, 1b.png: position 5, in batch 1, which is rank 1's
    (root / "c1" / "1b.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "means.safetensors"
    result = torchrun("calibrate-means", "-c", tiny_checkpoint, "-d", f"folder:{root}", "--split", "test", "-o", out,
                      "-b", "4", "--data-loading", "stream", "--workers", "0", cwd=tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "1b.png" in errors[0] and "(hint: " in errors[0], result.stderr
    assert "internal error" not in result.stderr and "interrupted" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob("means.safetensors*"))


def test_an_error_every_rank_meets_after_joining_is_printed_once(tmp_path: Path, tiny_checkpoint: str) -> None:
    """Labels past the checkpoint's classes: each rank finds them once it has joined the others and loaded the data;
    rank 0 alone says so, and the run (every rank) ends with the error's code."""
    from safetensors.torch import save_file

    save_file({"test.images": torch.zeros(4, 1, 28, 28, dtype=torch.uint8), "test.labels": torch.tensor([0, 1, 2, 25])},
              str(tmp_path / "labels-25.safetensors"))
    out = tmp_path / "means.safetensors"
    result = torchrun("calibrate-means", "-c", tiny_checkpoint, "-d", tmp_path / "labels-25.safetensors", "--split",
                      "test", "-o", out, cwd=tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "labels up to 25" in errors[0], result.stderr
    assert result.stderr.count("exitcode  : 4") == 2  # torchrun reports each rank that failed, and its code
    assert not out.exists()


def test_segmentation_class_statistics_under_torchrun_equal_one_process(tmp_path: Path) -> None:
    """24 mask images in batches of 8: 2 batches on rank 0, 1 on rank 1. The pixel counts are one process's exactly;
    the float64 sums differ from it only by the order in which the ranks' totals are added (far below 1e-12)."""
    from eetool.core.artifacts import Provenance
    from eetool.core.checkpoint import ModelSpec, save_checkpoint
    from tests.test_segmentation import trained_like, write_mask_file

    spec = ModelSpec(arch="eeseg", num_classes=3, input_shape=(1, 16, 16), mean=[0.5], std=[0.25],
                     arch_args={"width": 8, "head_width": 8}, classes=["bg", "square", "bar"])
    write_mask_file(tmp_path / "masks.safetensors")
    torch.manual_seed(2)
    save_checkpoint(str(tmp_path / "seg.safetensors"), trained_like(spec.build(), seed=2), spec,
                    Provenance(kind="checkpoint"))
    data = f"segmentation:{tmp_path / 'masks.safetensors'}"
    args = ["calibrate-means", "-c", tmp_path / "seg.safetensors", "-d", data, "-b", "8"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    ok(invoke(*args, "-o", one, "--threads", "1", "-q"))
    result = torchrun(*args, "-o", two, "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 24 and result.stderr.count(f"wrote {two}") == 1
    (single, made_by_one, _), (double, made_by_two, _) = (read_tensors(str(one), "segmentation-class-statistics"),
                                                          read_tensors(str(two), "segmentation-class-statistics"))
    assert (made_by_one.processes, made_by_two.processes) == (1, 2)
    assert torch.equal(single["counts"], double["counts"]) and int(single["counts"].sum()) > 0
    assert torch.allclose(single["sums"], double["sums"], rtol=1e-12, atol=0)

