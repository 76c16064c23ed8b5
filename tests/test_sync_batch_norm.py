"""Batch norm synchronised over two gloo processes on CPU equals nn.BatchNorm2d on the whole batch: output,
input gradient, weight gradients and running statistics, also when one process has an empty share.

The global sums are taken in another order than one process takes them, so values agree to float rounding
(about 1e-7 here), not bit for bit: the tests allow 1e-5. The inputs have a mean of 5 against a spread of 2,
so that a variance taken carelessly from float32 sums of squares would miss by more than that."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eetool.core.sync_batch_norm import SyncBatchNorm, synchronised_batch_norm

TOLERANCE = 1e-5
CHANNELS = 3
# (rank 0's share, rank 1's share) of each step's batch; the second step leaves rank 1 nothing
SPLITS = [(4, 3), (3, 0)]


def steps() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each step's whole batch and the weights of the loss sum(output * weights), the same in every process."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(sum(split), CHANNELS, 5, 4, generator=gen) * 2 + 5,
             torch.randn(sum(split), CHANNELS, 5, 4, generator=gen)) for split in SPLITS]


def fresh_norm(momentum: float | None) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(CHANNELS, momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(CHANNELS, generator=gen))
    return norm


def run_rank(rank: int, store: str, out: str, momentum: float | None) -> None:
    """One process: its share of each step through a synchronised copy of the norm; results saved for the test."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    model = nn.Sequential(fresh_norm(momentum)).train()
    results = []
    with synchronised_batch_norm(model):
        assert isinstance(model[0], SyncBatchNorm)
        for split, (images, loss_weights) in zip(SPLITS, steps(), strict=True):
            part = slice(0, split[0]) if rank == 0 else slice(split[0], sum(split))
            x = images[part].clone().requires_grad_(True)
            y = model(x)
            model.zero_grad()
            (y * loss_weights[part]).sum().backward()
            results.append({"output": y.detach(), "input_grad": x.grad, "weight_grad": model[0].weight.grad.clone(),
                            "bias_grad": model[0].bias.grad.clone()})
    torch.save({"steps": results, "state": model[0].state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_normalise_as_one_over_the_whole_batch(tmp_path: Path) -> None:
    for momentum in (0.1, None):  # None: a cumulative average of the batches
        out = tmp_path / str(momentum)
        out.mkdir()
        mp.spawn(run_rank, args=(str(tmp_path / f"store-{momentum}"), str(out), momentum), nprocs=2)
        ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
        reference = fresh_norm(momentum).train()
        for k, (images, loss_weights) in enumerate(steps()):
            x = images.clone().requires_grad_(True)
            y = reference(x)
            reference.zero_grad()
            (y * loss_weights).sum().backward()
            local = [r["steps"][k] for r in ranks]
            assert max(len(part["output"]) for part in local) > 0
            assert (torch.cat([part["output"] for part in local]) - y).abs().max() < TOLERANCE
            assert (torch.cat([part["input_grad"] for part in local]) - x.grad).abs().max() < TOLERANCE
            # each process holds its copy's part of the gradient; DDP sums them (and divides by the processes)
            assert reference.weight.grad is not None and reference.bias.grad is not None
            assert (sum(part["weight_grad"] for part in local) - reference.weight.grad).abs().max() < TOLERANCE
            assert (sum(part["bias_grad"] for part in local) - reference.bias.grad).abs().max() < TOLERANCE
            assert reference.weight.grad.abs().min() > 100 * TOLERANCE  # not trivially zero
        for r in ranks:
            for key, value in reference.state_dict().items():
                assert (r["state"][key].double() - value.double()).abs().max() < TOLERANCE, key


def test_conversion_keeps_the_tensors_and_puts_the_modules_back() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()), nn.BatchNorm1d(4)).eval()
    before = model.state_dict(keep_vars=True)
    originals = [model[1][0], model[2]]
    with synchronised_batch_norm(model) as any_norm:
        assert any_norm and isinstance(model[1][0], SyncBatchNorm) and isinstance(model[2], SyncBatchNorm)
        during = model.state_dict(keep_vars=True)
        assert during.keys() == before.keys() and all(during[k] is before[k] for k in before)
        assert not model[1][0].training  # eval mode stays eval mode
        model.train()
    assert [model[1][0], model[2]] == originals and originals[0].training  # the mode set meanwhile is kept
    with synchronised_batch_norm(nn.Sequential(nn.Linear(2, 2))) as any_norm:
        assert not any_norm


def test_outside_a_process_group_it_is_plain_batch_norm() -> None:
    images, _ = steps()[0]
    plain = fresh_norm(0.1).train()
    model = nn.Sequential(fresh_norm(0.1)).train()
    with synchronised_batch_norm(model):
        assert torch.equal(model(images), plain(images))
        model.eval()
        plain.eval()
        assert torch.equal(model(images), plain(images))
    assert torch.equal(model[0].running_mean, plain.running_mean)
