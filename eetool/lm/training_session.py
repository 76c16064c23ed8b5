"""Training an early-exit LM's exit head and final head on text (thesis 5.5.3): the contexts, the training loop
with its held-out curve, and the trained head (and the model folder) written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eetool.core.options import Run
from eetool.core.reporting import counted, format_fields, format_table


@dataclass
class TrainingSessionRequest:
    model: str
    head: str
    text: list[str]
    output: str
    steps: int
    lr: float
    freeze: bool
    eval_text: list[str] | None
    eval_every: int
    model_output: str | None
    report: str | None
    plot: str | None
    cache_mb: int
    context: int
    max_tokens: int | None
    batch_size: int
    resume: bool
    force: bool


def train_exit_head(run: Run, req: TrainingSessionRequest) -> None:
    model, head, text, output, steps, lr = req.model, req.head, req.text, req.output, req.steps, req.lr
    freeze, eval_text, eval_every, model_output = req.freeze, req.eval_text, req.eval_every, req.model_output
    report, plot, cache_mb, context, max_tokens = req.report, req.plot, req.cache_mb, req.context, req.max_tokens
    batch_size, resume, force = req.batch_size, req.resume, req.force
    from eetool.core.errors import InputError, UsageError

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
    resume_path = f"{output}.resume.pt"
    if model_output is not None:
        from eetool.core.owned_folders import check_folder_output

        check_folder_output(model_output, flag="--model-output", force=force or resume,
                            inputs=(*inputs, str(run.config) if run.config else None), outputs=(*files, resume_path))
    if plot:
        from eetool.core.plotting import require_matplotlib

        require_matplotlib()
    if resume and not Path(resume_path).is_file():
        raise InputError(f"no resumable state at {resume_path}", "run without --resume to start afresh")

    from eetool.core.artifacts import Provenance, output_set, sha256_file, write_yaml
    from eetool.core.errors import ProvenanceError
    from eetool.core.plotting import lm_training_png
    from eetool.lm.class_aware_head import ExitHead
    from eetool.lm.corpus import load_corpus, split_held_out
    from eetool.lm.exit_lm_training import ExitLM, TrainSettings, save_model_folder, train_exit_lm
    from eetool.lm.models import load_language_model, model_sha256

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
    run.resume_state = str(resume_path)
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
    run.wrote(*files, *([model_output] if model_output else []))

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

