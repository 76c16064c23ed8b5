"""Dataset pruning end to end: the pruning phase (trained, or its records reused), the selection of the samples
to keep, and the indices artifacts and summary written for them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eetool.core.choices import EEPRUNE_FAMILY, PRUNING_BASELINES
from eetool.core.options import Run
from eetool.core.owned_folders import check_state_folder, fresh_state_folder, remove_state_folder
from eetool.core.reporting import format_fields, format_table
from eetool.core.run_inputs import data_path

if TYPE_CHECKING:
    import torch

    from eetool.classification.dataset_pruning import PhaseSettings
    from eetool.core.checkpoint import Checkpoint, ModelSpec
    from eetool.core.datasets import Dataset

METHOD_NAMES = EEPRUNE_FAMILY + PRUNING_BASELINES


@dataclass
class KeptSamplesRequest:
    checkpoint: str
    data: str
    output: str
    ratio: float
    method: str
    split: str
    indices: str | None
    balanced: bool
    exit: str | None
    soft_weights: str | None
    soft_threshold: float | None
    models: int
    proxy_arch: str
    proxy_arch_args: str | None
    from_scores: str | None
    pruned_output: str | None
    summary: str | None
    from_weights: bool
    epochs: int | None
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    augment: bool
    resume: bool
    force: bool


def choose_kept_samples(run: Run, req: KeptSamplesRequest) -> None:
    checkpoint, data, output, ratio = req.checkpoint, req.data, req.output, req.ratio
    method, split, indices, balanced = req.method, req.split, req.indices, req.balanced
    exit, soft_weights, soft_threshold, models = req.exit, req.soft_weights, req.soft_threshold, req.models
    proxy_arch, proxy_arch_args, from_scores = req.proxy_arch, req.proxy_arch_args, req.from_scores
    pruned_output = req.pruned_output
    summary, from_weights, epochs, batch_size = req.summary, req.from_weights, req.epochs, req.batch_size
    optimizer, lr, weight_decay, schedule = req.optimizer, req.lr, req.weight_decay, req.schedule
    warmup_epochs, augment, resume, force = req.warmup_epochs, req.augment, req.resume, req.force
    from eetool.core.artifacts import STDOUT
    from eetool.core.errors import InputError, UsageError
    from eetool.core.options import parse_floats

    if method not in METHOD_NAMES:
        raise UsageError(f"unknown --method {method!r}", f"use one of {', '.join(METHOD_NAMES)}")
    if not 0 < ratio < 1:
        raise UsageError(f"--ratio must be between 0 and 1, not {ratio}", "e.g. --ratio 0.3 prunes 30%")
    weights = parse_floats(soft_weights, "--soft-weights")
    if weights is not None and (len(weights) != 4 or min(weights) < 0):
        raise UsageError("--soft-weights takes four non-negative numbers w1,w2,w3,w4", "e.g. 0.4,0.2,0.4,0.001")
    if soft_threshold is not None and not 0 <= soft_threshold < 1:
        raise UsageError(f"--soft-threshold must be in [0, 1), not {soft_threshold}", "e.g. 0.9")
    if (weights is not None or soft_threshold is not None) and method != "eeprune-soft":
        raise UsageError("--soft-weights and --soft-threshold belong to --method eeprune-soft",
                         "drop them, or use --method eeprune-soft")
    if from_scores and (epochs is not None or resume or from_weights):
        raise UsageError("--from-scores reuses records, so it trains nothing: --epochs, --from-weights and "
                         "--resume do not apply", "drop them, or drop --from-scores to train afresh")
    if from_weights and method == "svp":
        raise UsageError("svp trains a smaller proxy, which cannot start from the checkpoint's weights",
                         "drop --from-weights")
    for flag, path in (("-o", output), ("--pruned-output", pruned_output)):
        if path is not None and not path.endswith(".safetensors"):
            raise UsageError(f"{flag} {path}: indices artifacts are .safetensors files",
                             "end the name in .safetensors (train --indices reads them by that suffix)")
    summary = summary or output[: -len(".safetensors")] + ".yaml"
    inputs = (checkpoint, indices, data_path(data), from_scores)
    outputs = [p for p in (output, pruned_output, summary) if p]
    if len(set(outputs)) != len(outputs):
        raise UsageError("-o, --pruned-output and --summary name the same file", "give each its own name")
    if summary == STDOUT:
        raise UsageError("--summary - : the summary is written with the indices, as a file",
                         "give it a file name, or drop --summary (OUTPUT with .yaml)")
    for flag, path in zip(("-o", "--pruned-output", "--summary"), (output, pruned_output, summary), strict=True):
        if path is not None:
            run.check_output(path, force=force or resume, inputs=inputs, flag=flag, binary=flag != "--summary")
    state_dir = f"{output}.resume"
    if resume and not Path(state_dir).is_dir():
        raise InputError(f"no resumable state at {state_dir}", "run without --resume to start afresh")
    check_state_folder(state_dir, resume=resume)

    import torch

    from eetool.classification import dataset_pruning as dp
    from eetool.core.artifacts import Provenance, output_set, sha256_file, write_yaml
    from eetool.core.datasets import check_labels, load_indices, require_labels
    from eetool.core.distributed import reported_by_main
    from eetool.core.run_inputs import load_data, open_checkpoint
    from eetool.core.sample_indices import SampleIndices
    from eetool.core.training_loop import TrainConfig

    cfg = TrainConfig(epochs=epochs or dp.DEFAULT_EPOCHS[method] or 1, batch_size=batch_size, optimizer=optimizer,
                      lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                      augment=augment, seed=run.seed)
    if not from_scores:
        cfg.validate()  # before any data is loaded
        cfg.check_world(run.world)  # and before the processes meet: rank 0 alone reports it
    ckpt = open_checkpoint(run, checkpoint)
    device = run.torch()
    full = load_data(run, data, split, spec=ckpt.spec)
    ds = full.subset(load_indices(indices, full)) if indices else full
    check_labels(ds, ckpt.spec.num_classes)
    require_labels(ds, "dataset pruning needs a labelled training set")
    positions = ds.indices if ds.indices is not None else torch.arange(len(ds))
    family = dp.records_family(method)
    input_shas = {"indices": sha256_file(indices)} if indices else {}

    if from_scores:
        records, phase, exit_name, location = _reuse(from_scores, full.fingerprint, positions, family, exit, ckpt)
        input_shas["records"] = sha256_file(from_scores)
        run.reporter.log(f"reusing the {family} records of {from_scores}")
    else:
        settings = dp.PhaseSettings(method, cfg, exit=exit or "mid", models=models)
        records, phase, exit_name, location = _train(run, device, ckpt, ds, settings, proxy_arch,
                                                     proxy_arch_args, from_weights, state_dir, resume)
    scores = dp.priority(method, records, ratio=ratio, soft_weights=weights or dp.SOFT_WEIGHTS,
                         soft_threshold=soft_threshold)
    try:
        sel = dp.select(scores, ds.labels, ratio, balanced=balanced, seed=run.seed, method=method)
    except UsageError as e:
        if not from_scores and Path(state_dir).is_dir():  # the training is done: a lower ratio need not repeat it
            e = UsageError(e.problem, f"{e.hint}; the training is kept: rerun with --resume and a lower --ratio")
        raise reported_by_main(e, run.world) from None  # under torchrun every rank meets it; rank 0 reports it
    kept, pruned = positions[sel.kept], positions[sel.pruned]
    classes = ckpt.spec.classes or [str(c) for c in range(ckpt.spec.num_classes)]
    total = dp.class_counts(ds.labels, torch.arange(len(ds)), len(classes))
    pruned_counts = dp.class_counts(ds.labels, sel.pruned, len(classes))
    per_class = [{"class": name, "samples": t, "pruned": p, "kept": t - p}
                 for name, t, p in zip(classes, total, pruned_counts, strict=True) if t]
    result_doc: dict[str, Any] = {
        "method": method, "ratio": ratio, "balanced": balanced, "samples": len(ds), "pruned": int(pruned.numel()),
        "kept": int(kept.numel()), "exit": exit_name, "exit_location": location,
        "threshold": sel.threshold, "class_thresholds": sel.class_thresholds or None,
        "qualified": int(torch.isfinite(records["qualified"]).sum()) if method == "eeprune" else None,
        "ties_broken": sel.ties, "pruning_phase": phase, "per_class": per_class,
    }
    prov = Provenance(kind="indices", checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256,
                      exits=[exit_name] if exit_name else [],
                      dataset=full.fingerprint, args={**run.args, **{k: v for k, v in result_doc.items()
                                                                     if k != "per_class"}},
                      inputs=input_shas)
    kept_file = SampleIndices(kept, prov, output, pruned=pruned, positions=positions, priority=scores,
                              records=records)
    if not run.world.main:  # under torchrun every rank holds the same records; rank 0 writes and prints
        return
    with output_set(outputs) as temps:  # kept, pruned and summary appear together or not at all
        written = dict(zip(outputs, temps, strict=True))
        kept_file.save(written[output])
        if pruned_output:
            SampleIndices(pruned, Provenance(**{**vars(prov), "args": {**prov.args, "role": "pruned"}}),
                          pruned_output).save(written[pruned_output])
        write_yaml(written[summary], {**result_doc, "output": output, "pruned_output": pruned_output}, prov)
    remove_state_folder(state_dir, run.reporter.warn)
    run.wrote(*(p for p in (output, pruned_output, summary) if p))
    run.emit({"output": output, "pruned_output": pruned_output, "summary": summary, **result_doc}, _text)


def _train(run: Run, device: torch.device, ckpt: Checkpoint, ds: Dataset, settings: PhaseSettings, proxy_arch: str,
           proxy_arch_args: str | None, from_weights: bool, state_dir: str, resume: bool
           ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None, str | None]:
    """The pruning phase: the records, its cost, and the early exit where EEPrune put it."""

    from eetool.classification import dataset_pruning as dp
    from eetool.core.checkpoint import ModelSpec
    from eetool.core.datasets import Preprocess
    from eetool.core.options import parse_mapping

    method = settings.method
    spec = ckpt.spec
    if method == "svp":
        spec = ModelSpec(**{**vars(ckpt.spec), "arch": proxy_arch,
                            "arch_args": parse_mapping(proxy_arch_args, "--proxy-arch-args")})
        spec.build()  # a bad proxy is refused before any training

    def build(_: int) -> torch.nn.Module:
        model = spec.build()
        if from_weights:
            model.load_state_dict(ckpt.model.state_dict())
        return model

    if dp.records_family(method) == "eeprune":
        dp.exit_point(spec.build(), settings.exit)  # a bad --exit is refused before any state is written
    if method != "random":
        if not resume and run.world.main:
            fresh_state_folder(state_dir, "dataset-pruning-state")
        run.reporter.log(f"pruning phase: {method} on {ds.spec} ({len(ds)} samples); state after every epoch "
                         f"in {state_dir}")
        run.resume_state = str(state_dir)
        run.resumable = f"the state of every finished epoch is in {state_dir}: rerun with --resume"
    result = dp.pruning_phase(settings, build, ds, Preprocess(spec.input_shape, spec.mean, spec.std),
                              num_classes=spec.num_classes, device=device,
                              state_dir=None if method == "random" else state_dir, resume=resume,
                              reporter=run.reporter, world=run.world)
    phase = {"method": dp.records_family(method), "epochs": 0 if method == "random" else settings.config.epochs,
             "runs": result.runs, "samples_seen": result.samples_seen, "samples_scored": result.samples_scored,
             "seconds": round(result.seconds, 1),
             **({"proxy_arch": proxy_arch} if method == "svp" else {}),
             **({"from_weights": from_weights, "model": _model_record(ckpt.spec)} if method != "random" else {})}
    return result.records, phase, result.exit, settings.exit if result.exit else None




def _model_record(spec: ModelSpec) -> dict[str, Any]:
    """What a pruning phase's records depend on besides the data: the model trained (its weights too with
    --from-weights), as the provenance's JSON holds it."""
    import json

    return json.loads(json.dumps({"arch": spec.arch, "arch_args": spec.arch_args, "num_classes": spec.num_classes,
                                  "input_shape": list(spec.input_shape), "mean": list(spec.mean),
                                  "std": list(spec.std)}, sort_keys=True, default=str))


# The records each family's pruning phase leaves, one per sample, and their kind of values.
RECORD_KINDS = {
    "eeprune": {"qualified": "float", "early_loss": "float", "final_loss": "float", "early_margin": "float",
                "final_margin": "float", "early_correct": "bool", "final_correct": "bool"},
    "random": {"random": "float"},
    "el2n": {"el2n": "float"},
    "forgetting": {"forgotten": "int", "learned": "bool"},
    "svp": {"forgotten": "int", "learned": "bool"},
}


def _reuse(path: str, dataset: str, positions: torch.Tensor, family: str, exit_location: str | None,
           ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None, str | None]:
    import torch

    from eetool.core.errors import InputError, ProvenanceError, UsageError
    from eetool.core.sample_indices import SampleIndices

    remake = "re-make it with `eetool prune-dataset`"
    reused = SampleIndices.load(path)
    reused.verify(dataset=dataset)
    prov = reused.provenance
    phase = prov.args.get("pruning_phase")
    if reused.positions is None or not isinstance(phase, dict):
        raise InputError(f"{path} holds indices but no per-sample records", "give an output of `eetool prune-dataset`")
    if phase.get("method") != family:
        raise UsageError(f"{path} holds the records of a {phase.get('method')} pruning phase, not of {family}",
                         "reuse records of the same method (the eeprune variants share theirs)")
    if not torch.equal(reused.positions, positions):
        raise UsageError(f"{path} was made on other samples of the dataset (another --indices)",
                         "pass the same --indices as the run that made it")
    if family != "random":  # random records depend on the seed alone
        if phase.get("from_weights") or not isinstance(phase.get("model"), dict):
            reused.verify(checkpoint=ckpt.identity)  # the trained weights themselves came in
        elif phase["model"] != _model_record(ckpt.spec):
            made = phase["model"]
            raise ProvenanceError(f"{path} holds records of a {made.get('arch')} {made.get('arch_args')} with "
                                  f"{made.get('num_classes')} classes, not of this checkpoint's {ckpt.spec.arch} "
                                  f"{ckpt.spec.arch_args} with {ckpt.spec.num_classes}",
                                  "use the checkpoint the records were made with, or train afresh")
    exit_name = prov.exits[0] if prov.exits else None
    location = prov.args.get("exit_location")
    if family == "eeprune" and (exit_name is None or not isinstance(location, str | None)):
        raise ProvenanceError(f"{path} records no early exit for its eeprune records", remake)
    if exit_location is not None and exit_location not in (exit_name, location):
        raise UsageError(f"{path} has records from the exit after {exit_name}, not --exit {exit_location}",
                         "drop --exit, or train afresh for another exit")
    records = reused.records
    for name, kind in RECORD_KINDS[family].items():
        values = records.get(name)
        if values is None:
            raise InputError(f"{path} has no '{name}' record, which {family} pruning needs", remake)
        if values.shape != (positions.numel(),):
            raise InputError(f"{path}: record '{name}' has shape {tuple(values.shape)}, not one value for each of "
                             f"its {positions.numel()} samples", remake)
        found = "bool" if values.dtype == torch.bool else "float" if values.dtype.is_floating_point else "int"
        if found != kind:
            raise InputError(f"{path}: record '{name}' holds {values.dtype} values, not {kind}s", remake)
        if kind == "float" and name != "qualified" and not bool(torch.isfinite(values).all()):
            raise InputError(f"{path}: record '{name}' holds values that are not finite numbers", remake)
    return records, {**phase, "reused_from": path}, exit_name, location


def _text(d: dict[str, Any]) -> str:
    phase = d["pruning_phase"]
    cost = (f"{phase['samples_seen']:,} samples trained, {phase['samples_scored']:,} scored, "
            f"{phase['seconds']:.1f} s" + (f" (reused from {phase['reused_from']})" if "reused_from" in phase else ""))
    fields: list[tuple[str, object]] = [
        ("kept", f"{d['kept']:,} of {d['samples']:,} → {d['output']}"),
        ("pruned", f"{d['pruned']:,} ({d['pruned'] / d['samples']:.1%})"
                   + (f" → {d['pruned_output']}" if d["pruned_output"] else "")),
        ("method", d["method"] + (", per class" if d["balanced"] else "")
                   + (f", exit after {d['exit']}" if d["exit"] else "")),
    ]
    if d["threshold"] is not None:
        fields.append(("threshold t", f"{d['threshold']:.6g} (early-exit confidence; {d['qualified']:,} samples "
                                      "ever met all three conditions)"))
    if d["class_thresholds"]:
        fields.append(("threshold t per class", ", ".join("–" if t is None else f"{t:.4g}"
                                                          for t in d["class_thresholds"])))
    fields += [("pruning phase", cost), ("summary", d["summary"])]
    rows = [[c["class"], c["samples"], c["pruned"], c["kept"], f"{c['pruned'] / c['samples']:.1%}"]
            for c in d["per_class"]]
    return format_fields(fields) + "\n\n" + format_table(["class", "samples", "pruned", "kept", "pruned %"], rows)
