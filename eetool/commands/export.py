"""eetool export: an early-exit bundle (ONNX graphs and a manifest) for the PyTorch-free runtime."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from eetool.core.options import (
    DATA_HELP,
    INPUT,
    CheckpointOpt,
    ForceOpt,
    Run,
    ThresholdsOpt,
    complete_data,
    eetool_command,
)


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"


@eetool_command("export", model_options=True, data_options=True)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="The bundle folder to write.")],
    means: Annotated[str | None, typer.Option("--means", help="Class-means artifact (with --thresholds).",
                                              rich_help_panel=INPUT)] = None,
    exit_heads: Annotated[str | None, typer.Option("--exit-heads", "--exits-checkpoint", help="Exit-heads artifact "
                                                   "(with --thresholds fitted on it).", rich_help_panel=INPUT)] = None,
    thresholds: ThresholdsOpt = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help=f"Check the bundle on samples of this {DATA_HELP} "
                                             "Default: the demo set where it fits the model's input, else seeded "
                                             "random images.", rich_help_panel=INPUT,
                                             autocompletion=complete_data)] = None,
    split: Annotated[str, typer.Option("--split", help="With --data: train or test.", rich_help_panel=INPUT)] = "test",
    check_samples: Annotated[int, typer.Option("--check-samples", min=1, help="Samples the bundle is checked on "
                                               "against eetool's own pass.")] = 512,
    quantize: Annotated[Quantize, typer.Option("--quantize", help="int8: the stage graphs quantised by onnxruntime "
                                               "(static, QDQ, int8 weights per channel), calibrated on "
                                               "--calibration-data; the exit decisions stay float.")] = Quantize.none,
    calibration_data: Annotated[str | None, typer.Option("--calibration-data", help=f"With --quantize int8: the "
                                                         f"{DATA_HELP} whose images set the int8 ranges (the "
                                                         "model's own data, e.g. its training set).",
                                                         rich_help_panel=INPUT, autocompletion=complete_data)] = None,
    calibration_split: Annotated[str, typer.Option("--calibration-split", help="With --calibration-data: train or "
                                                   "test.", rich_help_panel=INPUT)] = "train",
    calibration_samples: Annotated[int, typer.Option("--calibration-samples", min=1, help="Samples drawn (seeded) "
                                                     "from --calibration-data to calibrate on.")] = 512,
    force: ForceOpt = False,
) -> None:
    """Export a checkpoint, plain or with its exits and every operating point of --thresholds, as a bundle folder:
    an ONNX graph per backbone stage and per exit decision, manifest.yaml, SHA256SUMS. The bundle is checked with
    onnxruntime against eetool's own pass before it is written (exit 5 when they disagree). A segmentation
    checkpoint exports its plain network (class map per pixel) for mask PNGs; its pixel exits do not export."""
    from eetool.classification.bundle_exporting import export_bundle
    from eetool.core.bundles import ExportRequest
    from eetool.segmentation.inputs import is_segmentation_checkpoint
    from eetool.segmentation.mask_bundle import export_mask_bundle

    export = export_mask_bundle if is_segmentation_checkpoint(run, checkpoint) else export_bundle
    export(run, ExportRequest(checkpoint=checkpoint, output=output, means=means, exit_heads=exit_heads,
                              thresholds=thresholds, data=data, split=split, check_samples=check_samples,
                              quantize=quantize.value, calibration_data=calibration_data,
                              calibration_split=calibration_split, calibration_samples=calibration_samples,
                              force=force))
