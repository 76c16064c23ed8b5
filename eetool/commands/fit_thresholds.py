"""eetool fit-thresholds: E²CM exit thresholds that meet compute budgets, and the convex hull of a sweep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

from eetool.choices import (
    COMBINES,
    DECIDE_AT,
    EXIT_METHODS,
    OVERHEADS,
    SEARCH_OVER,
    SEARCHES,
    SEGMENTATION_METHODS,
    SPLITS,
)
from eetool.commands.common import data_path, format_fields, format_table
from eetool.options import (
    INPUT,
    BatchOpt,
    ForceOpt,
    IndicesOpt,
    OutputOpt,
    Run,
    complete_data,
    eetool_command,
    prefix_completer,
)

SEARCH = "Search"
# What a point's cost is, by the artifact's cost_basis (formatted with its wall_time record).
COST_TEXT = {
    "dense": "dense MACs, as a fraction of the model's",
    "effective": "effective MACs of the pruned network (zero weights cost nothing), as a fraction of its dense "
                 "MACs; dense cost beside",
    "wall-time": "measured wall time of stages and exit decisions (batch {batch_size}, later stages at the batch "
                 "sizes compaction leaves them, {threads} threads), as a fraction of the plain model's "
                 "{plain_seconds:g} s per batch; MACs cost beside",
}


@eetool_command("thresholds", model_options=True, data_options=True, distributed=True)
def command(
    run: Run,
    output: OutputOpt,
    means: Annotated[str | None, typer.Option("--means", help="Class-means artifact from `eetool calibrate-means` "
                                              "(methods e2cm and e2cm+sdn; for cbt and cbt-ns, the class "
                                              "statistics it writes for a segmentation checkpoint).",
                                              rich_help_panel=INPUT)] = None,
    exit_heads: Annotated[str | None, typer.Option("--exit-heads", "--exits-checkpoint",
                                                   help="Exit-heads artifact from `eetool train-exits` (methods sdn, "
                                                   "entropy, e2cm+sdn).",
                                                   rich_help_panel=INPUT)] = None,
    method: Annotated[str, typer.Option("--method", help="e2cm, sdn (largest probability of a head), entropy "
                                        "(of a head's prediction) or e2cm+sdn; for segmentation networks cbt "
                                        "(a threshold per class), cbt-ns (per exit and class) or adp-c (one).",
                                        rich_help_panel=SEARCH,
                                        autocompletion=prefix_completer((*EXIT_METHODS,
                                                                         *SEGMENTATION_METHODS)))] = "e2cm",
    combine: Annotated[str, typer.Option("--combine", help="e2cm+sdn: 'and' leaves when both are confident, 'or' "
                                         "when either is.", rich_help_panel=SEARCH,
                                         autocompletion=prefix_completer(COMBINES))] = "and",
    budget: Annotated[list[float] | None, typer.Option("--budget", help="Target mean cost, normalised to the whole "
                                                       "model (repeat for several; one for cbt, cbt-ns, adp-c, "
                                                       "which search alpha or the threshold for it).",
                                                       rich_help_panel=SEARCH)] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Fit every budget from 0 to 1 in steps of --step and keep "
                                        "the convex hull.", rich_help_panel=SEARCH)] = False,
    step: Annotated[float, typer.Option("--step", min=1e-6, max=1.0, help="Budget granularity of --sweep.",
                                        rich_help_panel=SEARCH)] = 0.001,
    search: Annotated[str, typer.Option("--search", help="greedy (one walk for all budgets) or bisect (the "
                                        "thesis's per-component binary search).", rich_help_panel=SEARCH,
                                        autocompletion=prefix_completer(SEARCHES))] = "greedy",
    search_over: Annotated[str, typer.Option("--search-over", help="cbt, cbt-ns with --budget: alpha (below "
                                             "--beta), beta (above --alpha), or both (alpha below each beta of "
                                             "0.99, 0.995, 0.998, 0.999, 0.9995, keeping the pair of best mIoU on "
                                             "the fitting data).", rich_help_panel=SEARCH,
                                             autocompletion=prefix_completer(SEARCH_OVER))] = "alpha",
    decide_at: Annotated[str | None, typer.Option("--decide-at", help="cbt, cbt-ns, adp-c: where a pixel's exit is "
                                                  "decided, pixel (each image pixel on the upsampled logits, the "
                                                  "thesis's rule) or feature (each position of the head's grid, "
                                                  "upsampled once at the end; eeseg only), as --budget's runs and "
                                                  "`evaluate` use it.  [default: feature for eeseg, pixel for the "
                                                  "torchvision networks]", rich_help_panel=SEARCH,
                                                  show_default=False,
                                                  autocompletion=prefix_completer(DECIDE_AT))] = None,
    validation: Annotated[bool, typer.Option("--validation", help="e2cm: fit on --data/--split (a held-out set) "
                                             "instead of the calibration samples.")] = False,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="Checkpoint (with --validation, "
                                                   "for exit heads, and for cbt, cbt-ns and adp-c).")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data to fit on (with --validation, for exit "
                                             "heads; cbt and cbt-ns without --means, and --budget of a segmentation "
                                             "method), NAME[:PATH]: mnist, fashion-mnist, kmnist, cifar10, cifar100, "
                                             "folder:PATH, safetensors:FILE or demo; for segmentation "
                                             "fashion-mnist-scenes, brain-atlas, segmentation:FILE or "
                                             "segmentation-folder:PATH.", autocompletion=complete_data)] = None,
    split: Annotated[str | None, typer.Option("--split", help="Split of --data.  [default: train]",
                                              autocompletion=prefix_completer(SPLITS), show_default=False)] = None,
    indices: IndicesOpt = None,
    batch_size: BatchOpt = 256,
    alpha: Annotated[float, typer.Option("--alpha", help="cbt, cbt-ns: the threshold of the class the network is "
                                         "surest of (the lower end).", rich_help_panel=SEARCH)] = 0.9,
    beta: Annotated[float, typer.Option("--beta", help="cbt, cbt-ns: the threshold of the class it is least sure "
                                        "of (the upper end).", rich_help_panel=SEARCH)] = 0.998,
    threshold: Annotated[float, typer.Option("--threshold", help="adp-c: the one threshold of every pixel.",
                                             rich_help_panel=SEARCH)] = 0.998,
    overhead: Annotated[str, typer.Option("--overhead", help="analytic: costs are MACs (stages and decisions, from "
                                          "the cost model); measured: each stage's, exit decision's and compaction's "
                                          "wall time, timed on --checkpoint with --data at --batch-size and at the "
                                          "smaller batch sizes compaction leaves, so that budgets are met in wall "
                                          "time on this machine, thread count and batch size.",
                                          rich_help_panel=SEARCH,
                                          autocompletion=prefix_completer(OVERHEADS))] = "analytic",
    force: ForceOpt = False,
) -> None:
    """Find per-exit thresholds for budgets (--budget, or --sweep with its convex hull), or a segmentation
    network's pixel thresholds (--method cbt, cbt-ns, adp-c). Writes -o (YAML)."""
    import torch

    from eetool.artifacts import STDOUT, Provenance, sha256_file, write_yaml
    from eetool.e2cm import ClassMeans
    from eetool.errors import UsageError
    from eetool.heads import load_heads
    from eetool.rules import COMBINES, METHODS
    from eetool.thresholds import ExitStats, check_budget, hull, operating_point
    from eetool.thresholds import sweep as sweep_budgets
    from eetool.wall_costs import WALL_TIME, WallPoint

    if method in SEGMENTATION_METHODS:
        from eetool.segmentation.commands import ThresholdRequest, fit_segmentation_thresholds

        given = [flag for flag, value in (("--means", means if method == "adp-c" else None),
                                          ("--exit-heads", exit_heads), ("--sweep", sweep),
                                          ("--validation", validation)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} do not apply to --method {method}",
                             "drop them: cbt, cbt-ns and adp-c take --checkpoint, --data, --alpha, --beta, --threshold "
                             "and --budget (cbt and cbt-ns also --means)")
        if budget and len(set(budget)) > 1:
            raise UsageError(f"--method {method} takes one --budget, not {len(set(budget))}",
                             "a segmentation thresholds file holds one operating point: fit one file per budget")
        fit_segmentation_thresholds(run, ThresholdRequest(method, output, checkpoint, data, split or "train", indices,
                                                          batch_size, alpha, beta, threshold, force,
                                                          budget[0] if budget else None, search_over, means,
                                                          split_given=split is not None,
                                                          decide_at=decide_at))
        return
    if decide_at is not None:
        raise UsageError(f"--decide-at applies to --method {', '.join(SEGMENTATION_METHODS)}, not {method}",
                         "drop --decide-at: a classifier's exits decide per sample")
    if search_over != "alpha":
        raise UsageError(f"--search-over {search_over} applies to --method cbt or cbt-ns with --budget",
                         "drop --search-over; for classifiers --search chooses the budget search")
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}", f"use one of {', '.join((*METHODS, *SEGMENTATION_METHODS))}")
    if combine not in COMBINES:
        raise UsageError(f"unknown --combine {combine!r}", "use and or or")
    if overhead not in OVERHEADS:
        raise UsageError(f"unknown --overhead {overhead!r}", f"use one of {', '.join(OVERHEADS)}")
    measured = overhead == "measured"
    if not budget and not sweep:
        raise UsageError("no budget asked for", "pass --budget 0.5 (repeatable) or --sweep")
    if method in ("e2cm", "e2cm+sdn") and not means:
        raise UsageError(f"--method {method} needs --means", "make it with `eetool calibrate-means`")
    if method != "e2cm" and not exit_heads:
        raise UsageError(f"--method {method} needs --exit-heads", "make it with `eetool train-exits`")
    run.check_output(output, force=force,
                     inputs=(means, exit_heads, checkpoint, indices, data_path(data) if data else None))
    cm, means_prov = ClassMeans.load(means) if means else (None, None)
    heads, heads_prov = load_heads(exit_heads) if exit_heads else (None, None)
    made_from = means_prov or heads_prov
    assert made_from is not None
    dataset = made_from.dataset
    dense_costs = None  # a pruned network's dense costs, beside the effective ones the budgets are fitted on
    if method == "e2cm" and not validation:
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
                            method, combine, means, cm, means_prov, exit_heads, heads, heads_prov, checkpoint, data,
                            split or "train", indices) if measured else None
    else:
        model = _open_model(run, (f"--method {method}{' with --validation' if method == 'e2cm' else ''} needs "
                                  "--checkpoint and --data", "name the model and the data to fit on"),
                            method, combine, means, cm, means_prov, exit_heads, heads, heads_prov, checkpoint, data,
                            split or "train", indices)
        stats, dataset, dense_costs = _scored_stats(run, model, method, cm, means_prov, batch_size)
    wall = None
    if measured:
        # Budgets are fitted on measured wall-time costs; the analytic ones (MACs) are reported beside them.
        from eetool.wall_costs import measure_wall_costs, measured_batch_sizes

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
        from eetool.wall_costs import sweep_wall

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

    doc: dict[str, Any] = {
        "method": method,
        **({"combine": combine} if method == "e2cm+sdn" else {}),
        "search": search,
        # Budgets and costs are fractions of the dense model's MACs; for a pruned network (eetool prune-weights)
        # they are its effective MACs (zero weights cost nothing), with each point's dense cost beside.
        # With --overhead measured they are fractions of the plain model's measured wall time, measured as recorded
        # under wall_time, and each point's analytic cost (MACs) is beside.
        "cost_basis": WALL_TIME if measured else "dense" if dense_stats is None else "effective",
        **({"wall_time": wall.record()} if wall is not None else {}),
        "fitted_on": dataset,
        "reachable": [round(low, 6), round(min(high, 1.0), 6)],
        "swept": len(swept),
        # Thresholds are written unrounded: each lies one float32 step below a calibration confidence, and
        # any rounding could let that sample (or another) through differently from the fitted point.
        "points": [{"budget": round(p.budget, 6), "cost": round(p.cost, 6), "accuracy": round(p.accuracy, 6),
                    **dense_cost(list(p.thresholds)),
                    # the fits the wall-time loop made for the point, and whether it reached a fixed point
                    **({"fits": p.fits, "converged": p.converged} if isinstance(p, WallPoint) else {}),
                    "thresholds": list(p.thresholds)} for p in points],
    }
    inputs = {"class-means": sha256_file(means)} if means else {}
    if exit_heads:
        inputs["exit-heads"] = sha256_file(exit_heads)
    exits = list(cm.exits) if cm is not None else list(heads.spec.exits) if heads is not None else []
    prov = Provenance(kind="thresholds", checkpoint_sha256=made_from.checkpoint_sha256,
                      model_sha256=made_from.model_sha256, exits=exits,
                      dataset=dataset, args=run.args, inputs=inputs)
    if not run.world.main:  # under torchrun rank 0 writes and prints
        return
    write_yaml(output, doc, prov)
    if output == STDOUT:
        return
    run.reporter.log(f"wrote {output}")

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

    run.emit(doc, text)


@dataclass
class _Model:
    """The checkpoint with its exit rule, and the data it runs on: opened once, for scoring and for timing."""

    checkpoint: Any
    exit_model: Any
    rule: Any
    data: Any
    preprocess: Any
    device: Any


def _open_model(run: Run, missing: tuple[str, str], method: str, combine: str, means: str | None, cm: Any,
                means_prov: Any, exit_heads: str | None, heads: Any, heads_prov: Any, checkpoint: str | None,
                data: str | None, split: str, indices: str | None) -> _Model:
    """--checkpoint with the exit rule of --method, and --data decoded for it (``missing``: the error, and its
    hint, when either is not given)."""
    from eetool.archs import SEGMENTATION_ARCHS
    from eetool.commands.common import exit_rule, load_data, open_checkpoint
    from eetool.datasets import Preprocess
    from eetool.errors import ModelMismatchError, UsageError

    if not checkpoint or not data:
        raise UsageError(*missing)
    ckpt = open_checkpoint(run, checkpoint)
    if ckpt.spec.arch in SEGMENTATION_ARCHS:
        raise ModelMismatchError(f"--method {method} is for classifiers, and {ckpt.label} is a segmentation network",
                                 "use --method cbt, cbt-ns or adp-c")
    device = run.torch()
    em, rule = exit_rule(ckpt, method, combine, means, cm, means_prov, exit_heads, heads, heads_prov, device)
    ds = load_data(run, data, split, indices, ckpt.spec)
    return _Model(ckpt, em, rule, ds, Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std), device)


def _scored_stats(run: Run, model: _Model, method: str, cm: Any, means_prov: Any,
                  batch_size: int) -> tuple[Any, str, Any]:
    """Exit statistics from one pass over --data: E²CM on held-out data, or any method with exit heads; and the
    dense costs of the exits where the statistics' costs are a pruned network's effective ones (else None)."""
    import torch

    from eetool.commands.common import local_share
    from eetool.datasets import check_labels
    from eetool.rules import HeadsRule, cost_models, rule_scores
    from eetool.thresholds import ExitStats

    ckpt, em, rule, ds = model.checkpoint, model.exit_model, model.rule, model.data
    check_labels(ds, ckpt.spec.num_classes)
    if method == "e2cm" and ds.fingerprint == means_prov.dataset:
        run.reporter.warn("the validation data is the calibration data; thresholds are not held out")
    local, gather = local_share(run, ds, batch_size)  # under torchrun: this rank's batches, then every rank's rows
    conf, pred, final = (gather(t) for t in rule_scores(em, local, model.preprocess, rule, batch_size=batch_size,
                                                        device=model.device, reporter=run.reporter))
    if not isinstance(rule, HeadsRule):
        return cm.exit_stats(conf, pred, final, ds.labels), ds.fingerprint, _dense_means_costs(cm)
    correct = torch.cat([pred == ds.labels[:, None], (final == ds.labels)[:, None]], 1)
    dense, costs = cost_models(rule, em, ckpt.spec.input_shape)

    def normalised(c: Any) -> torch.Tensor:
        return torch.tensor(c.normalised_exit_costs(), dtype=torch.float64)

    return (ExitStats(conf, correct, normalised(costs)), ds.fingerprint,
            None if costs is dense else normalised(dense))


def _dense_means_costs(cm: Any) -> Any:
    """The dense exit costs of class means made from a pruned network (whose statistics carry the effective
    ones the budgets are fitted on), else None."""
    import torch

    if not cm.effective_stage_macs:
        return None
    return torch.tensor(cm.cost_model().normalised_exit_costs(), dtype=torch.float64)
