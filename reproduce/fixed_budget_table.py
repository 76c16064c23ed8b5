"""Tabulate the fixed-training-budget comparison (make fixed-budget) as Markdown and a plot, and write its results
page (docs/results/fixed-budget.md, from reproduce/pages/fixed-budget.md) with the figure (docs/fixed-budget.png).

    python reproduce/fixed_budget_table.py results/fixed-budget
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import yaml
from pages import write_page  # reproduce/pages.py, beside this script

BUDGETS = (0.15, 0.2, 0.25, 0.3)
ROWS = [
    ("E²CM (no training)", "e2cm"),
    ("SDN, 1 epoch", "sdn-1"),
    ("E²CM+SDN (and), 1 epoch", "e2cm-sdn-and-1"),
    ("E²CM+SDN (or), 1 epoch", "e2cm-sdn-or-1"),
    ("SDN, 6 epochs", "sdn-6"),
    ("E²CM+SDN (and), 6 epochs", "e2cm-sdn-and-6"),
    ("E²CM+SDN (or), 6 epochs", "e2cm-sdn-or-6"),
]


def tabulate(evaluations: dict[str, Any]) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """The Markdown table (test accuracy and cost at each budget, one row per method that was evaluated) and each
    method's (cost, accuracy) points; ``evaluations`` maps a row's name to its ``evaluate`` YAML."""
    lines = ["| method | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |",
             "|---|" + "---|" * len(BUDGETS)]
    curves = {}
    for label, name in ROWS:
        if not evaluations.get(name):
            continue
        points = [p for p in evaluations[name]["points"] if p["name"] != "plain"]
        cells = [f"{100 * p['accuracy']:.2f}% ({p['cost']:.3f})" for p in points]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        curves[label] = [(p["cost"], p["accuracy"]) for p in points]
    return "\n".join(lines), curves


def plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=150)
    for label, pts in curves.items():
        ax.plot([c for c, _ in pts], [a for _, a in pts], "o-", label=label)
    ax.set_xlabel("cost on the test set (normalised to the plain model)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Fashion-MNIST, ResNet-20: fixed training budget", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--figure", type=Path, default=Path("docs/fixed-budget.png"), help="the page's figure")
    p.add_argument("--page", type=Path, default=None, help="the results page (default docs/results/fixed-budget.md)")
    a = p.parse_args()
    evaluations = {}
    for _, name in ROWS:
        path = a.folder / f"{name}-evaluation.yaml"
        evaluations[name] = yaml.safe_load(path.read_text()) if path.is_file() else None
    table, curves = tabulate(evaluations)
    (a.folder / "table.md").write_text(table + "\n")
    print(table)
    plot(curves, a.folder / "fixed-budget.png")
    shutil.copyfile(a.folder / "fixed-budget.png", a.figure)
    print(f"wrote {write_page('fixed-budget', {'table': table}, a.page)}")


if __name__ == "__main__":
    main()
