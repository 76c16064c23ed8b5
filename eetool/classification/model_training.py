"""Training a model from scratch, or fine-tuning a checkpoint, into an eetool checkpoint (``eetool train``):
a classifier, or a segmentation network with its exits' losses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eetool.core.reporting import counted, format_fields
from eetool.core.run_inputs import data_path

if TYPE_CHECKING:
    from eetool.core.options import Run


@dataclass(frozen=True)
class TrainRequest:
    data: str
    output: str
    checkpoint: str | None  # None: train from scratch (--arch, default resnet20; eeseg for segmentation data)
    split: str
    indices: str | None
    eval_split: str | None
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    label_smoothing: float
    mixup: float
    augment: bool
    resume: bool
    force: bool


def train_model(run: Run, req: TrainRequest) -> None:
    """Train (or fine-tune) on ``req.data``, write the checkpoint to ``req.output`` and emit what training did."""
    from eetool.core.architectures import SEGMENTATION_ARCHS
    from eetool.core.artifacts import Provenance
    from eetool.core.checkpoint import save_checkpoint
    from eetool.core.datasets import Preprocess, check_labels, require_labels
    from eetool.core.errors import InputError
    from eetool.core.run_inputs import fed_as, fresh_spec, load_data, open_checkpoint
    from eetool.core.training_loop import TrainConfig, fit
    from eetool.segmentation.data import check_masks, is_segmentation
    from eetool.segmentation.exit_losses import exit_losses_step, require_same_task, segmentation_config

    output, eval_split = req.output, req.eval_split
    run.check_output(output, force=req.force or req.resume, inputs=(req.checkpoint, req.indices, data_path(req.data)),
                     binary=True)
    resume_path = f"{output}.resume.pt"
    if req.resume and not Path(resume_path).is_file():  # before any data is loaded
        raise InputError(f"no resumable state at {resume_path}", "run without --resume to start afresh")
    cfg = TrainConfig(epochs=req.epochs, batch_size=req.batch_size, optimizer=req.optimizer, lr=req.lr,
                      momentum=req.momentum, weight_decay=req.weight_decay, schedule=req.schedule,
                      warmup_epochs=req.warmup_epochs, label_smoothing=req.label_smoothing, mixup=req.mixup,
                      augment=req.augment, seed=run.seed)
    cfg.validate()
    cfg.check_world(run.world)  # before the processes meet: rank 0 alone reports it
    device = run.torch()
    ckpt = open_checkpoint(run, req.checkpoint) if req.checkpoint else None
    # folder images are decoded for the model: its recipe, or the one --input-shape, --crop and --resize give
    fed = ckpt.spec if ckpt is not None else fed_as(run)
    train_data = load_data(run, req.data, req.split, req.indices, fed)
    eval_data = load_data(run, req.data, eval_split, spec=fed) if eval_split else None
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
        step = exit_losses_step(req.label_smoothing)
    else:
        if train_data.geometry is not None:
            spec.resize = train_data.geometry.resize  # recorded: later commands decode folder images the same way
        check_labels(train_data, spec.num_classes)
    run.reporter.log(f"training {spec.arch} on {train_data.spec} ({len(train_data)} samples) for "
                     f"{counted(req.epochs, 'epoch')} on {device}")
    run.resume_state = str(resume_path)
    run.resumable = f"the state of every finished epoch goes to {resume_path}: rerun with --resume"
    result = fit(model, train_data, Preprocess(spec.input_shape, spec.mean, spec.std), cfg, device=device,
                 eval_data=eval_data, resume_path=resume_path, resume=req.resume, reporter=run.reporter, step=step,
                 world=run.world)
    training: dict[str, Any] = {
        "samples_seen": result.samples_seen,
        "epochs": req.epochs,
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
