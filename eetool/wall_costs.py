"""Exit costs in wall time: what ``fit-thresholds --overhead measured`` fits budgets on.

The analytic cost model (eetool.costs) counts MACs, and a decision's Python dispatch, synchronisation
and small kernels cost time its MACs do not show. Here each stage of the backbone and each exit's
decision is timed on the checkpoint, at the batch size asked for, on a few batches of the data being
fitted: after one untimed warm-up pass, ``repeats`` rounds each run every batch through the stages in
turn, timing each stage, the decision after it and the compaction that follows a decision (as
``eetool.inference.ExitBatch`` does it, with every other sample leaving), so that a change of load hits
every part of a round alike; each part's time is the median over rounds and batches. A sample leaving at
exit j then costs the stages up to j plus the decisions and compactions of exits 0..j, as in the analytic
model, and costs are divided
by the plain model's time (the sum of its stages' times, which is the plain model run stage by stage),
so that the plain model is 1. The numbers hold for the machine, thread count and batch size they were
measured at. The smaller batches that later stages run on after compaction are not measured: each stage
is timed at the full batch size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eetool.choices import OVERHEADS
from eetool.datasets import Dataset, Preprocess
from eetool.errors import UsageError
from eetool.exits import ExitModel
from eetool.inference import ExitBatch

ANALYTIC, MEASURED = OVERHEADS
WALL_TIME = "wall-time"


@dataclass
class WallCosts:
    """Median seconds per batch of each stage (the last ending at the model's head), each exit's decision and the
    compaction after it."""

    stage_seconds: list[float]  # len(decision_seconds) + 1
    decision_seconds: list[float]
    batch_size: int
    threads: int
    batches: int
    repeats: int
    compaction_seconds: list[float] = field(default_factory=list)  # per exit; empty: not measured

    @property
    def plain_seconds(self) -> float:
        return sum(self.stage_seconds)

    def normalised_exit_costs(self) -> list[float]:
        """What a sample leaving at exit j costs (j = number of exits: the model's head), decisions and
        compactions included, as a fraction of the plain model's time."""
        out, total = [], 0.0
        compactions = self.compaction_seconds or [0.0] * len(self.decision_seconds)
        for stage, decision, compaction in zip(self.stage_seconds, self.decision_seconds, compactions, strict=False):
            total += stage + decision + compaction
            out.append(total)
        out.append(total + self.stage_seconds[-1])
        return [c / self.plain_seconds for c in out]

    def record(self) -> dict[str, object]:
        """The measurement as the thresholds artifact keeps it."""
        return {"stage_seconds": [float(f"{s:.6g}") for s in self.stage_seconds],
                "decision_seconds": [float(f"{s:.6g}") for s in self.decision_seconds],
                "compaction_seconds": [float(f"{s:.6g}") for s in self.compaction_seconds],
                "plain_seconds": float(f"{self.plain_seconds:.6g}"), "batch_size": self.batch_size,
                "threads": self.threads, "batches": self.batches, "repeats": self.repeats}


def _timer(device: torch.device | str) -> Callable[[], float]:
    """A clock that waits for queued accelerator work first, so that each part is charged its own time."""
    if torch.device(device).type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.perf_counter


@torch.inference_mode()
def measure_wall_costs(exit_model: ExitModel, decide: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       data: Dataset,
                       preprocess: Preprocess, *, batch_size: int, device: torch.device | str = "cpu",
                       batches: int = 3, repeats: int = 5) -> WallCosts:
    """Each stage's and each exit decision's wall time on the first ``batches`` batches of ``data`` (see the
    module docstring); ``decide(j, features)`` is the exit rule's work at exit j."""
    if exit_model.stages is None:
        raise UsageError("--overhead measured times the model stage by stage, and this model cannot be split at "
                         "its exits", "use --overhead analytic")
    exit_model.model.eval().to(device)
    inputs = []
    for images, _, _ in data.batches(batch_size):
        inputs.append(preprocess(images, device))
        if len(inputs) == batches:
            break
    clock = _timer(device)
    n_exits = len(exit_model.stages) - 1
    stage_times: list[list[float]] = [[] for _ in range(n_exits + 1)]
    decision_times: list[list[float]] = [[] for _ in range(n_exits)]
    compaction_times: list[list[float]] = [[] for _ in range(n_exits)]
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, kernels) and is not kept
        for x in inputs:
            h = x
            for j, stage in enumerate(exit_model.stages):
                start = clock()
                h = stage(h)
                after_stage = clock()
                if round_:
                    stage_times[j].append(after_stage - start)
                if j < n_exits:
                    _, pred = decide(j, h)
                    after_decision = clock()
                    batch = ExitBatch.start(h, n_exits)
                    leave = torch.arange(h.shape[0], device=h.device) % 2 == 0
                    start = clock()
                    batch.take_leavers(j, leave, pred)
                    if round_:
                        decision_times[j].append(after_decision - after_stage)
                        compaction_times[j].append(clock() - start)
    return WallCosts([statistics.median(t) for t in stage_times], [statistics.median(t) for t in decision_times],
                     batch_size, torch.get_num_threads(), len(inputs), repeats,
                     [statistics.median(t) for t in compaction_times])
