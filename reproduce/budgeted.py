"""Budgeted classification against a family of plain networks on Fashion-MNIST: the results page of `make budgeted`.

The Makefile's steps train the plain family with the shipped recipe (ResNet-20 at widths 4, 6, 8, 12 and 16,
ResNet-8 and ResNet-32 at width 16: ``plain-resnet20-w4.safetensors`` ...), make every eetool method that makes a
network cheaper, and evaluate each on the test split with ``evaluate --compare`` on the plain family, so that every
operating point and every plain network is timed in the same interleaved rounds (``eval-<method>.yaml``). This
script reads those evaluations and writes the results page: each point's accuracy, MACs and measured speed-up
against the width-16 ResNet-20 of the same run; the plain family's accuracy-wall-time curve; for each method and
budget the best accuracy within that wall time against the curve's, and a sentence per method.

    python reproduce/budgeted.py results/budgeted --epochs 12 --page docs/results/budgeted.md \\
        --figure docs/budgeted.png

Definitions (the page says them too). A point's speed-up is the median over the run's rounds of the reference's
seconds over its seconds, and its wall cost 1 / speed-up. The plain curve is the upper concave envelope of the
family's (wall cost, accuracy) in the same run: between two members it is what running each on its share of the
inputs reaches, so it is a curve a user can have. An early-exit method's accuracy at a budget is that of its best
single operating point whose wall cost is within the budget (no interpolation on that side).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REFERENCE = "plain-resnet20-w16.safetensors"
FAMILY_GLOB = "plain-*.safetensors"
GAP_BUDGETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
LEVEL = 0.5  # points: within this of the plain curve counts as on it (the goal)
# the plain family the Makefile trains (plain-<name>.safetensors), in the page's words
FAMILY = {"resnet20-w4": "ResNet-20 width 4", "resnet20-w6": "ResNet-20 width 6", "resnet20-w8": "ResNet-20 width 8",
          "resnet20-w12": "ResNet-20 width 12", "resnet20-w16": "ResNet-20 width 16",
          "resnet8-w16": "ResNet-8 width 16", "resnet32-w16": "ResNet-32 width 16"}
FAMILY_RUN = "family"  # eval-family.yaml: the reference network with the rest of the family compared
# The evaluations the Makefile writes (eval-<stem>.yaml), in the page's order; others found are added by stem.
METHODS = {
    "e2cm-softmax": "E²CM, softmax rule",
    "e2cm-nearest": "E²CM, nearest-mean rule",
    "sdn": "SDN heads",
    "entropy": "entropy (SDN heads)",
    "e2cm-sdn-and": "E²CM+SDN (and)",
    "e2cm-sdn-or": "E²CM+SDN (or)",
    "channel-50": "channel pruning to 50% of the MACs",
    "channel-25": "channel pruning to 25% of the MACs",
    "w8-e2cm": "E²CM on the width-8 ResNet-20",
    "w8-sdn": "SDN heads on the width-8 ResNet-20",
    "joint-resnet20-w16": "joint training from scratch, ResNet-20 width 16",
    "distill-resnet20-w16": "joint training + self-distillation, ResNet-20 width 16",
    "joint-resnet20-w8": "joint training from scratch, ResNet-20 width 8",
    "distill-resnet20-w8": "joint training + self-distillation, ResNet-20 width 8",
    "msdnet": "MSDNet-style network, joint training",
}


@dataclass(frozen=True)
class Point:
    """One network or operating point of one evaluation run, against the run's reference network."""

    method: str
    name: str
    accuracy: float
    macs_cost: float  # its MACs over the reference's
    speedup: float  # median over the run's rounds of the reference's seconds over its seconds
    speedup_min: float
    speedup_max: float

    @property
    def wall_cost(self) -> float:
        return 1.0 / self.speedup


@dataclass(frozen=True)
class Gap:
    """A method at one budget: its best accuracy within that wall cost (and the point), the plain curve's there."""

    budget: float
    accuracy: float | None
    point: str | None
    plain: float | None

    @property
    def points(self) -> float | None:
        """Ahead (+) or behind (-) the plain curve, in percentage points."""
        if self.accuracy is None or self.plain is None:
            return None
        return 100 * (self.accuracy - self.plain)


def runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every timed run of an evaluation: the plain model, its operating points and the compared networks, each
    with its kind, the checkpoint it ran (sha256), accuracy, MACs and per-round seconds."""
    if doc.get("unit", "macs") != "macs":
        raise ValueError(f"the evaluation counts {doc['unit']}, not macs (evaluate --count macs)")
    out = []
    for p in doc["points"]:
        out.append({"kind": "plain" if p["name"] == "plain" else "point", "name": p["name"],
                    "sha256": doc["checkpoint_sha256"], "accuracy": p["accuracy"], "macs": p["macs"],
                    "seconds": p["seconds"]})
    for c in doc.get("compared", []):
        out.append({"kind": "compared", "name": c["name"], "sha256": c["checkpoint_sha256"],
                    "accuracy": c["accuracy"], "macs": c["macs"], "seconds": c["seconds"]})
    return out


def speedups(reference: Sequence[float], seconds: Sequence[float]) -> tuple[float, float, float]:
    """Median, least and greatest over the rounds of the reference's seconds over these (round by round)."""
    ratios = [r / s for r, s in zip(reference, seconds, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def collect(method: str, doc: dict[str, Any], reference_sha: str,
            family: dict[str, str]) -> tuple[list[Point], list[Point]]:
    """An evaluation's points against its reference run (the network of ``reference_sha``, plain or compared):
    the method's (operating points, and the plain model where it is no member of the family: a pruned or a
    jointly trained network is itself a point of its method) and the family's (``family``: sha256 to name)."""
    timed = runs(doc)
    reference = next((r for r in timed if r["sha256"] == reference_sha and r["kind"] != "point"), None)
    if reference is None:
        raise ValueError(f"{method}: the reference network ({REFERENCE}) is not in the run; evaluate it or "
                         "--compare it")
    method_points, family_points = [], []
    for r in timed:
        up, low, high = speedups(reference["seconds"], r["seconds"])
        in_family = r["kind"] != "point" and r["sha256"] in family
        point = Point(FAMILY_RUN if in_family else method, family.get(r["sha256"], r["name"]) if in_family
                      else r["name"], r["accuracy"], r["macs"] / reference["macs"], up, low, high)
        if in_family:
            family_points.append(point)
        elif r["kind"] != "compared":
            method_points.append(point)
    return method_points, family_points


def bundle_points(doc: dict[str, Any]) -> tuple[list[Point], dict[str, list[Point]]]:
    """``bundles.yaml`` (reproduce/budgeted_bundles.py) as the plain family's points and each bundled method's,
    every run against the reference's plain bundle round by round (all timed in the same rounds)."""
    runs = doc["runs"]
    reference = next((r for r in runs if r["bundle"] == doc["reference"]), None)
    if reference is None:
        raise ValueError(f"bundles.yaml: the reference bundle {doc['reference']} is not in the run")
    family, methods = [], {}
    for r in runs:
        up, low, high = speedups(reference["seconds"], r["seconds"])
        if r["kind"] == "family":
            family.append(Point(FAMILY_RUN, r["bundle"].removeprefix("bundle-") + ".safetensors", r["accuracy"],
                                r["macs"] / reference["macs"], up, low, high))
        else:
            stem, _, precision = r["method"].partition(" (")  # "sdn (int8)": make budgeted's stem, the bundle's
            label = f"{METHODS.get(stem, stem)}, {precision.rstrip(')')} bundle"
            methods.setdefault(label, []).append(Point(label, r["name"], r["accuracy"], r["macs"] / reference["macs"],
                                                       up, low, high))
    return family, methods


def bundles_section(doc: dict[str, Any] | None) -> str:
    """The page's section on the exported bundles (empty without ``bundles.yaml``)."""
    if doc is None:
        return ""
    family, methods = bundle_points(doc)
    hull = envelope(family)
    by_method = {m: gaps(pts, hull) for m, pts in methods.items()}
    sentences = "\n".join(f"- {verdict(m, g)}" for m, g in by_method.items())
    points = [p for pts in methods.values() for p in pts]
    return f"""## In onnxruntime: exported bundles, float and int8

An edge box runs the exported bundle (`eetool export`, run by `eetool-runtime`), and onnxruntime speeds up the plain
networks too, so here every network is a bundle: the plain family exported plain, and the early-exit configurations
exported float and int8 (`--quantize int8`, calibrated on 512 training images, thresholds refitted on the int8
bundle's own confidences by `export`). All timed in the same {doc['rounds']} interleaved rounds by
`reproduce/budgeted_bundles.py` ({doc['runtime']}, {doc['threads']} thread, batch {doc['batch']}, all
{doc['samples']:,} test images; 1-minute load average {doc['load'][0]:.2f} before, {doc['load'][1]:.2f} after),
against the width-16 ResNet-20's plain bundle.

{points_table(family)}

{points_table(points)}

{gaps_table(by_method)}
{plain_row(gaps([], hull))}

{sentences}

"""


def envelope(points: Sequence[Point]) -> list[tuple[float, float]]:
    """The upper concave envelope of (wall cost, accuracy), by cost: the members on it, joined by straight lines
    (running each of two neighbours on a share of the inputs), from the cheapest member to the most accurate."""
    pts = sorted({(p.wall_cost, p.accuracy) for p in points}, key=lambda q: (q[0], -q[1]))
    hull: list[tuple[float, float]] = []
    for c, a in pts:
        if hull and a <= hull[-1][1]:
            continue  # dearer and no more accurate: never on the envelope
        while len(hull) >= 2:
            (c1, a1), (c2, a2) = hull[-2], hull[-1]
            if (a2 - a1) * (c - c1) <= (a - a1) * (c2 - c1):  # the middle one is on or below the chord
                hull.pop()
            else:
                break
        hull.append((c, a))
    return hull


def curve_accuracy(hull: Sequence[tuple[float, float]], cost: float) -> float | None:
    """The envelope's accuracy at ``cost``: None below its cheapest member, the best member's beyond the last."""
    if not hull or cost < hull[0][0]:
        return None
    for (c1, a1), (c2, a2) in zip(hull, hull[1:], strict=False):
        if c1 <= cost <= c2:
            return a1 + (a2 - a1) * (cost - c1) / (c2 - c1)
    return hull[-1][1]


def gaps(points: Sequence[Point], hull: Sequence[tuple[float, float]],
         budgets: Sequence[float] = GAP_BUDGETS) -> list[Gap]:
    """At each budget (a wall cost), the best of ``points`` within it against the plain envelope there."""
    out = []
    for b in budgets:
        within = [p for p in points if p.wall_cost <= b]
        best = max(within, key=lambda p: p.accuracy, default=None)
        out.append(Gap(b, best.accuracy if best else None, best.name if best else None, curve_accuracy(hull, b)))
    return out


def _spans(budgets: list[float]) -> str:
    """Budgets as runs of neighbours in GAP_BUDGETS: 0.1-0.2 and 0.4."""
    groups: list[list[float]] = []
    for b in budgets:
        if groups and GAP_BUDGETS.index(b) == GAP_BUDGETS.index(groups[-1][-1]) + 1:
            groups[-1].append(b)
        else:
            groups.append([b])
    parts = [f"{g[0]:g}" if len(g) == 1 else f"{g[0]:g}\u2013{g[-1]:g}" for g in groups]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def verdict(method: str, found: Sequence[Gap], level: float = LEVEL) -> str:
    """One sentence: at which budgets the method is ahead of the plain curve, level with it (within ``level``
    points) and behind it, with the largest gap of each; and where it has no point within the budget."""
    ahead = [g for g in found if g.points is not None and g.points > level]
    even = [g for g in found if g.points is not None and abs(g.points) <= level]
    behind = [g for g in found if g.points is not None and g.points < -level]
    none = [g.budget for g in found if g.accuracy is None]
    no_plain = [g.budget for g in found if g.accuracy is not None and g.plain is None]
    parts: list[str] = []

    def curve() -> str:  # the curve by name the first time, then "it"
        return "it" if parts else "the plain curve"

    if ahead:
        top = max(ahead, key=lambda g: g.points or 0.0)
        parts.append(f"ahead of {curve()} at {_spans([g.budget for g in ahead])} (by up to {top.points:.1f} "
                     f"points, at {top.budget:g})")
    if even:
        parts.append(f"level with {curve()} (within {level:g} points) at {_spans([g.budget for g in even])}")
    if behind:
        worst = min(behind, key=lambda g: g.points or 0.0)
        parts.append(f"behind {curve()} at {_spans([g.budget for g in behind])} (by up to "
                     f"{-(worst.points or 0.0):.1f} points, at {worst.budget:g})")
    if no_plain:
        parts.append(f"faster than every plain network at {_spans(no_plain)}")
    if none:
        parts.append(f"no point that fast at {_spans(none)}")
    if not parts:
        return f"{method}: no budget to compare at."
    return f"{method}: {'; '.join(parts)}."


def best_of_all(by_method: dict[str, list[Gap]]) -> list[Gap]:
    """Per budget, the method furthest ahead of (or least behind) its own run's plain curve."""
    out = []
    for k, b in enumerate(GAP_BUDGETS):
        candidates = [(m, g[k]) for m, g in by_method.items() if g[k].points is not None]
        if not candidates:
            out.append(Gap(b, None, None, None))
            continue
        m, g = max(candidates, key=lambda mg: mg[1].points or 0.0)
        out.append(Gap(b, g.accuracy, f"{m}: {g.point}", g.plain))
    return out


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def points_table(points: Sequence[Point]) -> str:
    rows = ["| method | point | test accuracy | MACs cost | measured speed-up (range) | wall cost |",
            "|---|---|---|---|---|---|"]
    for p in points:
        rows.append(f"| {p.method} | {p.name} | {_percent(p.accuracy)} | {p.macs_cost:.3f} | {p.speedup:.2f}x "
                    f"({p.speedup_min:.2f}\u2013{p.speedup_max:.2f}) | {p.wall_cost:.3f} |")
    return "\n".join(rows)


def gaps_table(by_method: dict[str, list[Gap]]) -> str:
    """Methods by budget: the best accuracy within the budget and, in brackets, points ahead (+) or behind."""
    rows = ["| method | " + " | ".join(f"{b:g}" for b in GAP_BUDGETS) + " |", "|---|" + "---|" * len(GAP_BUDGETS)]
    for method, found in by_method.items():
        cells = []
        for g in found:
            if g.accuracy is None:
                cells.append("\u2014")
            elif g.points is None:
                cells.append(f"{100 * g.accuracy:.1f} (no plain network)")
            else:
                cells.append(f"{100 * g.accuracy:.1f} ({g.points:+.1f})")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plain_row(found: Sequence[Gap]) -> str:
    """The plain curve's accuracy at each budget, as a row of the gaps table."""
    cells = ["\u2014" if g.plain is None else f"{100 * g.plain:.1f}" for g in found]
    return "| plain family (curve) | " + " | ".join(cells) + " |"


def partial_runs(family: Sequence[Point], by_method_family: dict[str, Sequence[Point]]) -> dict[str, list[str]]:
    """Methods whose run timed only part of the family (an evaluation made before the family grew; make budgeted
    redoes it, a page from a partial run may hold it), each with the members its run lacks, in the family's order.
    Their curve is that part's envelope, so it can lie under the whole family's at some budgets."""
    names = [p.name for p in family]
    out = {}
    for method, fam in by_method_family.items():
        missing = [n for n in names if n not in {p.name for p in fam}]
        if missing:
            out[method] = missing
    return out


def partial_text(partial: dict[str, list[str]]) -> str:
    """The page's sentence on ``partial_runs`` (empty when every method was timed beside the whole family)."""
    if not partial:
        return ""

    def member(name: str) -> str:
        stem = name.removeprefix("plain-").removesuffix(".safetensors")
        return FAMILY.get(stem, name)

    listed = "; ".join(f"{m} (without {', '.join(member(n) for n in missing)})" for m, missing in partial.items())
    return (f"Timed beside part of the plain family, their curve that part's envelope (it can lie under the whole "
            f"family's, so their gaps can look better than they are): {listed}.\n\n")


def load_range(text: str) -> tuple[float, float] | None:
    """The least and greatest 1-minute load average in ``uptime`` lines (None without any)."""
    loads = [float(m.group(1)) for m in re.finditer(r"load average:\s*([\d.]+)", text)]
    return (min(loads), max(loads)) if loads else None


# The SDN heads trained on the frozen plain networks (budgeted-methods, budgeted-small): their epochs are the run's,
# read from each file's recorded arguments, since BUDGETED_HEAD_EPOCHS may have been set otherwise.
FROZEN_HEADS = {"heads.safetensors": "width 16", "w8-heads.safetensors": "width 8"}


def recorded_epochs(path: Path) -> int | None:
    """The --epochs an eetool artifact was made with (its safetensors metadata ``eetool.args``), None if absent."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        args = json.loads((f.metadata() or {}).get("eetool.args", "{}"))
    epochs = args.get("epochs")
    return epochs if isinstance(epochs, int) else None


def head_epochs_text(head_epochs: dict[str, int]) -> str:
    """The frozen SDN heads' epochs as this run trained them, for the page ("" when none were found)."""
    if not head_epochs:
        return ""
    each = ", ".join(f"{net} {n} epoch{'' if n == 1 else 's'}" for net, n in head_epochs.items())
    return f"\nThis run's SDN heads on the frozen networks were trained for: {each}."


def left_out(recipe: dict[str, Any]) -> str:
    """What the Makefile makes that this run did not: a page from a partial run says so where it is read."""
    missing = [*recipe.get("missing_family", []), *recipe.get("missing_methods", [])]
    return f" This run left out: {'; '.join(missing)}." if missing else ""


def page(family: Sequence[Point], points: Sequence[Point], by_method: dict[str, list[Gap]],
         plain: Sequence[Gap], sentences: Sequence[str], recipe: dict[str, Any],
         partial: dict[str, list[str]] | None = None, bundles: dict[str, Any] | None = None) -> str:
    """The results page (Markdown); ``partial``: methods timed beside part of the family (``partial_runs``);
    ``bundles``: reproduce/budgeted_bundles.py's timings of the exported bundles, if it ran."""
    best = best_of_all(by_method)
    reached = [g.budget for g in best if g.points is not None and g.points >= -LEVEL]
    missed = [g for g in best if g.points is not None and g.points < -LEVEL]
    goal = (f"The best early-exit configuration is on or above the plain family's curve (within {LEVEL:g} points) "
            f"at {_spans(reached) if reached else 'no budget'}" +
            (f"; it falls short at {_spans([g.budget for g in missed])}, by up to "
             f"{max(-(g.points or 0.0) for g in missed):.1f} points." if missed else "."))
    load = recipe.get("load")
    load_text = (f"the 1-minute load average read before and after each evaluation was {load[0]:.2f} to "
                 f"{load[1]:.2f} on {recipe['cpus']} CPUs" if load else f"no load was recorded ({recipe['cpus']} "
                 "CPUs)")
    epochs = f"{recipe['epochs']} epoch{'' if recipe['epochs'] == 1 else 's'}"
    threads = f"{recipe['threads']} torch thread{'' if recipe['threads'] == 1 else 's'}"
    figure = f"![accuracy against wall time and MACs]({recipe['figure']})\n\n" if recipe.get("figure") else ""
    return f"""# Results: budgeted classification against a family of plain networks

Written by `make budgeted` (`reproduce/budgeted.py`) from its last run; do not edit by hand. The side by side
timing is [`evaluate --compare`](../e2cm.md#beside-the-network-you-would-pick-instead).

"Why not just train a smaller network?" On all of {recipe['data']} (test split, {recipe['samples']:,} images),
every eetool method that makes a network cheaper against plain ResNets trained with the same recipe
(`{recipe['config']}`, {epochs}): {', '.join(recipe['family'])}.{left_out(recipe)}
Each `evaluate` ran with `--compare` on the plain family, so every speed-up below is a ratio within one run
(interleaved rounds, `--repeats` {recipe['repeats']}), against the width-16 ResNet-20 of that run; the wall cost
is 1 / speed-up and the MACs cost is MACs over that network's.

## The plain family

{points_table(family)}

## Every method's points

{points_table(points)}

## Against the plain family's curve

The plain curve is the upper envelope of the family's (wall cost, accuracy) in the same run as the method,
straight between members (running two networks each on a share of the inputs reaches it). A method's accuracy
at a budget is that of its best single point within that wall cost; in brackets, points ahead (+) or behind
(−) the curve there. "—": no point of the method that fast.

{gaps_table(by_method)}
{plain_row(plain)}

{partial_text(partial or {})}{goal}

{chr(10).join(f"- {s}" for s in sentences)}

{figure}{bundles_section(bundles)}## Reproduce

`make budgeted EPOCHS={recipe['epochs']}` (results under `results/budgeted/`, then this page and its figure).
Its groups run on their own: `budgeted-family` (the seven plain networks, timed together), `budgeted-methods`
(E²CM with each prediction rule, SDN heads trained for `BUDGETED_HEAD_EPOCHS` epochs on the frozen network,
entropy, E²CM+SDN with `and` and `or`, channel pruning to 50% and 25% of the MACs), `budgeted-small` (E²CM and
SDN heads on the width-8 network), `budgeted-scratch` (`train-exits --joint --from-scratch` with SDN's exit
weights, and with `--distill 0.5`), `budgeted-msdnet`, `budgeted-bundles` (the exported bundles, float and int8,
timed beside the exported family), and `budgeted-page` (this page from what exists). Every
step is a file, so an interrupted run continues where it stopped.{head_epochs_text(recipe.get('head_epochs', {}))}

## Caveats

Wall time is this machine's: {load_text}; {threads}, batch 256.
Speed-ups are medians over the rounds with their range; a busy machine widens the range (and `evaluate` warns).
The plain curve is read from the run of each method, so a method is compared with the family under the same load.
MACs costs do not depend on the machine; at equal MACs, early exits pay for their decisions and for compaction
in wall time.
"""


def plot(path: Path, family: Sequence[Point], hull: Sequence[tuple[float, float]],
         by_method: dict[str, list[Point]], bundles: dict[str, Any] | None = None) -> None:
    """Accuracy against wall cost (left, with the plain envelope) and against MACs cost (middle); with
    ``bundles``, against wall cost in onnxruntime (right: the exported family and the bundles, float and int8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if bundles else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.6), dpi=150, sharey=True)
    wall, macs = axes[0], axes[1]
    colours = plt.get_cmap("tab20")
    for ax, cost in ((wall, "wall_cost"), (macs, "macs_cost")):
        ax.plot([getattr(p, cost) for p in family], [100 * p.accuracy for p in family], "ks", label="plain family")
        for p in family:
            ax.annotate(p.name.removeprefix("plain-").removesuffix(".safetensors"),
                        (getattr(p, cost), 100 * p.accuracy), textcoords="offset points", xytext=(3, -9),
                        fontsize=6)
        for k, (method, pts) in enumerate(by_method.items()):
            ordered = sorted(pts, key=lambda p: p.macs_cost)  # operating points in budget order on both panels
            ax.plot([getattr(p, cost) for p in ordered], [100 * p.accuracy for p in ordered], ".-", markersize=4,
                    color=colours(k % 20), label=method)
        ax.grid(alpha=0.3)
    wall.plot([c for c, _ in hull], [100 * a for _, a in hull], "k--", linewidth=1, label="plain envelope")
    wall.set(xlabel="wall time (fraction of the width-16 ResNet-20's, same run)", ylabel="test accuracy (%)")
    macs.set(xlabel="MACs (fraction of the width-16 ResNet-20's)")
    macs.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if bundles:
        onnx = axes[2]
        bundle_family, bundle_methods = bundle_points(bundles)
        onnx.plot([p.wall_cost for p in bundle_family], [100 * p.accuracy for p in bundle_family], "ks",
                  label="plain family, exported")
        bundle_hull = envelope(bundle_family)
        onnx.plot([c for c, _ in bundle_hull], [100 * a for _, a in bundle_hull], "k--", linewidth=1)
        for k, (method, pts) in enumerate(bundle_methods.items()):
            ordered = sorted(pts, key=lambda p: p.macs_cost)
            onnx.plot([p.wall_cost for p in ordered], [100 * p.accuracy for p in ordered],
                      ".-" if "float" in method else "x:", markersize=4, color=colours((2 * k) % 20), label=method)
        onnx.set(xlabel="wall time in onnxruntime (fraction of the width-16 plain bundle's)")
        onnx.grid(alpha=0.3)
        onnx.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="make budgeted's results (plain-*.safetensors, eval-*.yaml)")
    p.add_argument("--epochs", type=int, required=True, help="epochs the networks were trained for")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--config", default="eetool/configs/train-resnet20-fashion-mnist.yaml")
    p.add_argument("--threads", type=int, default=1, help="torch threads the evaluations ran on")
    p.add_argument("--page", type=Path, default=Path("docs/results/budgeted.md"))
    p.add_argument("--figure", type=Path, default=Path("docs/budgeted.png"))
    a = p.parse_args()
    family = {sha256(f): f.name for f in sorted(a.folder.glob(FAMILY_GLOB))}
    if not (a.folder / REFERENCE).is_file():
        raise SystemExit(f"{a.folder / REFERENCE} is missing: run make budgeted first")
    reference = sha256(a.folder / REFERENCE)
    found = sorted(a.folder.glob("eval-*.yaml"))
    stems = [s for s in METHODS if a.folder / f"eval-{s}.yaml" in found]
    stems += [f.stem.removeprefix("eval-") for f in found if f.stem.removeprefix("eval-") not in (*METHODS,
                                                                                                 FAMILY_RUN)]
    family_doc = yaml.safe_load((a.folder / f"eval-{FAMILY_RUN}.yaml").read_text())
    _, family_points = collect(FAMILY_RUN, family_doc, reference, family)
    all_points, by_method, by_method_points, by_method_family = [], {}, {}, {}
    for stem in stems:
        label = METHODS.get(stem, stem)
        doc = yaml.safe_load((a.folder / f"eval-{stem}.yaml").read_text())
        pts, fam = collect(label, doc, reference, family)
        all_points += pts
        by_method[label] = gaps(pts, envelope(fam))
        by_method_points[label] = pts
        by_method_family[label] = fam
    hull = envelope(family_points)
    plain = gaps([], hull)
    load_file = a.folder / "load.txt"
    recipe = {"data": "Fashion-MNIST" if a.data.startswith("fashion-mnist") else a.data,
              "samples": family_doc["samples"], "config": a.config, "epochs": a.epochs, "threads": a.threads,
              "repeats": family_doc["repeats"], "cpus": os.cpu_count(),
              "load": load_range(load_file.read_text()) if load_file.is_file() else None,
              "figure": os.path.relpath(a.figure, a.page.parent),
              "family": [FAMILY.get(n, n) for n in FAMILY if f"plain-{n}.safetensors" in family.values()],
              "missing_family": [FAMILY[n] for n in FAMILY if f"plain-{n}.safetensors" not in family.values()],
              "missing_methods": [label for stem, label in METHODS.items() if stem not in stems],
              "head_epochs": {net: n for name, net in FROZEN_HEADS.items()
                              if (a.folder / name).is_file() and (n := recorded_epochs(a.folder / name)) is not None}}
    bundles_file = a.folder / "bundles.yaml"
    bundles = yaml.safe_load(bundles_file.read_text()) if bundles_file.is_file() else None
    plot(a.figure, family_points, hull, by_method_points, bundles)
    sentences = [verdict(m, g) for m, g in by_method.items()]
    text = page(family_points, all_points, by_method, plain, sentences, recipe,
                partial_runs(family_points, by_method_family), bundles)
    tmp = a.page.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(a.page)
    print(text)


if __name__ == "__main__":
    main()
