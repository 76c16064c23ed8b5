"""Exit heads against the model's own head on held-out text: next-token accuracy and perplexity (temperature
scaled where asked), the accuracy-cost curve of a confidence threshold, and the evaluation artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eetool.core.options import Run
from eetool.core.reporting import counted, format_fields, format_table

SWEEP_STEP = 0.01


@dataclass
class HeadComparisonRequest:
    model: str
    text: list[str]
    head: list[str]
    layer: int | None
    context: int
    max_tokens: int | None
    temperature: str
    budget: list[float] | None
    sweep: bool
    plot: str | None
    batch_size: int
    output: str | None
    force: bool


def compare_heads(run: Run, req: HeadComparisonRequest) -> None:
    model, text, head, layer, context = req.model, req.text, req.head, req.layer, req.context
    max_tokens, temperature, budget, sweep, plot = req.max_tokens, req.temperature, req.budget, req.sweep, req.plot
    batch_size, output, force = req.batch_size, req.output, req.force
    from eetool.core.errors import ProvenanceError, UsageError
    from eetool.lm.temperature import parse_temperature

    if not head:
        raise UsageError("no exit head was given", "pass --head HEAD.safetensors from `eetool init-exit-head`")
    fixed_temperature = parse_temperature(temperature)
    budgets = sorted(set(budget or []))
    for b in budgets:
        if not 0 < b <= 1:
            raise UsageError(f"--budget {b:g} is outside (0, 1]",
                             "a budget is a mean cost per token as a fraction of the whole model, e.g. --budget 0.8")
    if plot is not None:
        if not (budgets or sweep):
            raise UsageError("--plot draws the accuracy-cost curve, and no curve was asked for",
                             "add --sweep or --budget B")
        from eetool.core.plotting import require_matplotlib

        require_matplotlib()
        run.check_output(plot, force=force, inputs=(model, *text, *head), flag="--plot", binary=True)
    if output is not None:
        run.check_output(output, force=force, inputs=(model, *text, *head, plot))
    from eetool.core.artifacts import Provenance, write_yaml
    from eetool.lm.class_aware_head import ExitHead
    from eetool.lm.corpus import load_corpus
    from eetool.lm.curve import curve, exit_stats, token_costs
    from eetool.lm.head_evaluation import evaluate_heads, fit_temperatures
    from eetool.lm.models import load_language_model
    from eetool.lm.temperature import split_for_temperature

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
    costs = token_costs(lm, context)
    if budgets:
        import torch

        from eetool.core.budget_search import check_budget

        for h, _ in loaded.values():  # a budget below an exit's floor is refused before any forward pass
            no_tokens = exit_stats(torch.zeros(0), torch.zeros(0), torch.zeros(0), costs.exit_costs(h.layer))
            for b in budgets:
                check_budget(no_tokens, b)
    lm.model.to(device)
    corpus = load_corpus(text, lm.tokenizer, context=context, max_tokens=max_tokens)
    names = _names(head)
    heads = {names[path]: h for path, (h, _) in loaded.items()}
    if fixed_temperature is None:
        scored, fitting = split_for_temperature(corpus.contexts)
        fits = fit_temperatures(lm, fitting, heads, batch_size=batch_size, device=device)
        temperatures = {name: fit.temperature for name, fit in fits.items()}
    else:
        scored, fits = corpus.contexts, {}
        temperatures = dict.fromkeys([*heads, "final"], fixed_temperature)
    scores = evaluate_heads(lm, scored, heads, batch_size=batch_size, device=device, reporter=run.reporter,
                            temperatures=temperatures)
    final_score = scores[-1]
    final_correct = final_score.per_token()[1]
    rows = []
    for s in scores:
        scored_head = heads.get(s.name)
        row: dict[str, Any] = {
            "head": s.name, "layer": scored_head.layer if scored_head else lm.num_layers,
            "init": scored_head.info.get("init", "") if scored_head else "model", "accuracy": round(s.accuracy, 6),
            "perplexity": round(s.perplexity, 4), "temperature": round(s.temperature, 6),
            "perplexity_at_temperature": round(s.scaled_perplexity, 4), "tokens": s.tokens}
        if s.name in fits:
            fit = fits[s.name]
            row["temperature_fit"] = {"tokens": fit.tokens, "mean_nll": round(fit.mean_nll, 6),
                                      "mean_nll_raw": round(fit.mean_nll_raw, 6)}
        if scored_head is not None and (budgets or sweep):
            confidence, correct = s.per_token()
            leave, go_on = costs.exit_costs(scored_head.layer)
            stats = exit_stats(confidence, correct, final_correct, (leave, go_on))
            row["curve"] = {"cost_leaving": round(leave, 6), "cost_going_on": round(go_on, 6),
                            "points": [p.row() for p in curve(stats, budgets,
                                                              sweep_step=SWEEP_STEP if sweep else None)]}
        rows.append(row)
    doc: dict[str, Any] = {"model": lm.source, "model_sha256": lm.sha256, "text": corpus.fingerprint,
                           "files": len(corpus.files), "contexts": len(corpus.contexts),
                           "scored_contexts": len(scored), "context": context,
                           "temperature": "auto" if fixed_temperature is None else fixed_temperature,
                           "temperature_contexts": len(corpus.contexts) - len(scored),
                           "macs_per_token": {"block": costs.block, "head": costs.head, "model": costs.full},
                           "heads": rows}
    if plot is not None:
        from eetool.core.plotting import lm_curves_png

        lm_curves_png(plot, {r["head"]: r["curve"]["points"] for r in rows if "curve" in r},
                      final_score.accuracy, f"{model}: exit heads with a confidence threshold")
        run.wrote(plot)
    if output is not None:
        write_yaml(output, doc, Provenance(kind="lm-evaluation", checkpoint_sha256=lm.sha256, model_sha256=lm.sha256,
                                           exits=sorted({f"block{h.layer}" for h in heads.values()}),
                                           dataset=corpus.fingerprint, args=run.args))
        run.wrote(output)

    def text_out(d: dict[str, Any]) -> str:
        t = d["temperature"]
        fields = format_fields([
            ("model", f"{d['model']} ({d['model_sha256'][:12]})"),
            ("text", f"{counted(d['contexts'], 'context')} of {d['context']} tokens from {counted(d['files'], 'file')} "
                     f"({d['text']})"),
            ("temperature", f"fitted per head on {counted(d['temperature_contexts'], 'context')}, "
             f"{d['scored_contexts']} scored" if t == "auto"
             else f"{t:g}, all {counted(d['scored_contexts'], 'context')} scored")])
        table = format_table(["head", "after block", "init", "accuracy", "perplexity", "T", "perplexity at T",
                              "tokens"],
                             [[r["head"], r["layer"], r["init"], r["accuracy"], r["perplexity"], r["temperature"],
                               r["perplexity_at_temperature"], r["tokens"]] for r in d["heads"]])
        curves = [r for r in d["heads"] if "curve" in r]
        if not curves:
            return fields + "\n\n" + table
        points = format_table(["head", "budget", "threshold", "cost", "exit share", "exit accuracy", "accuracy"],
                              [[r["head"], "hull" if p["budget"] is None else p["budget"], f"{p['threshold']:.6g}",
                                p["cost"], p["exit_share"], p["exit_accuracy"], p["accuracy"]]
                               for r in curves for p in r["curve"]["points"]])
        floors = "; ".join(f"{r['head']}: {r['curve']['cost_leaving']:.4f} leaving, {r['curve']['cost_going_on']:.4f}"
                           " going on" for r in curves)
        return (fields + "\n\n" + table + "\n\n" + format_fields([("cost per token", "MACs, normalised to the "
                                                                      f"whole model ({floors})")])
                + "\n\n" + points)

    run.emit(doc, text_out)


def _names(paths: list[str]) -> dict[str, str]:
    """Short names of the heads: the file stems, or the paths where two stems are the same."""
    stems = [Path(p).stem for p in paths]
    return {p: (s if stems.count(s) == 1 and s != "final" else p) for p, s in zip(paths, stems, strict=True)}
