"""Pruning early-exit networks on Fashion-MNIST (thesis section 2.5, scaled to 2 CPU cores): `make weight-pruning`.

The shipped ResNet-20 (the thesis used ResNet-56 on CIFAR-10) gets SDN heads at its ten exits (`train-exits`, backbone
frozen), then is pruned with `prune-weights` jointly (Approach 1) and backbone first (Approach 2, "ordered"): 20
rounds of 10% global L1 pruning, each followed by a fine-tuning on --finetune-samples samples (the thesis: 10
epochs). Beyond the thesis, the same heads are channel-pruned (`--structure channel`, joint) to about the cost the
unstructured networks reach, with the same fine-tuning samples in all, spread over fewer rounds.
`fit-thresholds --method sdn --sweep` on the test split then gives each network's accuracy-cost curve (effective
cost for the unstructured ones), and `evaluate --baseline` times each pruned network against the unpruned one on
one thread. Every step is an `eetool` command line; a step whose output exists is skipped
and an interrupted pruning resumes from its last round, so rerunning continues where a run stopped. The two
prunings run side by side (one thread each). Then a Markdown table and three figures.

    python reproduce/weight_pruning.py results/weight-pruning --finetune-samples 3000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pages import write_page  # reproduce/pages.py, beside this script
from steps import Step, run_steps  # reproduce/steps.py, beside this script

APPROACHES = ("joint", "ordered")
CHANNEL = "channel"
PRUNED = (*APPROACHES, CHANNEL)
NETWORKS = ("unpruned", *PRUNED)
BUDGETS = (0.1, 0.15, 0.2, 0.5)  # cost (normalised to the dense network) at which the curves are read off
ACCURACY_DROP = 0.04  # the thesis: about half the cost for about 4 points of accuracy


def plan(out: Path, a: argparse.Namespace) -> list[Step]:
    eetool = [sys.executable, "-m", "eetool"]
    common = ["--threads", str(a.threads), "--no-progress", "--seed", str(a.seed)]
    data = ["--data", a.data]
    steps = [Step("heads", [*eetool, "train-exits", "-c", a.checkpoint, *data, "--split", "train",
                            "--epochs", str(a.head_epochs), "--eval-split", "test",
                            "-o", str(out / "heads.safetensors"), "--force", *common],
                  out / "heads.safetensors")]
    # Per-exit accuracy after every round on a class-balanced part of the test split (--eval-size images; the
    # whole split after every round would cost more than the fine-tuning); the curves use the whole split.
    pruning_data = ["--data", f"safetensors:{out / 'data.safetensors'}"]
    for approach in APPROACHES:
        steps.append(Step(approach, [*eetool, "prune-weights", "-c", a.checkpoint, *pruning_data, "--split", "train",
                                     "--exit-heads", str(out / "heads.safetensors"), "--approach", approach,
                                     "--rounds", str(a.rounds), "--amount", str(a.amount),
                                     "--finetune-samples", str(a.finetune_samples), "--eval-split", "test",
                                     "-o", str(out / f"{approach}.safetensors"), "--force", *common],
                          out / f"{approach}.safetensors", ["heads"]))
    steps.append(Step(CHANNEL, [*eetool, "prune-weights", "-c", a.checkpoint, *pruning_data, "--split", "train",
                                "--exit-heads", str(out / "heads.safetensors"), "--structure", "channel",
                                "--rounds", str(a.channel_rounds), "--amount", str(a.channel_amount),
                                "--finetune-samples", str(a.finetune_samples * a.rounds // a.channel_rounds),
                                "--eval-split", "test", "-o", str(out / f"{CHANNEL}.safetensors"), "--force",
                                *common],
                      out / f"{CHANNEL}.safetensors", ["heads"]))
    for network in PRUNED:  # the full model against the unpruned one, on one thread (as the README says why)
        steps.append(Step(f"speed-{network}", [*eetool, "evaluate", "-c", str(out / f"{network}.safetensors"), *data,
                                               "--split", "test", "--baseline", a.checkpoint, "--repeats",
                                               str(a.repeats), "--threads", "1", "--no-progress", "--format", "json"],
                          out / f"speed-{network}.json", [network]))
    for network in NETWORKS:
        checkpoint, heads = ((a.checkpoint, out / "heads.safetensors") if network == "unpruned" else
                             (str(out / f"{network}.safetensors"), out / f"{network}-heads.safetensors"))
        # The curve on the test split, as the thesis draws it (thresholds swept on the images they are scored on).
        steps.append(Step(f"sweep-{network}", [*eetool, "fit-thresholds", "--method", "sdn", "--exit-heads", str(heads),
                                               "-c", checkpoint, *data, "--split", "test", "--sweep",
                                               "-o", str(out / f"sweep-{network}.yaml"), "--force", *common],
                          out / f"sweep-{network}.yaml", ["heads" if network == "unpruned" else network]))
    for s in steps:
        s.stdout = out / f"{s.name}.out"
    return steps


def make_data(path: Path, data: str, eval_size: int, seed: int) -> None:
    """The training split whole and a class-balanced random ``eval_size`` images of the test split, as one
    safetensors dataset (``train.images`` ... ``test.labels``)."""
    if path.exists():
        return
    import torch
    from safetensors.torch import save_file

    from eetool.core.datasets import load_dataset

    train, test = load_dataset(data, "train"), load_dataset(data, "test")
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(test.num_classes):
        members = torch.nonzero(test.labels == c).squeeze(1)
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:eval_size // test.num_classes]])
    idx = torch.sort(torch.cat(chosen)).values
    tmp = path.with_suffix(".tmp")
    save_file({"train.images": train.images.contiguous(), "train.labels": train.labels.contiguous(),
               "test.images": test.images[idx].contiguous(), "test.labels": test.labels[idx].contiguous()},
              str(tmp), metadata={"classes": "\n".join(test.classes)})
    tmp.replace(path)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def accuracy_at(points: list[dict[str, Any]], cost: float) -> float | None:
    """Accuracy of the convex hull of a sweep at ``cost`` (time sharing between its neighbouring points); the best
    point's when ``cost`` is beyond the curve, None before its first point."""
    pts = sorted(points, key=lambda p: p["cost"])
    if not pts or cost < pts[0]["cost"]:
        return None
    for lo, hi in zip(pts, pts[1:], strict=False):
        if lo["cost"] <= cost <= hi["cost"]:
            t = 0.0 if hi["cost"] == lo["cost"] else (cost - lo["cost"]) / (hi["cost"] - lo["cost"])
            return float(lo["accuracy"] + t * (hi["accuracy"] - lo["accuracy"]))
    return float(max(p["accuracy"] for p in pts))


def cost_to_reach(points: list[dict[str, Any]], accuracy: float) -> float | None:
    """The lowest cost at which the convex hull reaches ``accuracy`` (None if it never does)."""
    pts = sorted(points, key=lambda p: p["cost"])
    if not pts:
        return None
    if pts[0]["accuracy"] >= accuracy:
        return float(pts[0]["cost"])
    for lo, hi in zip(pts, pts[1:], strict=False):
        if lo["accuracy"] < accuracy <= hi["accuracy"]:
            return float(lo["cost"] + (accuracy - lo["accuracy"]) / (hi["accuracy"] - lo["accuracy"])
                         * (hi["cost"] - lo["cost"]))
    return None


def depth_thirds(layers: list[dict[str, Any]]) -> list[float]:
    """Sparsity of the backbone's pruned conv layers in three depth groups (first, middle, last third), weighted by
    their weights: 'deeper layers are pruned more'."""
    convs = [la for la in layers if la["part"] == "backbone" and la["pruned"]][:-1]  # the final linear layer apart
    third = -(-len(convs) // 3)
    groups = [convs[i:i + third] for i in range(0, len(convs), third)]
    return [sum(la["zeros"] for la in g) / sum(la["weights"] for la in g) for g in groups]


def pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def exit_cost(report: dict[str, Any], i: int) -> float:
    """Exit ``i``'s cost as a fraction of the unpruned backbone's MACs: effective for unstructured pruning, the
    smaller dense network's for channel pruning."""
    e = report["costs"]["exits"][i]
    return float(e["of_original"] if report.get("structure") == CHANNEL else e["effective"])


def full_cost(report: dict[str, Any]) -> float:
    """The pruned network's cost as a fraction of the unpruned one's MACs (effective, or the smaller network's)."""
    if report.get("structure") == CHANNEL:
        return float(report["macs_fraction"])
    return float(report["costs"]["effective_model_macs"] / report["costs"]["model_macs"])


def curve(network: str, reports: dict[str, Any], sweeps: dict[str, Any]) -> list[dict[str, Any]]:
    """A network's sweep with costs as fractions of the unpruned network's MACs (a channel-pruned network's sweep
    is in its own, smaller MACs)."""
    sweep, r = sweeps.get(network), reports.get(network)
    if not sweep:
        return []
    scale = float(r["macs_fraction"]) if r and r.get("structure") == CHANNEL else 1.0
    return [{**p, "cost": p["cost"] * scale} for p in sweep["points"]]


def speed_text(doc: dict[str, Any] | None) -> str:
    """The full model's measured speed-up against the unpruned network: median (range over the rounds)."""
    if not doc:
        return "–"
    p = doc["points"][0]
    return f"{p['speedup_vs_baseline']:.2f}x ({p['speedup_vs_baseline_min']:.2f}–{p['speedup_vs_baseline_max']:.2f})"


def exit_rows(reports: dict[str, Any], label: Callable[[int, str], str] = lambda i, name: name) -> list[str]:
    """One Markdown row per exit: its dense cost, the unpruned network's accuracy and each pruned network's accuracy
    and cost there; ``label(i, name)`` names exit ``i``."""
    first = next(r for r in reports.values() if r)
    base = first["baseline_accuracy"]
    dense = next((r for r in reports.values() if r and r.get("structure") != CHANNEL), None)
    lines = []
    for i, name in enumerate(e["exit"] for e in first["costs"]["exits"]):
        cells = [label(i, name), f"{dense['costs']['exits'][i]['dense']:.3f}" if dense else "–", pct(base.get(name))]
        for a in PRUNED:
            r = reports.get(a)
            cells += [pct(r["accuracy"].get(name)), f"{exit_cost(r, i):.3f}"] if r else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def network_rows(reports: dict[str, Any], sweeps: dict[str, Any], speeds: dict[str, Any]) -> list[str]:
    """One Markdown row per network: sparsity, its accuracy-cost curve read off at BUDGETS and its speed-up."""
    best_unpruned = max(p["accuracy"] for p in sweeps["unpruned"]["points"]) if sweeps.get("unpruned") else None
    lines = []
    for network in NETWORKS:
        r = reports.get(network)
        speed = speed_text(speeds.get(network))
        if network == "unpruned":
            sparsity = thirds = final = heads = "–"
            full = "1.000"
            speed = "1.00x"
        elif r and r.get("structure") == CHANNEL:
            widths = r["pruned"]["widths"]["stage_widths"]
            original = r["original"]["widths"]["stage_widths"]
            sparsity = f"widths {'/'.join(map(str, widths))} of {'/'.join(map(str, original))}"
            thirds = final = heads = "dense"
            full = f"{full_cost(r):.3f}"
        elif r:
            s = r["sparsity"]
            sparsity = f"{pct(s['taking_part'], 1)} ({pct(s['backbone'], 1)}; {pct(s['heads'], 1)})"
            thirds = " / ".join(pct(x, 1) for x in depth_thirds(r["layers"]))
            final = pct([la for la in r["layers"] if la["part"] == "backbone"][-1]["sparsity"], 1)
            head_rows = [la for la in r["layers"] if la["part"] == "heads"]
            heads = f"{pct(head_rows[0]['sparsity'], 1)} → {pct(head_rows[-1]['sparsity'], 1)}" if head_rows else "–"
            full = f"{full_cost(r):.3f}"
        else:
            continue
        pts = curve(network, reports, sweeps)
        if pts:
            read = [pct(max(p["accuracy"] for p in pts)), *(pct(accuracy_at(pts, b)) for b in BUDGETS)]
            reach = None if best_unpruned is None else cost_to_reach(pts, best_unpruned - ACCURACY_DROP)
            read.append("never" if reach is None else f"{reach:.3f}")
        else:
            read = ["–"] * (len(BUDGETS) + 2)
        lines.append(f"| {network} | {sparsity} | {thirds} | {final} | {heads} | {full} | " + " | ".join(read)
                     + f" | {speed} |")
    return lines


def tabulate(reports: dict[str, Any], sweeps: dict[str, Any], speeds: dict[str, Any] | None = None) -> str:
    """Markdown: each exit's accuracy (unpruned and every pruned network) with its costs, then each network's
    sparsity, its accuracy-cost curve read off at BUDGETS and its measured speed-up."""
    speeds = speeds or {}
    lines = ["Each exit's test accuracy when every image leaves there (cost: dense, effective for the unstructured "
             "networks and the smaller network's for channel pruning, as a fraction of the unpruned backbone's MACs; "
             "leaving at an exit includes every head before it, so the last exits cost more than the backbone "
             "alone):", "",
             "| exit | dense cost | unpruned | " + " | ".join(f"{a} | {a} cost" for a in PRUNED) + " |",
             "|---|---|---|" + "---|---|" * len(PRUNED), *exit_rows(reports)]
    lines += ["", "Sparsity of the weights taking part (backbone conv and linear, heads; channel pruning: the widths "
              "kept), the accuracy-cost curves (convex hull of the test-split sweep, costs as above) and the full "
              "model's measured speed-up against the unpruned network (1 thread, batch 256, median and range over "
              "the rounds):", "",
              "| network | sparsity (backbone; heads) | backbone conv by depth thirds | final layer | heads "
              "(first → last) | full-model cost | best accuracy | "
              + " | ".join(f"accuracy at cost {b:g}" for b in BUDGETS)
              + f" | cost for best unpruned − {round(100 * ACCURACY_DROP)} points | measured speed-up |",
              "|---|---|---|---|---|---|---|" + "---|" * len(BUDGETS) + "---|---|",
              *network_rows(reports, sweeps, speeds)]
    return "\n".join(lines)


def page_exit_label(i: int, name: str) -> str:
    """An exit as the results page names it: its number (the stem's marked), or "final"."""
    return "final" if name == "final" else f"{i + 1} (stem)" if name == "stem" else str(i + 1)


def page_parts(reports: dict[str, Any], sweeps: dict[str, Any], speeds: dict[str, Any]) -> dict[str, str]:
    """The generated parts of docs/results/weight-pruning.md (reproduce/pages/weight-pruning.md holds the rest)."""
    best = max(p["accuracy"] for p in sweeps["unpruned"]["points"]) if sweeps.get("unpruned") else None
    target = "–" if best is None else pct(best - ACCURACY_DROP)
    exits = ["| exit | dense cost | unpruned | " + " | ".join(f"{a} | {a} cost" for a in PRUNED) + " |",
             "|---|---|---|" + "---|---|" * len(PRUNED), *exit_rows(reports, page_exit_label)]
    networks = ["| network | sparsity (backbone; heads) | backbone convs by depth thirds | final layer | heads, "
                "first → last | full-model cost | best accuracy | "
                + " | ".join(f"at cost {b:g}" if k == 0 else f"at {b:g}" for k, b in enumerate(BUDGETS))
                + f" | cost for unpruned best − {round(100 * ACCURACY_DROP)} points ({target}) | measured speed-up |",
                "|---|---|---|---|---|---|---|" + "---|" * len(BUDGETS) + "---|---|",
                *network_rows(reports, sweeps, speeds)]
    return {"exit_table": "\n".join(exits), "network_table": "\n".join(networks)}

def save(fig: Any, prefix: Path, name: str) -> Path:
    """Write a finished figure as PREFIX-NAME.png and close it."""
    import matplotlib.pyplot as plt

    path = prefix.with_name(f"{prefix.name}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot(reports: dict[str, Any], sweeps: dict[str, Any], prefix: Path) -> list[Path]:
    """Per-layer sparsity (thesis Fig. 5a/6a), per-exit accuracy against the unpruned network (Fig. 5b/7a) and the
    accuracy-cost curves (Fig. 5c/6d/7b), as PREFIX-sparsity.png, PREFIX-exits.png and PREFIX-cost.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"unpruned": "black", "joint": "tab:blue", "ordered": "tab:orange", CHANNEL: "tab:green"}
    written = []
    present = [a for a in APPROACHES if reports.get(a)]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 1]})
    for k, a in enumerate(present):
        layers = reports[a]["layers"]
        for ax, part in zip(axes, ("backbone", "heads"), strict=True):
            rows = [la for la in layers if la["part"] == part]
            xs = [i + (k - (len(present) - 1) / 2) * 0.4 for i in range(len(rows))]
            ax.bar(xs, [100 * la["sparsity"] for la in rows], width=0.4, color=colours[a], label=a)
            ax.set_xticks(range(len(rows)), [la["layer"] for la in rows], rotation=90, fontsize=5)
    axes[0].set(title="backbone layers (input → output)", ylabel="sparsity (%)")
    axes[1].set(title="exit heads (first → last)")
    axes[0].legend(fontsize=8)
    written.append(save(fig, prefix, "sparsity"))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    first = reports[present[0]] if present else None
    if first:
        names = [e["exit"] for e in first["costs"]["exits"]]
        ax.plot(range(len(names)), [100 * first["baseline_accuracy"][n] for n in names], marker="o",
                color=colours["unpruned"], label="unpruned")
        for a in [*present, *([CHANNEL] if reports.get(CHANNEL) else [])]:
            ax.plot(range(len(names)), [100 * reports[a]["accuracy"][n] for n in names], marker="o",
                    color=colours[a], label=a)
        ax.set_xticks(range(len(names)), [str(i + 1) for i in range(len(names) - 1)] + ["final"])
    ax.set(xlabel="exit (every image leaves there)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(save(fig, prefix, "exits"))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for network in NETWORKS:
        pts = sorted(curve(network, reports, sweeps), key=lambda p: p["cost"])
        if not pts:
            continue
        label = {"unpruned": network, CHANNEL: f"{network} (a smaller dense network)"}.get(
            network, f"{network} (effective cost)")
        ax.plot([p["cost"] for p in pts], [100 * p["accuracy"] for p in pts], marker=".", color=colours[network],
                label=label)
    ax.set(xlabel="cost (fraction of the unpruned network's MACs)", ylabel="test accuracy (%)", xlim=(0, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(save(fig, prefix, "cost"))
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--checkpoint", default="demo")
    p.add_argument("--head-epochs", type=int, default=1, help="epochs of SDN head training (backbone frozen)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--amount", type=float, default=0.1)
    p.add_argument("--finetune-samples", type=int, default=3000, help="fine-tuning after each round (the thesis: "
                                                                       "10 epochs)")
    p.add_argument("--channel-rounds", type=int, default=4, help="channel-pruning rounds (the same fine-tuning "
                                                                   "samples in all as the unstructured runs)")
    p.add_argument("--channel-amount", type=float, default=0.2929, help="fraction of the remaining MACs each "
                                                                         "channel-pruning round removes (4 x 0.2929: "
                                                                         "25%% of the MACs left)")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds of each speed measurement")
    p.add_argument("--eval-size", type=int, default=2000, help="test images for the per-round per-exit accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per step")
    p.add_argument("--figures", type=Path, default=Path("docs/weight-pruning"), help="figure prefix")
    p.add_argument("--page", type=Path, default=None, help="the results page (default docs/results/weight-pruning.md)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    make_data(a.out / "data.safetensors", a.data, a.eval_size, a.seed)
    ok = run_steps(plan(a.out, a), a.jobs)
    reports = {x: load_yaml(a.out / f"{x}.yaml") for x in PRUNED}
    sweeps = {x: load_yaml(a.out / f"sweep-{x}.yaml") for x in NETWORKS}
    speeds = {x: load_yaml(a.out / f"speed-{x}.json") for x in PRUNED}  # JSON is YAML
    if any(reports.values()):
        table = tabulate(reports, sweeps, speeds)
        (a.out / "table.md").write_text(table + "\n")
        print(table)
        plot(reports, sweeps, a.figures)
        print(f"wrote {write_page('weight-pruning', page_parts(reports, sweeps, speeds), a.page)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
