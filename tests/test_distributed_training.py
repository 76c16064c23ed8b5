"""train and train-exits under torchrun: two gloo processes on CPU train as one process does with the same
global batch; resume works; only rank 0 writes and prints.

DDP sums the ranks' gradients in another order than one process sums a batch's, so weights agree to float
rounding (about 1e-7 here after a few SGD steps), not bit for bit: the tests allow 1e-5, while the steps move
the weights by more than 1e-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eetool.core.distributed import World, share
from eetool.core.training_loop import Augmentation, augment_batch
from tests.cli_helpers import invoke, ok, one_error_line
from tests.test_distributed import torchrun

TOLERANCE = 1e-5


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize(("n", "size"), [(15, 2), (16, 2), (1, 2), (7, 3)])
def test_shares_split_a_batch_in_order(n: int, size: int) -> None:
    shares = [share(n, World(rank, size)) for rank in range(size)]
    assert [i for part in shares for i in range(n)[part]] == list(range(n))  # in order, each sample once
    assert max(len(range(n)[p]) for p in shares) - min(len(range(n)[p]) for p in shares) <= 1


def test_each_process_augments_its_share_as_one_process_does() -> None:
    images = torch.randint(0, 256, (15, 3, 8, 8), dtype=torch.uint8)
    whole = augment_batch(images, torch.Generator().manual_seed(3))
    drawn = Augmentation.draw(15, torch.Generator().manual_seed(3), 8, 8)
    for rank in range(2):
        part = share(15, World(rank, 2))
        assert torch.equal(drawn.select(part).apply(images[part]), whole[part])
    assert not torch.equal(whole, images)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_mixup_under_torchrun_is_refused(rank: str, monkeypatch: pytest.MonkeyPatch, workdir: Path,
                                         tiny_data: str) -> None:
    """Mixup pairs samples across the whole batch: refused before the processes meet, by rank 0 alone."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("train", "-d", tiny_data, "-o", "m.safetensors", "--arch-args", "{width: 4}", "--mixup", "0.2")
    if rank == "0":
        assert "--mixup" in one_error_line(result, 2)
    else:
        assert result.exit_code == 2 and result.stderr == "" and result.stdout == ""
    assert not (workdir / "m.safetensors").exists()


def test_train_resumed_under_torchrun_equals_one_process(tmp_path: Path, tiny_data: str) -> None:
    """Epoch 1 of 2 in one process, interrupted once its state is saved; epoch 2 resumed under torchrun. Batches
    of 15 from 96 samples: shares of 8 and 7, and a last batch of 6 (3 and 3); augmentation on. The model has no
    batch norm, so the DDP run is the one-process run to float rounding at any rate (see the ResNet case of
    the prune-dataset test for batch norm)."""
    import eetool.core.training_loop as training_module

    flags = ("-d", tiny_data, "--arch", "tests.plain_models:convnet", "--arch-args", "{width: 4}", "--epochs", "2",
             "-b", "15", "--optimizer", "sgd", "--lr", "0.05", "--format", "json")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    ok(invoke("train", *flags, "-o", one, "--threads", "1"))
    save_state = training_module._save_state

    def save_then_interrupt(*args: object, **kwargs: object) -> None:
        save_state(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_module, "_save_state", save_then_interrupt)
        assert invoke("train", *flags, "-o", two, "--threads", "1").exit_code == 130
    state = Path(f"{two}.resume.pt")
    after_epoch_1 = torch.load(state, weights_only=True)["model"]

    result = torchrun("train", *flags, "-o", two, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # one document: rank 1 printed nothing
    assert doc["processes"] == 2 and doc["samples_seen"] == 192
    assert result.stderr.count("resuming after epoch 1 of 2") == 1
    assert not state.exists()  # rank 0 removed the state once the checkpoint was written
    single, double = load_file(str(one)), load_file(str(two))
    assert max_difference(single, double) < TOLERANCE
    assert max_difference(single, after_epoch_1) > 100 * TOLERANCE  # epoch 2 moved the weights


def test_train_exits_under_torchrun_equals_one_process(tmp_path: Path, tiny_checkpoint: str, tiny_data: str) -> None:
    """SDN heads on a frozen backbone (eval-mode batch norm, heads without any): the same heads as one process.
    A budget of 113 samples in batches of 16 ends with a batch of one sample, which leaves rank 1 an empty share."""
    flags = ("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "-b", "16", "--samples", "113",
             "--optimizer", "sgd", "--lr", "0.05", "--eval-split", "test", "--format", "json")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    single_doc = json.loads(ok(invoke(*flags, "-o", one, "--threads", "1")).stdout)
    result = torchrun(*flags, "-o", two, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    double_doc = json.loads(result.stdout)
    assert result.stderr.count(f"wrote {two}") == 1
    assert (single_doc["processes"], double_doc["processes"]) == (1, 2)
    assert single_doc["samples_seen"] == double_doc["samples_seen"] == 113
    assert double_doc["loss"] == pytest.approx(single_doc["loss"], rel=1e-4)
    assert max_difference(load_file(str(one)), load_file(str(two))) < TOLERANCE
    # each head's accuracy on the 64 test samples, each rank scoring its share: at most a near tie apart
    for a, b in zip(single_doc["exits"], double_doc["exits"], strict=True):
        assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 64 + 1e-9


@pytest.mark.parametrize("batch_norm", [False, True])
def test_prune_dataset_under_torchrun_prunes_the_same_samples(batch_norm: bool, tmp_path: Path, tiny_data: str,
                                                               tiny_checkpoint: str) -> None:
    """EEPrune's pruning phase under DDP: every rank's qualification records are gathered after each epoch and
    the scoring pass's rows after training, and the pruned index lists are those of one process. On a model
    without batch norm, and on the ResNet-20 with batch norm in train mode, synchronised over the processes.
    Batches of 15: uneven shares. (eeprune-soft, since few random-pixel samples qualify.) The ResNet trains at
    --lr 0.01: at 0.05 its training on random pixels amplifies float rounding so much that one process on 1 and
    on 2 threads already prunes different samples (records 2e-2 apart); at 0.01 one process, another thread
    count and two processes agree to 1e-6, while batch norm over each process's share alone is 7e-2 off."""
    from eetool.core.artifacts import Provenance, read_tensors
    from eetool.core.checkpoint import ModelSpec, save_checkpoint

    checkpoint: Path | str = tiny_checkpoint
    model_flags: tuple[str, ...] = ("--lr", "0.01")
    if not batch_norm:
        arch = "tests.plain_models:convnet"
        spec = ModelSpec(arch=arch, num_classes=10, input_shape=(1, 28, 28), mean=[0.5], std=[0.25],
                         arch_args={"width": 4}, classes=[f"c{k}" for k in range(10)])
        torch.manual_seed(0)
        checkpoint = tmp_path / "plain.safetensors"
        save_checkpoint(str(checkpoint), spec.build(), spec, Provenance(kind="checkpoint"))
        model_flags = ("--arch", arch, "--lr", "0.05")
    flags = ("prune-dataset", "-c", checkpoint, *model_flags, "-d", tiny_data, "--method", "eeprune-soft",
             "--epochs", "2", "-b", "15", "--ratio", "0.3", "--format", "json")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    single_doc = json.loads(ok(invoke(*flags, "-o", one, "--threads", "1")).stdout)
    result = torchrun(*flags, "-o", two, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    double_doc = json.loads(result.stdout)
    assert double_doc["pruned"] == single_doc["pruned"] > 0
    (single, _, _), (double, _, _) = read_tensors(str(one), "indices"), read_tensors(str(two), "indices")
    assert torch.equal(single["indices"], double["indices"]) and torch.equal(single["pruned"], double["pruned"])
    qualified = torch.isfinite(single["records.qualified"])
    assert qualified.any() and torch.equal(qualified, torch.isfinite(double["records.qualified"]))
    for key, rows in (("records.early_margin", slice(None)), ("records.final_loss", slice(None)),
                      ("records.qualified", qualified)):
        assert float((single[key][rows] - double[key][rows]).abs().max()) < TOLERANCE, key
    assert not Path(f"{two}.resume").exists()


def test_calibrate_means_with_clusters_under_torchrun_equals_one_process(tmp_path: Path, tiny_checkpoint: str,
                                                                          tiny_data: str) -> None:
    """k-means centres: each rank computes the features of its batches (5 batches of 20: 3 and 2), the rows are
    gathered and every rank clusters the same features, so centres and means are bit-identical to one process
    on one thread (torchrun gives each process one)."""
    from eetool.core.artifacts import read_tensors

    flags = ("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "--clusters", "10", "-b", "20", "-q")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    ok(invoke(*flags, "-o", one, "--threads", "1"))
    result = torchrun(*flags, "-o", two, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (single, _, _), (double, _, _) = read_tensors(str(one), "class-means"), read_tensors(str(two), "class-means")
    assert single.keys() == double.keys() and any("means" in key for key in single)
    for key in single:
        assert torch.equal(single[key], double[key]), key

