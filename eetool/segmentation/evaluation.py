"""`evaluate` on a segmentation checkpoint: mIoU, pixel accuracy, cost and measured speed of the plain network and of
its pixel exits under a thresholds file."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from eetool.core.choices import DECIDE_AT
from eetool.core.errors import InputError, ProvenanceError, UsageError
from eetool.core.reporting import format_fields, format_table
from eetool.core.run_inputs import data_path, open_checkpoint
from eetool.segmentation.class_thresholds import SegmentationThresholds
from eetool.segmentation.inputs import (
    load_masks,
    preprocessed_batches,
    require_segmentation,
)
from eetool.segmentation.model import DENSE_ABOVE, EXIT_NAMES, EESegNet
from eetool.segmentation.networks import early_exit_forward, plain_macs
from eetool.segmentation.threshold_fitting import warn_if_slower

if TYPE_CHECKING:
    from eetool.core.options import Run
    from eetool.core.prediction_io import PredictRequest


@dataclass
class SegmentationEvaluation:
    checkpoint: str
    data: str
    split: str
    indices: str | None
    batch_size: int
    unit: str
    output: str | None
    force: bool
    thresholds: str | None
    repeats: int
    plot: str | None
    classification_only: dict[str, Any] = field(default_factory=dict)  # options given that do not apply
    decide_at: str | None = None  # --decide-at: must match the thresholds file's rule (None: the file's)


@dataclass
class SegmentationRun:
    confusion: torch.Tensor
    seconds: float
    exit_pixels: torch.Tensor | None = None  # pixels leaving at each exit
    macs: int = 0
    # anytime: per exit, the confusion of the class map had inference stopped there, and the MACs spent up to it
    exit_confusions: list[torch.Tensor] = field(default_factory=list)
    exit_macs: list[int] = field(default_factory=list)
    executed_macs: int | None = None  # what ran (dense blocks count every position); macs is the masked cost


def rule_of(fitted: SegmentationThresholds, req: SegmentationEvaluation | PredictRequest) -> str:
    """The exit rule the thresholds file was fitted for (files from before the option: pixel); --decide-at must
    agree with it."""
    recorded = fitted.record.get("decide_at", "pixel")
    if recorded not in DECIDE_AT:
        raise InputError(f"{req.thresholds} records an unknown decide_at {recorded!r}",
                         "re-make it with `eetool fit-thresholds --method cbt|cbt-ns|adp-c`")
    if req.decide_at is not None and req.decide_at != recorded:
        raise ProvenanceError(f"{req.thresholds} was fitted for --decide-at {recorded}, not {req.decide_at}",
                              f"drop --decide-at (evaluate takes the file's rule), or re-make the thresholds with "
                              f"`eetool fit-thresholds --decide-at {req.decide_at}`")
    return recorded


def evaluate_segmentation(run: Run, req: SegmentationEvaluation) -> None:
    from eetool.core.artifacts import STDOUT, Provenance, write_yaml
    from eetool.core.costs import in_unit
    from eetool.core.datasets import Preprocess
    from eetool.core.inference import BUSY_SPREAD, interleaved, speeds, timing_spread
    from eetool.segmentation.metrics import confusion, iou, mean_iou, pixel_accuracy

    given = [name for name, value in req.classification_only.items() if value not in (None, "all")]
    if given:
        raise UsageError(f"{', '.join(given)} apply to classifiers, not to a segmentation checkpoint",
                         "evaluate a segmentation network with --thresholds from `eetool fit-thresholds --method "
                         "cbt|cbt-ns|adp-c`, or none for the plain network")
    inputs = (req.checkpoint, req.indices, data_path(req.data), req.thresholds)
    if req.output:
        run.check_output(req.output, force=req.force, inputs=inputs)
    if req.plot:
        if req.plot == STDOUT:
            raise UsageError("--plot - would put a PNG among the data on stdout", "give the plot a file name")
        run.check_output(req.plot, force=req.force, inputs=inputs)
    if req.decide_at is not None and not req.thresholds:
        raise UsageError("--decide-at applies to early exits", "give --thresholds, or drop --decide-at for the "
                         "plain network")
    if req.decide_at is not None and req.decide_at not in DECIDE_AT:
        raise UsageError(f"unknown --decide-at {req.decide_at!r}", f"use one of {', '.join(DECIDE_AT)}")
    ckpt = open_checkpoint(run, req.checkpoint)
    model = require_segmentation(ckpt, "this evaluation")
    fitted = SegmentationThresholds.load_for(req.thresholds, ckpt, model.num_classes) if req.thresholds else None
    thresholds = fitted.thresholds if fitted is not None else None
    decide_at = rule_of(fitted, req) if fitted is not None else "pixel"
    device = run.torch()
    ds = load_masks(req.data, req.split, req.indices, ckpt)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    k = model.num_classes
    model.eval().to(device)
    # decoded once, so that the timed runs compare the networks and not the decoding
    batches = list(preprocessed_batches(ds, preprocess, req.batch_size, device))

    @torch.no_grad()
    def plain_run(batches: list[tuple[torch.Tensor, torch.Tensor]] = batches) -> SegmentationRun:
        matrix = torch.zeros(k, k, dtype=torch.int64)
        start = time.perf_counter()
        # max's indices, not argmax: the same first largest class, and on CPU argmax over the classes of a
        # B x K x H x W map is several times slower than the network's last stages
        predictions = [model(x).max(1).indices for x, _ in batches]
        seconds = time.perf_counter() - start
        for p, (_, masks) in zip(predictions, batches, strict=True):
            matrix += confusion(p.cpu(), masks, k)
        return SegmentationRun(matrix, seconds)

    def early_run(batches: list[tuple[torch.Tensor, torch.Tensor]] = batches) -> SegmentationRun:
        assert thresholds is not None
        matrix = torch.zeros(k, k, dtype=torch.int64)
        exits = torch.zeros(len(EXIT_NAMES), dtype=torch.int64)
        start = time.perf_counter()
        results = [early_exit_forward(model, x, thresholds, decide_at=decide_at) for x, _ in batches]
        seconds = time.perf_counter() - start
        macs, executed = 0, 0
        exit_matrices = [torch.zeros(k, k, dtype=torch.int64) for _ in EXIT_NAMES]
        exit_macs = [0] * len(EXIT_NAMES)
        for r, (_, masks) in zip(results, batches, strict=True):
            matrix += confusion(r.exit_predictions[-1].cpu(), masks, k)  # the final class map: the logits' argmax
            exits += torch.bincount(r.exit_index.flatten().long().cpu(), minlength=len(EXIT_NAMES))
            macs += r.macs
            executed += r.executed_macs if r.executed_macs is not None else r.macs
            for n, prediction in enumerate(r.exit_predictions):
                exit_matrices[n] += confusion(prediction.cpu(), masks, k)
                exit_macs[n] += r.exit_macs[n]
        return SegmentationRun(matrix, seconds, exits, macs, exit_matrices, exit_macs, executed)

    runs = [plain_run, *([early_run] if thresholds is not None else [])]
    for warm_up in runs:  # kernels and allocations set up on the first batch before the timed rounds
        warm_up(batches[:1])
    rounds = interleaved(runs, req.repeats)
    timing = speeds([[r.seconds for r in results] for results in rounds], len(ds))
    if len(runs) > 1 and timing_spread(timing) > BUSY_SPREAD:
        run.reporter.warn(f"timings varied by a factor {timing_spread(timing):.2f} across the {req.repeats} rounds: "
                          "the machine was busy and the speed-ups are unreliable; rerun on an idle machine or with "
                          "more --repeats")
    dense = plain_macs(model, ckpt.spec.input_shape)
    classes = ckpt.spec.classes or [str(i) for i in range(k)]
    unit = req.unit

    def point(name: str, result: SegmentationRun, macs: float, speed: Any) -> dict[str, Any]:
        return {"name": name, "miou": round(mean_iou(result.confusion), 6),
                "pixel_accuracy": round(pixel_accuracy(result.confusion), 6),
                "cost": round(macs / dense, 6), unit: int(in_unit(macs, unit)), "gflops": round(2 * macs / 1e9, 6),
                "throughput": round(speed.throughput, 1), "speedup": round(speed.speedup, 3),
                "speedup_min": round(speed.speedup_min, 3), "speedup_max": round(speed.speedup_max, 3),
                "seconds": [round(t, 4) for t in speed.seconds]}

    plain = rounds[0][0]
    doc: dict[str, Any] = {
        "checkpoint": ckpt.path, "checkpoint_sha256": ckpt.sha256, "dataset": ds.fingerprint, "samples": len(ds),
        "pixels": int(plain.confusion.sum()), "unit": unit, "repeats": req.repeats,
        "cost_note": COST_NOTE if isinstance(model, EESegNet) else TORCHVISION_COST_NOTE,
        "points": [point("plain", plain, dense, timing[0])],
        "per_class_iou": {"plain": _per_class(classes, iou(plain.confusion))},
    }
    if fitted is not None:
        early = rounds[0][1]
        assert early.exit_pixels is not None
        name = fitted.method
        p = point(name, early, early.macs / len(ds), timing[1])
        p["exit_shares"] = {e: round(int(c) / int(early.exit_pixels.sum()), 6)
                            for e, c in zip(EXIT_NAMES, early.exit_pixels.tolist(), strict=True)}
        # ADP-C's anytime view (the thesis's Tables III and IV): stopping after each exit, the class map so far
        # (pixels that left keep their exit's class, the others take this exit's) and the cost spent up to it
        p["anytime"] = {e: {"miou": round(mean_iou(m), 6), "cost": round(c / len(ds) / dense, 6),
                            "gflops": round(2 * c / len(ds) / 1e9, 6)}
                        for e, m, c in zip(EXIT_NAMES, early.exit_confusions, early.exit_macs, strict=True)}
        p["thresholds"] = req.thresholds
        p["decide_at"] = decide_at
        if early.executed_macs is not None:
            p["executed_cost"] = round(early.executed_macs / len(ds) / dense, 6)
        doc["points"].append(p)
        doc["per_class_iou"][name] = _per_class(classes, iou(early.confusion))
        warn_if_slower(run, f"{name} (cost {p['cost']}, decided per {decide_at})", timing[1].speedup,
                       f"median of {req.repeats} rounds")
    if req.plot:
        from eetool.core.plotting import accuracy_cost_png

        accuracy_cost_png(req.plot, [{**q, "accuracy": q["miou"]} for q in doc["points"]],
                          f"mIoU against cost: {ckpt.spec.arch} on {ds.spec} ({len(ds)} images)")
        run.wrote(req.plot)
    if req.output:
        prov = Provenance(kind="evaluation", checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256,
                          dataset=ds.fingerprint, args=run.args)
        write_yaml(req.output, doc, prov)
        if req.output == STDOUT:
            return
        run.wrote(req.output)

    def text(d: dict[str, Any]) -> str:
        head = format_fields([("checkpoint", ckpt.label), ("dataset", f"{d['dataset']} ({d['samples']} images, "
                                                                       f"{d['pixels']:,} labelled pixels)"),
                              ("cost", d["cost_note"])])
        points = format_table(["point", "mIoU", "pixel acc", "cost", f"{unit}/image", "GFLOPs", "images/s", "speedup",
                               *(f"share {e}" for e in EXIT_NAMES)],
                              [[q["name"], q["miou"], q["pixel_accuracy"],
                                (f"{q['cost']:.4f} (ran {q['executed_cost']:.4f})" if "executed_cost" in q
                                 else q["cost"]),
                                f"{q[unit]:,}", q["gflops"],
                                f"{q['throughput']:.1f}", f"{q['speedup']:.2f}x",
                                *((q["exit_shares"][e] for e in EXIT_NAMES) if "exit_shares" in q
                                  else ("",) * len(EXIT_NAMES))] for q in d["points"]])
        anytime = [q for q in d["points"] if "anytime" in q]
        stops = "".join("\n\n" + format_table([f"{q['name']}: stop after", "mIoU", "cost", "GFLOPs"],
                                                [[e, a["miou"], a["cost"], a["gflops"]]
                                                 for e, a in q["anytime"].items()]) for q in anytime)
        names = list(d["per_class_iou"])
        per = format_table(["class IoU", *names], [[c, *(d["per_class_iou"][n][c] for n in names)] for c in classes])
        return f"{head}\n\n{points}{stops}\n\n{per}"

    run.emit(doc, text)


COST_NOTE = ("multiply-adds of the positions each part computes (the stem on all; later stages, heads and the "
             "3x3 convolutions' neighbourhoods on active positions only), normalised to the plain network; what "
             f"ran is executed_cost: a block with at least {DENSE_ABOVE:.0%} of its positions active runs dense "
             "(faster on CPU than gathered matrix products) and counts every position; images/s are measured on "
             "what ran")


TORCHVISION_COST_NOTE = ("analytic masked cost: each part's multiply-adds times the share of the image's pixels "
                         "still active (ADP-C's accounting), normalised to the plain network; what ran is "
                         "executed_cost: the backbones compute active positions only after the first exit (and "
                         "the convolutions' neighbourhoods; a block with at least 60% (ResNets) or 10% "
                         "(MobileNets) of its positions active runs dense and counts every position), the "
                         "MobileNets' classifier every position of the images still active; images/s are "
                         "measured on what ran")


def _per_class(classes: list[str], values: torch.Tensor) -> dict[str, float | None]:
    return {c: (None if math.isnan(v) else round(v, 6)) for c, v in zip(classes, values.tolist(), strict=True)}
