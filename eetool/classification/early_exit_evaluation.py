"""`evaluate` on a classifier: accuracy, per-class accuracy, cost and measured throughput of the plain network
and of its early exits at a thresholds file's operating points, beside ``--compare`` peers and a
``--baseline``, all timed in the same interleaved rounds.

Method: docs/e2cm.md#beside-the-network-you-would-pick-instead
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from eetool.core.options import Run
from eetool.core.reporting import format_fields, format_table
from eetool.core.run_inputs import data_path, open_checkpoint

if TYPE_CHECKING:
    import torch

    from eetool.classification.e2cm import MeansRule
    from eetool.classification.rules import HeadsRule
    from eetool.classification.thresholds_artifact import ExitThresholds, OperatingPoint
    from eetool.core.checkpoint import Checkpoint
    from eetool.core.costs import CostModel
    from eetool.core.exits import ExitModel


@dataclass
class ClassifierEvaluation:
    checkpoint: str
    data: str
    split: str
    indices: str | None
    batch_size: int
    unit: str
    output: str | None
    force: bool
    means: str | None
    thresholds: str | None
    exit_heads: str | None
    point: str
    plot: str | None
    repeats: int
    baseline: str | None
    compare: list[str] = field(default_factory=list)
    fold_batch_norm: bool = True


def evaluate_classifier(run: Run, req: ClassifierEvaluation) -> None:
    import torch

    from eetool.classification.rules import Thresholded
    from eetool.core.artifacts import STDOUT, Provenance, write_yaml
    from eetool.core.costs import count_macs, effective_macs, in_unit, is_pruned
    from eetool.core.datasets import Preprocess, check_labels, require_labels
    from eetool.core.errors import UsageError
    from eetool.core.inference import (
        BUSY_SPREAD,
        evaluate_exits,
        interleaved,
        per_class_accuracy,
        predict,
        speeds,
        timing_spread,
    )
    from eetool.core.run_inputs import load_data
    from eetool.segmentation.data import is_segmentation
    from eetool.segmentation.exit_losses import require_same_task

    checkpoint, data, split, indices, batch_size = req.checkpoint, req.data, req.split, req.indices, req.batch_size
    unit, output, force, means, thresholds = req.unit, req.output, req.force, req.means, req.thresholds
    exit_heads, point, plot, repeats, baseline = req.exit_heads, req.point, req.plot, req.repeats, req.baseline
    if bool(means or exit_heads) != bool(thresholds):
        raise UsageError("early exits need --means and --thresholds (or --exit-heads and --thresholds)",
                         "pass them together, or none for the plain model")
    inputs = (checkpoint, indices, data_path(data), means, thresholds, exit_heads, baseline, *req.compare)
    if output:
        run.check_output(output, force=force, inputs=inputs)
    if plot:
        if plot == STDOUT:
            raise UsageError("--plot - would put a PNG among the data on stdout", "give the plot a file name")
        run.check_output(plot, force=force, inputs=inputs)
    ckpt = open_checkpoint(run, checkpoint)
    compared = [_open_peer(run, path, "--compare", ckpt, checkpoint) for path in req.compare]
    base = _open_peer(run, baseline, "--baseline", ckpt, checkpoint) if baseline else None
    for path, peer in zip(req.compare, compared, strict=True):
        if peer.sha256 == ckpt.sha256:
            run.reporter.warn(f"--compare {path} is the checkpoint being evaluated: its row repeats the plain model's")
    # the peers run after the plain model and the operating points in every round, the baseline last
    peers = [*compared, *([base] if base else [])]
    device = run.torch()
    ds = load_data(run, data, split, indices, ckpt.spec)
    require_same_task(False, is_segmentation(ds), ckpt.spec.arch, ds.spec)
    check_labels(ds, ckpt.spec.num_classes)
    require_labels(ds, "evaluate on a labelled dataset")
    macs = count_macs(ckpt.model, ckpt.spec.input_shape)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    early = early_exit_setup(ckpt, means, exit_heads, thresholds, point, device) if thresholds else None
    # A pruned network (eetool prune-weights) is reported at its dense and its effective cost; its zeros do not
    # make dense kernels faster, so the measured throughput is that of the dense computation.
    pruned = is_pruned(ckpt.model) or (early is not None and early.cost_models[1].basis == "effective")
    sparse_macs = effective_macs(ckpt.model, ckpt.spec.input_shape, macs) if pruned else macs
    whole, local = _shards(run, ds, batch_size)
    # The networks the passes run (costs are counted on the checkpoints as saved): every one folded, or none,
    # so that the plain model, the operating points and the peers are timed alike.
    model, peer_models = ckpt.model, [p.model for p in peers]
    if req.fold_batch_norm:
        from eetool.core.batch_norm_folding import fold_batch_norm, folded_exit_model

        model, peer_models = fold_batch_norm(ckpt.model), [fold_batch_norm(m) for m in peer_models]
        if early is not None:
            early = early._replace(exit_model=folded_exit_model(early.exit_model))
    # warm up (allocator, kernels) so the timed runs compare like with like
    warm_up = local.subset(torch.arange(min(len(local), batch_size)))
    predict(model, warm_up, preprocess, batch_size=batch_size, device=device)
    peer_preprocess = [Preprocess(p.spec.input_shape, p.spec.mean, p.spec.std) for p in peers]
    for peer_model, peer_pre in zip(peer_models, peer_preprocess, strict=True):
        predict(peer_model, warm_up, peer_pre, batch_size=batch_size, device=device)
    chosen = early.chosen if early is not None else []

    def model_run(model: Any, pre: Any) -> Any:
        return lambda: whole(predict(model, local, pre, batch_size=batch_size, device=device, reporter=run.reporter))

    def point_run(thresholds: list[float]) -> Any:
        assert early is not None
        return lambda: whole(evaluate_exits(early.exit_model, local, preprocess, Thresholded(early.rule, thresholds),
                                            batch_size=batch_size, device=device, reporter=run.reporter))

    # Interleaved rounds: a machine that gets busier (or idler) mid-way slows every run of a round alike. The
    # runs are deterministic, so the first round's predictions are every round's.
    own = 1 + len(chosen)  # the plain model and the operating points
    runs = [model_run(model, preprocess), *(point_run(p["thresholds"]) for _, p in chosen),
            *(model_run(m, pre) for m, pre in zip(peer_models, peer_preprocess, strict=True))]
    # Early exits compact batches to sizes of their own, whose kernels are set up on first use: one untimed pass
    # of every operating point first, or the first timed round would be the slowest by 20-40% on an idle machine.
    for point_pass in runs[1:own]:
        point_pass()
    rounds = interleaved(runs, repeats)
    seconds = [[r.seconds for r in results] for results in rounds]
    # Against the plain model: its own operating points and the compared networks.
    timing = speeds([s[:own + len(compared)] for s in seconds], len(ds))
    # Against the baseline: the same rounds with the baseline's time as each round's reference.
    against = speeds([[s[-1], *s[:-1]] for s in seconds], len(ds)) if base else []
    # The warning is about the speed-ups: the plain model alone has none to mislead.
    spread = timing_spread(against) if base else timing_spread(timing) if len(timing) > 1 else 1.0
    if spread > BUSY_SPREAD:
        run.reporter.warn(f"timings varied by a factor {spread:.2f} across the {repeats} rounds: the machine was busy "
                          "and the speed-ups are unreliable; rerun on an idle machine or with more --repeats")
    result = rounds[0][0]
    base_result = rounds[0][-1]
    clusters = early is not None and early.clusters

    def labelled(predictions: torch.Tensor) -> torch.Tensor:
        """Cluster ids under their best one-to-one matching to the labels (clustering accuracy), else as they are."""
        if not clusters:
            return predictions
        from eetool.classification.clustering import best_mapping

        return best_mapping(predictions, ds.labels, ckpt.spec.num_classes)[predictions]

    plain_predictions = labelled(result.predictions)
    correct = plain_predictions == ds.labels
    classes = ckpt.spec.classes or [str(k) for k in range(ckpt.spec.num_classes)]
    per_class = per_class_accuracy(plain_predictions, ds.labels, ckpt.spec.num_classes)
    doc: dict[str, Any] = {
        "checkpoint": ckpt.path,
        "checkpoint_sha256": ckpt.sha256,
        "dataset": ds.fingerprint,
        "samples": len(ds),
        "unit": unit,
        "repeats": repeats,
        "accuracy_kind": "clustering (Hungarian matching)" if clusters else "classification",
        "cost_basis": "effective" if pruned else "dense",
        **({"speed_note": SPEED_NOTE} if pruned else {}),
        "points": [{
            "name": "plain",
            "accuracy": round(float(correct.double().mean()), 6),
            "cost": 1.0,
            unit: int(in_unit(macs, unit)),
            "effective_cost": round(sparse_macs / macs, 6),
            f"effective_{unit}": int(in_unit(sparse_macs, unit)),
            **_speed_fields(timing[0]),
        }],
        "per_class": {"plain": _per_class_dict(classes, per_class)},
    }
    if early is not None:
        em, _, (cost_model, sparse_cost_model), _, _, fitted = early
        doc.update(fitted.fitted_basis())
        for (index, p), r, speed in zip(chosen, rounds[0][1:own], timing[1:own], strict=True):
            counts = torch.bincount(r.exit_index, minlength=len(em.exits) + 1)
            cost = cost_model.average(counts)
            sparse_cost = sparse_cost_model.average(counts)
            predictions = labelled(r.predictions)
            name = f"{index}: budget {p['budget']:g}"
            doc["points"].append({
                "name": name,
                "budget": p["budget"],
                "accuracy": round(float((predictions == ds.labels).double().mean()), 6),
                "cost": round(cost, 6),
                unit: int(in_unit(cost * macs, unit)),
                "effective_cost": round(sparse_cost, 6),
                f"effective_{unit}": int(in_unit(sparse_cost * macs, unit)),
                **_speed_fields(speed),
                "exit_shares": {e: round(int(c) / len(ds), 6)
                                for e, c in zip([*em.exits, "head"], counts.tolist(), strict=True)},
            })
            doc["per_class"][name] = _per_class_dict(
                classes, per_class_accuracy(predictions, ds.labels, ckpt.spec.num_classes))
    if compared:
        doc["compared"] = [_compared_fields(peer, r, speed, macs, unit, ds.labels, name)
                           for peer, r, speed, name in zip(compared, rounds[0][own:own + len(compared)], timing[own:],
                                                           _peer_names(req.compare, compared), strict=True)]
    if base is not None:
        base_macs = count_macs(base.model, base.spec.input_shape)
        doc["baseline"] = {
            "checkpoint": base.path,
            "checkpoint_sha256": base.sha256,
            "accuracy": round(float((base_result.predictions == ds.labels).double().mean()), 6),
            unit: int(in_unit(base_macs, unit)),
            "throughput": round(against[0].throughput, 1),
            "seconds": [round(t, 4) for t in against[0].seconds],
        }
        for p, speed in zip([*doc["points"], *doc.get("compared", [])], against[1:], strict=True):
            # Dense MACs on both sides: the time is the dense computation's (zero weights included).
            macs_ratio = base_macs / (p["cost"] * macs)
            p.update({"speedup_vs_baseline": round(speed.speedup, 3),
                      "speedup_vs_baseline_min": round(speed.speedup_min, 3),
                      "speedup_vs_baseline_max": round(speed.speedup_max, 3),
                      "macs_ratio": round(macs_ratio, 4),
                      "speedup_per_macs_ratio": round(speed.speedup / macs_ratio, 3)})
    if not run.world.main:  # under torchrun rank 0 writes and prints
        return
    if plot:
        from eetool.core.plotting import accuracy_cost_png

        accuracy_cost_png(plot, doc["points"], f"{ckpt.spec.arch} on {ds.spec} ({len(ds)} samples)",
                          doc.get("compared", []))
        run.wrote(plot)
    if output:
        prov = Provenance(kind="evaluation", checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256,
                          dataset=ds.fingerprint, args=run.args)
        write_yaml(output, {k: v for k, v in doc.items()}, prov)
        if output == STDOUT:  # the YAML is the data on stdout; nothing else goes there
            return
        run.wrote(output)

    def text(d: dict[str, Any]) -> str:
        sparse = d["cost_basis"] == "effective"
        b = d.get("baseline")
        head = format_fields([("checkpoint", ckpt.label), ("dataset", f"{d['dataset']} ({d['samples']} samples)"),
                              *([("pruned", d["speed_note"])] if sparse else []),
                              *([("budgets", _wall_time_text(d["thresholds_wall_time"]))]
                                if d.get("thresholds_cost_basis") == "wall-time" else []),
                              *([("baseline", f"{base.label if base else ''}: accuracy {b['accuracy']:.4f}, "
                                              f"{b[unit]:,} {unit}/sample, {b['throughput']:.1f} samples/s")]
                                if b else [])])
        points = format_table(["point", "accuracy", "cost", f"{unit}/sample",
                               *(["effective cost", f"effective {unit}"] if sparse else []), "samples/s", "speedup",
                               *(["vs baseline", f"{unit} ratio", "speed-up / ratio"] if b else [])],
                              [[p["name"], p["accuracy"], p["cost"], f"{p[unit]:,}",
                                *([p["effective_cost"], f"{p[f'effective_{unit}']:,}"] if sparse else []),
                                f"{p['throughput']:.1f}", _speedup_text(p, d["repeats"]),
                                *([_against_text(p, d["repeats"]), f"{p['macs_ratio']:.2f}",
                                   f"{p['speedup_per_macs_ratio']:.2f}"] if b else [])]
                               for p in [*d["points"], *({**c, "name": f"compared: {c['name']}"}
                                                         for c in d.get("compared", []))]])
        early = [p for p in d["points"] if "exit_shares" in p]
        shares = ("\n\n" + format_table(["share leaving at", *(p["name"].split(":")[0] for p in early)],
                                          [[e, *(p["exit_shares"][e] for p in early)] for e in early[0]["exit_shares"]])
                  if early else "")
        names = list(d["per_class"])
        per = format_table(["class", *(n.split(":")[0] for n in names)],
                           [[c, *(d["per_class"][n][c] for n in names)] for c in classes])
        return f"{head}\n\n{points}{shares}\n\n{per}"

    run.emit(doc, text)


def _open_peer(run: Run, path: str, flag: str, ckpt: Any, checkpoint: str) -> Any:
    """Another checkpoint to time beside ``ckpt`` (--compare, --baseline): a classifier of the same inputs and
    classes, so that it runs on the same data."""
    from eetool.core.architectures import SEGMENTATION_ARCHS
    from eetool.core.errors import ModelMismatchError

    peer = open_checkpoint(run, path)
    if peer.spec.arch in SEGMENTATION_ARCHS:
        raise ModelMismatchError(f"{flag} {path} is a segmentation network ({peer.spec.arch}) and {checkpoint} a "
                                 "classifier: they cannot be timed on the same data",
                                 f"give {flag} a classifier made for the same data")
    if (peer.spec.input_shape, peer.spec.num_classes) != (ckpt.spec.input_shape, ckpt.spec.num_classes):
        hint = ("give a baseline made for the same data (the checkpoint it was pruned from)" if flag == "--baseline"
                else "compare networks made for the same data (its input shape and classes)")
        raise ModelMismatchError(f"{flag} {path} takes inputs of shape {list(peer.spec.input_shape)} into "
                                 f"{peer.spec.num_classes} classes, {checkpoint} {list(ckpt.spec.input_shape)} into "
                                 f"{ckpt.spec.num_classes}: they cannot be timed on the same data", hint)
    return peer


def _peer_names(paths: list[str], peers: list[Any]) -> list[str]:
    """Each compared checkpoint's file name, or the path as given where two share a file name."""
    from collections import Counter
    from pathlib import Path

    names = [Path(p.path).name for p in peers]
    repeated = Counter(names)
    return [name if repeated[name] == 1 else path for name, path in zip(names, paths, strict=True)]


def _compared_fields(peer: Any, result: Any, speed: Any, macs: int, unit: str, labels: Any,
                     name: str) -> dict[str, Any]:
    """A compared network's row: its accuracy, its MACs (dense and effective) as a fraction of the evaluated
    checkpoint's plain model, and its speed against that model in the same rounds."""
    from eetool.core.costs import count_macs, effective_macs, in_unit, is_pruned

    peer_macs = count_macs(peer.model, peer.spec.input_shape)
    sparse = effective_macs(peer.model, peer.spec.input_shape, peer_macs) if is_pruned(peer.model) else peer_macs
    return {"name": name, "checkpoint": peer.path, "checkpoint_sha256": peer.sha256, "arch": peer.spec.arch,
            "arch_args": dict(peer.spec.arch_args),
            "accuracy": round(float((result.predictions == labels).double().mean()), 6),
            "cost": round(peer_macs / macs, 6), unit: int(in_unit(peer_macs, unit)),
            "effective_cost": round(sparse / macs, 6), f"effective_{unit}": int(in_unit(sparse, unit)),
            **_speed_fields(speed)}


SPEED_NOTE = ("its zero weights lower the effective cost (what sparse kernels would compute), not the time: "
              "dense kernels multiply by the zeros too, so samples/s and speed-ups are measured on the dense "
              "computation")


def _wall_time_text(wall_time: Any) -> str:
    measured = (f"batch {wall_time.get('batch_size')}, {wall_time.get('threads')} threads"
                if isinstance(wall_time, dict) else "a measurement not recorded")
    return (f"fitted on measured wall time ({measured}); the costs below are MACs, the speed-ups measured "
            "here")


def _speed_fields(speed: Any) -> dict[str, Any]:
    return {"throughput": round(speed.throughput, 1), "speedup": round(speed.speedup, 3),
            "speedup_min": round(speed.speedup_min, 3), "speedup_max": round(speed.speedup_max, 3),
            "seconds": [round(t, 4) for t in speed.seconds]}


def _speedup_text(point: dict[str, Any], repeats: int) -> str:
    """The median speed-up, with its range over the rounds where there are several (none for the plain model)."""
    if repeats == 1 or point["name"] == "plain":
        return f"{point['speedup']:.2f}x"
    return f"{point['speedup']:.2f}x ({point['speedup_min']:.2f}\u2013{point['speedup_max']:.2f})"


def _against_text(point: dict[str, Any], repeats: int) -> str:
    """The median speed-up against the baseline, with its range over the rounds where there are several."""
    text = f"{point['speedup_vs_baseline']:.2f}x"
    if repeats == 1:
        return text
    return f"{text} ({point['speedup_vs_baseline_min']:.2f}\u2013{point['speedup_vs_baseline_max']:.2f})"


def _per_class_dict(classes: list[str], accuracy: Any) -> dict[str, float | None]:
    return {name: (None if acc != acc else round(float(acc), 6)) for name, acc in zip(classes, accuracy, strict=False)}


class EarlyExits(NamedTuple):
    """Early exits as a thresholds file sets them up: the exit model, the rule, its cost models (dense, then
    effective: the same one unless the network is pruned), the chosen operating points (index, point), whether it
    predicts cluster ids, and the thresholds file they come from."""

    exit_model: ExitModel
    rule: HeadsRule | MeansRule
    cost_models: tuple[CostModel, CostModel]
    chosen: list[tuple[int, OperatingPoint]]
    clusters: bool
    thresholds: ExitThresholds


def early_exit_setup(ckpt: Checkpoint, means: str | None, exit_heads: str | None, thresholds: str, point: str,
                      device: torch.device | str) -> EarlyExits:
    """Load and cross-check the thresholds and what they were fitted with; pick the operating points to run."""
    from eetool.classification.e2cm import ClassMeans
    from eetool.classification.exit_heads import ExitHeadsArtifact
    from eetool.classification.rules import HeadsRule, cost_models, exit_rule
    from eetool.classification.thresholds_artifact import ExitThresholds
    from eetool.core.artifacts import sha256_file, verify
    from eetool.core.costs import effective
    from eetool.core.errors import UsageError
    from eetool.core.exit_methods import HEADS, MEANS, reads

    fitted = ExitThresholds.load(thresholds)
    method, combine = fitted.method, fitted.combine
    if reads(method, MEANS) and not means:
        raise UsageError(f"{thresholds} was fitted with {method}, which needs --means", "pass the same --means")
    if reads(method, HEADS) and not exit_heads:
        raise UsageError(f"{thresholds} was fitted with {method}, which needs --exit-heads",
                         "pass the same --exit-heads")
    cm = ClassMeans.load(means) if means else None
    heads = ExitHeadsArtifact.load(exit_heads) if exit_heads else None
    em, rule = exit_rule(ckpt, method, combine, cm, heads, device)
    # the artifacts the method was fitted with, each of which the thresholds must record
    inputs = {"class-means": sha256_file(means)} if means and reads(method, MEANS) else {}
    if exit_heads and reads(method, HEADS):
        inputs["exit-heads"] = sha256_file(exit_heads)
    verify(thresholds, fitted.provenance, checkpoint=ckpt.identity, exits=list(em.exits), inputs=inputs)
    fitted.check(len(em.exits))
    chosen = fitted.pick(point)
    if cm is not None and not reads(method, HEADS):
        # a pruned network's effective costs: recorded by calibrate-means (and fitted on), or from its weights
        # for class means made before they were recorded (the means were verified to be made from this checkpoint)
        sparse = (cm.cost_model(effective=True) if cm.effective_stage_macs
                  else effective(cm.cost_model(), em, ckpt.spec.input_shape))
        return EarlyExits(em, rule, (cm.cost_model(), sparse), chosen, cm.clusters, fitted)
    assert isinstance(rule, HeadsRule), "a method that reads no class means reads exit heads"
    return EarlyExits(em, rule, cost_models(rule, em, ckpt.spec.input_shape), chosen, False, fitted)


def _shards(run: Run, ds: Any, batch_size: int) -> tuple[Any, Any]:
    """Under torchrun: a function that turns a run over this rank's share into the run over every sample
    (predictions in order, the slowest rank's seconds), and the share. One process: the identity and the data."""
    import dataclasses

    from eetool.core.distributed import all_max
    from eetool.core.run_inputs import local_share

    world = run.world
    if -(-len(ds) // batch_size) < world.size:
        from eetool.core.errors import UsageError

        raise UsageError(f"{len(ds)} samples make fewer batches of {batch_size} than the {world.size} processes",
                         "use fewer processes or a smaller --batch-size")
    local, gather = local_share(run, ds, batch_size)

    def whole(result: Any) -> Any:
        if not world.distributed:
            return result
        per_sample = {f.name: gather(getattr(result, f.name)) for f in dataclasses.fields(result)
                      if f.name in ("predictions", "exit_index")}
        return dataclasses.replace(result, seconds=all_max(result.seconds, world), **per_sample)

    return whole, local
