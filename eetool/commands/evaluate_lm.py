"""eetool evaluate-lm: next-token accuracy and perplexity of early-exit LM heads and of the model's own head, the
perplexity at a temperature fitted on held-out tokens, and the accuracy-cost curve of a confidence threshold."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.commands.init_exit_head import ContextOpt, MaxTokensOpt, ModelOpt, TextOpt
from eetool.core.options import INPUT, BatchOpt, ForceOpt, OptionalOutputOpt, Run, eetool_command
from eetool.lm.head_comparison import SWEEP_STEP
from eetool.lm.temperature import HOLDOUT_EVERY, HOLDOUT_MAX

CURVE = "Accuracy-cost curve"


@eetool_command("lm-evaluation")
def command(
    run: Run,
    model: ModelOpt,
    text: TextOpt,
    head: Annotated[list[str], typer.Option("--head", help="Exit-head artifact from `eetool init-exit-head` "
                                            "(repeatable: every head is scored in the same pass).",
                                            rich_help_panel=INPUT)],
    layer: Annotated[int | None, typer.Option("--layer", "-k", help="Refuse heads made for another decoder "
                                              "block.")] = None,
    context: ContextOpt = 128,
    max_tokens: MaxTokensOpt = None,
    temperature: Annotated[str, typer.Option("--temperature", help="Each head's logits are divided by it for the "
                                             "second perplexity and the curve's confidences: auto (default: one "
                                             "per head, the one minimising NLL on every "
                                             f"{HOLDOUT_EVERY}th context, at most {HOLDOUT_MAX}, which are then not "
                                             "scored) or a number (1: the raw softmax; every context scored). "
                                             "Accuracy does not depend on it.")] = "auto",
    budget: Annotated[list[float] | None, typer.Option("--budget", help="Mean cost per token, normalised to the "
                                                       "whole model, for a confidence threshold on each exit head "
                                                       "(repeatable).", rich_help_panel=CURVE)] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help=f"Every budget from 0 to 1 in steps of {SWEEP_STEP}, "
                                        "keeping the convex hull of accuracy against cost.",
                                        rich_help_panel=CURVE)] = False,
    plot: Annotated[str | None, typer.Option("--plot", help="Also draw each exit head's curve (accuracy against "
                                             "cost) to this PNG (needs the plot extra: matplotlib).",
                                             rich_help_panel=CURVE)] = None,
    batch_size: BatchOpt = 8,
    output: OptionalOutputOpt = None,
    force: ForceOpt = False,
) -> None:
    """Next-token accuracy and perplexity, on held-out text, of exit heads (--head) and of the model's final
    head, the perplexity at each head's temperature, and with --budget or --sweep the accuracy-cost curve of a
    confidence threshold on each exit head. Writes -o if given."""
    from eetool.lm.head_comparison import HeadComparisonRequest, compare_heads

    compare_heads(run, HeadComparisonRequest(model, text, head, layer, context, max_tokens, temperature, budget,
                                             sweep, plot, batch_size, output, force))
