"""`fit-thresholds` for a classifier: per-exit thresholds of an exit method (eetool.core.exit_methods) that meet
compute budgets, or a sweep of budgets and its convex hull, fitted on the statistics of class means or exit heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eetool.core.choices import OVERHEADS
from eetool.core.exit_methods import (
    CLASSIFICATION_METHODS,
    EXIT_METHODS,
    HEADS,
    MEANS,
    SEGMENTATION_METHODS,
    reads,
)
from eetool.core.options import Run
from eetool.core.reporting import format_fields, format_table
from eetool.core.run_inputs import data_path

if TYPE_CHECKING:
    import torch

    from eetool.classification.e2cm import ClassMeans, MeansRule
    from eetool.classification.exit_heads import ExitHeadsArtifact
    from eetool.classification.rules import HeadsRule
    from eetool.core.checkpoint import Checkpoint
    from eetool.core.datasets import Dataset, Preprocess
    from eetool.core.exits import ExitModel


@dataclass(frozen=True, kw_only=True)
class ExitThresholdRequest:
    """What fit-thresholds is asked for: a classifier's exit thresholds, or (--method cbt, cbt-ns, adp-c) a
    segmentation network's pixel thresholds; ``fit_thresholds`` refuses the options of the other kind."""

    output: str
    means: str | None
    exit_heads: str | None
    method: str
    combine: str
    budget: list[float] | None
    sweep: bool
    step: float
    search: str
    validation: bool
    checkpoint: str | None
    data: str | None
    split: str | None  # None: not given (train)
    indices: str | None
    batch_size: int
    overhead: str
    force: bool
    # the segmentation methods' own, with their defaults
    alpha: float = 0.9
    beta: float = 0.998
    threshold: float = 0.998
    search_over: str = "alpha"
    decide_at: str | None = None


def fit_thresholds(run: Run, req: ExitThresholdRequest) -> None:
    """fit-thresholds: the method's options checked against its kind, then its thresholds fitted and written."""
    from eetool.core.errors import UsageError

    if req.method in SEGMENTATION_METHODS:
        from eetool.segmentation.threshold_fitting import ThresholdRequest

        method, budget = req.method, req.budget
        given = [flag for flag, value in (("--means", req.means if method == "adp-c" else None),
                                          ("--exit-heads", req.exit_heads), ("--sweep", req.sweep),
                                          ("--validation", req.validation)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} do not apply to --method {method}",
                             "drop them: cbt, cbt-ns and adp-c take --checkpoint, --data, --alpha, --beta, --threshold "
                             "and --budget (cbt and cbt-ns also --means)")
        if budget and len(set(budget)) > 1:
            raise UsageError(f"--method {method} takes one --budget, not {len(set(budget))}",
                             "a segmentation thresholds file holds one operating point: fit one file per budget")
        fit_pixel_thresholds = EXIT_METHODS.get(method).load()
        fit_pixel_thresholds(run, ThresholdRequest(method, req.output, req.checkpoint, req.data, req.split or "train",
                                                   req.indices, req.batch_size, req.alpha, req.beta, req.threshold,
                                                   req.force, budget[0] if budget else None, req.search_over,
                                                   req.means, split_given=req.split is not None,
                                                   decide_at=req.decide_at))
        return
    if req.decide_at is not None:
        raise UsageError(f"--decide-at applies to --method {', '.join(SEGMENTATION_METHODS)}, not {req.method}",
                         "drop --decide-at: a classifier's exits decide per sample")
    if req.search_over != "alpha":
        raise UsageError(f"--search-over {req.search_over} applies to --method cbt or cbt-ns with --budget",
                         "drop --search-over; for classifiers --search chooses the budget search")
    fit_exit_thresholds(run, req)


# What a point's cost is, by the artifact's cost_basis (formatted with its wall_time record).
COST_TEXT = {
    "dense": "dense MACs, as a fraction of the model's",
    "effective": "effective MACs of the pruned network (zero weights cost nothing), as a fraction of its dense "
                 "MACs; dense cost beside",
    "wall-time": "measured wall time of stages and exit decisions (batch {batch_size}, later stages at the batch "
                 "sizes compaction leaves them, {threads} threads), as a fraction of the plain model's "
                 "{plain_seconds:g} s per batch; MACs cost beside",
}


def fit_exit_thresholds(run: Run, req: ExitThresholdRequest) -> None:
    import torch

    from eetool.classification.e2cm import ClassMeans
    from eetool.classification.exit_heads import ExitHeadsArtifact
    from eetool.classification.rules import COMBINES
    from eetool.classification.thresholds_artifact import KIND, ExitThresholds, OperatingPoint
    from eetool.classification.wall_costs import WALL_TIME, WallPoint
    from eetool.core.artifacts import STDOUT, Provenance, sha256_file
    from eetool.core.budget_search import ExitStats, check_budget, hull, operating_point
    from eetool.core.budget_search import sweep as sweep_budgets
    from eetool.core.errors import UsageError

    output, means, exit_heads, method, combine = req.output, req.means, req.exit_heads, req.method, req.combine
    budget, sweep, step, search, validation = req.budget, req.sweep, req.step, req.search, req.validation
    checkpoint, data, split, indices, batch_size = req.checkpoint, req.data, req.split, req.indices, req.batch_size
    overhead, force = req.overhead, req.force
    if method not in CLASSIFICATION_METHODS:
        raise UsageError(f"unknown --method {method!r}", f"use one of {', '.join(EXIT_METHODS.names())}")
    if combine not in COMBINES:
        raise UsageError(f"unknown --combine {combine!r}", "use and or or")
    if overhead not in OVERHEADS:
        raise UsageError(f"unknown --overhead {overhead!r}", f"use one of {', '.join(OVERHEADS)}")
    measured = overhead == "measured"
    if not budget and not sweep:
        raise UsageError("no budget asked for", "pass --budget 0.5 (repeatable) or --sweep")
    if reads(method, MEANS) and not means:
        raise UsageError(f"--method {method} needs --means", "make it with `eetool calibrate-means`")
    if reads(method, HEADS) and not exit_heads:
        raise UsageError(f"--method {method} needs --exit-heads", "make it with `eetool train-exits`")
    run.check_output(output, force=force,
                     inputs=(means, exit_heads, checkpoint, indices, data_path(data) if data else None))
    cm = ClassMeans.load(means) if means else None
    heads = ExitHeadsArtifact.load(exit_heads) if exit_heads else None
    made_from = cm.provenance if cm is not None else heads.provenance if heads is not None else None
    assert made_from is not None
    dataset = made_from.dataset
    dense_costs = None  # a pruned network's dense costs, beside the effective ones the budgets are fitted on
    if not reads(method, HEADS) and not validation:
        assert cm is not None and means is not None
        if (checkpoint or data) and not measured:
            raise UsageError("--checkpoint/--data are only used with --validation or --overhead measured",
                             "add --validation or drop them")
        if cm.calibration is None:
            raise UsageError(f"{means} holds no calibration cache", "re-make it with `eetool calibrate-means`")
        c = cm.calibration
        stats = cm.exit_stats(c.confidence, c.prediction, c.final_prediction, c.labels)
        dense_costs = _dense_means_costs(cm)
        # the checkpoint and data only time the stages and decisions
        model = _open_model(run, ("--overhead measured needs --checkpoint and --data",
                                  "name the model and the data to time"),
                            method, combine, cm, heads, checkpoint, data, split or "train",
                            indices) if measured else None
    else:
        model = _open_model(run, (f"--method {method}{' with --validation' if method == 'e2cm' else ''} needs "
                                  "--checkpoint and --data", "name the model and the data to fit on"),
                            method, combine, cm, heads, checkpoint, data, split or "train", indices)
        stats, dataset, dense_costs = _scored_stats(run, model, method, cm, batch_size)
    wall = None
    if measured:
        # Budgets are fitted on measured wall-time costs; the analytic ones (MACs) are reported beside them.
        from eetool.classification.wall_costs import measure_wall_costs, measured_batch_sizes

        assert model is not None
        smaller = ", ".join(str(n) for n in measured_batch_sizes(batch_size)[:-1])
        run.reporter.log(f"timing stages and exit decisions at batch {batch_size}"
                         + (f" and at {smaller}, the batch sizes compaction leaves" if smaller else ""))
        wall = measure_wall_costs(model.exit_model, model.rule.scores, model.data, model.preprocess,
                                  batch_size=batch_size, device=model.device)
        dense_costs = stats.costs
        stats = ExitStats(stats.confidence, stats.correct,
                          torch.tensor(wall.normalised_exit_costs(), dtype=torch.float64))
    beside = "macs_cost" if measured else "dense_cost"  # the other cost of each point, where there is one
    asked = sorted(set(budget or []))
    for b in asked:
        check_budget(stats, b)  # with measured costs, those at the full batch: the model's reachable range

    def fit(budgets: list[float]) -> list[Any]:
        if wall is None:
            return sweep_budgets(stats, budgets, search, seed=run.seed)
        from eetool.classification.wall_costs import sweep_wall

        # later stages run on the smaller batches compaction leaves: fitted by re-costing at those batch sizes
        return sweep_wall(stats, wall, budgets, search, seed=run.seed)

    if sweep:
        grid = [round(i * step, 10) for i in range(int(round(1 / step)) + 1)]
        swept = fit(grid)
        points = hull(swept)
        if asked:
            points = sorted(points + fit(asked), key=lambda p: p.cost)
    else:
        swept = []
        points = fit(asked)
    low, high = stats.reachable()
    dense_stats = None if dense_costs is None else ExitStats(stats.confidence, stats.correct, dense_costs)

    def dense_cost(thresholds: list[float]) -> dict[str, float]:
        if dense_stats is None:
            return {}
        cost, _ = operating_point(dense_stats, torch.tensor(thresholds, dtype=stats.confidence.dtype))
        return {beside: round(cost, 6)}

    inputs = {"class-means": sha256_file(means)} if means else {}
    if exit_heads:
        inputs["exit-heads"] = sha256_file(exit_heads)
    exits = list(cm.exits) if cm is not None else list(heads.heads.spec.exits) if heads is not None else []
    fitted = ExitThresholds(
        method=method, combine=combine, search=search,
        # Budgets and costs are fractions of the dense model's MACs; for a pruned network (eetool prune-weights)
        # they are its effective MACs (zero weights cost nothing), with each point's dense cost beside.
        # With --overhead measured they are fractions of the plain model's measured wall time, measured as recorded
        # under wall_time, and each point's analytic cost (MACs) is beside.
        cost_basis=WALL_TIME if measured else "dense" if dense_stats is None else "effective",
        wall_time=wall.record() if wall is not None else None,
        fitted_on=dataset, reachable=(low, min(high, 1.0)), swept=len(swept),
        # Thresholds are written unrounded: each lies one float32 step below a calibration confidence, and
        # any rounding could let that sample (or another) through differently from the fitted point.
        points=[OperatingPoint(budget=round(p.budget, 6), cost=round(p.cost, 6), accuracy=round(p.accuracy, 6),
                               **dense_cost(list(p.thresholds)),  # type: ignore[typeddict-item]
                               # the fits the wall-time loop made for the point, and whether it converged
                               **({"fits": p.fits, "converged": p.converged} if isinstance(p, WallPoint) else {}),
                               thresholds=list(p.thresholds)) for p in points],
        provenance=Provenance(kind=KIND, checkpoint_sha256=made_from.checkpoint_sha256,
                              model_sha256=made_from.model_sha256, exits=exits, dataset=dataset, args=run.args,
                              inputs=inputs))
    if not run.world.main:  # under torchrun rank 0 writes and prints
        return
    fitted.save(output)
    if output == STDOUT:
        return
    run.wrote(output)

    def text(d: dict[str, Any]) -> str:
        head = format_fields([("thresholds", output), ("method", d["method"] + (f" ({d['combine']})" if "combine" in d
                                                                              else "")),
                              ("search", d["search"]), ("fitted on", d["fitted_on"]),
                              ("cost", COST_TEXT[d["cost_basis"]].format(**d.get("wall_time", {}))),
                              ("reachable", f"{d['reachable'][0]:.4f} to {d['reachable'][1]:.4f}")]
                             + ([("swept", f"{d['swept']} budgets, {len(d['points'])} on the convex hull")]
                                if d["swept"] else []))
        other = {"effective": ("dense cost", "dense_cost"), WALL_TIME: ("MACs cost", "macs_cost")}.get(
            d["cost_basis"])
        table = format_table(["budget", "cost", *([other[0]] if other else []), "accuracy"],
                             [[p["budget"], p["cost"], *([p[other[1]]] if other else []), p["accuracy"]]
                              for p in d["points"]])
        return f"{head}\n\n{table}"

    run.emit(fitted.to_doc(), text)


@dataclass
class _Model:
    """The checkpoint with its exit rule, and the data it runs on: opened once, for scoring and for timing."""

    checkpoint: Checkpoint
    exit_model: ExitModel
    rule: HeadsRule | MeansRule
    data: Dataset
    preprocess: Preprocess
    device: torch.device


def _open_model(run: Run, missing: tuple[str, str], method: str, combine: str, cm: ClassMeans | None,
                heads: ExitHeadsArtifact | None, checkpoint: str | None,
                data: str | None, split: str, indices: str | None) -> _Model:
    """--checkpoint with the exit rule of --method, and --data decoded for it (``missing``: the error, and its
    hint, when either is not given)."""
    from eetool.classification.rules import exit_rule
    from eetool.core.architectures import SEGMENTATION_ARCHS
    from eetool.core.datasets import Preprocess
    from eetool.core.errors import ModelMismatchError, UsageError
    from eetool.core.run_inputs import load_data, open_checkpoint

    if not checkpoint or not data:
        raise UsageError(*missing)
    ckpt = open_checkpoint(run, checkpoint)
    if ckpt.spec.arch in SEGMENTATION_ARCHS:
        raise ModelMismatchError(f"--method {method} is for classifiers, and {ckpt.label} is a segmentation network",
                                 "use --method cbt, cbt-ns or adp-c")
    device = run.torch()
    em, rule = exit_rule(ckpt, method, combine, cm, heads, device)
    ds = load_data(run, data, split, indices, ckpt.spec)
    return _Model(ckpt, em, rule, ds, Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std), device)


def _scored_stats(run: Run, model: _Model, method: str, cm: ClassMeans | None, batch_size: int) -> tuple[Any, str, Any]:
    """Exit statistics from one pass over --data: E²CM on held-out data, or any method with exit heads; and the
    dense costs of the exits where the statistics' costs are a pruned network's effective ones (else None)."""
    import torch

    from eetool.classification.rules import HeadsRule, cost_models, rule_scores
    from eetool.core.budget_search import ExitStats
    from eetool.core.datasets import check_labels
    from eetool.core.run_inputs import local_share

    ckpt, em, rule, ds = model.checkpoint, model.exit_model, model.rule, model.data
    check_labels(ds, ckpt.spec.num_classes)
    if not reads(method, HEADS) and cm is not None and ds.fingerprint == cm.provenance.dataset:
        run.reporter.warn("the validation data is the calibration data; thresholds are not held out")
    local, gather = local_share(run, ds, batch_size)  # under torchrun: this rank's batches, then every rank's rows
    conf, pred, final = (gather(t) for t in rule_scores(em, local, model.preprocess, rule, batch_size=batch_size,
                                                        device=model.device, reporter=run.reporter))
    if not isinstance(rule, HeadsRule):
        assert cm is not None, "a rule without heads is the class means' rule"
        return cm.exit_stats(conf, pred, final, ds.labels), ds.fingerprint, _dense_means_costs(cm)
    correct = torch.cat([pred == ds.labels[:, None], (final == ds.labels)[:, None]], 1)
    dense, costs = cost_models(rule, em, ckpt.spec.input_shape)

    def normalised(c: Any) -> torch.Tensor:
        return torch.tensor(c.normalised_exit_costs(), dtype=torch.float64)

    return (ExitStats(conf, correct, normalised(costs)), ds.fingerprint,
            None if costs is dense else normalised(dense))


def _dense_means_costs(cm: ClassMeans) -> torch.Tensor | None:
    """The dense exit costs of class means made from a pruned network (whose statistics carry the effective
    ones the budgets are fitted on), else None."""
    import torch

    if not cm.effective_stage_macs:
        return None
    return torch.tensor(cm.cost_model().normalised_exit_costs(), dtype=torch.float64)
