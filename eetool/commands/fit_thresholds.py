"""eetool fit-thresholds: E²CM exit thresholds that meet compute budgets, and the convex hull of a sweep."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from eetool.commands.common import data_path, format_fields, format_table
from eetool.options import (
    BatchOpt,
    ForceOpt,
    IndicesOpt,
    MeansOpt,
    OutputOpt,
    Run,
    eetool_command,
)

SEARCH = "Search"


@eetool_command("thresholds")
def command(
    run: Run,
    means: MeansOpt,
    output: OutputOpt,
    budget: Annotated[list[float] | None, typer.Option("--budget", help="Target mean cost, normalised to the whole "
                                                       "model (repeat for several).", rich_help_panel=SEARCH)] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Fit every budget from 0 to 1 in steps of --step and keep "
                                        "the convex hull.", rich_help_panel=SEARCH)] = False,
    step: Annotated[float, typer.Option("--step", min=1e-6, max=1.0, help="Budget granularity of --sweep.",
                                        rich_help_panel=SEARCH)] = 0.001,
    search: Annotated[str, typer.Option("--search", help="greedy (one walk for all budgets) or bisect (the "
                                        "thesis's per-component binary search).", rich_help_panel=SEARCH)] = "greedy",
    validation: Annotated[bool, typer.Option("--validation", help="Fit on --data/--split (a held-out set) instead "
                                             "of the calibration samples.")] = False,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", "-c", help="Checkpoint (with --validation).")
                          ] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Held-out dataset (with --validation).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the held-out dataset.")] = "train",
    indices: IndicesOpt = None,
    batch_size: BatchOpt = 256,
    force: ForceOpt = False,
) -> None:
    """Find per-exit thresholds for budgets (--budget, or --sweep with its convex hull). Writes -o (YAML)."""
    from eetool.artifacts import STDOUT, Provenance, sha256_file, write_yaml
    from eetool.e2cm import ClassMeans
    from eetool.errors import UsageError
    from eetool.thresholds import check_budget, hull
    from eetool.thresholds import sweep as sweep_budgets

    if not budget and not sweep:
        raise UsageError("no budget asked for", "pass --budget 0.5 (repeatable) or --sweep")
    run.check_output(output, force=force, inputs=(means, checkpoint, indices, data_path(data) if data else None))
    cm, means_prov = ClassMeans.load(means)
    dataset = means_prov.dataset
    if validation:
        stats, dataset = _validation_stats(run, means, cm, means_prov, checkpoint, data, split, indices, batch_size)
    else:
        if checkpoint or data:
            raise UsageError("--checkpoint/--data are only used with --validation", "add --validation or drop them")
        if cm.calibration is None:
            raise UsageError(f"{means} holds no calibration cache", "re-make it with `eetool calibrate-means`")
        c = cm.calibration
        stats = cm.exit_stats(c.confidence, c.prediction, c.final_prediction, c.labels)
    asked = sorted(set(budget or []))
    for b in asked:
        check_budget(stats, b)
    if sweep:
        grid = [round(i * step, 10) for i in range(int(round(1 / step)) + 1)]
        swept = sweep_budgets(stats, grid, search, seed=run.seed)
        points = hull(swept)
        if asked:
            points = sorted(points + sweep_budgets(stats, asked, search, seed=run.seed), key=lambda p: p.cost)
    else:
        swept = []
        points = sweep_budgets(stats, asked, search, seed=run.seed)
    low, high = stats.reachable()
    doc: dict[str, Any] = {
        "search": search,
        "fitted_on": dataset,
        "reachable": [round(low, 6), round(min(high, 1.0), 6)],
        "swept": len(swept),
        # Thresholds are written unrounded: each lies one float32 step below a calibration confidence, and
        # any rounding could let that sample (or another) through differently from the fitted point.
        "points": [{"budget": round(p.budget, 6), "cost": round(p.cost, 6), "accuracy": round(p.accuracy, 6),
                    "thresholds": list(p.thresholds)} for p in points],
    }
    prov = Provenance(kind="thresholds", checkpoint_sha256=means_prov.checkpoint_sha256, exits=list(cm.exits),
                      dataset=dataset, args=run.args, inputs={"class-means": sha256_file(means)})
    write_yaml(output, doc, prov)
    if output == STDOUT:
        return
    run.reporter.log(f"wrote {output}")

    def text(d: dict[str, Any]) -> str:
        head = format_fields([("thresholds", output), ("search", d["search"]), ("fitted on", d["fitted_on"]),
                              ("reachable", f"{d['reachable'][0]:.4f} to {d['reachable'][1]:.4f}")]
                             + ([("swept", f"{d['swept']} budgets, {len(d['points'])} on the convex hull")]
                                if d["swept"] else []))
        table = format_table(["budget", "cost", "accuracy"],
                             [[p["budget"], p["cost"], p["accuracy"]] for p in d["points"]])
        return f"{head}\n\n{table}"

    run.emit(doc, text)


def _validation_stats(run: Run, means: str, cm: Any, means_prov: Any, checkpoint: str | None, data: str | None,
                      split: str, indices: str | None, batch_size: int) -> tuple[Any, str]:
    from eetool.artifacts import verify
    from eetool.commands.common import open_checkpoint
    from eetool.datasets import Preprocess, check_labels, load_dataset
    from eetool.e2cm import exit_scores
    from eetool.errors import UsageError
    from eetool.exits import build_exit_model

    if not checkpoint or not data:
        raise UsageError("--validation needs --checkpoint and --data", "name the model and the held-out data")
    ckpt = open_checkpoint(checkpoint)
    verify(means, means_prov, checkpoint_sha256=ckpt.sha256)
    device = run.torch()
    ds = load_dataset(data, split, indices)
    check_labels(ds, ckpt.spec.num_classes)
    if ds.fingerprint == means_prov.dataset:
        run.reporter.warn("the validation data is the calibration data; thresholds are not held out")
    em = build_exit_model(ckpt.model.to(device), ",".join(cm.exits))
    conf, pred, final = exit_scores(em, ds, Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std), cm,
                                    batch_size=batch_size, device=device, reporter=run.reporter)
    return cm.exit_stats(conf, pred, final, ds.labels), ds.fingerprint
