"""eetool predict: classes (or a segmentation network's masks) of new, unlabelled inputs, one record per input on
stdout (or -o)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from eetool.core.choices import DECIDE_AT
from eetool.core.options import (
    DATA_HELP,
    INPUT,
    BatchOpt,
    CheckpointOpt,
    FoldBatchNormOpt,
    ForceOpt,
    Run,
    ThresholdsOpt,
    complete_data,
    eetool_command,
    prefix_completer,
)


class OutputFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    tsv = "tsv"


class OnError(str, Enum):
    skip = "skip"
    stop = "stop"


@eetool_command("prediction", model_options=True, data_options=True, formats=OutputFormat)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    inputs: Annotated[list[str] | None, typer.Argument(help="Image files, folders of images (recursive, sorted) or "
                                                      "'-' for paths on stdin, one a line.", show_default=False)
                      ] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help=f"Instead of INPUTS: {DATA_HELP} Labels, where "
                                             "it has them, go into the output.", rich_help_panel=INPUT,
                                             autocompletion=complete_data)] = None,
    split: Annotated[str, typer.Option("--split", help="With --data: train or test.", rich_help_panel=INPUT)] = "test",
    means: Annotated[str | None, typer.Option("--means", help="Class-means artifact (with --thresholds).",
                                              rich_help_panel=INPUT)] = None,
    exit_heads: Annotated[str | None, typer.Option("--exit-heads", "--exits-checkpoint", help="Exit-heads artifact "
                                                   "(with --thresholds fitted on it).", rich_help_panel=INPUT)] = None,
    thresholds: ThresholdsOpt = None,
    point: Annotated[int | None, typer.Option("--point", min=0, help="Operating point of --thresholds (its index; "
                                              "may be left out when it holds one, as a segmentation file does).")
                      ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Also the K most probable classes with their "
                                       "probabilities, at the exit the input left by.")] = 0,
    batch_size: BatchOpt = 64,
    on_error: Annotated[OnError, typer.Option("--on-error", help="An input that cannot be read: skip it (one line "
                                              "on stderr; the run ends with exit 7) or stop there (exit 3), the "
                                              "records already written left complete.")] = OnError.skip,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the records to this file (atomically, "
                                               "when the run ends) instead of stdout.")] = None,
    force: ForceOpt = False,
    output_dir: Annotated[str | None, typer.Option("--output-dir", help="Segmentation checkpoints: the folder the "
                                                   "mask PNGs go to, one per input (created if missing).")] = None,
    decide_at: Annotated[str | None, typer.Option("--decide-at", help="Segmentation thresholds: where a pixel's exit "
                                                  "is decided, pixel or feature; it must be the rule the --thresholds "
                                                  "file was fitted for.  [default: the file's]", show_default=False,
                                                  autocompletion=prefix_completer(DECIDE_AT))] = None,
    fold_batch_norm: FoldBatchNormOpt = True,
) -> None:
    """Predict the classes of images (files, folders, '-' for paths on stdin) or of a --data set, with the plain
    model or with early exits at one operating point (--thresholds, --point): one record per input, JSON Lines
    (default), CSV or TSV, written batch by batch; a summary on stderr. A segmentation checkpoint writes one mask
    PNG per input into --output-dir, and its record gives the share of pixels leaving at each exit and the cost."""
    from eetool.classification.prediction import predict_classes
    from eetool.core.prediction_io import PredictRequest
    from eetool.segmentation.inputs import is_segmentation_checkpoint
    from eetool.segmentation.mask_prediction import predict_masks

    req = PredictRequest(checkpoint=checkpoint, inputs=list(inputs or []), data=data, split=split, means=means,
                         exit_heads=exit_heads, thresholds=thresholds, point=point, top_k=top_k,
                         batch_size=batch_size, stop_on_error=on_error == OnError.stop, output=output, force=force,
                         output_dir=output_dir, decide_at=decide_at, fold_batch_norm=fold_batch_norm)
    (predict_masks if is_segmentation_checkpoint(run, checkpoint) else predict_classes)(run, req)
