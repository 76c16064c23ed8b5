"""The class-aware exit head after decoder block K (thesis eq. 5.4-5.8) made from a model and its text: the
statistics pass, the n0 choice on held-out contexts, and the head artifact written with what it scores."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from eetool.core.options import Run
from eetool.core.reporting import counted, format_fields, format_table


def parse_n0(text: str) -> float | None:
    """--n0: 'auto' (None) or a finite number >= 0."""
    from eetool.core.errors import UsageError

    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"--n0 {text!r} is neither 'auto' nor a number >= 0", "write e.g. --n0 auto or --n0 0.25")
    return value


class Grouping(str, Enum):
    next = "next"
    current = "current"


class Unseen(str, Enum):
    copy = "copy"
    impossible = "impossible"


class Mix(str, Enum):
    random = "random"
    copy = "copy"


@dataclass
class HeadInitRequest:
    model: str
    text: list[str]
    output: str
    layer: int | None
    group: Grouping
    final_norm: bool
    n0: str
    unseen: Unseen
    mix: Mix | None
    alpha: float | None
    context: int
    max_tokens: int | None
    batch_size: int
    force: bool


def initialise_exit_head(run: Run, req: HeadInitRequest) -> None:
    model, text, output, layer, group = req.model, req.text, req.output, req.layer, req.group
    final_norm, n0, unseen, mix, alpha = req.final_norm, req.n0, req.unseen, req.mix, req.alpha
    context, max_tokens, batch_size, force = req.context, req.max_tokens, req.batch_size, req.force
    from eetool.core.errors import UsageError

    if (mix is None) != (alpha is None):
        raise UsageError("--mix and --alpha go together", "give both, e.g. --mix copy --alpha 0.4, or neither")
    fixed_n0 = parse_n0(n0)
    run.check_output(output, force=force, inputs=(model, *text), binary=True)
    import torch

    from eetool.core.artifacts import Provenance
    from eetool.lm.class_aware_head import ExitHead, baseline_head, choose_n0, class_aware_head, mixed
    from eetool.lm.corpus import load_corpus, split_held_out
    from eetool.lm.models import load_language_model
    from eetool.lm.stats import collect_stats, full_forward_seconds, grouped, run_to_block

    device = run.torch()
    lm = load_language_model(model, run.reporter.log)
    k = layer if layer is not None else lm.num_layers // 2
    if not 1 <= k < lm.num_layers:
        raise UsageError(f"--layer {k} is outside 1..{lm.num_layers - 1} for this {lm.num_layers}-block model",
                         f"give a block between 1 and {lm.num_layers - 1}, e.g. --layer {lm.num_layers // 2}")
    lm.model.to(device)
    corpus = load_corpus(text, lm.tokenizer, context=context, max_tokens=max_tokens)
    contexts, held_out = corpus.contexts, corpus.contexts[:0]
    if fixed_n0 is None:
        contexts, held_out = split_held_out(corpus.contexts)
    run.reporter.log(f"{lm.source}: {lm.num_layers} blocks, {lm.vocab_size} tokens x {lm.hidden_size} dims; "
                     f"{counted(len(contexts), 'context')} of {context} tokens from "
                     f"{counted(len(corpus.files), 'file')}")
    stats = collect_stats(lm, contexts, k, grouping=group.value, final_norm=final_norm, batch_size=batch_size,
                          device=device, reporter=run.reporter)
    timed = contexts[: 2 * batch_size]  # the full model on the first batches, for the speed of the K-block pass
    full_seconds = full_forward_seconds(lm, timed, batch_size, device)
    backbone = lm.lm_head
    choice = None
    if fixed_n0 is None:
        states, targets = [], []
        for batch in held_out.split(batch_size):
            ids = batch.to(device)
            s, _ = grouped(run_to_block(lm, k, ids, final_norm=final_norm), ids, "next")
            states.append(s.cpu())
            targets.append(ids[:, 1:].reshape(-1).cpu())
        choice = choose_n0(stats, unseen.value, backbone, torch.cat(states), torch.cat(targets))
        chosen = choice.n0
    else:
        chosen = fixed_n0
    weight, bias = class_aware_head(stats, chosen, unseen.value, backbone)
    init = "class-aware"
    if mix is not None and alpha is not None:
        base = baseline_head(mix.value, backbone, torch.Generator().manual_seed(run.seed))
        weight, bias = mixed(alpha, (weight, bias), base)
        init = mix.value if alpha == 0 else f"class-aware+{mix.value}"
    seen = int(stats.seen.sum())
    info = {"init": init, "n0": chosen, "n0_auto": fixed_n0 is None, "grouping": group.value,
            "unseen": unseen.value, "mix": mix.value if mix else None, "alpha": alpha, "context": context,
            "tokens_seen": stats.total, "vocab_seen": seen, "vocab_unseen": lm.vocab_size - seen}
    head = ExitHead(weight.float(), bias.float(), k, final_norm, info)
    prov = Provenance(kind="lm-exit-head", checkpoint_sha256=lm.sha256, model_sha256=lm.sha256,
                      exits=[f"block{k}"], dataset=corpus.fingerprint, args=run.args)
    head.save(output, prov)
    run.wrote(output)

    calibration_tokens = len(contexts) * context
    doc: dict[str, Any] = {
        "output": output, "model": lm.source, "model_sha256": lm.sha256, "blocks": lm.num_layers, "layer": k,
        "text": corpus.fingerprint, "files": len(corpus.files), **info,
        "n0_maximum_likelihood": round(stats.noise_power(), 6),
        "n0_tried": choice.tried if choice else [],
        "held_out_tokens": int(held_out.numel()),
        "statistics_mb": round(stats.bytes / 2**20, 1),
        "seconds": round(stats.seconds, 2),
        "tokens_per_second_k_blocks": round(calibration_tokens / stats.seconds, 1) if stats.seconds else None,
        "tokens_per_second_full_model": round(timed.numel() / full_seconds, 1) if full_seconds else None,
    }

    def text_out(d: dict[str, Any]) -> str:
        fields = format_fields([
            ("exit head", f"{d['output']} ({d['init']}, after block {d['layer']} of {d['blocks']})"),
            ("text", f"{d['tokens_seen']:,} states from {d['files']} files ({d['text']}); "
                     f"{d['held_out_tokens']:,} tokens held out"),
            ("vocabulary", f"{d['vocab_seen']:,} tokens seen, {d['vocab_unseen']:,} never ({d['unseen']})"),
            ("grouping", f"{d['grouping']} token; final norm {'on' if final_norm else 'off'}"),
            ("N0", f"{d['n0']:.6g} ({'auto' if d['n0_auto'] else 'fixed'}; maximum likelihood "
                   f"{d['n0_maximum_likelihood']:.6g})"),
            ("statistics", f"{d['statistics_mb']} MB (V x D float64 sums and counts)"),
            ("speed", f"{d['tokens_per_second_k_blocks']} tokens/s through {d['layer']} blocks, "
                      f"{d['tokens_per_second_full_model']} through the whole model"),
        ])
        if not d["n0_tried"]:
            return fields
        table = format_table(["N0", "held-out accuracy", "mean NLL"],
                             [[f"{r['n0']:.6g}", r["accuracy"], r["mean_nll"]] for r in d["n0_tried"]])
        return fields + "\n\n" + table

    run.emit(doc, text_out)
