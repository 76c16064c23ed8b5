"""Accuracy against cost plots (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

import io
from types import ModuleType
from typing import TYPE_CHECKING, Any

from eetool.core.artifacts import atomic_write
from eetool.core.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot() -> ModuleType:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib", "pip install 'eetool[plot]'") from None
    return plt


def _save(plt: ModuleType, fig: Figure, path: str) -> None:
    """Lay the figure out, write it as PNG atomically, and free it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def require_matplotlib() -> None:
    """Refuse --plot before any work when the plot extra is missing."""
    _pyplot()


def pruning_png(path: str, layers: list[dict[str, Any]], accuracy: dict[str, float] | None,
                baseline: dict[str, float] | None, title: str) -> None:
    """Thesis Fig. 5a/6a and 5b: each layer's sparsity (backbone, then heads), and each exit's accuracy when every
    sample leaves there, after pruning and before it; written atomically."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=150)
    colours = ["tab:blue" if r["part"] == "backbone" else "tab:orange" for r in layers]
    left.bar(range(len(layers)), [r["sparsity"] for r in layers], color=colours)
    left.set_xlabel("layer (backbone blue, heads orange)")
    left.set_ylabel("sparsity of the weights")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3, axis="y")
    for values, style, label in ((baseline, "k.-", "before pruning"), (accuracy, "o-", "after pruning")):
        if values:
            right.plot(list(values), list(values.values()), style, label=label)
    right.set_xlabel("exit (every sample leaves there)")
    right.set_ylabel("accuracy")
    right.tick_params(axis="x", labelrotation=60, labelsize=7)
    right.grid(alpha=0.3)
    right.legend(loc="lower right")
    fig.suptitle(title, fontsize=9)
    _save(plt, fig, path)


def accuracy_cost_png(path: str, points: list[dict[str, Any]], title: str,
                      compared: list[dict[str, Any]] | None = None) -> None:
    """Operating points joined in cost order, the plain model marked, and other plain networks (``compared``: each
    with its name) as squares; written atomically."""
    plt = _pyplot()
    plain = [p for p in points if p["name"] == "plain"]
    early = sorted((p for p in points if p["name"] != "plain"), key=lambda p: p["cost"])
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=150)
    if early:
        ax.plot([p["cost"] for p in early], [p["accuracy"] for p in early], "o-", label="early exits")
    for p in plain:
        ax.plot([p["cost"]], [p["accuracy"]], "k*", markersize=12, label="plain model")
    if compared:
        ax.plot([c["cost"] for c in compared], [c["accuracy"] for c in compared], "s", color="tab:gray",
                label="compared networks")
        for c in compared:
            ax.annotate(c["name"].removesuffix(".safetensors"), (c["cost"], c["accuracy"]),
                        textcoords="offset points", xytext=(4, -8), fontsize=6, color="tab:gray")
    ax.set_xlabel("cost (normalised to the plain model)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save(plt, fig, path)


def lm_curves_png(path: str, curves: dict[str, list[dict[str, Any]]], final_accuracy: float, title: str) -> None:
    """Each exit head's operating points (cost, accuracy) joined in cost order, the final head alone marked at
    cost 1; written atomically."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=150)
    for name, points in curves.items():
        ordered = sorted(points, key=lambda p: p["cost"])
        ax.plot([p["cost"] for p in ordered], [p["accuracy"] for p in ordered], "o-", markersize=3, label=name)
    ax.plot([1.0], [final_accuracy], "k*", markersize=12, label="final head only")
    ax.set_xlabel("cost per token (MACs, normalised to the whole model)")
    ax.set_ylabel("next-token accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    _save(plt, fig, path)


def lm_training_png(path: str, curve: list[dict[str, Any]], title: str) -> None:
    """Next-token accuracy of the exit head and of the final head against training steps; written atomically."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=150)
    steps = [p["step"] for p in curve]
    ax.plot(steps, [p["exit_accuracy"] for p in curve], "o-", label="exit head")
    ax.plot(steps, [p["final_accuracy"] for p in curve], "k.--", label="final head")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token accuracy (held out)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save(plt, fig, path)
