"""Class-based thresholds for early-exit segmentation on Fashion-MNIST scenes or brain atlas slices (thesis chapter
3, Tables III and IV, scaled to 2 CPU cores): `make segmentation`, `make segmentation-atlas`.

`eetool train` trains eeseg (three early exits and the final one, the sum of their losses) on the training scenes;
`calibrate-means` computes CBT's class statistics once, from every training scene (eq. 3.1, as the thesis
calibrates on the training set), and `fit-thresholds` makes from them (with --means, no further pass over the data)
CBT with [0.99, 0.998], [0.95, 0.998] and [0.9, 0.998] and CBT-ns at [0.99, 0.998] (Table III's) and [0.9, 0.998]
(Table IV's), and ADP-C at 0.998 and at 0.9. Beyond the thesis, ADP-C at 0.95, 0.99,
0.995 and 0.999 as well, so that CBT can be compared with ADP-C at equal mIoU on a curve rather than at two
points, and ADP-C 0.998, CBT [0.99, 0.998] and ADP-C 0.9 with the exit decided per position of the heads' grid
(`--decide-at feature`) beside the thesis's per-pixel rule.
`evaluate` scores each on the test scenes: mIoU and cost at the last exit, and the anytime view of the
thesis's tables (stopping after each exit: the class map so far and the GFLOPs spent up to it), with the
measured speed beside the plain network's. Every step is an `eetool` command line; a step whose output exists is
skipped, so rerunning continues where a run stopped. Then a Markdown table (results/segmentation/table.md) with
the thesis's rows beside this run's and the comparison with its claims, point by point.

With ``--arch`` one of torchvision's segmentation networks (`make segmentation-torchvision`), `eetool train`
trains the plain network (random initialisation, its final classifier only) and `eetool train-exits` adds the
three per-pixel exit heads and trains them with the backbone frozen (--exit-epochs, --exit-lr; heads of
eetool's default width, --width and --head-width being eeseg's); calibration, fits and evaluations are the same.

    python reproduce/segmentation.py results/segmentation --epochs 5
    python reproduce/segmentation.py results/segmentation-atlas --data brain-atlas --epochs 60 --width 32 \
        --head-width 64 --batch-size 4 --eval-batch-size 8
    python reproduce/segmentation.py results/segmentation-lraspp_mobilenet_v3_large \
        --arch lraspp_mobilenet_v3_large --epochs 6
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pages import write_page  # reproduce/pages.py, beside this script
from steps import Step, run_steps  # reproduce/steps.py, beside this script

from eetool.core.architectures import SEGMENTATION_ARCHS

EXITS = ("exit1", "exit2", "exit3", "final")
BETA = 0.998
PIXEL, FEATURE = ["--decide-at", "pixel"], ["--decide-at", "feature"]
# (name, label, fit-thresholds arguments); the first seven are the thesis's rows, then the ADP-C curve, all decided per
# pixel as the thesis does (the default for every network), then three rows decided per feature
METHODS: list[tuple[str, str, list[str]]] = [
    ("adpc-0.998", "ADP-C", ["--method", "adp-c", "--threshold", "0.998", *PIXEL]),
    ("cbt-0.99", "CBT [0.99, 0.998]", ["--method", "cbt", "--alpha", "0.99", "--beta", str(BETA), *PIXEL]),
    ("cbtns-0.99", "CBT-ns [0.99, 0.998]", ["--method", "cbt-ns", "--alpha", "0.99", "--beta", str(BETA), *PIXEL]),
    ("cbt-0.95", "CBT [0.95, 0.998]", ["--method", "cbt", "--alpha", "0.95", "--beta", str(BETA), *PIXEL]),
    ("cbt-0.9", "CBT [0.9, 0.998]", ["--method", "cbt", "--alpha", "0.9", "--beta", str(BETA), *PIXEL]),
    ("cbtns-0.9", "CBT-ns [0.9, 0.998]", ["--method", "cbt-ns", "--alpha", "0.9", "--beta", str(BETA), *PIXEL]),
    ("adpc-0.9", "ADP-C β = 0.9", ["--method", "adp-c", "--threshold", "0.9", *PIXEL]),
    *((f"adpc-{t}", f"ADP-C {t}", ["--method", "adp-c", "--threshold", t, *PIXEL])
      for t in ("0.95", "0.99", "0.995", "0.999")),
    # beyond the thesis: the exit decided per position of the heads' grid, upsampled once at the end
    ("adpc-0.998-feature", "ADP-C 0.998, per feature", ["--method", "adp-c", "--threshold", "0.998", *FEATURE]),
    ("cbt-0.99-feature", "CBT [0.99, 0.998], per feature",
     ["--method", "cbt", "--alpha", "0.99", "--beta", str(BETA), *FEATURE]),
    ("adpc-0.9-feature", "ADP-C 0.9, per feature", ["--method", "adp-c", "--threshold", "0.9", *FEATURE]),
]
ADPC_CURVE = ("adpc-0.9", "adpc-0.95", "adpc-0.99", "adpc-0.995", "adpc-0.998", "adpc-0.999")

# The thesis's rows (mIoU in %, GFLOPs per image) at exits 1-4, as printed (ADP-C W48's exit 4 mIoU, 68.55, below
# its exit 3, is the thesis's figure).
THESIS_TABLE_III = [  # Cityscapes
    ("HRNetV2-W48", "ADP-C", [(44.34, 41.92), (60.13, 93.90), (76.82, 259.33), (68.55, 387.80)]),
    ("HRNetV2-W48", "CBT [0.99, 0.998]", [(44.34, 41.92), (59.85, 84.02), (76.29, 206.89), (80.69, 299.10)]),
    ("HRNetV2-W48", "CBT-ns [0.99, 0.998]", [(44.34, 41.92), (59.82, 84.00), (76.28, 206.88), (80.74, 299.17)]),
    ("HRNetV2-W48", "CBT [0.95, 0.998]", [(44.34, 41.92), (57.97, 71.57), (72.86, 155.77), (76.60, 222.65)]),
    ("HRNetV2-W48", "CBT [0.9, 0.998]", [(44.34, 41.92), (56.05, 65.91), (68.92, 132.49), (72.29, 186.31)]),
    ("HRNetV2-W48", "ADP-C β = 0.9", [(44.34, 41.92), (54.86, 53.27), (67.10, 118.25), (69.31, 157.48)]),
    ("HRNetV2-W18", "ADP-C", [(40.83, 23.68), (48.19, 33.27), (68.26, 45.40), (77.02, 58.90)]),
    ("HRNetV2-W18", "CBT [0.99, 0.998]", [(40.83, 23.68), (48.07, 31.74), (67.98, 41.40), (76.57, 51.26)]),
    ("HRNetV2-W18", "CBT [0.95, 0.998]", [(40.83, 23.68), (46.97, 29.51), (64.88, 36.25), (71.18, 43.35)]),
    ("HRNetV2-W18", "CBT [0.9, 0.998]", [(40.83, 23.68), (45.79, 28.39), (61.32, 33.72), (67.45, 39.42)]),
]
THESIS_TABLE_IV = [  # ADE20K
    ("HRNetV2-W48", "ADP-C", [(4.12, 6.20), (5.16, 15.42), (12.15, 52.47), (42.82, 100.28)]),
    ("HRNetV2-W48", "CBT [0.9, 0.998]", [(4.12, 6.20), (5.15, 15.07), (12.09, 50.48), (41.85, 94.31)]),
    ("HRNetV2-W48", "CBT-ns [0.9, 0.998]", [(4.12, 6.20), (5.15, 15.06), (12.08, 50.48), (41.87, 94.34)]),
    ("HRNetV2-W48", "CBT [0.8, 0.998]", [(4.12, 6.20), (5.14, 14.80), (11.90, 48.81), (40.17, 90.25)]),
    ("HRNetV2-W48", "CBT [0.7, 0.998]", [(4.12, 6.20), (5.12, 14.55), (11.58, 47.27), (37.54, 86.52)]),
    ("HRNetV2-W18", "ADP-C", [(4.89, 5.88), (6.83, 7.84), (8.94, 12.73), (9.74, 19.04)]),
    ("HRNetV2-W18", "CBT [0.9, 0.998]", [(4.89, 5.88), (6.80, 7.73), (10.07, 12.24), (11.78, 17.89)]),
    ("HRNetV2-W18", "CBT [0.8, 0.998]", [(4.89, 5.88), (6.75, 7.67), (10.17, 11.98), (11.95, 17.26)]),
    ("HRNetV2-W18", "CBT [0.7, 0.998]", [(4.89, 5.88), (6.70, 7.62), (10.09, 11.75), (11.88, 16.71)]),
]
DATA_NAMES = {"fashion-mnist-scenes": "the Fashion-MNIST scenes", "brain-atlas": "the brain atlas slices"}
THESIS_SPREAD = {"Cityscapes": 0.033, "ADE20K": 0.009}  # sigma of CBT [0.9, 0.998]'s thresholds (Figure 11)


def plan(out: Path, a: argparse.Namespace) -> list[Step]:
    eetool = [sys.executable, "-m", "eetool"]
    common = ["--threads", str(a.threads), "--no-progress", "-q"]
    data = ["--data", a.data]
    eeseg = a.arch == "eeseg"
    plain = out / f"{a.arch}.safetensors"
    arch_args = ["--arch-args", json.dumps({"width": a.width, "head_width": a.head_width})] if eeseg else []
    train = [*eetool, "train", *data, "--split", "train", "--arch", a.arch, *arch_args,
             "--epochs", str(a.epochs), "--optimizer", "adamw", "--lr", str(a.lr), "--weight-decay", "0.0001",
             "--batch-size", str(a.batch_size), "--schedule", "cosine", "--no-augment", "--eval-split", "test",
             "--seed", str(a.seed), "-o", str(plain), "--force", *common]
    subsets = {part: ["--indices", str(out / f"{part}-scenes.txt")] if getattr(a, f"{part}_scenes") else []
               for part in ("train", "calibration", "test")}
    batch = ["--batch-size", str(a.eval_batch_size)]
    statistics = out / "class-statistics.safetensors"
    steps = [Step("train", [*train, *subsets["train"]], plain)]
    if eeseg:  # its exits are trained with it
        model, trained = plain, "train"
    else:  # a torchvision network gets its exit heads afterwards, on the frozen backbone
        model, trained = out / f"{a.arch}-exits.safetensors", "train-exits"
        steps.append(Step(trained, [*eetool, "train-exits", "-c", str(plain), *data, "--split", "train",
                                    *subsets["train"], "--epochs", str(a.exit_epochs), "--optimizer", "adamw",
                                    "--lr", str(a.exit_lr), "--batch-size", str(a.batch_size), "--schedule", "cosine",
                                    "--no-augment", "--eval-split", "test", "--seed", str(a.seed), "-o", str(model),
                                    "--force", "--format", "json", *common], model, ["train"]))
    # CBT's class statistics (eq. 3.1), once for every CBT and CBT-ns row
    steps.append(Step("calibrate", [*eetool, "calibrate-means", "-c", str(model), *data, "--split", "train",
                                    *subsets["calibration"], *batch, "-o", str(statistics), "--force", "--format",
                                    "json", *common], statistics, [trained]))
    for name, _, method in METHODS:
        cbt = method[1] != "adp-c"
        steps.append(Step(f"fit-{name}", [*eetool, "fit-thresholds", *method, "-c", str(model),
                                          *(["--means", str(statistics)] if cbt else []),
                                          "-o", str(out / f"{name}.yaml"), "--force", *common],
                          out / f"{name}.yaml", ["calibrate" if cbt else trained]))
        steps.append(Step(f"eval-{name}", [*eetool, "evaluate", "-c", str(model), *data, "--split", "test",
                                           *subsets["test"], *batch, "--thresholds", str(out / f"{name}.yaml"),
                                           "--repeats", str(a.repeats), "--format", "json", *common],
                          out / f"eval-{name}.json", [f"fit-{name}"]))
    for s in steps:
        s.stdout = out / f"{s.name}.out"
    return steps


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None  # JSON is YAML


def anytime(evaluation: dict[str, Any]) -> list[tuple[float, float]]:
    """(mIoU, GFLOPs) per exit, stopping after it, from an `evaluate --format json` of one threshold file."""
    point = evaluation["points"][1]
    return [(point["anytime"][e]["miou"], point["anytime"][e]["gflops"]) for e in EXITS]


def cost_at_miou(curve: list[tuple[float, float]], miou: float) -> float | None:
    """The cost at which the piecewise-linear (mIoU, cost) curve of ADP-C's thresholds reaches ``miou``: the
    cheapest segment that spans it, interpolated; None outside the curve's range."""
    pts = sorted(curve, key=lambda p: p[1])
    best = None
    for (m0, c0), (m1, c1) in zip(pts, pts[1:], strict=False):
        if min(m0, m1) <= miou <= max(m0, m1):
            c = c0 if m1 == m0 else c0 + (miou - m0) / (m1 - m0) * (c1 - c0)
            best = c if best is None else min(best, c)
    return best


def change(new: float, old: float) -> str:
    return f"{100 * (new - old) / old:+.1f}%"


def thesis_rows(table: list[tuple[str, str, list[tuple[float, float]]]]) -> list[str]:
    return [f"| {model} | {label} | " + " | ".join(f"{m:.2f} | {g:.2f}" for m, g in cells) + " |"
            for model, label, cells in table]


def tabulate(evals: dict[str, Any], fits: dict[str, Any], data: str = "fashion-mnist-scenes",
             model: str = "eeseg") -> str:
    """Markdown: the anytime table (this run of ``model`` beside the thesis's Tables III and IV), the plain
    network's per-class IoU, the last exit with cost, shares and speed, CBT's class thresholds and spread, and the
    thesis's claims checked point by point."""
    head = ("| model | method | " + " | ".join(f"exit {i} mIoU | exit {i} GFLOPs" for i in range(1, 5)) + " |\n"
            "|---|---|" + "---|---|" * 4)
    ours = []
    for name, label, _ in METHODS[:7]:
        if evals.get(name):
            ours.append(f"| {model} (this run) | {label} | " + " | ".join(
                f"{100 * m:.2f} | {g:.4f}" for m, g in anytime(evals[name])) + " |")
    lines = ["Anytime mIoU (%) and GFLOPs per image when inference stops after each exit (pixels that left earlier "
             f"keep their exit's class), this run on {DATA_NAMES.get(data, data)}' test split, then the thesis's Table "
             "III (Cityscapes) and Table IV (ADE20K):", "", head, *ours,
             *thesis_rows(THESIS_TABLE_III), "", head, *ours, *thesis_rows(THESIS_TABLE_IV), ""]
    evaluation = next((e for e in evals.values() if e), None)
    if evaluation:
        plain = evaluation["points"][0]
        lines += [f"The plain network (final exit only): mIoU {100 * plain['miou']:.2f}%, pixel accuracy "
                  f"{100 * plain['pixel_accuracy']:.2f}%, {plain['gflops']:.4f} GFLOPs per image, "
                  f"{plain['throughput']:.0f} images/s; IoU (%) per class: "
                  + ", ".join("absent" if v is None else f"{c} {100 * v:.1f}"
                              for c, v in evaluation.get("per_class_iou", {}).get("plain", {}).items()) + ".", ""]
    lines += ["At the last exit (cost: of the plain network's multiply-adds, analytic (each part's multiply-adds "
              "times the share of pixels still active) and executed (what ran); speed-up: measured images/s "
              "against the plain network in the same run, and the analytic 1 / cost):", "",
              "| method | mIoU (%) | pixel acc (%) | cost | executed cost | GFLOPs | pixels leaving at exit 1 / 2 / 3 "
              "/ final | measured speed-up | analytic speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for name, label, _ in METHODS:
        e = evals.get(name)
        if not e:
            continue
        p = e["points"][1]
        shares = " / ".join(f"{p['exit_shares'][x]:.3f}" for x in EXITS)
        executed = f"{p['executed_cost']:.4f}" if "executed_cost" in p else "-"
        lines.append(f"| {label} | {100 * p['miou']:.2f} | {100 * p['pixel_accuracy']:.2f} | {p['cost']:.4f} | "
                     f"{executed} | {p['gflops']:.4f} | {shares} | {p['speedup']:.2f}x | {1 / p['cost']:.2f}x |")
    lines += ["", *threshold_lines(fits), "", *claims(evals, fits)]
    return "\n".join(lines)


def threshold_lines(fits: dict[str, Any]) -> list[str]:
    names = [n for n in ("cbt-0.99", "cbt-0.95", "cbt-0.9") if fits.get(n)]
    if not names:
        return []
    classes = fits[names[0]]["classes"]
    scores = fits[names[0]]["statistics"]["scores"]
    pixels = fits[names[0]]["statistics"]["pixels"]
    lines = ["CBT's class thresholds (shared by the three early exits), with each class's confidence score c_k = "
             "top1 − top2 of P_k (eq. 3.2) and its calibration pixels; σ is their spread over the classes (the "
             f"thesis, for [0.9, 0.998]: {THESIS_SPREAD['Cityscapes']} on Cityscapes, {THESIS_SPREAD['ADE20K']} "
             "on ADE20K):", "",
             "| class | pixels | c_k | " + " | ".join(f"CBT [{fits[n]['alpha']}, {fits[n]['beta']}]" for n in names)
             + " |", "|---|---|---|" + "---|" * len(names)]
    order = sorted(range(len(classes)), key=lambda k: -math.inf if scores[k] is None else -scores[k])
    for k in order:
        score = "absent" if scores[k] is None else f"{scores[k]:.4f}"
        lines.append(f"| {classes[k]} | {pixels[classes[k]]:,} | {score} | "
                     + " | ".join(f"{fits[n]['thresholds'][0][k]:.4f}" for n in names) + " |")
    lines.append("| σ | | | " + " | ".join(f"{fits[n]['spread']:.4f}" for n in names) + " |")
    return lines


def claims(evals: dict[str, Any], fits: dict[str, Any]) -> list[str]:
    """The thesis's claims, each with this run's figures and whether they agree."""
    def last(name: str) -> tuple[float, float] | None:
        e = evals.get(name)
        return (e["points"][1]["miou"], e["points"][1]["cost"]) if e else None

    out = ["Against the thesis's claims:", ""]
    adpc, cbt99, cbt95, cbt90 = last("adpc-0.998"), last("cbt-0.99"), last("cbt-0.95"), last("cbt-0.9")
    if adpc and cbt99:
        out.append(f"- CBT [0.99, 0.998] against ADP-C at the last exit (the thesis, W48: −23% cost for −0.62 mIoU): "
                   f"{change(cbt99[1], adpc[1])} cost for {100 * (cbt99[0] - adpc[0]):+.2f} mIoU.")
    if evals.get("adpc-0.998") and evals.get("cbt-0.99"):
        a, c = anytime(evals["adpc-0.998"]), anytime(evals["cbt-0.99"])
        out.append(f"- Exits 2 and 3 (the thesis: −10% and −20% GFLOPs): {change(c[1][1], a[1][1])} and "
                   f"{change(c[2][1], a[2][1])}.")
    if evals.get("adpc-0.998") and evals.get("cbt-0.95"):
        a, c = anytime(evals["adpc-0.998"]), anytime(evals["cbt-0.95"])
        verdict = "matches" if c[3][0] >= a[2][0] else "falls short of"
        # the claim is both: the mIoU reached and less computation spent
        agrees = "agrees" if c[3][0] >= a[2][0] and c[3][1] < a[2][1] else "not reproduced"
        out.append(f"- Exit 4 of CBT [0.95, 0.998] against exit 3 of ADP-C (the thesis: matches it with 14% less "
                   f"computation): {100 * c[3][0]:.2f} against {100 * a[2][0]:.2f} mIoU ({verdict} it) at "
                   f"{change(c[3][1], a[2][1])} GFLOPs: {agrees}.")
    if cbt99 and cbt95 and cbt90:
        falling = cbt99[1] >= cbt95[1] >= cbt90[1]
        out.append(f"- Lower α lets pixels leave earlier: cost {cbt99[1]:.4f} / {cbt95[1]:.4f} / {cbt90[1]:.4f} "
                   f"and mIoU {100 * cbt99[0]:.2f} / {100 * cbt95[0]:.2f} / {100 * cbt90[0]:.2f} for α 0.99 / 0.95 / "
                   f"0.9: {'agrees' if falling else 'does not agree'}.")
    named = [(n, p) for n, p in ((n, last(n)) for n in ADPC_CURVE) if p]
    curve = [p for _, p in named]
    rows = []
    for name in ("cbt-0.99", "cbt-0.95", "cbt-0.9", "cbtns-0.99", "cbtns-0.9"):
        p = last(name)
        if p and len(curve) > 1:
            reach = cost_at_miou(curve, p[0])
            if reach is not None:
                rows.append(f"{name} {p[1]:.4f} against {reach:.4f} ({change(p[1], reach)})")
                continue
            # Below the curve's least mIoU the curve cannot be read, but an ADP-C point at least as accurate and
            # as cheap still answers the claim.
            better = [n for n, q in named if q[0] >= p[0] and q[1] <= p[1]]
            rows.append(f"{name} {p[1]:.4f}: " + (f"dominated by {better[0]} (at least as accurate, no dearer)"
                                                  if better else "outside ADP-C's range"))
    if rows:
        out.append("- CBT at equal mIoU costs less than ADP-C (ADP-C's cost read off its curve over thresholds "
                   + ", ".join(n.split("-")[1] for n in ADPC_CURVE) + " at the CBT point's mIoU): "
                   + "; ".join(rows) + ".")
    for alpha in ("0.99", "0.9"):
        c, ns = last(f"cbt-{alpha}"), last(f"cbtns-{alpha}")
        if c and ns:
            out.append(f"- CBT-ns no better than CBT at [{alpha}, 0.998]: mIoU {100 * ns[0]:.2f} against "
                       f"{100 * c[0]:.2f}, cost {ns[1]:.4f} against {c[1]:.4f}.")
    if fits.get("cbt-0.9"):
        out.append(f"- Spread: σ = {fits['cbt-0.9']['spread']:.4f} for [0.9, 0.998] (Cityscapes 0.033, ADE20K 0.009; "
                   "the thesis relates a larger spread to a larger saving).")
    return out


# The results pages' rows and columns (docs/results/<page>.md; their prose is reproduce/pages/<page>.md)
PAGE_ANYTIME_ROWS = ("adpc-0.998", "cbt-0.99", "cbt-0.95", "cbt-0.9", "adpc-0.9")
PAGE_THESIS_ROWS = ("ADP-C", "CBT [0.99, 0.998]", "CBT [0.9, 0.998]")  # Table III's HRNetV2-W48 rows
PAGE_LAST_ROWS = ("adpc-0.998", "cbt-0.99", "cbtns-0.99", "cbt-0.95", "cbt-0.9", "cbtns-0.9", "adpc-0.9")
FEATURE_ROWS = ("adpc-0.998-feature", "cbt-0.99-feature", "adpc-0.9-feature")
PAGE_TORCHVISION_ARCH = "lraspp_mobilenet_v3_large"  # the network docs/results/segmentation-torchvision.md is about


def page_name(data: str, arch: str) -> str | None:
    """The results page a run writes (None for a run no page reports)."""
    if arch == "eeseg":
        return {"fashion-mnist-scenes": "segmentation", "brain-atlas": "segmentation-atlas"}.get(data)
    return "segmentation-torchvision" if arch == PAGE_TORCHVISION_ARCH and data == "fashion-mnist-scenes" else None


def page_label(name: str) -> str:
    """A method as the results pages name it: ADP-C with its threshold."""
    label = next(label for n, label, _ in METHODS if n == name)
    return f"ADP-C {name.split('-')[1]}" if name.startswith("adpc-") and not name.endswith("-feature") else label


def last_exit_table(evals: dict[str, Any], names: tuple[str, ...], shares: bool = True,
                    measured: str = "measured speed-up") -> str:
    """The results page's last-exit table: mIoU, analytic and executed cost, optionally the share of pixels leaving
    at each exit, the measured and the analytic speed-up, one row per method in ``names`` that was evaluated."""
    columns = ["method", "mIoU", "cost", "executed", *(["pixels leaving at exit 1 / 2 / 3 / final"] if shares else []),
               measured, "analytic"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name in names:
        if not evals.get(name):
            continue
        p = evals[name]["points"][1]
        cells = [page_label(name), f"{100 * p['miou']:.2f}", f"{p['cost']:.3f}", f"{p['executed_cost']:.3f}",
                 *([" / ".join(f"{p['exit_shares'][x]:.3f}" for x in EXITS)] if shares else []),
                 f"{p['speedup']:.2f}x", f"{1 / p['cost']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anytime_table(evals: dict[str, Any], model: str = "eeseg") -> str:
    """The results page's anytime table: mIoU (%) / GFLOPs after each exit, this run beside Table III's W48 rows."""
    lines = ["| model | method | " + " | ".join(f"exit {i}" for i in range(1, 5)) + " |", "|---|---|" + "---|" * 4]
    for name in PAGE_ANYTIME_ROWS:
        if evals.get(name):
            lines.append(f"| {model} (this run) | {page_label(name)} | " + " | ".join(
                f"{100 * m:.2f} / {g:.4f}" for m, g in anytime(evals[name])) + " |")
    for model_name, label, cells in THESIS_TABLE_III:
        if model_name == "HRNetV2-W48" and label in PAGE_THESIS_ROWS:
            lines.append(f"| {model_name} (thesis) | {'ADP-C 0.998' if label == 'ADP-C' else label} | "
                         + " | ".join(f"{m:.2f} / {g:.2f}" for m, g in cells) + " |")
    return "\n".join(lines)


def page_parts(page: str, evals: dict[str, Any]) -> dict[str, str]:
    """The generated parts of a results page (reproduce/pages/PAGE.md holds the rest)."""
    if page == "segmentation":
        return {"anytime_table": anytime_table(evals),
                "last_exit_table": last_exit_table(evals, (*PAGE_LAST_ROWS, "adpc-0.99", "adpc-0.999"))}
    if page == "segmentation-atlas":
        return {"last_exit_table": last_exit_table(evals, (*PAGE_LAST_ROWS, "adpc-0.99", "adpc-0.999"),
                                                   shares=False)}
    return {"last_exit_table": last_exit_table(evals, (*PAGE_LAST_ROWS, *(f"adpc-{t}" for t in
                                                                          ("0.95", "0.99", "0.995", "0.999")),
                                                          *FEATURE_ROWS), measured="measured")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--data", default="fashion-mnist-scenes")
    p.add_argument("--arch", default="eeseg", choices=SEGMENTATION_ARCHS,
                   help="eeseg, or a torchvision network that gets its exit heads from train-exits")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--exit-epochs", type=int, default=3, help="torchvision networks: epochs of the exit heads")
    p.add_argument("--exit-lr", type=float, default=0.003, help="torchvision networks: the exit heads' peak rate")
    p.add_argument("--train-scenes", type=int, default=0, help="train on the first N training scenes (0: all)")
    p.add_argument("--calibration-scenes", type=int, default=0, help="CBT's statistics from the first N training "
                                                                     "scenes (0: all)")
    p.add_argument("--test-scenes", type=int, default=0, help="evaluate on the first N test scenes (0: all)")
    p.add_argument("--width", type=int, default=16, help="eeseg's width")
    p.add_argument("--head-width", type=int, default=32, help="eeseg's exit heads' width")
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--batch-size", type=int, default=16, help="training batch")
    p.add_argument("--eval-batch-size", type=int, default=256, help="batch of the calibration and the evaluations")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds of each evaluation (interleaved: the plain "
                   "network and the thresholds in turn; a shared machine moves a single round by 2x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per step")
    p.add_argument("--page", type=Path, default=None, help="the results page (default: docs/results/ segmentation.md, "
                   "segmentation-atlas.md or segmentation-torchvision.md, by --data and --arch)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for part in ("train", "calibration", "test"):
        if getattr(a, f"{part}_scenes"):
            (a.out / f"{part}-scenes.txt").write_text("".join(f"{i}\n" for i in range(getattr(a, f"{part}_scenes"))))
    start = time.time()
    ok = run_steps(plan(a.out, a), 1)
    print(f"steps took {time.time() - start:.0f} s", flush=True)
    evals = {name: load(a.out / f"eval-{name}.json") for name, _, _ in METHODS}
    fits = {name: load(a.out / f"{name}.yaml") for name, _, _ in METHODS}
    if any(evals.values()):
        table = tabulate(evals, fits, a.data.split(":")[0], a.arch)
        (a.out / "table.md").write_text(table + "\n")
        print(table)
        page = page_name(a.data.split(":")[0], a.arch)
        if page is not None:
            print(f"wrote {write_page(page, page_parts(page, evals), a.page)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
