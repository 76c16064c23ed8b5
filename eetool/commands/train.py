"""eetool train: train an architecture from scratch, or fine-tune a checkpoint, into an eetool checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eetool.core.choices import SPLITS
from eetool.core.options import (
    MAX_EPOCHS,
    TRAINING,
    AugmentOpt,
    DataOpt,
    ForceOpt,
    GlobalBatchOpt,
    IndicesOpt,
    LrOpt,
    MomentumOpt,
    OptimizerOpt,
    OutputOpt,
    Run,
    ScheduleOpt,
    SplitOpt,
    WarmupEpochsOpt,
    WeightDecayOpt,
    eetool_command,
    prefix_completer,
)
from eetool.core.reporting import counted, format_fields
from eetool.core.run_inputs import data_path


@eetool_command("train", model_options=True, data_options=True, distributed=True)
def command(
    run: Run,
    data: DataOpt,
    output: OutputOpt,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="Fine-tune this checkpoint (eetool's, "
                                                   "or foreign weights with --arch and friends) instead of training "
                                                   "from scratch.")] = None,
    split: SplitOpt = "train",
    indices: IndicesOpt = None,
    eval_split: Annotated[str | None, typer.Option("--eval-split", help="Report accuracy on this split after "
                                                   "every epoch.", autocompletion=prefix_completer(SPLITS))] = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", min=1, max=MAX_EPOCHS,
                                        help="Epochs.", rich_help_panel=TRAINING)] = 15,
    batch_size: GlobalBatchOpt = 128,
    optimizer: OptimizerOpt = "sgd",
    lr: LrOpt = 0.1,
    momentum: MomentumOpt = 0.9,
    weight_decay: WeightDecayOpt = 5e-4,
    schedule: ScheduleOpt = "cosine",
    warmup_epochs: WarmupEpochsOpt = 1.0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing.",
                                                   rich_help_panel=TRAINING)] = 0.0,
    mixup: Annotated[float, typer.Option("--mixup", help="Mixup alpha (0 = off).", rich_help_panel=TRAINING)] = 0.0,
    augment: AugmentOpt = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.resume.pt, saved after every "
                                         "epoch.")] = False,
    force: ForceOpt = False,
) -> None:
    """Train a model (or fine-tune --checkpoint) and write an eetool checkpoint. Reads a dataset; writes -o."""
    from eetool.core.architectures import SEGMENTATION_ARCHS
    from eetool.core.artifacts import Provenance
    from eetool.core.checkpoint import save_checkpoint
    from eetool.core.datasets import Preprocess, check_labels, require_labels
    from eetool.core.errors import InputError
    from eetool.core.run_inputs import fed_as, fresh_spec, load_data, open_checkpoint
    from eetool.core.training_loop import TrainConfig, fit
    from eetool.segmentation.data import check_masks, is_segmentation
    from eetool.segmentation.exit_losses import exit_losses_step, require_same_task, segmentation_config

    run.check_output(output, force=force or resume, inputs=(checkpoint, indices, data_path(data)), binary=True)
    resume_path = f"{output}.resume.pt"
    if resume and not Path(resume_path).is_file():  # before any data is loaded
        raise InputError(f"no resumable state at {resume_path}", "run without --resume to start afresh")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                      label_smoothing=label_smoothing, mixup=mixup, augment=augment, seed=run.seed)
    cfg.validate()
    cfg.check_world(run.world)  # before the processes meet: rank 0 alone reports it
    device = run.torch()
    ckpt = open_checkpoint(run, checkpoint) if checkpoint else None
    # folder images are decoded for the model: its recipe, or the one --input-shape, --crop and --resize give
    fed = ckpt.spec if ckpt is not None else fed_as(run)
    train_data = load_data(run, data, split, indices, fed)
    eval_data = load_data(run, data, eval_split, spec=fed) if eval_split else None
    segmentation = is_segmentation(train_data)
    for ds in (train_data, eval_data):
        if ds is not None and not segmentation:  # a mask's ignored pixels are not unlabelled samples
            require_labels(ds, "train and evaluate on labelled data")
    parent = ""
    if ckpt is not None:
        model, spec, parent = ckpt.model, ckpt.spec, ckpt.sha256
        if not spec.classes and len(train_data.classes) == spec.num_classes:
            spec.classes = list(train_data.classes)  # foreign weights: name the classes after the data
    else:
        spec = fresh_spec(run, train_data, "eeseg" if segmentation else "resnet20")
        model = spec.build()
    require_same_task(spec.arch in SEGMENTATION_ARCHS, segmentation, spec.arch, train_data.spec)
    step = None
    if segmentation:
        for ds in (train_data, eval_data):
            if ds is not None:
                check_masks(ds, spec)
        cfg = segmentation_config(cfg, run.reporter.log)
        step = exit_losses_step(label_smoothing)
    else:
        if train_data.geometry is not None:
            spec.resize = train_data.geometry.resize  # recorded: later commands decode folder images the same way
        check_labels(train_data, spec.num_classes)
    run.reporter.log(f"training {spec.arch} on {train_data.spec} ({len(train_data)} samples) for "
                     f"{counted(epochs, 'epoch')} on {device}")
    run.resume_state = str(resume_path)
    run.resumable = f"the state of every finished epoch goes to {resume_path}: rerun with --resume"
    result = fit(model, train_data, Preprocess(spec.input_shape, spec.mean, spec.std), cfg, device=device,
                 eval_data=eval_data, resume_path=resume_path, resume=resume, reporter=run.reporter, step=step,
                 world=run.world)
    training: dict[str, Any] = {
        "samples_seen": result.samples_seen,
        "epochs": epochs,
        "train_accuracy": round(result.last.train_accuracy, 6),
        "eval_accuracy": None if result.last.eval_accuracy is None else round(result.last.eval_accuracy, 6),
        "eval_split": eval_split,
        "seconds": round(result.seconds, 1),
        "processes": run.world.size,  # --batch-size is the global batch, shared out among them
    }
    prov = Provenance(kind="checkpoint", checkpoint_sha256=parent, dataset=train_data.fingerprint,
                      args={**run.args, "training": training})
    if run.world.main:  # under torchrun every rank holds the same weights; rank 0 writes them
        save_checkpoint(output, model.cpu(), spec, prov)
        Path(resume_path).unlink(missing_ok=True)
        run.wrote(output)
    doc = {"output": output, "arch": spec.arch, **training,
           "history": [vars(r) for r in result.history]}
    run.emit(doc, lambda d: format_fields([
        ("output", d["output"]), ("arch", d["arch"]), ("epochs", d["epochs"]), ("samples seen", d["samples_seen"]),
        ("train accuracy", d["train_accuracy"]),
        *([(f"{eval_split} accuracy", d["eval_accuracy"])] if eval_split else []),
        ("seconds", f"{d['seconds']:.1f}"),
    ]))

