"""eetool calibrate-means: E²CM class means at every exit, from one checkpoint and a labelled dataset."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.classification.class_means_calibration import Predict
from eetool.core.options import (
    MAX_CLUSTERS,
    BatchOpt,
    CheckpointOpt,
    Count,
    CountOpt,
    DataOpt,
    ExitsOpt,
    ForceOpt,
    IndicesOpt,
    OutputOpt,
    Run,
    SplitOpt,
    eetool_command,
)

POOL = "Pooling"


@eetool_command("class-means", model_options=True, data_options=True, distributed=True)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    data: DataOpt,
    output: OutputOpt,
    split: SplitOpt = "train",
    indices: IndicesOpt = None,
    exits: ExitsOpt = "every",
    pool_spatial: Annotated[int | None, typer.Option("--pool-spatial", min=1, help="Max-pool each exit's feature "
                                                     "maps to at most N x N before the means.",
                                                     rich_help_panel=POOL)] = None,
    pool_channels: Annotated[int | None, typer.Option("--pool-channels", min=1, help="Max-pool channels in groups "
                                                      "down to N (must divide each exit's channels).",
                                                      rich_help_panel=POOL)] = None,
    clusters: Annotated[int | None, typer.Option("--clusters", min=2, max=MAX_CLUSTERS,
                                                 help="Unsupervised: k-means centres at each "
                                                 "exit stand in for class means (K = the model's outputs); no "
                                                 "labels are used.")] = None,
    batch_size: BatchOpt = 256,
    count: CountOpt = Count.macs,
    force: ForceOpt = False,
    predict: Annotated[Predict, typer.Option("--predict", help="Label of an exiting sample: softmax (argmax of "
                                             "softmax(-d/normaliser), eq. 2.7), nearest (nearest class mean, argmin "
                                             "of the raw distance d), or auto: per exit, the more accurate on these "
                                             "samples (softmax on a tie, and with --clusters, which uses no "
                                             "labels). The exit confidence is eq. 2.5's either way.")] = Predict.auto,
) -> None:
    """Compute class means, normalisers and calibration confidences at every exit; on a segmentation checkpoint,
    CBT's class statistics (per exit and class, the summed softmax and the pixel count, eq. 3.1) for
    `fit-thresholds --method cbt|cbt-ns --means`. Writes -o (safetensors)."""
    from eetool.segmentation.inputs import is_segmentation_checkpoint

    if is_segmentation_checkpoint(run, checkpoint):
        from eetool.segmentation.statistics import StatisticsRequest, calibrate_statistics

        calibrate_statistics(run, StatisticsRequest(
            checkpoint, data, output, split, indices, batch_size, force,
            {"--exits": exits != "every", "--pool-spatial": pool_spatial is not None,
             "--pool-channels": pool_channels is not None, "--clusters": clusters is not None,
             "--predict": predict != Predict.auto, "--count": count != Count.macs}))
        return

    from eetool.classification.class_means_calibration import MeansCalibrationRequest, calibrate_class_means

    calibrate_class_means(run, MeansCalibrationRequest(checkpoint, data, output, split, indices, exits,
                                                       pool_spatial, pool_channels, clusters, batch_size, count,
                                                       force, predict))
