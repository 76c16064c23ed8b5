"""torch.distributed under torchrun: one process per rank, gloo on CPU, NCCL on CUDA. Work is shared out by
whole batches; sums and counts are all-reduced in float64 and per-sample records put back in order; rank 0
alone prints and writes. Free of torch at import, so that the CLI reads the environment cheaply.

Method: docs/scale-out.md#how-the-processes-share-the-work
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from eetool.core.errors import UsageError
from eetool.core.interrupts import Interrupted

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

Batch = TypeVar("Batch")
# A rank that waits this long for the others gives up, should torchrun fail to end them after a failure.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class PeerFailed(Interrupted):
    """Another rank has gone (its own error says why; torchrun ends the rest): this rank stops without a word."""

    def __init__(self) -> None:
        super().__init__("a failed peer")


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        """From the variables torchrun sets; one process when they are absent."""
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_size = int(env.get("LOCAL_WORLD_SIZE", size))
        except ValueError:
            raise UsageError("RANK, WORLD_SIZE, LOCAL_RANK or LOCAL_WORLD_SIZE is not a number",
                             "start eetool with torchrun, which sets them, or unset them") from None
        if not 0 <= rank < size or not 0 <= local_rank < local_size:
            raise UsageError(f"RANK {rank} of WORLD_SIZE {size} is not a rank of the world",
                             "start eetool with torchrun, which sets them, or unset them")
        return cls(rank, size, local_rank, local_size)


def join(world: World, device_name: str) -> torch.device:
    """Join torchrun's process group on this rank's device: gloo on CPU, NCCL with one CUDA device per process.
    ``device_name`` is --device (auto, cpu or cuda); a choice that cannot work with this many processes is refused."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if device_name == "cuda" or (device_name == "auto" and cuda):
        if not cuda:
            raise UsageError("--device cuda was asked for but no CUDA device is available", "use --device cpu or auto")
        gpus = torch.cuda.device_count()
        if world.local_size > gpus:
            raise UsageError(f"torchrun started {world.local_size} processes on this machine, which has {gpus} CUDA "
                             f"device{'s' if gpus != 1 else ''}: NCCL needs one device per process",
                             f"use torchrun --nproc-per-node {gpus}, or --device cpu (gloo)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                **({"device_id": device} if backend == "nccl" else {}))  # type: ignore[arg-type]
    return device


def _comm_device() -> torch.device:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over the ranks, in place (and returned); unchanged in one process."""
    if world.distributed:
        import torch.distributed as dist

        buffer = values.to(_comm_device())
        _reduce(buffer, dist.ReduceOp.SUM)
        values.copy_(buffer)
    return values


def all_max(value: float, world: World) -> float:
    """The largest of the ranks' values: the wall time of a pass that every rank must finish."""
    if not world.distributed:
        return value
    import torch
    import torch.distributed as dist

    buffer = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    _reduce(buffer, dist.ReduceOp.MAX)
    return float(buffer.item())


def _reduce(buffer: torch.Tensor, op: dist.ReduceOp.RedOpType) -> None:
    import torch.distributed as dist

    try:
        dist.all_reduce(buffer, op=op)
    except RuntimeError:  # gloo and NCCL report a peer that has gone as a RuntimeError (DistBackendError)
        raise PeerFailed() from None


def shard_batches(batches: list[Batch], world: World) -> list[Batch]:
    """This rank's batches: r, r + N, r + 2N, ...; whole batches, so each sample sits in its usual batch."""
    return batches[world.rank::world.size]


def shard_positions(n: int, batch_size: int, world: World) -> torch.Tensor:
    """Positions of this rank's samples among ``n`` taken in batches of ``batch_size``."""
    import torch

    chunks = shard_batches(list(torch.arange(n).split(batch_size)), world)
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)


def gather_rows(local: torch.Tensor, positions: torch.Tensor, n: int, world: World) -> torch.Tensor:
    """Every rank's rows (``local[i]`` belongs at ``positions[i]``) in the original order of ``n`` rows."""
    if not world.distributed:
        return local
    import torch

    full = torch.zeros((n, *local.shape[1:]), dtype=local.dtype)
    full[positions] = local.cpu()
    return all_sum(full, world)


def share(n: int, world: World) -> slice:
    """This rank's contiguous share of a batch of ``n`` samples split over the ranks (sizes differ by at most one;
    a batch smaller than the world leaves the last ranks an empty share)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def broadcast_from_main(tensors: list[torch.Tensor], world: World) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place (batch norm's running statistics, so that
    every rank scores and saves the same bits whatever its own float rounding)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    for tensor in tensors:
        buffer = tensor.to(_comm_device())
        try:
            dist.broadcast(buffer, 0)
        except RuntimeError:  # a peer that has gone, as in _reduce
            raise PeerFailed() from None
        tensor.copy_(buffer)


def reported_by_main(error: Exception, world: World) -> BaseException:
    """An error that every rank meets at once (training that diverged, say): rank 0's to report. Another rank
    waits until rank 0 has gone, then stops without a word, so that it never ends first and has torchrun stop
    rank 0 before its error line is out."""
    if world.main:
        return error
    import torch.distributed as dist

    try:
        dist.barrier()  # rank 0 never comes to it: the wait fails when rank 0 leaves (or torchrun ends this rank)
    except RuntimeError:
        pass
    return PeerFailed()


def leave() -> None:
    """Leave the process group (at the end of a command), so that no rank exits while others still talk to it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
