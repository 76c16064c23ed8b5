"""eetool evaluate-lm: next-token accuracy and perplexity of early-exit LM heads and of the model's own head."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eetool.commands.common import format_fields, format_table
from eetool.commands.init_exit_head import ContextOpt, MaxTokensOpt, ModelOpt, TextOpt
from eetool.options import INPUT, BatchOpt, ForceOpt, OptionalOutputOpt, Run, eetool_command


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
    batch_size: BatchOpt = 8,
    output: OptionalOutputOpt = None,
    force: ForceOpt = False,
) -> None:
    """Next-token accuracy and perplexity, on held-out text, of exit heads (--head) and of the model's final
    head. Writes -o if given."""
    from eetool.errors import ProvenanceError, UsageError

    if not head:
        raise UsageError("no exit head was given", "pass --head HEAD.safetensors from `eetool init-exit-head`")
    if output is not None:
        run.check_output(output, force=force, inputs=(model, *text, *head))
    from eetool.artifacts import Provenance, write_yaml
    from eetool.lm.corpus import load_corpus
    from eetool.lm.evaluate import evaluate_heads
    from eetool.lm.head import ExitHead
    from eetool.lm.models import load_language_model

    loaded = {path: ExitHead.load(path) for path in head}  # bad artifacts are refused before the model loads
    for path, (h, _) in loaded.items():
        if layer is not None and h.layer != layer:
            raise ProvenanceError(f"{path} was made for decoder block {h.layer}, not {layer}",
                                  f"pass --layer {h.layer}, or re-make it with `eetool init-exit-head --layer "
                                  f"{layer}`")
    device = run.torch()
    lm = load_language_model(model, run.reporter.log)
    for path, (h, prov) in loaded.items():
        if prov.model_sha256 != lm.sha256:
            raise ProvenanceError(f"{path} was made for model {prov.model_sha256[:12] or '(none recorded)'}, "
                                  f"not {lm.sha256[:12]} ({model})",
                                  "re-make it for this model with `eetool init-exit-head`")
        h.check_fits(path, lm.vocab_size, lm.hidden_size, lm.num_layers)
    lm.model.to(device)
    corpus = load_corpus(text, lm.tokenizer, context=context, max_tokens=max_tokens)
    names = _names(head)
    heads = {names[path]: h for path, (h, _) in loaded.items()}
    scores = evaluate_heads(lm, corpus.contexts, heads, batch_size=batch_size, device=device, reporter=run.reporter)
    rows = []
    for s in scores:
        scored = heads.get(s.name)
        rows.append({"head": s.name, "layer": scored.layer if scored else lm.num_layers,
                     "init": scored.info.get("init", "") if scored else "model", "accuracy": round(s.accuracy, 6),
                     "perplexity": round(s.perplexity, 4), "tokens": s.tokens})
    doc: dict[str, Any] = {"model": lm.source, "model_sha256": lm.sha256, "text": corpus.fingerprint,
                           "files": len(corpus.files), "contexts": len(corpus.contexts), "context": context,
                           "heads": rows}
    if output is not None:
        write_yaml(output, doc, Provenance(kind="lm-evaluation", checkpoint_sha256=lm.sha256, model_sha256=lm.sha256,
                                           exits=sorted({f"block{h.layer}" for h in heads.values()}),
                                           dataset=corpus.fingerprint, args=run.args))
        run.reporter.log(f"wrote {output}")

    def text_out(d: dict[str, Any]) -> str:
        fields = format_fields([("model", f"{d['model']} ({d['model_sha256'][:12]})"),
                                ("text", f"{d['contexts']} contexts of {d['context']} tokens from {d['files']} files "
                                         f"({d['text']})")])
        table = format_table(["head", "after block", "init", "accuracy", "perplexity", "tokens"],
                             [[r["head"], r["layer"], r["init"], r["accuracy"], r["perplexity"], r["tokens"]]
                              for r in d["heads"]])
        return fields + "\n\n" + table

    run.emit(doc, text_out)


def _names(paths: list[str]) -> dict[str, str]:
    """Short names of the heads: the file stems, or the paths where two stems are the same."""
    stems = [Path(p).stem for p in paths]
    return {p: (s if stems.count(s) == 1 and s != "final" else p) for p, s in zip(paths, stems, strict=True)}
