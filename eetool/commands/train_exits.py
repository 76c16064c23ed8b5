"""eetool train-exits: train exit heads (SDN internal classifiers or BranchyNet branches) on a checkpoint, or an
early-exit network from scratch with all its exits in the loss."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.core.choices import HEAD_KINDS, SPLITS
from eetool.core.options import (
    INPUT,
    MAX_EPOCHS,
    MAX_POOL_SIZE,
    TRAINING,
    DataOpt,
    ExitsOpt,
    ExitWeightsOpt,
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

HEADS = "Exit heads"


@eetool_command("exit-heads", model_options=True, data_options=True, distributed=True)
def command(
    run: Run,
    data: DataOpt,
    output: OutputOpt,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="Checkpoint file (.safetensors/.pt) "
                                                   "or 'demo' whose exits get heads.", rich_help_panel=INPUT)] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Instead of --checkpoint: build a new "
                                               "backbone from --arch and --arch-args (random weights, seeded by "
                                               "--seed) and train it with its heads; needs --joint and "
                                               "--backbone-output.", rich_help_panel=INPUT)] = False,
    split: SplitOpt = "train",
    indices: IndicesOpt = None,
    exits: ExitsOpt = "every",
    head: Annotated[str, typer.Option("--head", help="sdn (mixed pooling + linear) or branchy (3x3 conv first).",
                                      rich_help_panel=HEADS, autocompletion=prefix_completer(HEAD_KINDS))] = "sdn",
    pool_size: Annotated[int, typer.Option("--pool-size", min=1, max=MAX_POOL_SIZE,
                                           help="Spatial size the heads pool to.",
                                           rich_help_panel=HEADS)] = 4,
    means: Annotated[str | None, typer.Option("--means", help="Class-means artifact: concatenate each exit's "
                                              "normalised distances to the class means (thesis 2.3.2).",
                                              rich_help_panel=HEADS)] = None,
    joint: Annotated[bool, typer.Option("--joint/--frozen", help="Train backbone and heads together, or only the "
                                        "heads (the backbone runs without gradients).", rich_help_panel=TRAINING)
                     ] = False,
    exit_weights: ExitWeightsOpt = None,
    distill: Annotated[float, typer.Option("--distill", help="With --joint: self-distillation weight (0 to 1; 0 = "
                                           "off): each early exit also learns the final exit's softened "
                                           "predictions.", rich_help_panel=TRAINING)] = 0.0,
    distill_temperature: Annotated[float, typer.Option("--distill-temperature", help="Softmax temperature of "
                                                       "--distill.", rich_help_panel=TRAINING)] = 3.0,
    backbone_output: Annotated[str | None, typer.Option("--backbone-output", help="With --joint: where the "
                                                        "trained backbone checkpoint goes.")] = None,
    eval_split: Annotated[str | None, typer.Option("--eval-split", help="Report each exit's accuracy on this "
                                                   "split after training.",
                                                   autocompletion=prefix_completer(SPLITS))] = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", min=1, max=MAX_EPOCHS,
                                        help="Epochs.", rich_help_panel=TRAINING)] = 1,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Train on exactly this many samples "
                                                "(a fixed training budget) instead of --epochs.",
                                                rich_help_panel=TRAINING)] = None,
    batch_size: GlobalBatchOpt = 128,
    training: TrainingOptions = training_options("momentum", "warmup_epochs", optimizer="adamw", lr=1e-3),
    force: ForceOpt = False,
) -> None:
    """Attach heads at the exits of a checkpoint and train them (frozen backbone or jointly), or train a new
    network and its heads from scratch. Writes -o (and --backbone-output)."""
    from eetool.classification.exit_head_fitting import ExitHeadsRequest, train_exits

    train_exits(run, ExitHeadsRequest(
        checkpoint=checkpoint, from_scratch=from_scratch, data=data, output=output, split=split, indices=indices,
        exits=exits, head=head, pool_size=pool_size, means=means, joint=joint, exit_weights=exit_weights,
        backbone_output=backbone_output, distill=distill, distill_temperature=distill_temperature,
        eval_split=eval_split, epochs=epochs, samples=samples, batch_size=batch_size, **training.given(), force=force))
