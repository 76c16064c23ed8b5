"""eetool train: train an architecture from scratch, or fine-tune a checkpoint, into an eetool checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.core.choices import SPLITS
from eetool.core.options import (
    MAX_EPOCHS,
    TRAINING,
    DataOpt,
    ForceOpt,
    GlobalBatchOpt,
    IndicesOpt,
    OutputOpt,
    Run,
    SplitOpt,
    TrainingOptions,
    eetool_command,
    prefix_completer,
    training_options,
)


@eetool_command("train", model_options=True, data_options=True, distributed=True)
def command(
    run: Run,
    data: DataOpt,
    output: OutputOpt,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="Fine-tune this checkpoint (eetool's, "
                                                   "or foreign weights with --arch and friends) instead of training "
                                                   "from scratch.")] = None,
    split: SplitOpt = "train",
    indices: IndicesOpt = None,
    eval_split: Annotated[str | None, typer.Option("--eval-split", help="Report accuracy on this split after "
                                                   "every epoch.", autocompletion=prefix_completer(SPLITS))] = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", min=1, max=MAX_EPOCHS,
                                        help="Epochs.", rich_help_panel=TRAINING)] = 15,
    batch_size: GlobalBatchOpt = 128,
    training: TrainingOptions = training_options("momentum", "warmup_epochs", "label_smoothing", "mixup"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.resume.pt, saved after every "
                                         "epoch.")] = False,
    force: ForceOpt = False,
) -> None:
    """Train a model (or fine-tune --checkpoint) and write an eetool checkpoint. Reads a dataset; writes -o."""
    from eetool.classification.model_training import TrainRequest, train_model

    train_model(run, TrainRequest(data=data, output=output, checkpoint=checkpoint, split=split, indices=indices,
                                  eval_split=eval_split, epochs=epochs, batch_size=batch_size, **training.given(),
                                  resume=resume, force=force))
