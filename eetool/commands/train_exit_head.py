"""eetool train-exit-head: train an early-exit LM head and the final one (thesis 5.5.3, "freezing" or not)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eetool.commands.common import counted, format_fields, format_table
from eetool.commands.init_exit_head import ContextOpt, MaxTokensOpt, ModelOpt, TextOpt
from eetool.options import INPUT, TRAINING, BatchOpt, ForceOpt, LrOpt, OutputOpt, Run, eetool_command


@eetool_command("lm-training")
def command(
    run: Run,
    model: ModelOpt,
    head: Annotated[str, typer.Option("--head", help="Starting exit head from `eetool init-exit-head` "
                                      "(class-aware, random, copy or a mix).", rich_help_panel=INPUT)],
    text: TextOpt,
    output: OutputOpt,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps (AdamW, constant rate).",
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
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Score both heads on the held-out text "
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
    from eetool.errors import InputError, UsageError

    if steps <= 0:
        raise UsageError(f"--steps {steps} trains nothing", "give a number of steps >= 1, e.g. --steps 200")
    if not freeze and model_output is None:
        raise UsageError("--no-freeze trains the whole model, and without --model-output it would be lost",
                         "add --model-output FOLDER (evaluate-lm then reads it with --model FOLDER)")
    files = [p for p in (output, report, plot) if p]
    if "-" in files:
        raise UsageError("the outputs of train-exit-head are files, not stdout", "give each a file name")
    if len(set(files)) != len(files):
        raise UsageError("-o, --report and --plot name the same file", "give each its own name")
    inputs = (model, head, *text, *(eval_text or []))
    for flag, path in (("-o", output), ("--report", report), ("--plot", plot)):
        if path is not None:
            run.check_output(path, force=force or resume, inputs=inputs, flag=flag, binary=True)
    if model_output is not None:
        _check_folder_output(model_output, force=force or resume, model=model)
    if plot:
        from eetool.plotting import require_matplotlib

        require_matplotlib()
    resume_path = f"{output}.resume.pt"
    if resume and not Path(resume_path).is_file():
        raise InputError(f"no resumable state at {resume_path}", "run without --resume to start afresh")

    from eetool.artifacts import Provenance, output_set, sha256_file, write_yaml
    from eetool.errors import ProvenanceError
    from eetool.lm.corpus import load_corpus, split_held_out
    from eetool.lm.head import ExitHead
    from eetool.lm.models import load_language_model, model_sha256
    from eetool.lm.training import ExitLM, TrainSettings, save_model_folder, train_exit_lm
    from eetool.plotting import lm_training_png

    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, seed=run.seed, freeze=freeze,
                             eval_every=eval_every, cache_mb=cache_mb)
    settings.validate()
    start_head, start_prov = ExitHead.load(head)  # a bad artifact is refused before the model loads
    head_sha = sha256_file(head)
    device = run.torch()
    lm = load_language_model(model, run.reporter.log)
    if start_prov.model_sha256 != lm.sha256:
        raise ProvenanceError(f"{head} was made for model {start_prov.model_sha256[:12] or '(none recorded)'}, "
                              f"not {lm.sha256[:12]} ({model})",
                              "re-make it for this model with `eetool init-exit-head`")
    start_head.check_fits(head, lm.vocab_size, lm.hidden_size, lm.num_layers)
    corpus = load_corpus(text, lm.tokenizer, context=context, max_tokens=max_tokens)
    if eval_text:
        train_contexts = corpus.contexts
        held_out = load_corpus(eval_text, lm.tokenizer, context=context, max_tokens=max_tokens)
        held_contexts, held_name = held_out.contexts, held_out.fingerprint
    else:
        if len(corpus.contexts) < 2:
            raise InputError(f"the text makes one context of {context} tokens, none left to train on after one is "
                             "held out for scoring", "give more text, or held-out text with --eval-text")
        train_contexts, held_contexts = split_held_out(corpus.contexts)
        held_name = f"{corpus.fingerprint} (every 10th context)"
    source_sha = lm.sha256
    exit_lm = ExitLM(lm, start_head, freeze)
    run.reporter.log(f"training the exit head after block {start_head.layer} of {lm.num_layers} and the final head "
                     f"({'freezing: only the two heads' if freeze else 'no freezing: every parameter'}) for "
                     f"{counted(steps, 'step')} on {counted(len(train_contexts), 'context')} of {context} tokens, "
                     f"scoring {counted(len(held_contexts), 'held-out context')} every {counted(eval_every, 'step')}")
    identity = {"head_sha256": head_sha, "model_sha256": source_sha, "text": corpus.fingerprint,
                "held_out": held_name, "context": context}
    run.resumable = f"the state at every evaluation goes to {resume_path}: rerun with --resume"
    result = train_exit_lm(exit_lm, train_contexts, held_contexts, settings, device=device, resume_path=resume_path,
                           resume=resume, identity=identity, reporter=run.reporter)
    lm.model.cpu()
    # The exit head names the model it was trained with: the one written, or (freezing, nothing written) the
    # source model, whose blocks 1..K and final norm it reads unchanged.
    fitted_sha = model_sha256(lm.model) if model_output is not None else source_sha
    last = result.curve[-1]
    training = {"steps": steps, "freeze": freeze, "lr": lr, "batch_size": batch_size, "seed": run.seed,
                "eval_every": eval_every, "loss": "exit cross-entropy + final cross-entropy",
                "start_head_sha256": head_sha, "source_model_sha256": source_sha, "text": corpus.fingerprint,
                "held_out": held_name, "exit_accuracy": round(last.exit_accuracy, 6),
                "final_accuracy": round(last.final_accuracy, 6), "model_output": model_output}
    trained = exit_lm.head_state()
    info = {**start_head.info, "trained": training}
    new_head = ExitHead(trained["weight"].cpu(), trained["bias"].cpu(), start_head.layer, start_head.final_norm, info)
    prov = Provenance(kind="lm-exit-head", checkpoint_sha256=fitted_sha, model_sha256=fitted_sha,
                      exits=[f"block{start_head.layer}"], dataset=corpus.fingerprint,
                      args={**run.args, "training": training}, inputs={"lm-exit-head": head_sha})
    curve = [{"step": p.step, "exit_accuracy": round(p.exit_accuracy, 6), "final_accuracy": round(p.final_accuracy, 6),
              "train_loss": None if p.train_loss is None else round(p.train_loss, 6), "seconds": round(p.seconds, 2)}
             for p in result.curve]
    doc: dict[str, Any] = {
        "output": output, "model_output": model_output, "model": lm.source, "model_sha256": fitted_sha,
        "layer": start_head.layer, "blocks": lm.num_layers, "init": start_head.info.get("init", ""), **training,
        "train_contexts": len(train_contexts), "held_out_contexts": len(held_contexts),
        "seconds_per_step": round(result.seconds_per_step, 4), "cache_mb": round(result.cache_mb, 1),
        "cache_on_disk": result.cache_on_disk, "cache_seconds": round(result.cache_seconds, 2), "curve": curve,
    }
    title = (f"{Path(lm.source).name}: exit after block {start_head.layer} ({doc['init']}), "
             f"{'freezing' if freeze else 'no freezing'}")
    with output_set(files) as temps:  # the head, the report and the plot appear together, or none
        written = dict(zip(files, temps, strict=True))
        new_head.save(written[output], prov)
        if report:
            write_yaml(written[report], doc, Provenance(kind="lm-training", checkpoint_sha256=fitted_sha,
                                                        model_sha256=fitted_sha, exits=prov.exits,
                                                        dataset=corpus.fingerprint, args=prov.args,
                                                        inputs={"lm-exit-head": head_sha}))
        if plot:
            lm_training_png(written[plot], curve, title)
        if model_output is not None:  # last: if it fails, the temp files go and no output appears
            save_model_folder(lm, model_output)
    Path(resume_path).unlink(missing_ok=True)
    run.reporter.log(f"wrote {', '.join([*files, *([model_output] if model_output else [])])}")

    def text_out(d: dict[str, Any]) -> str:
        fields = format_fields([
            ("exit head", f"{d['output']} ({d['init']}, after block {d['layer']} of {d['blocks']})"),
            ("model", f"{d['model_output'] or d['model']} ({d['model_sha256'][:12]})"),
            ("training", f"{counted(d['steps'], 'step')}, {'freezing' if d['freeze'] else 'no freezing'}, "
                         f"lr {d['lr']}, batch {d['batch_size']}, {d['seconds_per_step']} s/step"),
            ("held out", f"{counted(d['held_out_contexts'], 'context')} ({d['held_out']})"),
        ])
        table = format_table(["step", "exit accuracy", "final accuracy", "train loss"],
                             [[p["step"], p["exit_accuracy"], p["final_accuracy"],
                               "" if p["train_loss"] is None else p["train_loss"]] for p in d["curve"]])
        return fields + "\n\n" + table

    run.emit(doc, text_out)


def _check_folder_output(folder: str, *, force: bool, model: str) -> None:
    """--model-output: refused when it is the input model, exists without --force, is a file, or its parent is
    missing."""
    from eetool.errors import OutputError

    path = Path(folder)
    if Path(model).exists() and path.resolve() == Path(model).resolve():
        raise OutputError(f"--model-output {folder} is the input model", "write the trained model to another folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"--model-output {folder} is a file", "give a folder name")
    if path.exists() and not force:
        raise OutputError(f"--model-output {folder} already exists", "pass --force to replace it, or choose another "
                          "name")
    if not path.parent.is_dir():
        raise OutputError(f"folder {path.parent} of --model-output {folder} does not exist",
                          "create it first (mkdir -p)")
