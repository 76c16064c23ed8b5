"""Tabulate the fixed-training-budget comparison (make fixed-budget) as Markdown and a plot.

    python reproduce/fixed_budget_table.py results/fixed-budget
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

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


def main(folder: Path) -> None:
    lines = ["| method | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |",
             "|---|" + "---|" * len(BUDGETS)]
    curves = {}
    for label, name in ROWS:
        path = folder / f"{name}-evaluation.yaml"
        if not path.is_file():
            continue
        points = [p for p in yaml.safe_load(path.read_text())["points"] if p["name"] != "plain"]
        cells = [f"{100 * p['accuracy']:.2f}% ({p['cost']:.3f})" for p in points]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        curves[label] = [(p["cost"], p["accuracy"]) for p in points]
    table = "\n".join(lines)
    (folder / "table.md").write_text(table + "\n")
    print(table)
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
    fig.savefig(folder / "fixed-budget.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
