"""Early-exit speed-up against 1 / cost, for every exit method, at batch 256 and batch 1.

    python bench/exit_speed.py                    # both thread settings' view: default threads
    python bench/exit_speed.py --threads 1        # one thread: less noise where other work shares the cores
    python bench/exit_speed.py --profile          # instead: where an early-exit batch spends its time, per exit
    python bench/exit_speed.py --threads 1 --overhead measured   # also wall-time budgets, in the same rounds

On the shipped checkpoint and the demo set: class means (calibrate-means on the training split), SDN
heads trained for one epoch (train-exits, backbone frozen) and thresholds at budgets from 0.15 to 0.9
for e2cm, sdn, entropy and e2cm+sdn (fit-thresholds) are made once with the CLI and cached under
``--cache`` (default tmp/exit-speed). Each method's operating points then run on the demo test split
in interleaved rounds with the plain model (plain, point 0, point 1, ..., plain, point 0, ...): the
speed-up of a round compares runs of that round only. Reported per point: the cost (MACs, the
model's own head = 1), the median speed-up over the rounds with its range, and speed-up x cost (1.0
means the wall time tracks the MACs exactly). Goal (issue 14, batch 256): speed-up x cost >= 0.9 at
cost 0.5, >= 0.8 at cost 0.25 and >= 0.7 at cost 0.15; batch 1 is reported beside it.

``--overhead measured`` also fits every method's thresholds with ``fit-thresholds --overhead measured`` at the
same budgets, at each batch size and thread count timed (a wall-time budget holds for those only), and runs
them in the same rounds: there the budget is a fraction of the plain model's wall time, and speed-up x budget
is what to read (1.0: the budget met exactly). Every run is timed by the wall clock and by the process's CPU
time: at one thread the CPU time leaves out the time other work on a shared machine takes the core away, so
its ratios move less with the load; both are reported, with the goal checked against each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from eetool.classification.e2cm import ClassMeans
from eetool.classification.exit_heads import load_heads
from eetool.classification.rules import HeadsRule, MeansRule, Thresholded, cost_models
from eetool.core.checkpoint import load_checkpoint
from eetool.core.costs import measure
from eetool.core.datasets import Dataset, Preprocess, load_dataset
from eetool.core.exits import ExitModel, build_exit_model
from eetool.core.inference import Decision, evaluate_exits, predict

BUDGETS = (0.15, 0.25, 0.5, 0.75, 0.9)
METHODS = ("e2cm", "sdn", "entropy", "e2cm+sdn")
GOALS = {0.5: 0.9, 0.25: 0.8, 0.15: 0.7}  # cost -> least speed-up x cost (batch 256)


def _eetool(*args: str) -> None:
    """One eetool command; a failure ends the benchmark with exit code 2, as every benchmark here does."""
    _failed(_eetool_run(*args))


def _eetool_run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "eetool", *args, "--force", "-q", "--no-progress"], env=env,
                          stderr=subprocess.PIPE, text=True)


def _failed(done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode:
        print(done.stderr, end="", file=sys.stderr)
        print(f"eetool {done.args[3]} failed (exit {done.returncode})", file=sys.stderr)
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


def make_wall_thresholds(cache: Path, paths: dict[str, Path], methods: list[str], budgets: list[float],
                         batch_size: int, threads: int) -> dict[str, Path | None]:
    """Every method's thresholds fitted with ``fit-thresholds --overhead measured`` at ``batch_size`` and
    ``threads``, made once and reused: at those of ``budgets`` the measurement can reach. A budget under the cost
    of the first exit (its stage, decision and compaction, which every sample pays) cannot be met; where one is
    asked for, the fit is made again without the budgets within 0.01 of the floor it reported (None: none left)."""
    out: dict[str, Path | None] = {}
    for method in methods:
        path = cache / f"{method}-wall-b{batch_size}-t{threads}.yaml"
        inputs = ["--means", str(paths["means"])] if method in ("e2cm", "e2cm+sdn") else []
        if method != "e2cm":
            inputs += ["--method", method, "--exit-heads", str(paths["heads"])]
        fit = ["fit-thresholds", *inputs, "--checkpoint", "demo", "--data", "demo", "--split", "train",
               "--overhead", "measured", "--batch-size", str(batch_size), "--threads", str(threads), "-o", str(path)]
        asked = list(budgets)
        while not path.exists() and asked:
            done = _eetool_run(*fit, *(a for b in asked for a in ("--budget", str(b))))
            floor = re.search(r"reachable budgets are ([0-9.]+)", done.stderr)
            if done.returncode == 2 and floor:
                print(f"{method} b{batch_size}: wall-time budgets start at {floor[1]}", file=sys.stderr)
                asked = [b for b in asked if b >= float(floor[1]) + 0.01]
                continue
            _failed(done)
        out[method] = path if path.exists() else None
    return out


def _read_wall_points(path: Path | None) -> list[dict[str, float | list[float]]]:
    import yaml

    return [] if path is None else yaml.safe_load(path.read_text())["points"]


def _read_thresholds(path: Path) -> list[list[float]]:
    import yaml

    return [p["thresholds"] for p in yaml.safe_load(path.read_text())["points"]]


def method_rule(method: str, cm: ClassMeans, heads_path: Path) -> MeansRule | HeadsRule:
    if method == "e2cm":
        return MeansRule(cm)
    heads, _ = load_heads(str(heads_path))
    return HeadsRule(heads, method, cm if method == "e2cm+sdn" else None)


def _clocked(run: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of one call (at one thread the CPU time is the time the core ran this work)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_method(em: ExitModel, model: torch.nn.Module, data: Dataset, pre: Preprocess, rule: MeansRule | HeadsRule,
                points: list[list[float]], batch_size: int, rounds: int
                ) -> tuple[list[list[float]], list[list[float]], list[torch.Tensor]]:
    """Wall and CPU seconds[round][run], run 0 the plain model, and each point's exit indices."""
    runs: list[Callable[[], object]] = [lambda: predict(model, data, pre, batch_size=batch_size)]
    exits: list[torch.Tensor] = []
    for t in points:
        decide = Thresholded(rule, t)
        exits.append(evaluate_exits(em, data, pre, decide, batch_size=batch_size).exit_index)  # warm-up pass
        runs.append(lambda decide=decide: evaluate_exits(em, data, pre, decide, batch_size=batch_size))
    runs[0]()
    clocked = [[_clocked(run) for run in runs] for _ in range(rounds)]
    return [[w for w, _ in r] for r in clocked], [[c for _, c in r] for r in clocked], exits


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


def print_summary(rows: list[dict[str, Any]], methods: list[str], budgets: list[float]) -> None:
    """Markdown tables on stderr, one per batch size and budget kind: median speed-up x cost (MACs budgets) or x
    budget (wall-time budgets) by the wall clock, the CPU time's in brackets; and whether the goal is met by
    each reading."""
    for batch in sorted({r["batch"] for r in rows}, reverse=True):
        for basis, what in (("macs", "speed-up x MACs cost"), ("wall", "speed-up x wall-time budget")):
            mine = {(r["method"], r["budget"]): r for r in rows if r["batch"] == batch and r["basis"] == basis}
            if not mine:
                continue
            print(f"\nbatch {batch}, {what}: wall clock (CPU time), median over rounds\n", file=sys.stderr)
            print("| method | " + " | ".join(f"{b:g}" for b in budgets) + " |\n|---|" + "---|" * len(budgets),
                  file=sys.stderr)
            for method in methods:
                cells = []
                for b in budgets:
                    r = mine.get((method, b))
                    cells.append("below the floor" if r is None else
                                 f"{r['wall']['speedup_x']:.2f} ({r['cpu']['speedup_x']:.2f})")
                print(f"| {method} | " + " | ".join(cells) + " |", file=sys.stderr)
            if batch == 256:
                for clock in ("wall", "cpu"):
                    # a wall-time budget under the floor is one the goal asks for and that cannot be met
                    met = all((m, b) in mine and mine[(m, b)][clock]["speedup_x"] >= goal
                              for m in methods for b, goal in GOALS.items() if b in budgets)
                    print(f"goal met by the {clock} reading: {met}", file=sys.stderr)


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
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="the budgets timed (a shorter run)")
    ap.add_argument("--overhead", choices=("analytic", "measured"), default="analytic",
                    help="measured: also thresholds fitted with fit-thresholds --overhead measured, in the same rounds")
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
    cm = ClassMeans.load(str(paths["means"]))
    results: dict[str, object] = {"threads": torch.get_num_threads(), "samples": len(test),
                                  "loadavg_start": Path("/proc/loadavg").read_text().split()[:3], "points": []}
    print(f"threads {torch.get_num_threads()}, load {' '.join(results['loadavg_start'])}", file=sys.stderr)  # type: ignore[arg-type]
    if args.profile:
        print_profile(em, ck.model, test, pre, cm, paths, args.methods.split(","),
                      [float(b) for b in args.profile_budgets.split(",")])
        return
    budgets = [float(b) for b in args.budgets.split(",")]
    unknown = [b for b in budgets if b not in BUDGETS]
    if unknown:
        ap.error(f"--budgets: {unknown} are not among {BUDGETS}")
    methods = args.methods.split(",")
    rows: list[dict[str, Any]] = []
    scaled_by = {"macs": "cost", "wall": "budget"}
    for batch_size, data, rounds in ((256, test, args.rounds), (1, small, args.batch1_rounds)):
        if str(batch_size) not in args.batch_sizes.split(","):
            continue
        wall_paths = (make_wall_thresholds(Path(args.cache), paths, methods, budgets, batch_size,
                                           torch.get_num_threads()) if args.overhead == "measured" else {})
        for method in methods:
            rule = method_rule(method, cm, paths["heads"])
            cost_model = cm.cost_model() if method == "e2cm" else cost_models(rule, em, ck.spec.input_shape)[0]  # type: ignore[arg-type]
            all_points = _read_thresholds(paths[method])
            macs = [("macs", b, all_points[BUDGETS.index(b)], None) for b in budgets]
            wall = [("wall", float(p["budget"]), p["thresholds"], float(p["cost"]))  # type: ignore[arg-type]
                    for p in _read_wall_points(wall_paths.get(method))]
            points = macs + wall
            t0 = time.perf_counter()
            seconds, cpu, exits = time_method(em, ck.model, data, pre, rule, [p[2] for p in points], batch_size,
                                              rounds)
            for i, ((basis, budget, _, model_cost), e) in enumerate(zip(points, exits, strict=True)):
                cost = cost_model.average(torch.bincount(e, minlength=len(em.exits) + 1))
                # speed-up x cost in MACs for MACs budgets; x the budget (a fraction of the plain model's wall
                # time) for wall-time budgets
                scale = cost if basis == "macs" else budget
                row: dict[str, Any] = {"method": method, "batch": batch_size, "basis": basis, "budget": budget,
                                          "cost": round(cost, 4)}
                if model_cost is not None:
                    row["wall_model_cost"] = round(model_cost, 4)
                for clock, times in (("wall", seconds), ("cpu", cpu)):
                    ups = [r[0] / r[i + 1] for r in times]
                    # Other work on the machine only ever adds time: the best round of each run is a second,
                    # steadier view beside the median of the per-round ratios.
                    best = min(r[0] for r in times) / min(r[i + 1] for r in times)
                    row[clock] = {"speedup": round(statistics.median(ups), 3), "speedup_min": round(min(ups), 3),
                                  "speedup_max": round(max(ups), 3),
                                  "speedup_x": round(statistics.median(ups) * scale, 3),
                                  "best_speedup_x": round(best * scale, 3),
                                  # the measured speed-up against the one the wall-time model promised
                                  **({"speedup_x_model_cost": round(statistics.median(ups) * model_cost, 3)}
                                     if model_cost is not None else {}),
                                  "plain_s": [round(r[0], 4) for r in times],
                                  "point_s": [round(r[i + 1], 4) for r in times]}
                rows.append(row)
                w, c = row["wall"], row["cpu"]
                print(f"{method:9s} b{batch_size:<3d} {basis} budget {budget:.2f} MACs cost {cost:.3f} speed-up "
                      f"{w['speedup']:.2f} ({w['speedup_min']:.2f}-{w['speedup_max']:.2f}) x {scaled_by[basis]} "
                      f"{w['speedup_x']:.2f} (best rounds {w['best_speedup_x']:.2f}); CPU time {c['speedup']:.2f} "
                      f"({c['speedup_min']:.2f}-{c['speedup_max']:.2f}) x {c['speedup_x']:.2f}"
                      + (f"; x the model's cost {model_cost:.3f}: wall {w['speedup_x_model_cost']:.2f}, CPU "
                         f"{c['speedup_x_model_cost']:.2f}" if model_cost is not None else ""), file=sys.stderr)
            print(f"  ({time.perf_counter() - t0:.0f} s, load {Path('/proc/loadavg').read_text().split()[0]})",
                  file=sys.stderr)
    print_summary(rows, methods, budgets)
    results["points"] = rows
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    json.dump(results, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
