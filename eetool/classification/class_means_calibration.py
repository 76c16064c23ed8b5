"""Class means, normalisers and calibration confidences at every exit of a classifier (E²CM, thesis chapter
2), or k-means centres in their place, from one checkpoint and a dataset; the class-means artifact written."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from eetool.core.options import Count, Run
from eetool.core.reporting import format_fields, format_table
from eetool.core.run_inputs import data_path, open_checkpoint


class Predict(str, Enum):
    auto = "auto"
    softmax = "softmax"
    nearest = "nearest"


@dataclass
class MeansCalibrationRequest:
    checkpoint: str
    data: str
    output: str
    split: str
    indices: str | None
    exits: str
    pool_spatial: int | None
    pool_channels: int | None
    clusters: int | None
    batch_size: int
    count: Count
    force: bool
    predict: Predict


def calibrate_class_means(run: Run, req: MeansCalibrationRequest) -> None:
    checkpoint, data, output, split, indices = req.checkpoint, req.data, req.output, req.split, req.indices
    exits, pool_spatial, pool_channels, clusters = req.exits, req.pool_spatial, req.pool_channels, req.clusters
    batch_size, count, force, predict = req.batch_size, req.count, req.force, req.predict
    import math

    from eetool.classification.e2cm import ClassMeans, Pooling, calibrate
    from eetool.core.artifacts import Provenance
    from eetool.core.costs import effective, in_unit, measure
    from eetool.core.datasets import Preprocess, check_labels
    from eetool.core.exits import build_exit_model
    from eetool.core.run_inputs import load_data

    run.check_output(output, force=force, inputs=(checkpoint, indices, data_path(data)), binary=True)
    ckpt = open_checkpoint(run, checkpoint)
    device = run.torch()
    ds = load_data(run, data, split, indices, ckpt.spec)
    check_labels(ds, ckpt.spec.num_classes)
    if clusters is not None and clusters != ckpt.spec.num_classes:
        from eetool.core.errors import UsageError

        raise UsageError(f"--clusters {clusters} differs from the model's {ckpt.spec.num_classes} outputs",
                         f"use --clusters {ckpt.spec.num_classes}: exits predict in the head's terms")
    ckpt.model.to(device)
    em = build_exit_model(ckpt.model, exits)
    pooling = Pooling(pool_spatial, pool_channels)
    costs = measure(em, ckpt.spec.input_shape)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    centres = None
    if clusters:
        import torch

        from eetool.classification.e2cm import cluster_centres

        centres, _ = cluster_centres(em, ds, preprocess, clusters, pooling=pooling, batch_size=batch_size,
                                     device=device, generator=torch.Generator().manual_seed(run.seed),
                                     reporter=run.reporter, world=run.world)
    calib = calibrate(em, ds, preprocess, ckpt.spec.num_classes, pooling=pooling, batch_size=batch_size,
                      device=device, reporter=run.reporter, centres=centres, predict=predict.value, world=run.world)
    feature_sizes = [math.prod(shape) for shape in em.exit_shapes(ckpt.spec.input_shape)]
    sparse = effective(costs, em, ckpt.spec.input_shape)  # a pruned network's: thresholds are fitted on them
    cm = ClassMeans(list(em.exits), calib.means, calib.normalisers, calib.counts, pooling, costs.stage_macs, calib,
                    effective_stage_macs=list(sparse.stage_macs) if sparse is not costs else [],
                    clusters=clusters is not None, feature_sizes=feature_sizes, rules=calib.rules)
    cm.provenance = Provenance(kind="class-means", checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256,
                               exits=list(em.exits), dataset=ds.fingerprint, args=run.args)
    if run.world.main:  # under torchrun every rank holds the whole result; rank 0 writes it
        cm.save(output)
        run.wrote(output)

    unit = count.value
    model_bytes = sum(p.numel() * p.element_size() for p in ckpt.model.parameters())
    model_macs = costs.model_macs
    with_overheads = cm.cost_model()
    stats = cm.exit_stats(calib.confidence, calib.prediction, calib.final_prediction, calib.labels)
    correct = stats.correct[:, :-1]
    rule_accuracy = {rule: cm.exit_stats(calib.confidence, p, calib.final_prediction,
                                         calib.labels).correct[:, :-1].double().mean(0)
                     for rule, p in calib.rule_predictions.items()}
    rows = [{
        "exit": name,
        "dim": dim,
        "means_mb": round(mem / 2**20, 4),
        "means_fraction_of_model": round(mem / model_bytes, 6),
        f"overhead_{unit}": int(in_unit(over, unit)),
        "overhead_normalised": round(over / model_macs, 6),
        "cost_normalised": round(c, 6),
        "calibration_accuracy": round(float(acc), 6),
        "predict": rule,
        **{f"{r}_accuracy": round(float(a[e]), 6) for r, a in rule_accuracy.items()},
    } for e, (name, dim, mem, over, c, acc, rule) in enumerate(zip(
        em.exits, calib.dims, cm.memory_bytes(), with_overheads.overhead_macs,
        with_overheads.normalised_exit_costs(), correct.double().mean(0), cm.rules, strict=False))]
    passes = calib.seconds
    doc: dict[str, Any] = {
        "output": output, "checkpoint": ckpt.path, "dataset": ds.fingerprint, "samples": len(ds),
        "mode": em.mode, "unit": unit, "predict": predict.value, "exits": rows,
        # a pruned network's thresholds are fitted on its effective cost (zero weights cost nothing)
        "cost_basis": "effective" if cm.effective_stage_macs else "dense",
        "total_means_mb": round(sum(cm.memory_bytes()) / 2**20, 4),
        "total_means_fraction_of_model": round(sum(cm.memory_bytes()) / model_bytes, 6),
        f"total_overhead_{unit}": int(in_unit(sum(with_overheads.overhead_macs), unit)),
        "total_overhead_normalised": round(sum(with_overheads.overhead_macs) / model_macs, 6),
        "head_calibration_accuracy": round(float(stats.correct[:, -1].double().mean()), 6),
        "throughput_pass1": round(len(ds) / passes[0], 1) if passes[0] else None,  # none with --clusters
        "throughput_pass2": round(len(ds) / passes[1], 1),
    }

    def text(d: dict[str, Any]) -> str:
        table = format_table(
            ["exit", "dim", "means MB", "of model", f"overhead {unit}", "overhead", "exit cost", "softmax acc",
             "nearest acc", "predict", "calib acc"],
            [[r["exit"], r["dim"], r["means_mb"], r["means_fraction_of_model"], f"{r[f'overhead_{unit}']:,}",
              r["overhead_normalised"], r["cost_normalised"], r["softmax_accuracy"], r["nearest_accuracy"],
              r["predict"], r["calibration_accuracy"]] for r in d["exits"]])
        return format_fields([
            ("cluster centres" if clusters else "class means",
             f"{d['output']} ({d['samples']} samples of {d['dataset']}, {d['mode']} mode)"),
            ("means memory", f"{d['total_means_mb']:.3f} MB = {d['total_means_fraction_of_model']:.3f} of the model"),
            ("overhead", f"{d[f'total_overhead_{unit}']:,} {unit} = {d['total_overhead_normalised']:.4f} of the "
                         "model if a sample passes every exit"),
            ("head accuracy", d["head_calibration_accuracy"]),
            ("predict", d["predict"] + (" (per exit, the more accurate on these samples; softmax on a tie)"
                                        if d["predict"] == "auto" and not clusters else
                                        " (softmax: cluster centres use no labels)" if d["predict"] == "auto"
                                        else "")),
        ]) + "\n\n" + table

    run.emit(doc, text)
