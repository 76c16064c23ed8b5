"""eetool train-exit-head: train an early-exit LM head and the final one (thesis 5.5.3, "freezing" or not)."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.commands.init_exit_head import ContextOpt, MaxTokensOpt, ModelOpt, TextOpt
from eetool.core.options import INPUT, MAX_STEPS, TRAINING, BatchOpt, ForceOpt, LrOpt, OutputOpt, Run, eetool_command


@eetool_command("lm-training")
def command(
    run: Run,
    model: ModelOpt,
    head: Annotated[str, typer.Option("--head", help="Starting exit head from `eetool init-exit-head` "
                                      "(class-aware, random, copy or a mix).", rich_help_panel=INPUT)],
    text: TextOpt,
    output: OutputOpt,
    steps: Annotated[int, typer.Option("--steps", max=MAX_STEPS, help="Optimiser steps (AdamW, constant rate).",
                                       rich_help_panel=TRAINING)] = 200,
    lr: LrOpt = 1e-4,
    freeze: Annotated[bool, typer.Option("--freeze/--no-freeze", help="Freezing (the thesis): only the two LM "
                                         "heads train, on layer-K and final states computed once and cached (a "
                                         "tied final head is untied from the embedding). --no-freeze: every "
                                         "parameter trains and the trunk runs every step; needs --model-output.",
                                         rich_help_panel=TRAINING)] = True,
    eval_text: Annotated[list[str] | None, typer.Option("--eval-text", help="Held-out text scored every "
                                                        "--eval-every steps (default: every 10th context of "
                                                        "--text, at most 64, held out of training).",
                                                        rich_help_panel=INPUT)] = None,
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, max=MAX_STEPS,
                                            help="Score both heads on the held-out text "
                                            "every this many steps (and at step 0 and the end); the resumable "
                                            "state is saved then too.", rich_help_panel=TRAINING)] = 50,
    model_output: Annotated[str | None, typer.Option("--model-output", help="Also write the trained model as a "
                                                     "Hugging Face model folder (config, safetensors, tokenizer) "
                                                     "that --model reads; the exit head then names it. Needed "
                                                     "with --no-freeze; with --freeze it holds the trained final "
                                                     "head, untied.")] = None,
    report: Annotated[str | None, typer.Option("--report", help="Also write the accuracy curve as YAML.")] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="Also draw accuracy against steps to this PNG.")] = None,
    cache_mb: Annotated[int, typer.Option("--cache-mb", min=1, help="With --freeze, cached states up to this "
                                          "size stay in memory; more go to an unlinked temp file in $TMPDIR "
                                          "(2 x tokens x hidden size x 4 bytes).",
                                          rich_help_panel=TRAINING)] = 4096,
    context: ContextOpt = 128,
    max_tokens: MaxTokensOpt = None,
    batch_size: BatchOpt = 8,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.resume.pt, saved at every "
                                         "evaluation.")] = False,
    force: ForceOpt = False,
) -> None:
    """Train an early-exit LM head (--head) together with the model's final head under the sum of their
    next-token losses, scoring both on held-out text as it goes. Writes -o (the trained exit head) and, with
    --model-output, the trained model."""
    from eetool.lm.training_session import TrainingSessionRequest, train_exit_head

    train_exit_head(run, TrainingSessionRequest(model, head, text, output, steps, lr, freeze, eval_text, eval_every,
                                                model_output, report, plot, cache_mb, context, max_tokens,
                                                batch_size, resume, force))
