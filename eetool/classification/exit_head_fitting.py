"""Exit heads (SDN internal classifiers or BranchyNet branches) trained on a classifier's exits, its backbone
frozen or trained jointly (optionally with the final exit teaching the early ones), or a new network trained from
scratch with its heads; the exit-heads artifact (and the trained backbone) written."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from eetool.core.errors import UsageError
from eetool.core.options import Run
from eetool.core.reporting import counted, format_fields, format_table
from eetool.core.run_inputs import data_path

if TYPE_CHECKING:
    from eetool.core.checkpoint import Checkpoint
    from eetool.core.datasets import Dataset


@dataclass(frozen=True, kw_only=True)
class ExitHeadsRequest:
    checkpoint: str | None  # None: a new backbone, built from --arch (--from-scratch)
    from_scratch: bool = False
    data: str
    output: str
    split: str
    indices: str | None
    # the options that apply to classifiers alone, with their defaults (a segmentation checkpoint refuses others)
    exits: str = "every"
    head: str = "sdn"
    pool_size: int = 4
    means: str | None = None
    joint: bool = False
    exit_weights: str | None = None
    backbone_output: str | None = None
    distill: float = 0.0
    distill_temperature: float = 3.0
    eval_split: str | None
    epochs: int
    samples: int | None
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    augment: bool
    force: bool


CLASSIFIER_ONLY = ("head", "pool_size", "means", "joint", "exit_weights", "backbone_output", "exits", "distill",
                   "distill_temperature")  # in the order a segmentation checkpoint's refusal names them


def train_exits(run: Run, req: ExitHeadsRequest) -> None:
    """Exit heads for ``req.checkpoint``: a classifier's (fit_exit_heads), or a segmentation network's three
    pixel heads, which take none of the classifier's options."""
    from eetool.segmentation.inputs import is_segmentation_checkpoint

    check_backbone_source(req.checkpoint, req.from_scratch, req.joint, req.backbone_output)
    if req.checkpoint is None or not is_segmentation_checkpoint(run, req.checkpoint):
        fit_exit_heads(run, req)
        return
    from eetool.segmentation.pixel_head_training import ExitTrainingRequest, train_segmentation_exits

    defaults = {f.name: f.default for f in fields(ExitHeadsRequest)}
    train_segmentation_exits(run, ExitTrainingRequest(
        req.checkpoint, req.data, req.output, req.split, req.indices, req.eval_split, req.epochs, req.samples,
        req.batch_size, req.optimizer, req.lr, req.weight_decay, req.schedule, req.force, req.momentum,
        req.warmup_epochs, classification_only={
            f"--{name.replace('_', '-')}": _given(getattr(req, name), defaults[name]) for name in CLASSIFIER_ONLY}))


def _given(value: Any, default: Any) -> bool:
    """Whether an option differs from its default (an empty file name counts as not given)."""
    return value != default and (default is not None or bool(value))


def check_backbone_source(checkpoint: str | None, from_scratch: bool, joint: bool, backbone_output: str | None
                          ) -> None:
    """Either --checkpoint, or --from-scratch with what training a new backbone needs."""
    if from_scratch:
        if checkpoint is not None:
            raise UsageError("--from-scratch builds a new backbone, and --checkpoint names one to start from",
                             "drop --checkpoint to train from scratch, or --from-scratch to start from it")
        if not joint:
            raise UsageError("--from-scratch trains the backbone with its heads, so it needs --joint",
                             "add --joint")
        if not backbone_output:
            raise UsageError("--from-scratch needs --backbone-output FILE for the trained backbone",
                             "name a file for it, e.g. --backbone-output model.safetensors")
    elif checkpoint is None:
        raise UsageError("train-exits needs --checkpoint (or --from-scratch with --arch)",
                         "give the checkpoint whose exits get heads, e.g. --checkpoint demo")


def fit_exit_heads(run: Run, req: ExitHeadsRequest) -> None:
    checkpoint, data, output, split, indices = req.checkpoint, req.data, req.output, req.split, req.indices
    exits, head, pool_size, means, joint = req.exits, req.head, req.pool_size, req.means, req.joint
    exit_weights, backbone_output, eval_split = req.exit_weights, req.backbone_output, req.eval_split
    epochs, samples, batch_size, optimizer, lr = req.epochs, req.samples, req.batch_size, req.optimizer, req.lr
    weight_decay, schedule, augment, force = req.weight_decay, req.schedule, req.augment, req.force
    from eetool.classification.e2cm import ClassMeans
    from eetool.classification.exit_heads import ExitHeads, ExitHeadsArtifact, HeadsSpec, parse_weights
    from eetool.classification.head_training import ExitTrainer, exit_accuracies
    from eetool.classification.self_distillation import check_distillation
    from eetool.core.artifacts import Provenance, output_set, sha256_file
    from eetool.core.checkpoint import model_sha256, save_checkpoint
    from eetool.core.datasets import Preprocess, check_labels
    from eetool.core.exits import build_exit_model
    from eetool.core.run_inputs import load_data, open_checkpoint
    from eetool.core.training_loop import TrainConfig, fit

    from_scratch = checkpoint is None
    if req.distill and not joint:
        raise UsageError("--distill needs --joint: the final exit teaches the early ones while they train together",
                         "add --joint, or drop --distill")
    check_distillation(req.distill, req.distill_temperature)
    if from_scratch and means:
        raise UsageError("--means are class means of a trained checkpoint, and --from-scratch trains a new one",
                         "drop --means, or train from that checkpoint with --checkpoint")
    if joint and not backbone_output:
        raise UsageError("--joint changes the backbone, so it needs --backbone-output FILE",
                         "name a file for the fine-tuned checkpoint, or train with --frozen")
    if backbone_output and not joint:
        raise UsageError("--backbone-output is only written with --joint", "drop it, or add --joint")
    inputs = (checkpoint, indices, data_path(data), means)
    run.check_output(output, force=force, inputs=inputs, binary=True)
    if backbone_output:
        if backbone_output == output:
            raise UsageError("-o and --backbone-output name the same file", "give each its own name")
        run.check_output(backbone_output, force=force, inputs=(*inputs, output), flag="--backbone-output",
                         binary=True)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=req.momentum,
                      weight_decay=weight_decay, schedule=schedule, warmup_epochs=req.warmup_epochs, augment=augment,
                      seed=run.seed, samples=samples or 0)
    cfg.validate()  # before any data is loaded
    cfg.check_world(run.world)  # and before the processes meet: rank 0 alone reports it
    # run.torch() applies --seed: before a new backbone's random weights are drawn, and after a checkpoint is
    # built (building draws weights its file then replaces), so that the heads' weights are the seed's first draws
    if checkpoint is None:
        device = run.torch()
        ckpt, train_data = _new_backbone(run, data, split, indices)
    else:
        ckpt = open_checkpoint(run, checkpoint)
        device = run.torch()
        train_data = load_data(run, data, split, indices, ckpt.spec)
    check_labels(train_data, ckpt.spec.num_classes)
    eval_data = load_data(run, data, eval_split, spec=ckpt.spec) if eval_split else None
    em = build_exit_model(ckpt.model, exits)
    cm = None
    if means:
        cm = ClassMeans.load(means)
        cm.verify(checkpoint=ckpt.identity, exits=list(em.exits))
    shapes = [list(s) for s in em.exit_shapes(ckpt.spec.input_shape)]
    spec = HeadsSpec(head, list(em.exits), shapes, ckpt.spec.num_classes, pool_size, cm is not None,
                     parse_weights(exit_weights, len(em.exits)))
    heads = ExitHeads(spec)
    trainer = ExitTrainer(em, heads, cm, spec.weights, joint=joint, distill=req.distill,
                          temperature=req.distill_temperature)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    how = "jointly" if joint else "backbone frozen"
    if req.distill:
        how += f", the final exit teaching with weight {req.distill:g} at temperature {req.distill_temperature:g}"
    backbone = f"a new {ckpt.spec.arch}" if from_scratch else ckpt.label
    run.reporter.log(f"training {head} heads at {len(em.exits)} exits of {backbone} ({how}) on {train_data.spec}")
    result = fit(trainer, train_data, preprocess, cfg, device=device, params=trainer.trainable_parameters(),
                 step=trainer.step, resume_path=None, reporter=run.reporter, world=run.world)
    training = {"samples_seen": result.samples_seen, "epochs": len(result.history), "seconds": round(result.seconds, 1),
                "loss": round(result.last.loss, 6),
                "processes": run.world.size}  # --batch-size is the global batch, shared out among them
    # The heads name the backbone they were trained with: with --joint both files appear together or neither.
    # Under torchrun every rank holds the same weights; rank 0 writes them.
    if run.world.main:
        with output_set([output, *([backbone_output] if joint and backbone_output else [])]) as temps:
            backbone_sha, backbone_model_sha = ckpt.sha256, ckpt.model_sha256
            if joint and backbone_output:
                # a new backbone has no parent: its provenance records the whole training, as `train`'s does
                backbone_training = training if from_scratch else {"samples_seen": result.samples_seen}
                save_checkpoint(temps[1], ckpt.model.cpu(), ckpt.spec,
                                Provenance(kind="checkpoint", checkpoint_sha256=ckpt.sha256,
                                           model_sha256=ckpt.model_sha256, dataset=train_data.fingerprint,
                                           args={**run.args, "training": backbone_training}))
                backbone_sha, backbone_model_sha = sha256_file(temps[1]), model_sha256(ckpt.spec, ckpt.model)
            prov = Provenance(kind="exit-heads", checkpoint_sha256=backbone_sha, model_sha256=backbone_model_sha,
                              exits=list(em.exits), dataset=train_data.fingerprint,
                              args={**run.args, "training": training},
                              inputs={"class-means": sha256_file(means)} if means else {})
            ExitHeadsArtifact(heads.cpu(), prov, output).save(temps[0])
    run.wrote(output, *([backbone_output] if joint and backbone_output else []))

    from eetool.core.costs import measure

    costs = measure(em, ckpt.spec.input_shape)
    head_macs = heads.macs()
    cumulative = costs.backbone_cumulative()
    accs = (exit_accuracies(trainer.to(device), eval_data, preprocess, device=device, world=run.world)
            if eval_data else None)
    rows: list[dict[str, Any]] = [{
        "exit": name, "head_macs": m, "cost_normalised": round((cumulative[j] + m) / costs.model_macs, 6),
        "accuracy": None if accs is None else round(accs[j], 6),
    } for j, (name, m) in enumerate(zip(em.exits, head_macs, strict=True))]
    doc = {"output": output, "head": head, "joint": joint, "from_scratch": from_scratch,
           "with_distances": cm is not None, **training,
           "distill": req.distill, "distill_temperature": req.distill_temperature if req.distill else None,
           "eval_split": eval_split, "head_accuracy": None if accs is None else round(accs[-1], 6), "exits": rows}

    def text(d: dict[str, Any]) -> str:
        head_rows = [[r["exit"], f"{r['head_macs']:,}", r["cost_normalised"], r["accuracy"]] for r in d["exits"]]
        return format_fields([
            ("exit heads", d["output"]), ("head", d["head"] + (" + E²CM distances" if d["with_distances"] else "")),
            ("training", f"{'joint' if d['joint'] else 'frozen backbone'}"
                         f"{' from scratch' if d['from_scratch'] else ''}, {counted(d['epochs'], 'epoch')}, "
                         f"{d['samples_seen']} samples, {d['seconds']:.1f} s"),
            *([("self-distillation", f"weight {d['distill']:g}, temperature {d['distill_temperature']:g}")]
              if d["distill"] else []),
            *([(f"{eval_split} accuracy of the model's head", d["head_accuracy"])] if eval_split else []),
        ]) + "\n\n" + format_table(["exit", "head macs", "cost to exit", f"{eval_split or 'eval'} accuracy"],
                                   head_rows)

    run.emit(doc, text)


def _new_backbone(run: Run, data: str, split: str, indices: str | None) -> tuple[Checkpoint, Dataset]:
    """--from-scratch: the model --arch and --arch-args describe (default resnet20), fed as the training data is,
    with the random weights --seed gives; and that data. It has no file yet, so no sha256."""
    from eetool.core.architectures import SEGMENTATION_ARCHS
    from eetool.core.checkpoint import Checkpoint
    from eetool.core.datasets import require_labels
    from eetool.core.run_inputs import fed_as, fresh_spec, load_data

    arch = run.model_options.arch or "resnet20"
    if arch in SEGMENTATION_ARCHS:
        raise UsageError(f"--from-scratch trains a classifier with exit heads, and {arch} is a segmentation network",
                         f"train {arch} with `eetool train`, whose loss covers its per-pixel exits")
    train_data = load_data(run, data, split, indices, fed_as(run))
    require_labels(train_data, "train on labelled data")
    spec = fresh_spec(run, train_data, "resnet20")
    if train_data.geometry is not None:
        spec.resize = train_data.geometry.resize  # recorded: later commands decode folder images the same way
    model = spec.build()
    return Checkpoint(path="", sha256="", spec=spec, model=model), train_data
