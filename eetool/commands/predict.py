"""eetool predict: classes of new, unlabelled inputs, one record per input on stdout (or -o)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from eetool.core.options import (
    DATA_HELP,
    INPUT,
    BatchOpt,
    CheckpointOpt,
    ForceOpt,
    Run,
    ThresholdsOpt,
    complete_data,
    eetool_command,
)
from eetool.core.run_inputs import data_path, open_checkpoint


class OutputFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    tsv = "tsv"


class OnError(str, Enum):
    skip = "skip"
    stop = "stop"


@eetool_command("prediction", model_options=True, data_options=True, formats=OutputFormat)
def command(
    run: Run,
    checkpoint: CheckpointOpt,
    inputs: Annotated[list[str] | None, typer.Argument(help="Image files, folders of images (recursive, sorted) or "
                                                      "'-' for paths on stdin, one a line.", show_default=False)
                      ] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help=f"Instead of INPUTS: {DATA_HELP} Labels, where "
                                             "it has them, go into the output.", rich_help_panel=INPUT,
                                             autocompletion=complete_data)] = None,
    split: Annotated[str, typer.Option("--split", help="With --data: train or test.", rich_help_panel=INPUT)] = "test",
    means: Annotated[str | None, typer.Option("--means", help="Class-means artifact (with --thresholds).",
                                              rich_help_panel=INPUT)] = None,
    exit_heads: Annotated[str | None, typer.Option("--exit-heads", "--exits-checkpoint", help="Exit-heads artifact "
                                                   "(with --thresholds fitted on it).", rich_help_panel=INPUT)] = None,
    thresholds: ThresholdsOpt = None,
    point: Annotated[int | None, typer.Option("--point", min=0, help="Operating point of --thresholds (its index; "
                                              "may be left out when it holds one).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Also the K most probable classes with their "
                                       "probabilities, at the exit the input left by.")] = 0,
    batch_size: BatchOpt = 64,
    on_error: Annotated[OnError, typer.Option("--on-error", help="An input that cannot be read: skip it (one line "
                                              "on stderr; the run ends with exit 7) or stop there (exit 3), the "
                                              "records already written left complete.")] = OnError.skip,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the records to this file (atomically, "
                                               "when the run ends) instead of stdout.")] = None,
    force: ForceOpt = False,
) -> None:
    """Predict the classes of images (files, folders, '-' for paths on stdin) or of a --data set, with the plain
    model or with early exits at one operating point (--thresholds, --point): one record per input, JSON Lines
    (default), CSV or TSV, written batch by batch; a summary on stderr."""
    import sys

    import torch

    from eetool.classification.early_exit_evaluation import early_exit_setup
    from eetool.classification.prediction import (
        AtomicTextFile,
        InputsFailedError,
        Predictor,
        RecordWriter,
        Tally,
        dataset_batches,
        file_batches,
        list_inputs,
        predict_batches,
    )
    from eetool.core.artifacts import STDOUT
    from eetool.core.datasets import Preprocess, check_labels
    from eetool.core.errors import InputError, ModelMismatchError, UsageError
    from eetool.core.run_inputs import load_data
    from eetool.segmentation.inputs import is_segmentation_checkpoint

    if bool(inputs) == bool(data):
        raise UsageError("predict takes INPUTS or --data, one of the two",
                         "name image files or folders (or '-' for paths on stdin), or give --data NAME[:PATH]")
    if bool(means or exit_heads) != bool(thresholds):
        raise UsageError("early exits need --means and --thresholds (or --exit-heads and --thresholds)",
                         "pass them together, or none for the plain model")
    if point is not None and not thresholds:
        raise UsageError("--point chooses an operating point of --thresholds", "pass --thresholds, or drop --point")
    if output == STDOUT:
        output = None
    if output:
        run.check_output(output, force=force, inputs=(checkpoint, means, exit_heads, thresholds,
                                                      data_path(data) if data else None, *(inputs or [])))
    files = list_inputs(inputs) if inputs else []
    if is_segmentation_checkpoint(run, checkpoint):
        raise ModelMismatchError("predict takes classifiers; this checkpoint is a segmentation network",
                                 "use `eetool evaluate` on segmentation data")
    ckpt = open_checkpoint(run, checkpoint)
    if top_k > ckpt.spec.num_classes:
        raise UsageError(f"--top-k {top_k} is more than the model's {ckpt.spec.num_classes} classes",
                         f"use at most {ckpt.spec.num_classes}")
    device = run.torch()
    ckpt.model.eval().to(device)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    if thresholds:
        em, rule, (cost_model, _), chosen, clusters, _ = early_exit_setup(
            ckpt, means, exit_heads, thresholds, "all" if point is None else str(point), device)
        if point is None and len(chosen) > 1:
            budgets = ", ".join(f"{i}: budget {p['budget']:g}" for i, p in chosen)
            raise UsageError(f"{thresholds} holds {len(chosen)} operating points ({budgets})", "choose one: --point N")
        _, chosen_point = chosen[0]
        predictor = Predictor(ckpt.model, em, rule, list(chosen_point["thresholds"]), top_k)
        costs = cost_model.normalised_exit_costs()
    else:
        predictor, costs, clusters = Predictor(ckpt.model, top_k=top_k), [1.0], False
    # cluster ids (E²CM on clustered means) have no class names
    class_names = None if clusters else (ckpt.spec.classes or [str(k) for k in range(ckpt.spec.num_classes)])
    tally = Tally(predictor.exits, costs)

    def failed(e: InputError) -> None:
        tally.failed += 1
        if on_error == OnError.stop:
            raise e
        sys.stderr.write(f"skipped: {e}\n")  # an error about an input: shown under -q too

    labelled = False
    if data:
        ds = load_data(run, data, split, None, ckpt.spec)
        check_labels(ds, ckpt.spec.num_classes)
        labelled = bool((ds.labels >= 0).any())
        batches = dataset_batches(ds, batch_size)
    else:
        geometry = run.data_options.geometry(ckpt.spec.arch, (ckpt.spec.input_shape[1], ckpt.spec.input_shape[2]),
                                           ckpt.spec.resize)
        batches = file_batches(files, geometry, batch_size, failed)
    target = AtomicTextFile(output) if output else None
    writer = RecordWriter(target.stream if target else sys.stdout, run.format.value, labelled, top_k)
    try:
        with torch.inference_mode():
            predict_batches(batches, predictor, preprocess, device, writer, tally, class_names)
    except InputError as e:
        if target is not None and tally.failed:  # --on-error stop: the records before the bad input stand
            writer.finish()
            target.commit()
        elif target is not None:
            target.discard()
        run.reporter.log(tally.summary())
        raise e from None
    except BaseException:
        if target is not None:
            target.discard()
        raise
    writer.finish()
    if target is not None:
        target.commit()
    run.reporter.log(tally.summary())
    if output:
        run.wrote(output)
    if tally.failed:
        raise InputsFailedError(f"{tally.failed} of {tally.failed + tally.predicted} inputs could not be read "
                                "(each is named above); the others were predicted",
                                "remove or re-encode those files")
