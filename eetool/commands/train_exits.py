"""eetool train-exits: train exit heads (SDN internal classifiers or BranchyNet branches) on a checkpoint."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from eetool.choices import HEAD_KINDS, SPLITS
from eetool.commands.common import counted, data_path, format_fields, format_table
from eetool.options import (
    TRAINING,
    AugmentOpt,
    CheckpointOpt,
    DataOpt,
    ExitsOpt,
    ForceOpt,
    GlobalBatchOpt,
    IndicesOpt,
    LrOpt,
    OptimizerOpt,
    OutputOpt,
    Run,
    ScheduleOpt,
    SplitOpt,
    WeightDecayOpt,
    eetool_command,
    prefix_completer,
)

HEADS = "Exit heads"


@eetool_command("exit-heads", model_options=True, data_options=True, distributed=True)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    data: DataOpt,
    output: OutputOpt,
    split: SplitOpt = "train",
    indices: IndicesOpt = None,
    exits: ExitsOpt = "every",
    head: Annotated[str, typer.Option("--head", help="sdn (mixed pooling + linear) or branchy (3x3 conv first).",
                                      rich_help_panel=HEADS, autocompletion=prefix_completer(HEAD_KINDS))] = "sdn",
    pool_size: Annotated[int, typer.Option("--pool-size", min=1, help="Spatial size the heads pool to.",
                                           rich_help_panel=HEADS)] = 4,
    means: Annotated[str | None, typer.Option("--means", help="Class-means artifact: concatenate each exit's "
                                              "normalised distances to the class means (thesis 2.3.2).",
                                              rich_help_panel=HEADS)] = None,
    joint: Annotated[bool, typer.Option("--joint/--frozen", help="Train backbone and heads together, or only the "
                                        "heads (the backbone runs without gradients).", rich_help_panel=TRAINING)
                     ] = False,
    exit_weights: Annotated[str | None, typer.Option("--exit-weights", help="Loss weight per exit, "
                                                     "comma-separated, or 'sdn' (0.15, 0.3, ...).",
                                                     rich_help_panel=TRAINING)] = None,
    backbone_output: Annotated[str | None, typer.Option("--backbone-output", help="With --joint: where the "
                                                        "fine-tuned backbone checkpoint goes.")] = None,
    eval_split: Annotated[str | None, typer.Option("--eval-split", help="Report each exit's accuracy on this "
                                                   "split after training.",
                                                   autocompletion=prefix_completer(SPLITS))] = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", min=1, help="Epochs.", rich_help_panel=TRAINING)] = 1,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Train on exactly this many samples "
                                                "(a fixed training budget) instead of --epochs.",
                                                rich_help_panel=TRAINING)] = None,
    batch_size: GlobalBatchOpt = 128,
    optimizer: OptimizerOpt = "adamw",
    lr: LrOpt = 1e-3,
    weight_decay: WeightDecayOpt = 5e-4,
    schedule: ScheduleOpt = "cosine",
    augment: AugmentOpt = True,
    force: ForceOpt = False,
) -> None:
    """Attach heads at the exits of a checkpoint and train them (frozen backbone or jointly). Writes -o."""
    from eetool.artifacts import Provenance, output_set, sha256_file, verify
    from eetool.checkpoint import model_sha256, save_checkpoint
    from eetool.commands.common import load_data, open_checkpoint
    from eetool.datasets import Preprocess, check_labels
    from eetool.e2cm import ClassMeans
    from eetool.errors import UsageError
    from eetool.exit_training import ExitTrainer, exit_accuracies
    from eetool.exits import build_exit_model
    from eetool.heads import ExitHeads, HeadsSpec, parse_weights, save_heads
    from eetool.segmentation.commands import is_segmentation_checkpoint
    from eetool.training import TrainConfig, fit

    if is_segmentation_checkpoint(run, checkpoint):
        from eetool.segmentation.exit_training import ExitTrainingRequest, train_segmentation_exits

        train_segmentation_exits(run, ExitTrainingRequest(
            checkpoint, data, output, split, indices, eval_split, epochs, samples, batch_size, optimizer, lr,
            weight_decay, schedule, force, classification_only={
                "--head": head != "sdn", "--pool-size": pool_size != 4, "--means": means, "--joint": joint,
                "--exit-weights": exit_weights, "--backbone-output": backbone_output, "--exits": exits != "every"}))
        return
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
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, augment=augment, seed=run.seed, samples=samples or 0)
    cfg.validate()  # before any data is loaded
    cfg.check_world(run.world)  # and before the processes meet: rank 0 alone reports it
    ckpt = open_checkpoint(run, checkpoint)
    device = run.torch()
    train_data = load_data(run, data, split, indices, ckpt.spec)
    check_labels(train_data, ckpt.spec.num_classes)
    eval_data = load_data(run, data, eval_split, spec=ckpt.spec) if eval_split else None
    em = build_exit_model(ckpt.model, exits)
    cm = None
    if means:
        cm, means_prov = ClassMeans.load(means)
        verify(means, means_prov, checkpoint=ckpt.identity, exits=list(em.exits))
    shapes = [list(s) for s in em.exit_shapes(ckpt.spec.input_shape)]
    spec = HeadsSpec(head, list(em.exits), shapes, ckpt.spec.num_classes, pool_size, cm is not None,
                     parse_weights(exit_weights, len(em.exits)))
    heads = ExitHeads(spec)
    trainer = ExitTrainer(em, heads, cm, spec.weights, joint=joint)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    run.reporter.log(f"training {head} heads at {len(em.exits)} exits of {ckpt.label} "
                     f"({'jointly' if joint else 'backbone frozen'}) on {train_data.spec}")
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
                save_checkpoint(temps[1], ckpt.model.cpu(), ckpt.spec,
                                Provenance(kind="checkpoint", checkpoint_sha256=ckpt.sha256,
                                           model_sha256=ckpt.model_sha256, dataset=train_data.fingerprint,
                                           args={**run.args, "training": {"samples_seen": result.samples_seen}}))
                backbone_sha, backbone_model_sha = sha256_file(temps[1]), model_sha256(ckpt.spec, ckpt.model)
            prov = Provenance(kind="exit-heads", checkpoint_sha256=backbone_sha, model_sha256=backbone_model_sha,
                              exits=list(em.exits), dataset=train_data.fingerprint,
                              args={**run.args, "training": training},
                              inputs={"class-means": sha256_file(means)} if means else {})
            save_heads(temps[0], heads.cpu(), prov)
    run.reporter.log(f"wrote {output}" + (f" and {backbone_output}" if joint and backbone_output else ""))

    from eetool.costs import measure

    costs = measure(em, ckpt.spec.input_shape)
    head_macs = heads.macs()
    cumulative = costs.backbone_cumulative()
    accs = (exit_accuracies(trainer.to(device), eval_data, preprocess, device=device, world=run.world)
            if eval_data else None)
    rows: list[dict[str, Any]] = [{
        "exit": name, "head_macs": m, "cost_normalised": round((cumulative[j] + m) / costs.model_macs, 6),
        "accuracy": None if accs is None else round(accs[j], 6),
    } for j, (name, m) in enumerate(zip(em.exits, head_macs, strict=True))]
    doc = {"output": output, "head": head, "joint": joint, "with_distances": cm is not None, **training,
           "eval_split": eval_split, "head_accuracy": None if accs is None else round(accs[-1], 6), "exits": rows}

    def text(d: dict[str, Any]) -> str:
        head_rows = [[r["exit"], f"{r['head_macs']:,}", r["cost_normalised"], r["accuracy"]] for r in d["exits"]]
        return format_fields([
            ("exit heads", d["output"]), ("head", d["head"] + (" + E²CM distances" if d["with_distances"] else "")),
            ("training", f"{'joint' if d['joint'] else 'frozen backbone'}, {counted(d['epochs'], 'epoch')}, "
                         f"{d['samples_seen']} samples, {d['seconds']:.1f} s"),
            *([(f"{eval_split} accuracy of the model's head", d["head_accuracy"])] if eval_split else []),
        ]) + "\n\n" + format_table(["exit", "head macs", "cost to exit", f"{eval_split or 'eval'} accuracy"],
                                   head_rows)

    run.emit(doc, text)
