"""The wall-time model's per-step times against the same steps timed inside real early-exit passes.

    python bench/wall_model_check.py THRESHOLDS.yaml --point 1            # a --overhead measured artifact
    python bench/wall_model_check.py results/exit-speed/sdn-wall-b1-t1.yaml --method sdn --batch-size 1 --samples 300

For one point of a thresholds artifact fitted with ``fit-thresholds --overhead measured`` (the bench's cache of
``exit_speed.py --overhead measured``), runs the point on the demo test split at the artifact's batch size, at one
thread, in interleaved rounds: ``run_early_exit`` as shipped, a copy of it with a timer around each stage, decision
(``Thresholded``: the scores and the threshold comparison) and compaction, the plain model and the plain model
stage by stage. Prints, per step, the time the model charges at the batch sizes the point really let reach it
(summed over the test batches) beside the time the instrumented pass took, and the passes' totals, so that a part
the model misses or mis-times shows. The copy is the bench's own: the library's path carries no timers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from exit_speed import method_rule  # bench/ is on the path: this script runs as bench/wall_model_check.py

from eetool.classification.e2cm import ClassMeans
from eetool.classification.rules import Thresholded
from eetool.classification.wall_costs import PartSeconds, WallCosts, _interpolate
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.exits import ExitModel, build_exit_model
from eetool.core.inference import ExitBatch, run_early_exit

PARTS = ("stage", "decide", "compact")


def instrumented_pass(em: ExitModel, x: torch.Tensor, decide: Thresholded, seconds: dict[str, list[float]],
                      reached: list[int]) -> None:
    """``run_early_exit``'s steps with a timer around each part, added to ``seconds``; samples reaching each step
    added to ``reached``."""
    assert em.stages is not None
    n_exits = len(em.exits)
    clock = time.perf_counter
    start = clock()
    batch = ExitBatch.start(x, n_exits)
    seconds["pass"][0] += clock() - start
    for j, stage in enumerate(em.stages[:-1]):
        reached[j] += batch.h.shape[0]
        a = clock()
        batch.h = stage(batch.h)
        b = clock()
        leave, pred = decide(j, batch.h)
        c = clock()
        done = batch.take_leavers(j, leave, pred)
        d = clock()
        seconds["stage"][j] += b - a
        seconds["decide"][j] += c - b
        seconds["compact"][j] += d - c
        if done:
            return
    reached[n_exits] += batch.h.shape[0]
    a = clock()
    logits = em.stages[-1](batch.h)
    b = clock()
    batch.predictions.index_copy_(0, batch.remaining, logits.argmax(1))
    seconds["stage"][n_exits] += b - a
    seconds["pass"][0] += clock() - b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("thresholds", help="a thresholds artifact fitted with --overhead measured")
    ap.add_argument("--point", type=int, default=0, help="which of its points")
    ap.add_argument("--method", default="e2cm", choices=("e2cm", "sdn", "entropy", "e2cm+sdn"))
    ap.add_argument("--cache", default="results/exit-speed", help="exit_speed.py's cache: means and heads")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=2000, help="test samples timed")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    doc = yaml.safe_load(Path(args.thresholds).read_text())
    wall = WallCosts([PartSeconds(p["batch_size"], p["stage_seconds"], p["decision_seconds"],
                                  p["compaction_seconds"], p.get("pass_seconds", 0.0))
                      for p in doc["wall_time"]["by_batch_size"]], 1, 0, 0)
    point = doc["points"][args.point]
    ck = load_checkpoint("demo")
    ck.model.eval()
    pre = Preprocess(ck.spec.input_shape, ck.spec.mean, ck.spec.std)
    test = load_dataset("demo", "test")
    test = test.subset(torch.arange(min(args.samples, len(test))))
    em = build_exit_model(ck.model)
    assert em.stages is not None
    cm = ClassMeans.load(str(Path(args.cache) / "means.safetensors"))
    rule = method_rule(args.method, cm, Path(args.cache) / "heads-1.safetensors")
    decide = Thresholded(rule, point["thresholds"])
    n_exits = len(em.exits)
    clock = time.perf_counter
    with torch.inference_mode():
        xs = [pre(images) for images, _, _ in test.batches(args.batch_size)]

        def shipped() -> None:
            for x in xs:
                run_early_exit(em, x, decide)

        def plain() -> None:
            for x in xs:
                ck.model(x).argmax(1)

        def stagewise() -> None:
            for x in xs:
                h = x
                for stage in em.stages:  # type: ignore[union-attr]
                    h = stage(h)
                h.argmax(1)

        totals: dict[str, list[float]] = {"shipped": [], "instrumented": [], "plain": [], "stagewise": []}
        seconds: dict[str, list[float]] = {}
        reached = [0] * (n_exits + 1)
        for round_ in range(args.rounds + 1):  # round 0 warms up
            run: dict[str, list[float]] = {"stage": [0.0] * (n_exits + 1), "decide": [0.0] * n_exits,
                                           "compact": [0.0] * n_exits, "pass": [0.0]}
            reached = [0] * (n_exits + 1)
            for name, work in (("shipped", shipped), ("plain", plain), ("stagewise", stagewise)):
                start = clock()
                work()
                if round_:
                    totals[name].append(clock() - start)
            start = clock()
            for x in xs:
                instrumented_pass(em, x, decide, run, reached)
            if round_:
                totals["instrumented"].append(clock() - start)
                seconds = {k: [a + b / args.rounds for a, b in zip(seconds.get(k, [0.0] * len(v)), v, strict=True)]
                           for k, v in run.items()}
    sizes = [p.batch_size for p in wall.by_batch_size]
    charged: dict[str, list[float]] = {k: [0.0] * len(seconds[k]) for k in PARTS}
    per_batch = [[0] * (n_exits + 1) for _ in xs]  # samples reaching each step, batch by batch, from one pass
    with torch.inference_mode():
        for b, x in enumerate(xs):
            exits = run_early_exit(em, x, decide)[1]
            leaving = torch.bincount(exits, minlength=n_exits + 1)
            per_batch[b] = leaving.flip(0).cumsum(0).flip(0).tolist()
    for counts in per_batch:
        for j, n in enumerate(counts):
            if n:
                charged["stage"][j] += _interpolate(sizes, [p.stage_seconds[j] for p in wall.by_batch_size], n)
                if j < n_exits:
                    charged["decide"][j] += _interpolate(sizes, [p.decision_seconds[j] for p in wall.by_batch_size], n)
                    charged["compact"][j] += _interpolate(sizes, [p.compaction_seconds[j] for p in wall.by_batch_size],
                                                          n)
    charged_pass = sum(_interpolate(sizes, [p.pass_seconds for p in wall.by_batch_size], c[0]) for c in per_batch)
    model_plain = sum(_interpolate(sizes, [sum(p.stage_seconds) for p in wall.by_batch_size], c[0])
                      for c in per_batch)
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{args.method} point {args.point}: budget {point['budget']}, model cost {point['cost']}; batch "
          f"{args.batch_size}, {len(xs)} batches, {args.rounds} rounds; load {load}")
    print(f"samples reaching each step: {reached}")
    print("\nms over the test batches: charged by the model / timed in the instrumented pass\n")
    print("| step | stage | decision | compaction |\n|---|---|---|---|")
    for j in range(n_exits + 1):
        cells = [f"{charged[k][j] * 1e3:.1f} / {seconds[k][j] * 1e3:.1f}" for k in PARTS if j < len(charged[k])]
        print(f"| {j} | " + " | ".join(cells) + " |")
    print("| sum | " + " | ".join(f"{sum(charged[k]) * 1e3:.1f} / {sum(seconds[k]) * 1e3:.1f}" for k in PARTS)
          + " |")
    print(f"| pass bookkeeping | {charged_pass * 1e3:.1f} / {seconds['pass'][0] * 1e3:.1f} | | |")
    med = {k: statistics.median(v) for k, v in totals.items()}
    model_total = sum(sum(charged[k]) for k in PARTS) + charged_pass
    timed_parts = sum(sum(seconds[k]) for k in PARTS) + seconds["pass"][0]
    print(f"\nmedian ms: shipped pass {med['shipped'] * 1e3:.1f}, instrumented {med['instrumented'] * 1e3:.1f} "
          f"(parts {timed_parts * 1e3:.1f}), plain model {med['plain'] * 1e3:.1f}, stage by stage "
          f"{med['stagewise'] * 1e3:.1f}; the model's plain {model_plain * 1e3:.1f}")
    print(f"cost: the model's on these batches {model_total / model_plain:.3f}; timed parts / stage by stage "
          f"{timed_parts / med['stagewise']:.3f}; shipped / plain {med['shipped'] / med['plain']:.3f}; shipped / "
          f"stage by stage {med['shipped'] / med['stagewise']:.3f}")


if __name__ == "__main__":
    main()
