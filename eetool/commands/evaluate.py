"""eetool evaluate: accuracy, cost and measured throughput of a checkpoint on a dataset."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.core.choices import DECIDE_AT
from eetool.core.options import (
    INPUT,
    MAX_REPEATS,
    BatchOpt,
    CheckpointOpt,
    Count,
    CountOpt,
    DataOpt,
    FoldBatchNormOpt,
    ForceOpt,
    IndicesOpt,
    OptionalOutputOpt,
    Run,
    SplitOpt,
    ThresholdsOpt,
    eetool_command,
    prefix_completer,
)


@eetool_command("evaluation", model_options=True, data_options=True, distributed=True)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    data: DataOpt,
    split: SplitOpt = "test",
    indices: IndicesOpt = None,
    batch_size: BatchOpt = 256,
    count: CountOpt = Count.macs,
    output: OptionalOutputOpt = None,
    force: ForceOpt = False,
    means: Annotated[str | None, typer.Option("--means", help="Class-means artifact (with --thresholds): evaluate "
                                              "early exits.", rich_help_panel=INPUT)] = None,
    thresholds: ThresholdsOpt = None,
    exit_heads: Annotated[str | None, typer.Option("--exit-heads", "--exits-checkpoint",
                                                   help="Exit-heads artifact (with --thresholds fitted on it).",
                                                   rich_help_panel=INPUT)] = None,
    point: Annotated[str, typer.Option("--point", help="Operating point(s) of --thresholds: all, or indices "
                                       "separated by commas.", autocompletion=prefix_completer(["all"]))] = "all",
    plot: Annotated[str | None, typer.Option("--plot", help="Also draw accuracy against cost to this PNG "
                                             "(needs the plot extra: matplotlib).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=MAX_REPEATS,
                                         help="Timing rounds: each runs the plain model and "
                                         "every operating point in turn; speed-ups are medians over the rounds, "
                                         "with their range.")] = 3,
    decide_at: Annotated[str | None, typer.Option("--decide-at", help="Segmentation thresholds: where a pixel's exit "
                                                  "is decided, pixel or feature; it must be the rule the --thresholds "
                                                  "file was fitted for.  [default: the file's]", show_default=False,
                                                  autocompletion=prefix_completer(DECIDE_AT))] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="Another checkpoint (the unpruned network, "
                                                 "say) timed in the same rounds: the speed-up of the plain model "
                                                 "and every operating point against it, beside its MACs ratio.",
                                                 rich_help_panel=INPUT)] = None,
    compare: Annotated[list[str] | None, typer.Option("--compare", help="A plain checkpoint to put beside this one "
                                                      "(repeatable): the network a user would pick instead, a "
                                                      "smaller one say, for the same inputs and classes; its "
                                                      "accuracy, MACs as a fraction of this checkpoint's and speed-up "
                                                      "timed in the same rounds.", rich_help_panel=INPUT)] = None,
    fold_batch_norm: FoldBatchNormOpt = True,
) -> None:
    """Evaluate a checkpoint, plain or with early exits (--means, --thresholds), on a dataset: accuracy,
    per-class accuracy, cost, measured throughput. Writes -o if given."""
    from eetool.classification.early_exit_evaluation import ClassifierEvaluation, evaluate_classifier
    from eetool.segmentation.evaluation import SegmentationEvaluation, evaluate_segmentation
    from eetool.segmentation.inputs import is_segmentation_checkpoint

    if is_segmentation_checkpoint(run, checkpoint):
        evaluate_segmentation(run, SegmentationEvaluation(
            checkpoint, data, split, indices, batch_size, count.value, output, force, thresholds, repeats, plot,
            {"--means": means, "--exit-heads": exit_heads, "--baseline": baseline, "--compare": compare or None,
             "--point": point}, decide_at))
        return
    if decide_at is not None:
        from eetool.core.errors import UsageError

        raise UsageError("--decide-at applies to segmentation thresholds", "drop --decide-at: a classifier's "
                         "exits decide per sample")
    evaluate_classifier(run, ClassifierEvaluation(checkpoint, data, split, indices, batch_size, count.value, output,
                                                  force, means, thresholds, exit_heads, point, plot, repeats,
                                                  baseline, compare or [], fold_batch_norm))
