"""Exit costs in wall time: what ``fit-thresholds --overhead measured`` fits budgets on.

Stages, decisions and compactions are timed at several batch sizes; ``sweep_wall`` refits on the per-sample costs
at the batch sizes each fit lets through. The numbers hold for the machine, thread count and batch size measured.

Method: docs/exits-and-costs.md#how-wall-time-costs-are-measured-and-fitted
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from eetool.core.budget_search import ExitStats, GreedyPath, Point, bisect, exit_index, greedy, greedy_path
from eetool.core.choices import OVERHEADS, SEARCHES
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.errors import UsageError
from eetool.core.exits import Carried, ExitModel, exit_input
from eetool.core.inference import ExitBatch

ANALYTIC, MEASURED = OVERHEADS
WALL_TIME = "wall-time"
SMALLER_BATCHES = (2, 4, 16)  # besides the batch size asked for and 1, it divided by these is timed
MAX_FITS = 4


def measured_batch_sizes(batch_size: int) -> list[int]:
    """The batch sizes timed for budgets at ``batch_size``, ascending: it, a half, a quarter, a sixteenth, 1."""
    return sorted({batch_size, 1, *(max(1, batch_size // d) for d in SMALLER_BATCHES)})


@dataclass
class PartSeconds:
    """Median seconds per batch of each stage (the last ending at the model's head), each exit's decision and
    the compaction after it, at one batch size."""

    batch_size: int
    stage_seconds: list[float]  # len(decision_seconds) + 1
    decision_seconds: list[float]
    compaction_seconds: list[float]
    # the early-exit pass's own bookkeeping, paid once per batch: starting the batch (``ExitBatch.start``) and
    # writing the head's predictions back; at batch 1 it is a visible share of a pass the stages do not show
    pass_seconds: float = 0.0

    def record(self) -> dict[str, object]:
        return {"batch_size": self.batch_size, "stage_seconds": _rounded(self.stage_seconds),
                "decision_seconds": _rounded(self.decision_seconds),
                "compaction_seconds": _rounded(self.compaction_seconds),
                "pass_seconds": float(f"{self.pass_seconds:.6g}")}


@dataclass
class WallCosts:
    """The measurement at every batch size timed, ascending; the last is the batch size budgets are for."""

    by_batch_size: list[PartSeconds]
    threads: int
    batches: int
    repeats: int

    @property
    def full(self) -> PartSeconds:
        return self.by_batch_size[-1]

    @property
    def batch_size(self) -> int:
        return self.full.batch_size

    @property
    def num_exits(self) -> int:
        return len(self.full.decision_seconds)

    @property
    def plain_seconds(self) -> float:
        """The plain model's time per batch: its stages' at the full batch size."""
        return sum(self.full.stage_seconds)

    def step_seconds(self) -> list[list[float]]:
        """Per step (stage j with exit j's decision and compaction; the last, the head), seconds per batch at each
        measured batch size, made non-decreasing (module docstring)."""
        steps = []
        for j in range(self.num_exits + 1):
            times = [p.stage_seconds[j] + (p.decision_seconds[j] + p.compaction_seconds[j] if j < self.num_exits
                                           else 0.0) for p in self.by_batch_size]
            steps.append(_monotone(times))
        # the pass's bookkeeping is paid by every batch, so by step 0, which every sample reaches
        steps[0] = _monotone([t + p.pass_seconds for t, p in zip(steps[0], self.by_batch_size, strict=True)])
        return steps

    def exit_costs(self, reach: Sequence[float]) -> list[float]:
        """What a sample leaving at exit j costs (j = number of exits: the model's head), as a fraction of the plain
        model's time per sample, when a fraction ``reach[j]`` of the batch reaches step j: each step at the
        per-sample time of the batch size it then runs at."""
        sizes = [p.batch_size for p in self.by_batch_size]
        per_sample = []
        for r, times in zip(reach, self.step_seconds(), strict=True):
            n = r * self.batch_size
            # no sample gets there: the cost per sample as n falls to 0 (it is paid by nobody)
            per_sample.append(_interpolate(sizes, times, n) / n if n > 0 else times[0] / sizes[0])
        plain_per_sample = self.plain_seconds / self.batch_size
        out, total = [], 0.0
        for p in per_sample:
            total += p
            out.append(total / plain_per_sample)
        return out

    def normalised_exit_costs(self) -> list[float]:
        """Exit costs with every step at the full batch size: the first fit's, and exact at the ends of the reachable
        range (everyone at the first exit, nobody leaving early)."""
        return self.exit_costs([1.0] * (self.num_exits + 1))

    def model_cost(self, exits: torch.Tensor) -> float:
        """The cost under the model of samples leaving at ``exits`` (per sample; the number of exits: the head):
        the batch's time with each step at the batch size that reaches it, over the plain model's."""
        sizes = [p.batch_size for p in self.by_batch_size]
        batch = sum(_interpolate(sizes, times, r * self.batch_size)
                    for r, times in zip(reach_fractions(exits, self.num_exits), self.step_seconds(), strict=True))
        return batch / self.plain_seconds

    def record(self) -> dict[str, object]:
        """The measurement as the thresholds artifact keeps it: the full batch size's parts at the top level, every
        batch size's under ``by_batch_size``."""
        return {"stage_seconds": _rounded(self.full.stage_seconds),
                "decision_seconds": _rounded(self.full.decision_seconds),
                "compaction_seconds": _rounded(self.full.compaction_seconds),
                "pass_seconds": float(f"{self.full.pass_seconds:.6g}"),
                "plain_seconds": float(f"{self.plain_seconds:.6g}"), "batch_size": self.batch_size,
                "threads": self.threads, "batches": self.batches, "repeats": self.repeats,
                "batch_sizes": [p.batch_size for p in self.by_batch_size],
                "by_batch_size": [p.record() for p in self.by_batch_size]}


def _rounded(seconds: list[float]) -> list[float]:
    return [float(f"{s:.6g}") for s in seconds]


def _monotone(times: Sequence[float]) -> list[float]:
    """``times`` at ascending batch sizes made non-decreasing, keeping the dearer reading."""
    out = list(times)
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1])
    return out


def _interpolate(sizes: Sequence[int], times: Sequence[float], n: float) -> float:
    """Time of a batch of ``n`` samples: linear between the measured sizes, and from (0, 0) to the smallest."""
    if n <= 0:
        return 0.0
    lo_n, lo_t = 0.0, 0.0
    for size, t in zip(sizes, times, strict=True):
        if n <= size:
            return lo_t + (t - lo_t) * (n - lo_n) / (size - lo_n)
        lo_n, lo_t = float(size), t
    return lo_t  # n is the full batch up to rounding


def reach_fractions(exits: torch.Tensor, n_exits: int) -> list[float]:
    """Fraction of the samples that reach step j (leave at exit j or later), j = 0 .. n_exits."""
    return [c / exits.numel() for c in _reach_counts(exits, n_exits)]


def _reach_counts(exits: torch.Tensor, n_exits: int) -> list[int]:
    leaving = torch.bincount(exits, minlength=n_exits + 1)
    return leaving.flip(0).cumsum(0).flip(0).tolist()


@dataclass
class WallPoint(Point):
    """An operating point fitted under the wall-time model: its cost is the model's, ``fits`` the fits made and
    ``converged`` whether the last one was a fixed point (module docstring)."""

    fits: int = 1
    converged: bool = True


def _with_costs(stats: ExitStats, costs: list[float]) -> ExitStats:
    return ExitStats(stats.confidence, stats.correct, torch.tensor(costs, dtype=torch.float64))


def sweep_wall(stats: ExitStats, wall: WallCosts, budgets: list[float], search: str = "greedy", *, seed: int = 0,
               tol: float = 5e-4, max_fits: int = MAX_FITS) -> list[WallPoint]:
    """An operating point for every budget reachable under the wall-time model, fitted by the loop of the module
    docstring; ``stats``' own costs are not used. Greedy points are within their budget under the model; bisect's,
    as in ``eetool.core.budget_search.bisect``, within ``tol`` of it or below."""
    if search not in SEARCHES:
        raise UsageError(f"unknown search {search!r}", f"use one of {', '.join(SEARCHES)}")
    n_exits = stats.num_exits
    full = _with_costs(stats, wall.normalised_exit_costs())
    low, high = full.reachable()  # exact under the model: everyone at the first exit, nobody leaving early
    over = tol if search == "bisect" else 0.0
    paths: dict[tuple[float, ...], GreedyPath] = {}
    generator = torch.Generator().manual_seed(seed)

    def path_of(costed: ExitStats) -> GreedyPath:
        key = tuple(costed.costs.tolist())
        if key not in paths:
            paths[key] = greedy_path(costed)
        return paths[key]

    def within_model(costed: ExitStats, budget: float) -> torch.Tensor:
        """The most accurate step of the greedy walk on ``costed``'s costs from the first whose model cost is within
        ``budget`` (the model cost only falls along the walk; its last step, everyone at exit 0, costs ``low``)."""
        path = path_of(costed)
        lo, hi = 0, len(path.costs) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if wall.model_cost(exit_index(stats.confidence, path.thresholds_at([mid], n_exits)[0])) <= budget:
                hi = mid
            else:
                lo = mid + 1
        step = int(path.best_step_from(torch.tensor([lo]))[0])
        return path.thresholds_at([step], n_exits)[0]

    points = []
    for budget in (b for b in budgets if low <= b <= min(high, 1.0)):
        costed, tried = full, []
        reached: list[list[int]] = []  # how many samples each fit lets reach every step
        for fit in range(1, max_fits + 1):
            t = (greedy(costed, budget, path_of(costed)) if search == "greedy"
                 else bisect(costed, budget, tol=tol, generator=generator))
            exits = exit_index(stats.confidence, t)
            if wall.model_cost(exits) > budget + over:
                t = within_model(costed, budget)
                exits = exit_index(stats.confidence, t)
            counts = _reach_counts(exits, n_exits)
            accuracy = float(stats.correct.gather(1, exits[:, None]).double().mean())
            tried.append(WallPoint(budget, wall.model_cost(exits), accuracy, t.tolist(), fit,
                                   bool(reached) and counts == reached[-1]))
            if counts in reached:  # a fixed point, or the fits would go round the same cycle again
                break
            reached.append(counts)
            costed = _with_costs(stats, wall.exit_costs(reach_fractions(exits, n_exits)))
        best = max(tried, key=lambda p: (p.accuracy, p.fits))  # the later fit on ties
        best.fits, best.converged = len(tried), tried[-1].converged
        points.append(best)
    return points


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
                       batches: int | None = None, repeats: int = 5) -> WallCosts:
    """Each stage's, exit decision's and compaction's wall time on the first ``batches`` batches of ``data`` (3, or
    enough for 64 samples), cut to each of ``measured_batch_sizes(batch_size)``; ``decide(j, features)`` is the
    exit rule's work at exit j."""
    batches = batches or max(3, 64 // batch_size)
    if exit_model.stages is None:
        raise UsageError("--overhead measured times the model stage by stage, and this model cannot be split at "
                         "its exits", "use --overhead analytic")
    exit_model.model.eval().to(device)
    inputs = []
    for images, _, _ in data.batches(batch_size):
        inputs.append(preprocess(images, device))
        if len(inputs) == batches:
            break
    sizes = sorted({min(n, min(x.shape[0] for x in inputs)) for n in measured_batch_sizes(batch_size)})
    clock = _timer(device)
    n_exits = len(exit_model.stages) - 1
    # [batch size][part] -> seconds of each round and batch
    stage_times: list[list[list[float]]] = [[[] for _ in range(n_exits + 1)] for _ in sizes]
    decision_times: list[list[list[float]]] = [[[] for _ in range(n_exits)] for _ in sizes]
    compaction_times: list[list[list[float]]] = [[[] for _ in range(n_exits)] for _ in sizes]
    pass_times: list[list[float]] = [[] for _ in sizes]
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, kernels) and is not kept
        for x in inputs:
            for k, size in enumerate(sizes):
                h: Carried = x[:size]
                start = clock()
                started = ExitBatch.start(h, n_exits)
                bookkeeping = clock() - start
                for j, stage in enumerate(exit_model.stages):
                    start = clock()
                    h = stage(h)
                    after_stage = clock()
                    if round_:
                        stage_times[k][j].append(after_stage - start)
                    if j < n_exits:
                        # as ``Thresholded`` decides: the rule's scores, then the comparison with the threshold
                        confidence, pred = decide(j, exit_input(h))
                        _ = confidence > 0.5
                        after_decision = clock()
                        batch = ExitBatch.start(h, n_exits)
                        leave = torch.arange(size, device=x.device) % 2 == 0
                        start = clock()
                        batch.take_leavers(j, leave, pred)
                        if round_:
                            decision_times[k][j].append(after_decision - after_stage)
                            compaction_times[k][j].append(clock() - start)
                    else:
                        start = clock()
                        started.predictions.index_copy_(0, started.remaining, exit_input(h).argmax(1))
                        if round_:
                            pass_times[k].append(bookkeeping + clock() - start)

    def medians(times: list[list[float]]) -> list[float]:
        return [statistics.median(t) for t in times]

    return WallCosts([PartSeconds(size, medians(stage_times[k]), medians(decision_times[k]),
                                  medians(compaction_times[k]), statistics.median(pass_times[k]))
                      for k, size in enumerate(sizes)],
                     torch.get_num_threads(), len(inputs), repeats)
