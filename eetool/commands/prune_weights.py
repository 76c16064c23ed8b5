"""eetool prune-weights: prune an early-exit network in rounds of global L1 magnitude pruning and fine-tuning
(thesis 2.5), jointly or backbone first; or of L1-norm channel pruning into a smaller dense network."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.core.choices import FINAL_LAYER_PHASES, PRUNING_APPROACHES, SPLITS, WEIGHT_STRUCTURES
from eetool.core.options import (
    INPUT,
    MAX_EPOCHS,
    MAX_ROUNDS,
    TRAINING,
    BatchOpt,
    CheckpointOpt,
    DataOpt,
    ExitWeightsOpt,
    ForceOpt,
    IndicesOpt,
    Run,
    SplitOpt,
    TrainingOptions,
    eetool_command,
    prefix_completer,
    training_options,
)

PRUNING = "Pruning"
# The pruning options, declared here so that the command's signature reads as its list of options.
ApproachOpt = Annotated[str, typer.Option(
    "--approach", help="joint: backbone and heads pruned and fine-tuned together (thesis Approach 1); ordered: the "
    "backbone first, then the heads on it with the backbone fixed (Approach 2).", rich_help_panel=PRUNING,
    autocompletion=prefix_completer(PRUNING_APPROACHES))]
FinalLayerPhasesOpt = Annotated[str | None, typer.Option(
    "--final-layer-phases", help="With --approach ordered: both (default; the thesis's final exit goes through "
    "two pruning phases: in the heads phase the final layer is ranked with the heads and fine-tuned with the "
    "final exit's loss beside theirs) or backbone (fixed with the rest of the backbone in the heads phase).",
    rich_help_panel=PRUNING, autocompletion=prefix_completer(FINAL_LAYER_PHASES))]
StructureOpt = Annotated[str, typer.Option(
    "--structure", help="unstructured (single weights, global L1 magnitude) or channel (whole channels, L1 norm, "
    "with Torch-Pruning: a smaller dense network, CIFAR ResNets only; round k prunes to (1 - amount)^k of the "
    "unpruned MACs; joint only; needs the prune extra).", rich_help_panel=PRUNING,
    autocompletion=prefix_completer(WEIGHT_STRUCTURES))]
RoundsOpt = Annotated[int, typer.Option(
    "--rounds", max=MAX_ROUNDS, help="Pruning rounds, each followed by fine-tuning (ordered: this many for the "
    "backbone, then for the heads).", rich_help_panel=PRUNING)]
AmountOpt = Annotated[float, typer.Option(
    "--amount", help="Fraction of the REMAINING weights each round prunes, in (0, 1): after k rounds "
    "1 - (1 - amount)^k of the weights taking part are zero (87.8% for 20 rounds of 0.1). With --structure "
    "channel: of the remaining MACs.", rich_help_panel=PRUNING)]
PruneFirstConvOpt = Annotated[bool, typer.Option("--prune-first-conv/--no-prune-first-conv",
                                                 help="Let the first convolution take part.", rich_help_panel=PRUNING)]
PruneFinalLayerOpt = Annotated[bool, typer.Option("--prune-final-layer/--no-prune-final-layer",
                                                  help="Let the model's final (linear) layer take part.",
                                                  rich_help_panel=PRUNING)]
RoundToOpt = Annotated[int | None, typer.Option(
    "--round-to", min=1, help="With --structure channel: keep every layer's channel count a multiple of this "
    "(e.g. 8, which CPU kernels may run faster).", rich_help_panel=PRUNING)]


@eetool_command("weight-pruning", model_options=True, data_options=True)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    data: DataOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="The pruned checkpoint (.safetensors, zeros where "
                                        "weights were pruned), an ordinary checkpoint for every other command.")],
    split: SplitOpt = "train",
    indices: IndicesOpt = None,
    exit_heads: Annotated[str | None, typer.Option("--exit-heads", help="Exit heads of the checkpoint from `eetool "
                                                   "train-exits` (default: SDN heads at --exits, trained first).",
                                                   rich_help_panel=INPUT)] = None,
    exits: Annotated[str | None, typer.Option("--exits", help="Without --exit-heads: exit points of the SDN heads "
                                              "to make (every, half, quartiles or module names; default every).",
                                              rich_help_panel=INPUT)] = None,
    approach: ApproachOpt = "joint",
    final_layer_phases: FinalLayerPhasesOpt = None,
    structure: StructureOpt = "unstructured",
    rounds: RoundsOpt = 20,
    amount: AmountOpt = 0.1,
    prune_first_conv: PruneFirstConvOpt = True,
    prune_final_layer: PruneFinalLayerOpt = True,
    round_to: RoundToOpt = None,
    heads_output: Annotated[str | None, typer.Option("--heads-output", help="The pruned exit heads (default: "
                                                     "OUTPUT with -heads.safetensors), for fit-thresholds and "
                                                     "evaluate with -c OUTPUT.")] = None,
    masks_output: Annotated[str | None, typer.Option("--masks-output", help="Also write the pruning masks, "
                                                     "one bit per weight.")] = None,
    report: Annotated[str | None, typer.Option("--report", help="The YAML report: every round and the end "
                                               "(default: OUTPUT with .yaml).")] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="Draw per-layer sparsity and per-exit accuracy to this "
                                             "PNG (needs the plot extra: matplotlib).")] = None,
    eval_split: Annotated[str, typer.Option("--eval-split", help="Per-exit accuracy after every round on this "
                                            "split of --data.", autocompletion=prefix_completer(SPLITS))] = "test",
    exit_weights: ExitWeightsOpt = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=1, max=MAX_EPOCHS,
                                                 help="Fine-tuning epochs after each "
                                                 "round (and for training the heads).",
                                                 rich_help_panel=TRAINING)] = 10,
    finetune_samples: Annotated[int | None, typer.Option("--finetune-samples", min=1, help="Fine-tune on exactly "
                                                         "this many samples per round instead of --finetune-epochs.",
                                                         rich_help_panel=TRAINING)] = None,
    batch_size: BatchOpt = 128,
    training: TrainingOptions = training_options(optimizer="adamw", lr=1e-3),
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUTPUT.resume/ "
                                         "(saved after every round).")] = False,
    force: ForceOpt = False,
) -> None:
    """Prune an early-exit network (backbone and exit heads) in rounds of global L1 magnitude pruning and
    fine-tuning, jointly or backbone first. Writes -o, the heads, the report and optionally the masks."""
    from eetool.classification.pruning_rounds import WeightPruningRequest, prune_weights

    prune_weights(run, WeightPruningRequest(
        checkpoint=checkpoint, data=data, output=output, split=split, indices=indices, exit_heads=exit_heads,
        exits=exits, approach=approach, final_layer_phases=final_layer_phases, structure=structure, rounds=rounds,
        amount=amount, prune_first_conv=prune_first_conv, prune_final_layer=prune_final_layer, round_to=round_to,
        heads_output=heads_output, masks_output=masks_output, report=report, plot=plot, eval_split=eval_split,
        exit_weights=exit_weights, finetune_epochs=finetune_epochs, finetune_samples=finetune_samples,
        batch_size=batch_size, **training.given(), resume=resume, force=force))
