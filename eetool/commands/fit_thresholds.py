"""eetool fit-thresholds: E²CM exit thresholds that meet compute budgets, and the convex hull of a sweep."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.core.choices import COMBINES, DECIDE_AT, OVERHEADS, SEARCH_OVER, SEARCHES, SPLITS
from eetool.core.exit_methods import (
    EXIT_METHODS,
    method_help,
)
from eetool.core.options import (
    INPUT,
    BatchOpt,
    ForceOpt,
    IndicesOpt,
    OutputOpt,
    Run,
    complete_data,
    eetool_command,
    prefix_completer,
    within,
)
from eetool.core.sources import source_list

SEARCH = "Search"
# The search's options, declared here so that the command's signature reads as its list of options.
MethodOpt = Annotated[str, typer.Option("--method", help=method_help(), rich_help_panel=SEARCH,
                                        autocompletion=prefix_completer(EXIT_METHODS.names()))]
CombineOpt = Annotated[str, typer.Option("--combine", help="e2cm+sdn: 'and' leaves when both are confident, 'or' "
                                         "when either is.", rich_help_panel=SEARCH,
                                         autocompletion=prefix_completer(COMBINES))]
BudgetOpt = Annotated[list[float] | None, typer.Option(
    "--budget", help="Target mean cost, normalised to the whole model (repeat for several; one for cbt, cbt-ns, "
    "adp-c, which search alpha or the threshold for it).", rich_help_panel=SEARCH)]
SweepOpt = Annotated[bool, typer.Option("--sweep", help="Fit every budget from 0 to 1 in steps of --step and keep "
                                        "the convex hull.", rich_help_panel=SEARCH)]
StepOpt = Annotated[float, typer.Option("--step", callback=within(1e-6, 1.0), help="Budget granularity of --sweep.",
                                        rich_help_panel=SEARCH)]
SearchOpt = Annotated[str, typer.Option("--search", help="greedy (one walk for all budgets) or bisect (the "
                                        "thesis's per-component binary search).", rich_help_panel=SEARCH,
                                        autocompletion=prefix_completer(SEARCHES))]
SearchOverOpt = Annotated[str, typer.Option(
    "--search-over", help="cbt, cbt-ns with --budget: alpha (below --beta), beta (above --alpha), or both (alpha "
    "below each beta of 0.99, 0.995, 0.998, 0.999, 0.9995, keeping the pair of best mIoU on the fitting data).",
    rich_help_panel=SEARCH, autocompletion=prefix_completer(SEARCH_OVER))]
DecideAtOpt = Annotated[str | None, typer.Option(
    "--decide-at", help="cbt, cbt-ns, adp-c: where a pixel's exit is decided, pixel (each image pixel on the "
    "upsampled logits, the thesis's rule) or feature (each position of the head's grid, upsampled once at the end), "
    "as --budget's runs and `evaluate` use it.  [default: pixel]", rich_help_panel=SEARCH,
    show_default=False, autocompletion=prefix_completer(DECIDE_AT))]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="cbt, cbt-ns: the threshold of the class the network is "
                                         "surest of (the lower end).", rich_help_panel=SEARCH)]
BetaOpt = Annotated[float, typer.Option("--beta", help="cbt, cbt-ns: the threshold of the class it is least sure "
                                        "of (the upper end).", rich_help_panel=SEARCH)]
ThresholdOpt = Annotated[float, typer.Option("--threshold", help="adp-c: the one threshold of every pixel.",
                                             rich_help_panel=SEARCH)]
OverheadOpt = Annotated[str, typer.Option(
    "--overhead", help="analytic: costs are MACs (stages and decisions, from the cost model); measured: each "
    "stage's, exit decision's and compaction's wall time, timed on --checkpoint with --data at --batch-size and at "
    "the smaller batch sizes compaction leaves, so that budgets are met in wall time on this machine, thread count "
    "and batch size.", rich_help_panel=SEARCH, autocompletion=prefix_completer(OVERHEADS))]


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
    method: MethodOpt = "e2cm",
    combine: CombineOpt = "and",
    budget: BudgetOpt = None,
    sweep: SweepOpt = False,
    step: StepOpt = 0.001,
    search: SearchOpt = "greedy",
    search_over: SearchOverOpt = "alpha",
    decide_at: DecideAtOpt = None,
    validation: Annotated[bool, typer.Option("--validation", help="e2cm: fit on --data/--split (a held-out set) "
                                             "instead of the calibration samples.")] = False,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="Checkpoint (with --validation, "
                                                   "for exit heads, and for cbt, cbt-ns and adp-c).")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data to fit on (with --validation, for exit "
                                             "heads; cbt and cbt-ns without --means, and --budget of a segmentation "
                                             f"method), NAME[:PATH]: {source_list()}.",
                                             autocompletion=complete_data)] = None,
    split: Annotated[str | None, typer.Option("--split", help="Split of --data.  [default: train]",
                                              autocompletion=prefix_completer(SPLITS), show_default=False)] = None,
    indices: IndicesOpt = None,
    batch_size: BatchOpt = 256,
    alpha: AlphaOpt = 0.9,
    beta: BetaOpt = 0.998,
    threshold: ThresholdOpt = 0.998,
    overhead: OverheadOpt = "analytic",
    force: ForceOpt = False,
) -> None:
    """Find per-exit thresholds for budgets (--budget, or --sweep with its convex hull), or a segmentation
    network's pixel thresholds (--method cbt, cbt-ns, adp-c). Writes -o (YAML)."""
    from eetool.classification.exit_thresholds import ExitThresholdRequest, fit_thresholds

    fit_thresholds(run, ExitThresholdRequest(
        output=output, means=means, exit_heads=exit_heads, method=method, combine=combine, budget=budget,
        sweep=sweep, step=step, search=search, validation=validation, checkpoint=checkpoint, data=data, split=split,
        indices=indices, batch_size=batch_size, overhead=overhead, force=force, alpha=alpha, beta=beta,
        threshold=threshold, search_over=search_over, decide_at=decide_at))
