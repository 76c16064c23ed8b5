"""Dataset pruning on Fashion-MNIST (thesis chapter 4, scaled to 2 CPU cores): `make dataset-pruning`.

Every step is an `eetool` command line, as a Makefile user would write it; a step whose output
exists is skipped, so an interrupted reproduction continues where it stopped. Steps run two at a
time (one thread each). Then the results are tabulated (Markdown) and plotted.

    python reproduce/dataset_pruning.py results/dataset-pruning --train-size 20000 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from pages import write_page  # reproduce/pages.py, beside this script
from steps import Step, run_steps  # reproduce/steps.py, beside this script

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
TABLE_IX_RATIO = 0.5
SEED_RATIO = 0.3  # where a second retraining seed runs
BALANCED_RATIO = 0.6
METHODS = ("eeprune", "eeprune-loss", "eeprune-soft", "random", "el2n", "forgetting", "svp")
ABLATION = ("before", "after")


def pct(r: float) -> str:
    return f"{round(100 * r)}"


def plan(out: Path, a: argparse.Namespace) -> list[Step]:
    eetool = [sys.executable, "-m", "eetool"]
    common = ["--threads", "1", "--no-progress", "--seed", str(a.seed)]
    data = ["--data", a.data]
    steps: list[Step] = []

    def add(name: str, argv: list[str], output: Path, needs: list[str] | None = None, json_out: bool = True) -> None:
        if any(s.name == name for s in steps):  # e.g. Table IX's ratio is also one of the compared ratios
            return
        steps.append(Step(name, [*eetool, *argv, *common, *(["--format", "json"] if json_out else [])], output,
                          needs or [], out / f"{name}.json" if json_out else None))

    arch = ["--arch", a.arch, "--arch-args", a.arch_args]
    # The architecture checkpoint prune-dataset builds its networks from (freshly initialised).
    add("arch", ["train", *data, "--indices", str(out / "subset.txt"), *arch, "--epochs", "1",
                 "-o", str(out / "arch.safetensors"), "--force"], out / "arch.safetensors")
    training = ["--epochs", str(a.epochs), "--eval-split", "test"]
    add("train-none", ["train", *data, "--indices", str(out / "subset.txt"), *arch, *training,
                       "-o", str(out / "train-none.safetensors"), "--force"], out / "train-none.safetensors")

    def prune(name: str, method: str, ratio: float, extra: list[str], needs: list[str]) -> None:
        add(name, ["prune-dataset", "-c", str(out / "arch.safetensors"), *data, "--indices", str(out / "subset.txt"),
                   "--method", method, "--ratio", str(ratio), "-o", str(out / f"{name}.safetensors"), "--force",
                   *extra], out / f"{name}.safetensors", ["arch", *needs])

    phase_epochs = {"eeprune": a.eeprune_epochs, "el2n": a.el2n_epochs, "forgetting": a.epochs,
                    "svp": a.svp_epochs}
    first = pct(RATIOS[0])
    for location in ("mid", *ABLATION):
        tag = "eeprune" if location == "mid" else f"eeprune-{location}"
        prune(f"{tag}-{first}", "eeprune", RATIOS[0],
              ["--exit", location, "--epochs", str(a.eeprune_epochs),
               "--pruned-output", str(out / f"{tag}-{first}-pruned.safetensors")], [])
        for r in (*RATIOS[1:], TABLE_IX_RATIO):
            prune(f"{tag}-{pct(r)}", "eeprune", r,
                  ["--from-scores", str(out / f"{tag}-{first}.safetensors"),
                   "--pruned-output", str(out / f"{tag}-{pct(r)}-pruned.safetensors")], [f"{tag}-{first}"])
    for method in ("eeprune-loss", "eeprune-soft"):
        for r in RATIOS:
            prune(f"{method}-{pct(r)}", method, r, ["--from-scores", str(out / f"eeprune-{first}.safetensors")],
                  [f"eeprune-{first}"])
    for r in RATIOS:
        prune(f"random-{pct(r)}", "random", r, [], [])
    for method in ("el2n", "forgetting", "svp"):
        extra = {"el2n": ["--models", str(a.el2n_models)], "svp": ["--proxy-arch", a.proxy_arch,
                                                                  "--proxy-arch-args", a.proxy_arch_args]}
        prune(f"{method}-{first}", method, RATIOS[0], ["--epochs", str(phase_epochs[method]),
                                                       *extra.get(method, [])], [])
        for r in RATIOS[1:]:
            prune(f"{method}-{pct(r)}", method, r, ["--from-scores", str(out / f"{method}-{first}.safetensors")],
                  [f"{method}-{first}"])

    def retrain(name: str, indices: str, needs: str) -> None:
        add(f"train-{name}", ["train", *data, "--indices", str(out / indices), *arch, *training,
                              "-o", str(out / f"train-{name}.safetensors"), "--force"],
            out / f"train-{name}.safetensors", [needs])

    for method in METHODS:
        for r in RATIOS:
            retrain(f"{method}-{pct(r)}", f"{method}-{pct(r)}.safetensors", f"{method}-{pct(r)}")
    for location in ABLATION:
        for r in RATIOS:
            retrain(f"eeprune-{location}-{pct(r)}", f"eeprune-{location}-{pct(r)}.safetensors",
                    f"eeprune-{location}-{pct(r)}")
    # --balanced at the highest ratio (EEPrune itself refuses when a class has too few qualified samples).
    top = pct(BALANCED_RATIO)
    for method, extra in (("eeprune-soft", ["--from-scores", str(out / f"eeprune-{first}.safetensors")]),
                          ("random", [])):
        prune(f"{method}-balanced-{top}", method, BALANCED_RATIO, ["--balanced", *extra],
              [f"eeprune-{first}"] if extra else [])
        retrain(f"{method}-balanced-{top}", f"{method}-balanced-{top}.safetensors", f"{method}-balanced-{top}")
    # A second retraining seed for no pruning and every method at 30%: how much one seed says.
    second = pct(SEED_RATIO)
    for name, indices in (("none", "subset.txt"), *((f"{m}-{second}", f"{m}-{second}.safetensors")
                                                    for m in ("eeprune", "eeprune-soft", "random", "forgetting",
                                                              "el2n"))):
        add(f"seed1-train-{name}", ["train", *data, "--indices", str(out / indices), *arch, *training,
                                    "-o", str(out / f"seed1-train-{name}.safetensors"), "--force", "--seed", "1"],
            out / f"seed1-train-{name}.safetensors", ["arch" if name == "none" else name])
    half = pct(TABLE_IX_RATIO)
    retrain(f"eeprune-{half}", f"eeprune-{half}.safetensors", f"eeprune-{half}")
    retrain(f"eeprune-{half}-pruned", f"eeprune-{half}-pruned.safetensors", f"eeprune-{half}")
    # Table X: the model trained on what EEPrune kept, evaluated on what it pruned.
    add(f"on-pruned-{half}", ["evaluate", "-c", str(out / f"train-eeprune-{half}.safetensors"), *data,
                              "--split", "train", "--indices", str(out / f"eeprune-{half}-pruned.safetensors")],
        out / f"on-pruned-{half}.json", [f"train-eeprune-{half}"])
    return steps


def make_subset(path: Path, data: str, size: int, seed: int) -> None:
    """A class-balanced random subset of the training split, as an --indices text file."""
    if path.exists():
        return
    from eetool.core.datasets import load_dataset

    ds = load_dataset(data, "train")
    gen = torch.Generator().manual_seed(seed)
    per_class = size // ds.num_classes
    chosen = []
    for c in range(ds.num_classes):
        members = torch.nonzero(ds.labels == c).squeeze(1)
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    idx = torch.sort(torch.cat(chosen)).values
    path.write_text("\n".join(str(int(i)) for i in idx) + "\n")


def load(out: Path, name: str) -> dict | None:
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def samples_to_reach(history: list[dict], target: float) -> int | None:
    for h in history:
        if h["eval_accuracy"] is not None and h["eval_accuracy"] >= target:
            return int(h["samples_seen"])
    return None


def tabulate(out: Path, a: argparse.Namespace) -> str:
    base = load(out, "train-none")
    lines: list[str] = []
    if base is None:
        return "no results"
    base_acc = base["eval_accuracy"]
    lines += [f"No pruning: {100 * base_acc:.2f}% test accuracy after {base['samples_seen']:,} samples "
              f"({a.epochs} epochs on {a.train_size:,} images).", "",
              "Test accuracy (samples seen in retraining; samples seen until the test accuracy first came within "
              "0.5 points of no pruning's final accuracy, – if never):", "", *accuracy_table(out, base_acc)]
    lines += ["", "Cost of each pruning phase (one phase serves every ratio):", "",
              "| method | runs × epochs | samples trained | samples scored | seconds | EEPrune threshold t at "
              + ", ".join(f"{pct(r)}%" for r in RATIOS) + " |", "|---|---|---|---|---|---|"]
    for method in ("eeprune", "eeprune-before", "eeprune-after", "el2n", "forgetting", "svp", "random"):
        p = load(out, f"{method}-{pct(RATIOS[0])}")
        if p is None:
            continue
        ph = p["pruning_phase"]
        ts = ""
        if method.startswith("eeprune"):
            vals = [load(out, f"{method}-{pct(r)}") for r in RATIOS]
            ts = ", ".join("–" if v is None or v["threshold"] is None else f"{v['threshold']:.4f}" for v in vals)
        lines.append(f"| {method} (exit after {p['exit']}) |" if p["exit"] else f"| {method} |")
        lines[-1] += (f" {ph['runs']} × {ph['epochs']} | {ph['samples_seen']:,} | {ph['samples_scored']:,} | "
                      f"{ph['seconds']:.0f} | {ts} |")
    top, second = pct(BALANCED_RATIO), pct(SEED_RATIO)
    balanced = [(m, load(out, f"train-{m}-balanced-{top}"), load(out, f"train-{m}-{top}"))
                for m in ("eeprune-soft", "random")]
    lines += ["", f"--balanced at {top}%: " + "; ".join(
        f"{m} {100 * b['eval_accuracy']:.2f}% (without: {100 * u['eval_accuracy']:.2f}%)"
        for m, b, u in balanced if b and u) + "."]
    seeds = [(name, load(out, f"train-{name}"), load(out, f"seed1-train-{name}"))
             for name in ("none", *(f"{m}-{second}" for m in ("eeprune", "eeprune-soft", "random", "forgetting",
                                                              "el2n")))]
    lines += ["", "Retraining seeds 0 and 1 (same pruned sets): " + "; ".join(
        f"{name} {100 * a['eval_accuracy']:.2f}% / {100 * b['eval_accuracy']:.2f}% "
        f"(mean {50 * (a['eval_accuracy'] + b['eval_accuracy']):.2f}%)" for name, a, b in seeds if a and b) + "."]
    half = pct(TABLE_IX_RATIO)
    kept, pruned, on_pruned = (load(out, f"train-eeprune-{half}"), load(out, f"train-eeprune-{half}-pruned"),
                               load(out, f"on-pruned-{half}"))
    if kept and pruned:
        lines += ["", f"Table IX check ({half}% pruned by EEPrune): trained on the kept half "
                      f"{100 * kept['eval_accuracy']:.2f}%, on the pruned half {100 * pruned['eval_accuracy']:.2f}% "
                      "test accuracy."]
        if on_pruned:
            acc = next(p["accuracy"] for p in on_pruned["points"] if p["name"] == "plain")
            lines[-1] += f" The model trained on the kept half scores {100 * acc:.2f}% on the pruned half (Table X)."
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def accuracy_table(out: Path, base_acc: float) -> list[str]:
    """Test accuracy after retraining on what each method keeps at each ratio (bold: at or above no pruning), with
    the samples trained on and the samples until it first came within 0.5 points of no pruning's accuracy."""
    lines = ["| method | " + " | ".join(f"{pct(r)}% pruned" for r in RATIOS) + " |", "|---|" + "---|" * len(RATIOS)]
    for method in [*METHODS, *(f"eeprune-{loc}" for loc in ABLATION)]:
        cells = []
        for r in RATIOS:
            t = load(out, f"train-{method}-{pct(r)}")
            if t is None:
                cells.append("failed")
                continue
            reach = samples_to_reach(t["history"], base_acc - 0.005)
            cells.append(f"**{100 * t['eval_accuracy']:.2f}%**" if t["eval_accuracy"] >= base_acc else
                         f"{100 * t['eval_accuracy']:.2f}%")
            cells[-1] += f" ({t['samples_seen']:,}; {'–' if reach is None else f'{reach:,}'})"
        label = {"eeprune-before": "EEPrune, exit before (ablation)",
                 "eeprune-after": "EEPrune, exit after (ablation)"}.get(method, method)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def phase_table(out: Path) -> list[str]:
    """The results page's table of each pruning phase's cost, and EEPrune's threshold t at every ratio."""
    lines = [f"| method | runs × epochs | samples trained | samples scored | seconds | threshold t at "
             f"{pct(RATIOS[0])}% … {pct(RATIOS[-1])}% |", "|---|---|---|---|---|---|"]
    exits = {"eeprune": "mid", "eeprune-before": "before", "eeprune-after": "after"}
    for method in ("eeprune", "eeprune-before", "eeprune-after", "el2n", "forgetting", "svp", "random"):
        p = load(out, f"{method}-{pct(RATIOS[0])}")
        if p is None:
            continue
        ph = p["pruning_phase"]
        ts = ""
        if method in exits:
            vals = [load(out, f"{method}-{pct(r)}") for r in RATIOS]
            ts = ", ".join("–" if v is None or v["threshold"] is None else f"{v['threshold']:.4f}" for v in vals)
            label = (f"eeprune (exit after `{p['exit']}`, {exits[method]})" if method == "eeprune" else
                     f"eeprune, exit after `{p['exit']}` ({exits[method]})")
        elif method == "svp":
            proxy = re.sub(r"^resnet(\d+)$", r"ResNet-\1", str(ph.get("proxy_arch", "proxy")))
            label = f"svp ({proxy})"
        else:
            label = method
        runs = "–" if not ph["runs"] or not ph["epochs"] else f"{ph['runs']} × {ph['epochs']}"
        lines.append(f"| {label} | {runs} | {ph['samples_seen']:,} | {ph['samples_scored']:,} | {ph['seconds']:.0f} |"
                     + (f" {ts} |" if ts else " |"))
    return lines


def page_parts(out: Path) -> dict[str, str] | None:
    """The generated parts of docs/results/dataset-pruning.md (reproduce/pages/dataset-pruning.md holds the rest),
    or None before no pruning's run has finished."""
    base = load(out, "train-none")
    if base is None:
        return None
    return {"baseline": f"{100 * base['eval_accuracy']:.2f}% after {base['samples_seen']:,} samples",
            "accuracy_table": "\n".join(accuracy_table(out, base["eval_accuracy"])),
            "phase_table": "\n".join(phase_table(out))}


def plot(out: Path, a: argparse.Namespace, figure: Path) -> None:
    """Test accuracy against samples trained on (thesis Figure 15), and samples pruned per class (Figure 19)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = load(out, "train-none")
    columns = 3
    fig, grid_axes = plt.subplots(-(-len(RATIOS) // columns), columns, figsize=(16.5, 4.2 * -(-len(RATIOS) // columns)),
                                  squeeze=False)
    axes = grid_axes.flatten()
    for ax, r in zip(axes, RATIOS, strict=False):
        for method in ("none", *METHODS):
            t = base if method == "none" else load(out, f"train-{method}-{pct(r)}")
            if t is None:
                continue
            xs = [h["samples_seen"] for h in t["history"]]
            ys = [100 * h["eval_accuracy"] for h in t["history"]]
            ax.plot(xs, ys, marker=".", label="no pruning" if method == "none" else method,
                    color="black" if method == "none" else None, linewidth=2.2 if method == "eeprune" else 1)
        ax.set(title=f"{pct(r)}% pruned", xlabel="samples trained on in total", ylabel="test accuracy (%)")
        ax.set_ylim(max(70, ax.get_ylim()[0]), None)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=100)

    names = [*METHODS, "eeprune-before", "eeprune-after"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, r in zip(axes, (RATIOS[0], RATIOS[-1]), strict=True):
        runs = [load(out, f"{m}-{pct(r)}") for m in names]
        classes = [c["class"] for c in next(f for f in runs if f)["per_class"]]
        grid = torch.tensor([[c["pruned"] for c in f["per_class"]] if f else [0] * len(classes) for f in runs])
        im = ax.imshow(grid.T.numpy(), cmap="viridis", aspect="auto")
        for (j, k), v in zip(((j, k) for j in range(len(names)) for k in range(len(classes))),
                             grid.flatten().tolist(), strict=True):
            ax.text(j, k, str(v), ha="center", va="center", fontsize=6,
                    color="white" if v < grid.max() / 2 else "black")
        ax.set_xticks(range(len(names)), names, rotation=50, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_title(f"samples pruned per class, {pct(r)}% pruned")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(figure.with_name(figure.stem + "-classes.png"), dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--arch-args", default="{width: 8}")
    p.add_argument("--proxy-arch", default="resnet8")
    p.add_argument("--proxy-arch-args", default="{width: 8}")
    p.add_argument("--epochs", type=int, default=8, help="retraining epochs (and the forgetting run's)")
    p.add_argument("--eeprune-epochs", type=int, default=3)
    p.add_argument("--el2n-epochs", type=int, default=3)
    p.add_argument("--el2n-models", type=int, default=5)
    p.add_argument("--svp-epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--figure", type=Path, default=Path("docs/dataset-pruning.png"))
    p.add_argument("--page", type=Path, default=None, help="the results page (default docs/results/dataset-pruning.md)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    make_subset(a.out / "subset.txt", a.data, a.train_size, a.seed)
    run_steps(plan(a.out, a), a.jobs)
    print(tabulate(a.out, a))
    plot(a.out, a, a.figure)
    parts = page_parts(a.out)
    if parts is not None:
        print(f"wrote {write_page('dataset-pruning', parts, a.page)}")


if __name__ == "__main__":
    main()
