"""eetool prune-dataset: EEPrune (thesis chapter 4), its variants and the baselines, as index lists to train on."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.classification.kept_samples import METHOD_NAMES
from eetool.core.architectures import ALL_ARCHS
from eetool.core.choices import EXIT_LOCATIONS
from eetool.core.options import (
    MAX_EPOCHS,
    MAX_MODELS,
    TRAINING,
    CheckpointOpt,
    DataOpt,
    ForceOpt,
    GlobalBatchOpt,
    IndicesOpt,
    Run,
    SplitOpt,
    TrainingOptions,
    eetool_command,
    prefix_completer,
    training_options,
)

PRUNING = "Pruning"


@eetool_command("indices", model_options=True, data_options=True, distributed=True)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    data: DataOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="The kept samples: an indices artifact "
                                        "(.safetensors) for `eetool train --indices`.")],
    ratio: Annotated[float, typer.Option("--ratio", "-r", help="Fraction of the samples to prune, in (0, 1).",
                                         rich_help_panel=PRUNING)],
    method: Annotated[str, typer.Option("--method", "-m", help="eeprune, eeprune-loss, eeprune-soft, random, el2n, "
                                        "forgetting or svp.", rich_help_panel=PRUNING,
                                        autocompletion=prefix_completer(METHOD_NAMES))] = "eeprune",
    split: SplitOpt = "train",
    indices: IndicesOpt = None,
    balanced: Annotated[bool, typer.Option("--balanced", help="Prune the same fraction from every class.",
                                           rich_help_panel=PRUNING)] = False,
    exit: Annotated[str | None, typer.Option("--exit", help="EEPrune's early exit: before, mid or after "
                                                      "(first quartile, middle, third quartile of the exit points) or "
                                                      "a module name. Default: mid.",
                                                      rich_help_panel=PRUNING,
                                                      autocompletion=prefix_completer(EXIT_LOCATIONS))] = None,
    soft_weights: Annotated[str | None, typer.Option("--soft-weights", help="eeprune-soft's w1,w2,w3,w4 (default "
                                                     "0.4,0.2,0.4,0.001, the thesis's).", rich_help_panel=PRUNING)
                            ] = None,
    soft_threshold: Annotated[float | None, typer.Option("--soft-threshold", help="eeprune-soft's confidence t "
                                                         "(default: the one a fraction --ratio of samples exceed).",
                                                         rich_help_panel=PRUNING)] = None,
    models: Annotated[int, typer.Option("--models", min=1, max=MAX_MODELS, help="el2n: models in the ensemble.",
                                        rich_help_panel=PRUNING)] = 10,
    proxy_arch: Annotated[str, typer.Option("--proxy-arch", help="svp: the smaller proxy architecture.",
                                            rich_help_panel=PRUNING, autocompletion=prefix_completer(ALL_ARCHS))
                          ] = "resnet8",
    proxy_arch_args: Annotated[str | None, typer.Option("--proxy-arch-args", help="svp: the proxy's builder "
                                                        "arguments, e.g. '{width: 8}'.", rich_help_panel=PRUNING)
                               ] = None,
    from_scores: Annotated[str | None, typer.Option("--from-scores", help="Reuse the per-sample records of an "
                                                    "earlier prune-dataset output (another ratio, or another "
                                                    "EEPrune variant) instead of training.",
                                                    rich_help_panel=PRUNING)] = None,
    pruned_output: Annotated[str | None, typer.Option("--pruned-output", help="Also write the pruned samples as an "
                                                      "indices artifact.")] = None,
    summary: Annotated[str | None, typer.Option("--summary", help="Where the YAML summary goes (default: OUTPUT "
                                                "with .yaml for .safetensors).")] = None,
    from_weights: Annotated[bool, typer.Option("--from-weights", help="Start the pruning phase from the "
                                               "checkpoint's weights instead of a fresh initialisation.",
                                               rich_help_panel=TRAINING)] = False,
    epochs: Annotated[int | None, typer.Option("--epochs", "-e", min=1, max=MAX_EPOCHS,
                                               help="Epochs of the pruning phase (default: "
                                               "the thesis's: 10 for eeprune*, 15 per el2n model, 200 for "
                                               "forgetting, 50 for svp).", rich_help_panel=TRAINING)] = None,
    batch_size: GlobalBatchOpt = 128,
    training: TrainingOptions = training_options("warmup_epochs"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted pruning phase from "
                                         "OUTPUT.resume/ (saved after every epoch).")] = False,
    force: ForceOpt = False,
) -> None:
    """Choose the samples to drop from a training set (EEPrune or a baseline) and write the ones to keep. Writes -o."""
    from eetool.classification.kept_samples import KeptSamplesRequest, choose_kept_samples

    choose_kept_samples(run, KeptSamplesRequest(
        checkpoint=checkpoint, data=data, output=output, ratio=ratio, method=method, split=split, indices=indices,
        balanced=balanced, exit=exit, soft_weights=soft_weights, soft_threshold=soft_threshold, models=models,
        proxy_arch=proxy_arch, proxy_arch_args=proxy_arch_args, from_scores=from_scores, pruned_output=pruned_output,
        summary=summary, from_weights=from_weights, epochs=epochs, batch_size=batch_size, **training.given(),
        resume=resume, force=force))
