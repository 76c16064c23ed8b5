"""Accuracy against cost plots (matplotlib, the optional ``plot`` extra)."""

from __future__ import annotations

import io
from typing import Any

from eetool.artifacts import atomic_write
from eetool.errors import UsageError


def accuracy_cost_png(path: str, points: list[dict[str, Any]], title: str) -> None:
    """Operating points joined in cost order, the plain model marked; written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib", "pip install 'eetool[plot]'") from None
    plain = [p for p in points if p["name"] == "plain"]
    early = sorted((p for p in points if p["name"] != "plain"), key=lambda p: p["cost"])
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=150)
    if early:
        ax.plot([p["cost"] for p in early], [p["accuracy"] for p in early], "o-", label="early exits")
    for p in plain:
        ax.plot([p["cost"]], [p["accuracy"]], "k*", markersize=12, label="plain model")
    ax.set_xlabel("cost (normalised to the plain model)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
