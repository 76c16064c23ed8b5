"""Early-exit speed-up against 1 / cost, for every exit method, at batch 256 and batch 1.

    python bench/exit_speed.py                    # both thread settings' view: default threads
    python bench/exit_speed.py --threads 1        # one thread: less noise where other work shares the cores
    python bench/exit_speed.py --profile          # instead: where an early-exit batch spends its time, per exit

On the shipped checkpoint and the demo set: class means (calibrate-means on the training split), SDN
heads trained for one epoch (train-exits, backbone frozen) and thresholds at budgets from 0.15 to 0.9
for e2cm, sdn, entropy and e2cm+sdn (fit-thresholds) are made once with the CLI and cached under
``--cache`` (default tmp/exit-speed). Each method's operating points then run on the demo test split
in interleaved rounds with the plain model (plain, point 0, point 1, ..., plain, point 0, ...): the
speed-up of a round compares runs of that round only. Reported per point: the cost (MACs, the
model's own head = 1), the median speed-up over the rounds with its range, and speed-up x cost (1.0
means the wall time tracks the MACs exactly). Goal (issue 14, batch 256): speed-up x cost >= 0.9 at
cost 0.5, >= 0.8 at cost 0.25 and >= 0.7 at cost 0.15; batch 1 is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from eetool.checkpoint import load_checkpoint
from eetool.costs import measure
from eetool.datasets import Dataset, Preprocess, load_dataset
from eetool.e2cm import ClassMeans
from eetool.exits import ExitModel, build_exit_model
from eetool.heads import load_heads
from eetool.inference import Decision, evaluate_exits, predict
from eetool.rules import HeadsRule, MeansRule, Thresholded, cost_models

BUDGETS = (0.15, 0.25, 0.5, 0.75, 0.9)
METHODS = ("e2cm", "sdn", "entropy", "e2cm+sdn")
GOALS = {0.5: 0.9, 0.25: 0.8, 0.15: 0.7}  # cost -> least speed-up x cost (batch 256)


def _eetool(*args: str) -> None:
    """One eetool command; a failure ends the benchmark with exit code 2, as every benchmark here does."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-m", "eetool", *args, "--force", "-q", "--no-progress"], env=env)
    if done.returncode:
        print(f"eetool {args[0]} failed (exit {done.returncode})", file=sys.stderr)
        sys.exit(2)


def make_artifacts(cache: Path) -> dict[str, Path]:
    """Class means, SDN heads and every method's thresholds, made with the CLI once and then reused."""
    cache.mkdir(parents=True, exist_ok=True)
    means, heads = cache / "means.safetensors", cache / "heads-1.safetensors"
    if not means.exists():
        _eetool("calibrate-means", "--checkpoint", "demo", "--data", "demo", "--split", "train", "-o", str(means))
    if not heads.exists():
        _eetool("train-exits", "--checkpoint", "demo", "--data", "demo", "--split", "train", "--epochs", "1",
                "-o", str(heads))
    budgets = [a for b in BUDGETS for a in ("--budget", str(b))]
    out = {"means": means, "heads": heads}
    for method in METHODS:
        path = cache / f"{method}.yaml"
        if not path.exists():
            inputs = ["--means", str(means)] if method in ("e2cm", "e2cm+sdn") else []
            if method != "e2cm":
                inputs += ["--method", method, "--exit-heads", str(heads), "--checkpoint", "demo", "--data", "demo",
                           "--split", "train"]
            _eetool("fit-thresholds", *inputs, *budgets, "-o", str(path))
        out[method] = path
    return out


def _read_thresholds(path: Path) -> list[list[float]]:
    import yaml

    return [p["thresholds"] for p in yaml.safe_load(path.read_text())["points"]]


def method_rule(method: str, cm: ClassMeans, heads_path: Path) -> MeansRule | HeadsRule:
    if method == "e2cm":
        return MeansRule(cm)
    heads, _ = load_heads(str(heads_path))
    return HeadsRule(heads, method, cm if method == "e2cm+sdn" else None)


def time_method(em: ExitModel, model: torch.nn.Module, data: Dataset, pre: Preprocess, rule: MeansRule | HeadsRule,
                points: list[list[float]], batch_size: int, rounds: int
                ) -> tuple[list[list[float]], list[torch.Tensor]]:
    """seconds[round][run], run 0 the plain model, and each point's exit indices."""
    runs: list[Callable[[], float]] = [lambda: predict(model, data, pre, batch_size=batch_size).seconds]
    exits: list[torch.Tensor] = []
    for t in points:
        decide = Thresholded(rule, t)
        exits.append(evaluate_exits(em, data, pre, decide, batch_size=batch_size).exit_index)  # warm-up pass
        runs.append(lambda decide=decide: evaluate_exits(em, data, pre, decide, batch_size=batch_size).seconds)
    runs[0]()
    return [[run() for run in runs] for _ in range(rounds)], exits


def profile(em: ExitModel, data: Dataset, pre: Preprocess, decide: Decision, batch_size: int) -> dict[str, float]:
    """Seconds spent in each part of early-exit inference over ``data``, by manual timers around the same steps
    ``run_early_exit`` takes: preprocessing, each stage, each exit's decision, each compaction, the head."""
    assert em.stages is not None
    parts: dict[str, float] = {}

    def timed(name: str, step: Callable[[], object]) -> object:
        t = time.perf_counter()
        out = step()
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return out

    with torch.inference_mode():
        for images, _, _ in data.batches(batch_size):
            h = timed("preprocess", lambda images=images: pre(images))
            for j, stage in enumerate(em.stages[:-1]):
                h = timed(f"stage {j}", lambda stage=stage, h=h: stage(h))
                leave, pred = timed(f"decide {j}", lambda j=j, h=h: decide(j, h))
                h = timed(f"compact {j}", lambda h=h, leave=leave: h[~leave] if bool(leave.any()) else h)
                if h.shape[0] == 0:
                    break
            else:
                timed("head", lambda h=h: em.stages[-1](h).argmax(1))
    return parts


def print_profile(em: ExitModel, model: torch.nn.Module, test: Dataset, pre: Preprocess, cm: ClassMeans,
                  paths: dict[str, Path], methods: list[str], budgets: list[float], repeats: int = 3) -> None:
    input_shape: tuple[int, int, int] = pre.input_shape  # type: ignore[assignment]
    """Milliseconds per part at each of ``budgets``, best of ``repeats`` passes (noise only adds time), as Markdown
    tables: the model's stages and head, then each method's decisions and compactions per exit. Below each table,
    the plain model's pass and the ceiling of speed-up x cost were decisions and compaction free (the plain pass
    over the stages' time in the early-exit pass, times the cost): what the backbone alone allows."""
    print(f"threads {torch.get_num_threads()}, load {Path('/proc/loadavg').read_text().split()[0]}")
    print_stage_shares(em, test, pre, input_shape, repeats)
    for budget in budgets:
        for batch_size, data in ((256, test), (1, test.subset(torch.arange(200)))):
            plain = min(_plain_pass(model, data, pre, batch_size) for _ in range(repeats + 1))
            found: dict[str, dict[str, float]] = {}
            costs: dict[str, float] = {}
            for method in methods:
                rule = method_rule(method, cm, paths["heads"])
                decide = Thresholded(rule, _read_thresholds(paths[method])[BUDGETS.index(budget)])
                profile(em, data, pre, decide, batch_size)  # warm-up
                parts = [profile(em, data, pre, decide, batch_size) for _ in range(repeats)]
                found[method] = {k: min(p.get(k, 0.0) for p in parts) * 1e3 for k in parts[0]}
                exits = evaluate_exits(em, data, pre, decide, batch_size=batch_size).exit_index
                cost_model = (cm.cost_model() if method == "e2cm"  # type: ignore[arg-type]
                              else cost_models(rule, em, input_shape)[0])  # type: ignore[arg-type]
                costs[method] = cost_model.average(torch.bincount(exits, minlength=len(em.exits) + 1))
            print(f"\nbatch {batch_size}, {len(data)} samples, budget {budget}: ms over the pass (stage / decision / "
                  f"compaction per exit), load {Path('/proc/loadavg').read_text().split()[0]}\n")
            print("| part | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
            parts_in_order = sorted({k for f in found.values() for k in f}, key=_part_order)
            for part in parts_in_order:
                print(f"| {part} | " + " | ".join(f"{found[m].get(part, 0.0):.1f}" for m in methods) + " |")
            for kind in ("stage", "decide", "compact"):
                shares = []
                for m in methods:
                    total = sum(found[m].values())
                    mine = sum(v for k, v in found[m].items()
                               if k.startswith(kind) or (kind == "stage" and k == "head"))
                    shares.append(f"{mine / total:.0%}")
                print(f"| {kind} share | " + " | ".join(shares) + " |")
            print("| cost | " + " | ".join(f"{costs[m]:.3f}" for m in methods) + " |")
            print("| speed-up x cost (this pass) | " + " | ".join(
                f"{plain * 1e3 / sum(found[m].values()) * costs[m]:.2f}" for m in methods) + " |")
            print("| ceiling: stages only | " + " | ".join(
                f"{plain * 1e3 / _stage_ms(found[m]) * costs[m]:.2f}" for m in methods) + " |")
            print(f"\nplain model: {plain * 1e3:.1f} ms")


def print_stage_shares(em: ExitModel, test: Dataset, pre: Preprocess, input_shape: tuple[int, int, int],
                       repeats: int) -> None:
    """Each stage's share of the plain model's wall time (best of ``repeats`` + 2 passes per stage, batch 256 and 1)
    beside its share of the MACs, cumulated to each exit: the MACs cost over the wall-time cost of leaving
    there is the most speed-up x cost a sample leaving there can give, with decisions and compaction free."""
    assert em.stages is not None
    macs = measure(em, input_shape).stage_macs
    shares = {}
    for batch_size, data in ((256, test), (1, test.subset(torch.arange(200)))):
        best = [float("inf")] * len(em.stages)
        with torch.inference_mode():
            for _ in range(repeats + 2):
                seconds = [0.0] * len(em.stages)
                for images, _, _ in data.batches(batch_size):
                    h = pre(images)
                    for j, stage in enumerate(em.stages):
                        start = time.perf_counter()
                        h = stage(h)
                        seconds[j] += time.perf_counter() - start
                best = [min(b, s) for b, s in zip(best, seconds, strict=True)]
        shares[batch_size] = [b / sum(best) for b in best]
    print(f"\nstage shares of the plain model, load {Path('/proc/loadavg').read_text().split()[0]}: MACs, wall time "
          "at batch 256 and 1; cumulated to the exit after the stage, and MACs / wall there\n")
    print("| stage | MACs | wall b256 | wall b1 | to exit: MACs | wall b256 | wall b1 | MACs / wall b256 | b1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = sum(macs)
    cum = [0.0, 0.0, 0.0]
    for j, name in enumerate([*em.exits, "head"]):
        row = [macs[j] / total, shares[256][j], shares[1][j]]
        cum = [c + r for c, r in zip(cum, row, strict=True)]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row + cum)
              + f" | {cum[0] / cum[1]:.2f} | {cum[0] / cum[2]:.2f} |")


def _plain_pass(model: torch.nn.Module, data: Dataset, pre: Preprocess, batch_size: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for images, _, _ in data.batches(batch_size):
            model(pre(images)).argmax(1)
        return time.perf_counter() - start


def _stage_ms(parts: dict[str, float]) -> float:
    return sum(v for k, v in parts.items() if k.startswith("stage") or k in ("head", "preprocess"))


def _part_order(part: str) -> tuple[int, int]:
    name, _, index = part.partition(" ")
    exit_order = int(index) if index else (-1 if name == "preprocess" else 10**6)
    return exit_order, ["preprocess", "stage", "decide", "compact", "head"].index(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="results/exit-speed", help="where the artifacts are made once and reused")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds at batch 256")
    ap.add_argument("--batch1-samples", type=int, default=300, help="test samples timed at batch 1")
    ap.add_argument("--batch1-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch-sizes", default="256,1", help="256, 1 or both")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="instead: per exit, the time of the stage, the decision and the compaction")
    ap.add_argument("--profile-budgets", default="0.15,0.25,0.5", help="the budgets --profile looks at")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = make_artifacts(Path(args.cache))
    ck = load_checkpoint("demo")
    ck.model.eval()
    pre = Preprocess(ck.spec.input_shape, ck.spec.mean, ck.spec.std)
    test = load_dataset("demo", "test")
    small = test.subset(torch.arange(min(args.batch1_samples, len(test))))
    em = build_exit_model(ck.model)
    cm, _ = ClassMeans.load(str(paths["means"]))
    results: dict[str, object] = {"threads": torch.get_num_threads(), "samples": len(test),
                                  "loadavg_start": Path("/proc/loadavg").read_text().split()[:3], "points": []}
    print(f"threads {torch.get_num_threads()}, load {' '.join(results['loadavg_start'])}", file=sys.stderr)  # type: ignore[arg-type]
    if args.profile:
        print_profile(em, ck.model, test, pre, cm, paths, args.methods.split(","),
                      [float(b) for b in args.profile_budgets.split(",")])
        return
    rows = []
    for method in args.methods.split(","):
        rule = method_rule(method, cm, paths["heads"])
        cost_model = cm.cost_model() if method == "e2cm" else cost_models(rule, em, ck.spec.input_shape)[0]  # type: ignore[arg-type]
        points = _read_thresholds(paths[method])
        for batch_size, data, rounds in ((256, test, args.rounds), (1, small, args.batch1_rounds)):
            if str(batch_size) not in args.batch_sizes.split(","):
                continue
            t0 = time.perf_counter()
            seconds, exits = time_method(em, ck.model, data, pre, rule, points, batch_size, rounds)
            for i, e in enumerate(exits):
                cost = cost_model.average(torch.bincount(e, minlength=len(em.exits) + 1))
                ups = [r[0] / r[i + 1] for r in seconds]
                # Other work on the machine only ever adds time: the best round of each run is a second,
                # steadier view beside the median of the per-round ratios.
                best = min(r[0] for r in seconds) / min(r[i + 1] for r in seconds)
                row = {"method": method, "batch": batch_size, "budget": BUDGETS[i], "cost": round(cost, 4),
                       "speedup": round(statistics.median(ups), 3), "speedup_min": round(min(ups), 3),
                       "speedup_max": round(max(ups), 3), "speedup_x_cost": round(statistics.median(ups) * cost, 3),
                       "best_speedup_x_cost": round(best * cost, 3),
                       "plain_s": [round(r[0], 4) for r in seconds], "point_s": [round(r[i + 1], 4) for r in seconds]}
                rows.append(row)
                print(f"{method:9s} b{batch_size:<3d} budget {BUDGETS[i]:.2f} cost {cost:.3f} speed-up "
                      f"{row['speedup']:.2f} ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) "
                      f"x cost {row['speedup_x_cost']:.2f} (best rounds: {row['best_speedup_x_cost']:.2f})",
                      file=sys.stderr)
            print(f"  ({time.perf_counter() - t0:.0f} s, load {Path('/proc/loadavg').read_text().split()[0]})",
                  file=sys.stderr)
    results["points"] = rows
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    json.dump(results, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
