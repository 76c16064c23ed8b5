"""eetool evaluate: accuracy, cost and measured throughput of a checkpoint on a dataset."""

from __future__ import annotations

from typing import Any

from eetool.commands.common import data_path, format_fields, format_table, open_checkpoint
from eetool.options import (
    ArchArgsOpt,
    ArchOpt,
    BatchOpt,
    CheckpointOpt,
    Count,
    CountOpt,
    DataOpt,
    ForceOpt,
    IndicesOpt,
    InputShapeOpt,
    MeanOpt,
    NumClassesOpt,
    OptionalOutputOpt,
    Run,
    SplitOpt,
    StdOpt,
    eetool_command,
)


@eetool_command("evaluation")
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    data: DataOpt,
    split: SplitOpt = "test",
    indices: IndicesOpt = None,
    batch_size: BatchOpt = 256,
    count: CountOpt = Count.macs,
    output: OptionalOutputOpt = None,
    force: ForceOpt = False,
    arch: ArchOpt = None,
    arch_args: ArchArgsOpt = None,
    num_classes: NumClassesOpt = None,
    input_shape: InputShapeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Evaluate a checkpoint on a dataset: accuracy, per-class accuracy, cost, throughput. Writes -o if given."""
    from eetool.artifacts import STDOUT, Provenance, write_yaml
    from eetool.costs import count_macs, in_unit
    from eetool.datasets import Preprocess, check_labels, load_dataset
    from eetool.errors import UsageError
    from eetool.inference import per_class_accuracy, predict

    if output == STDOUT and run.json:
        raise UsageError("-o - and --format json both ask for stdout", "drop one, or write the YAML to a file")
    if output:
        run.check_output(output, force=force, inputs=(checkpoint, indices, data_path(data)))
    ckpt = open_checkpoint(checkpoint, arch, arch_args, num_classes, input_shape, mean, std)
    device = run.torch()
    ds = load_dataset(data, split, indices)
    check_labels(ds, ckpt.spec.num_classes)
    if bool((ds.labels < 0).any()):
        from eetool.errors import InputError

        raise InputError(f"{ds.spec} has unlabelled samples", "evaluate on a labelled dataset")
    unit = count.value
    macs = count_macs(ckpt.model, ckpt.spec.input_shape)
    result = predict(ckpt.model, ds, Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std),
                     batch_size=batch_size, device=device, reporter=run.reporter)
    correct = result.predictions == ds.labels
    classes = ckpt.spec.classes or [str(k) for k in range(ckpt.spec.num_classes)]
    per_class = per_class_accuracy(result.predictions, ds.labels, ckpt.spec.num_classes)
    doc: dict[str, Any] = {
        "checkpoint": ckpt.path,
        "checkpoint_sha256": ckpt.sha256,
        "dataset": ds.fingerprint,
        "samples": len(ds),
        "unit": unit,
        "points": [{
            "name": "plain",
            "accuracy": round(float(correct.double().mean()), 6),
            "cost": 1.0,
            unit: int(in_unit(macs, unit)),
            "throughput": round(len(ds) / result.seconds, 1),
            "speedup": 1.0,
        }],
        "per_class": {name: (None if acc != acc else round(float(acc), 6))
                      for name, acc in zip(classes, per_class, strict=False)},
    }
    if output:
        prov = Provenance(kind="evaluation", checkpoint_sha256=ckpt.sha256, dataset=ds.fingerprint, args=run.args)
        write_yaml(output, {k: v for k, v in doc.items()}, prov)
        if output == STDOUT:  # the YAML is the data on stdout; nothing else goes there
            return
        run.reporter.log(f"wrote {output}")

    def text(d: dict[str, Any]) -> str:
        head = format_fields([("checkpoint", ckpt.label), ("dataset", f"{d['dataset']} ({d['samples']} samples)")])
        points = format_table(["point", "accuracy", "cost", f"{unit}/sample", "samples/s", "speedup"],
                              [[p["name"], p["accuracy"], p["cost"], f"{p[unit]:,}", f"{p['throughput']:.1f}",
                                f"{p['speedup']:.2f}x"] for p in d["points"]])
        per = format_table(["class", "accuracy"], [[k, v] for k, v in d["per_class"].items()])
        return f"{head}\n\n{points}\n\n{per}"

    run.emit(doc, text)
