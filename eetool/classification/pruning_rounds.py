"""Weight pruning of an early-exit network end to end (thesis 2.5): the options checked, rounds of pruning and
fine-tuning (unstructured or channel), and the pruned checkpoint, exit heads, masks and report written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eetool.core.choices import FINAL_LAYER_PHASES, PRUNING_APPROACHES, WEIGHT_STRUCTURES
from eetool.core.options import Run
from eetool.core.owned_folders import check_state_folder, fresh_state_folder, remove_state_folder
from eetool.core.reporting import format_fields, format_table
from eetool.core.run_inputs import data_path


@dataclass(frozen=True, kw_only=True)
class WeightPruningRequest:
    """What prune-weights is asked for, its flags as given: prune_weights checks them before any work."""

    checkpoint: str
    data: str
    output: str
    split: str
    indices: str | None
    exit_heads: str | None
    exits: str | None
    approach: str
    final_layer_phases: str | None  # --approach ordered only; None: both (see phases)
    structure: str
    rounds: int
    amount: float
    prune_first_conv: bool
    prune_final_layer: bool
    round_to: int | None
    heads_output: str | None  # None: next to -o (see heads_file)
    masks_output: str | None
    report: str | None  # None: next to -o (see report_file)
    plot: str | None
    eval_split: str
    exit_weights: str | None
    finetune_epochs: int
    finetune_samples: int | None
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    augment: bool
    resume: bool
    force: bool

    @property
    def heads_file(self) -> str:
        """--heads-output, or OUTPUT with -heads.safetensors."""
        return self.heads_output or f"{self.output.removesuffix('.safetensors')}-heads.safetensors"

    @property
    def report_file(self) -> str:
        """--report, or OUTPUT with .yaml."""
        return self.report or f"{self.output.removesuffix('.safetensors')}.yaml"

    @property
    def phases(self) -> str:
        """--final-layer-phases of --approach ordered: both unless given."""
        return self.final_layer_phases or "both"


def prune_weights(run: Run, req: WeightPruningRequest) -> None:
    """Check the request's options and outputs before any work, then prune in rounds and write the outputs."""
    checkpoint, data, output, indices, exit_heads = req.checkpoint, req.data, req.output, req.indices, req.exit_heads
    structure, approach, final_layer_phases = req.structure, req.approach, req.final_layer_phases
    rounds, amount, masks_output, plot, resume = req.rounds, req.amount, req.masks_output, req.plot, req.resume
    from eetool.core.artifacts import STDOUT
    from eetool.core.errors import InputError, UsageError

    if structure not in WEIGHT_STRUCTURES:
        raise UsageError(f"unknown --structure {structure!r}", f"use one of {', '.join(WEIGHT_STRUCTURES)}")
    if approach not in PRUNING_APPROACHES:
        raise UsageError(f"unknown --approach {approach!r}", f"use one of {', '.join(PRUNING_APPROACHES)}")
    if final_layer_phases is not None and final_layer_phases not in FINAL_LAYER_PHASES:
        raise UsageError(f"unknown --final-layer-phases {final_layer_phases!r}",
                         f"use one of {', '.join(FINAL_LAYER_PHASES)}")
    if final_layer_phases is not None and approach != "ordered":
        raise UsageError("--final-layer-phases chooses the phases of --approach ordered, and joint has one phase",
                         "drop --final-layer-phases, or add --approach ordered")
    if structure == "channel":
        _refuse_for_channels(approach, masks_output, plot, req.prune_first_conv, req.prune_final_layer)
    elif req.round_to is not None:
        raise UsageError("--round-to rounds channel counts, which unstructured pruning keeps",
                         "drop --round-to, or add --structure channel")
    if not 0 < amount < 1:
        raise UsageError(f"--amount must be between 0 and 1, not {amount}",
                         "e.g. --amount 0.1 prunes 10% of the remaining weights per round")
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, not {rounds}", "e.g. --rounds 20 (the thesis's)")
    if exit_heads and req.exits:
        raise UsageError("--exits chooses where new heads go, but --exit-heads brings its own",
                         "drop --exits (the heads' exits are used)")
    if not output.endswith(".safetensors"):
        raise UsageError(f"-o {output}: checkpoints are .safetensors files", "end the name in .safetensors")
    outputs = [p for p in (output, req.heads_file, req.report_file, masks_output, plot) if p]
    if STDOUT in outputs:
        raise UsageError("the outputs of prune-weights are written together, as files, not to stdout",
                         "give each a file name")
    if len(set(outputs)) != len(outputs):
        raise UsageError("-o, --heads-output, --report, --masks-output and --plot name the same file",
                         "give each its own name")
    inputs = (checkpoint, indices, data_path(data), exit_heads)
    for flag, path in (("-o", output), ("--heads-output", req.heads_file), ("--report", req.report_file),
                       ("--masks-output", masks_output), ("--plot", plot)):
        if path is not None:
            run.check_output(path, force=req.force or resume, inputs=inputs, flag=flag, binary=True)
    if plot:
        from eetool.core.plotting import require_matplotlib

        require_matplotlib()
    if structure == "channel":
        from eetool.classification.channel_pruning import require_torch_pruning

        require_torch_pruning()
    state_dir = Path(f"{output}.resume")
    if resume and not (state_dir / "state.pt").is_file():
        raise InputError(f"no resumable state in {state_dir}", "run without --resume to start afresh")
    check_state_folder(str(state_dir), resume=resume)
    _prune(run, req)


def _refuse_for_channels(approach: str, masks_output: str | None, plot: str | None, first_conv: bool,
                         final_layer: bool) -> None:
    """What --structure channel cannot do, refused before any work, each with why."""
    from eetool.core.errors import UsageError

    if approach == "ordered":
        raise UsageError("--approach ordered prunes the heads in rounds of their own with the backbone fixed, but "
                         "channel pruning removes backbone channels only (a head reads the channels its exit keeps "
                         "and has none of its own to remove)", "use --approach joint with --structure channel")
    if masks_output:
        raise UsageError("--structure channel removes channels, leaving no zeros to mask: the pruned checkpoint is "
                         "a smaller dense network", "drop --masks-output (the report lists the widths kept)")
    if plot:
        raise UsageError("--plot draws per-layer sparsity, and channel pruning leaves every layer dense",
                         "drop --plot (the report lists the widths of every round)")
    if not (first_conv and final_layer):
        raise UsageError("--structure channel prunes the first convolution's channels with the residual stream it "
                         "feeds and never the final layer's outputs (the classes), so neither can be left out",
                         "drop --no-prune-first-conv and --no-prune-final-layer")


def _prune(run: Run, o: WeightPruningRequest) -> None:
    from eetool.classification import weight_pruning as wp
    from eetool.classification.exit_heads import ExitHeads, HeadsSpec, load_heads, parse_weights
    from eetool.classification.pruning_artifacts import MASKS_KIND, PruningMasks
    from eetool.core.artifacts import Provenance, output_set, sha256_file, verify
    from eetool.core.datasets import Preprocess, check_labels, require_labels
    from eetool.core.errors import UsageError
    from eetool.core.exits import build_exit_model
    from eetool.core.run_inputs import load_data, open_checkpoint
    from eetool.core.training_loop import TrainConfig

    cfg = TrainConfig(epochs=o.finetune_epochs, batch_size=o.batch_size, optimizer=o.optimizer, lr=o.lr,
                      weight_decay=o.weight_decay, schedule=o.schedule, augment=o.augment, seed=run.seed,
                      samples=o.finetune_samples or 0)
    cfg.validate()  # before any data is loaded
    ckpt = open_checkpoint(run, o.checkpoint)
    if o.structure == "channel":
        from eetool.classification.channel_pruning import check_savable

        check_savable(ckpt.spec)
    device = run.torch()
    heads: ExitHeads | None = None
    heads_sha = ""
    if o.exit_heads:
        heads, heads_prov = load_heads(o.exit_heads)
        verify(o.exit_heads, heads_prov, checkpoint=ckpt.identity)
        if heads.spec.with_distances:
            raise UsageError(f"{o.exit_heads} holds heads that read E²CM distances, which pruning does not "
                             "fine-tune", "train SDN heads without --means, or drop --exit-heads")
        heads_sha = sha256_file(o.exit_heads)
    em = build_exit_model(ckpt.model, ",".join(heads.spec.exits) if heads is not None else o.exits or "every")
    shapes = [list(s) for s in em.exit_shapes(ckpt.spec.input_shape)]
    if heads is None:
        heads = ExitHeads(HeadsSpec("sdn", list(em.exits), shapes, ckpt.spec.num_classes, 4, False,
                                    parse_weights(o.exit_weights, len(em.exits))))
    elif heads.spec.in_shapes != shapes or heads.spec.num_classes != ckpt.spec.num_classes:
        raise UsageError(f"{o.exit_heads} was made for other exit shapes or classes than this checkpoint has",
                         "re-make the heads for it with `eetool train-exits`")
    weights = parse_weights(o.exit_weights, len(em.exits)) if o.exit_weights else (
        heads.spec.weights or [1.0] * len(em.exits))
    settings = wp.Settings(o.approach, o.rounds, o.amount, cfg, first_conv=o.prune_first_conv,
                           final_layer=o.prune_final_layer, train_heads=not o.exit_heads,
                           final_phases=o.phases)
    train_data = load_data(run, o.data, o.split, o.indices, ckpt.spec)
    check_labels(train_data, ckpt.spec.num_classes)
    require_labels(train_data, "pruning fine-tunes on a labelled training set")
    eval_data = load_data(run, o.data, o.eval_split, spec=ckpt.spec)
    check_labels(eval_data, ckpt.spec.num_classes)
    require_labels(eval_data, "per-exit accuracy needs labels: choose a labelled --eval-split")
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    if o.structure == "channel":
        _prune_channels(run, o, ckpt, heads, heads_sha, weights, cfg, train_data, eval_data, preprocess, device)
        return
    pruner = wp.Pruner(em, heads, weights, settings, train_data, preprocess, eval_data=eval_data, device=device,
                       reporter=run.reporter)
    # The checkpoint's own weights decide: heads made here start dense whatever the checkpoint is.
    backbone = wp.participating(pruner.layers, (wp.BACKBONE,))
    already = wp.sparsity_of(backbone)
    target = wp.target_sparsity(o.amount, o.rounds)
    if already >= target:
        raise UsageError(f"{o.checkpoint} is already {already:.1%} sparse in its weights taking part, at or beyond "
                         f"the {target:.1%} that {o.rounds} rounds of {o.amount:g} ask for",
                         "start from the unpruned checkpoint, or ask for more --rounds or a larger --amount")
    remaining = sum(int(layer.weight.ne(0).sum()) for layer in backbone)
    if wp.pruned_count(remaining, o.amount) == 0:
        raise UsageError(f"--amount {o.amount:g} prunes none of the {remaining:,} weights taking part in a round",
                         "give a larger --amount, e.g. 0.1")

    state_dir, expected = _resumable(run, o, ckpt, train_data, pruner)
    run.reporter.log(f"pruning {ckpt.label}, {o.approach}: {o.rounds} rounds of {o.amount:g} of the "
                     f"remaining weights ({target:.1%} in all); state after every step in {state_dir}")
    pruner.run(after_step=_saver(state_dir, expected))

    model = ckpt.model.cpu().eval()
    heads = heads.cpu().eval()
    costs = _costs(em, heads, ckpt.spec.input_shape)
    layers = wp.layer_sparsity(pruner.layers)
    final = pruner.records[-1]
    taking_part = [la for la in pruner.layers if la.takes_part]
    weights_in = sum(la.weight.numel() for la in taking_part)
    doc: dict[str, Any] = {
        "output": o.output, "heads_output": o.heads_file, "masks_output": o.masks_output,
        "report": o.report_file, "plot": o.plot,
        "approach": o.approach, "structure": o.structure, "rounds": o.rounds, "amount": o.amount,
        **({"final_layer_phases": o.phases} if o.approach == "ordered" else {}),
        "requested_sparsity": round(target, 6),
        "sparsity": final["sparsity"],
        "weights_taking_part": weights_in,
        "exits": list(em.exits),
        "accuracy": final["accuracy"], "baseline_accuracy": pruner.baseline, "eval_split": o.eval_split,
        "costs": costs,
        "steps": pruner.records,
        "layers": layers,
    }
    dataset = train_data.fingerprint
    args = {**run.args, "pruning": {"requested_sparsity": doc["requested_sparsity"], "sparsity": final["sparsity"]}}
    outputs = [p for p in (o.output, o.heads_file, o.report_file, o.masks_output, o.plot) if p]
    with output_set(outputs) as temps:  # every output appears, or none
        written = dict(zip(outputs, temps, strict=True))
        made_from = _write_pruned(written, o, ckpt, ckpt.spec, model, heads, list(em.exits), dataset, args, heads_sha,
                                  doc)
        if o.masks_output:
            PruningMasks(pruner.masks, Provenance(**{**vars(made_from), "kind": MASKS_KIND, "schema": 0})
                         ).save(written[o.masks_output])
        if o.plot:
            from eetool.core.plotting import pruning_png

            pruning_png(written[o.plot], layers, final["accuracy"], pruner.baseline,
                        f"{ckpt.spec.arch}, {o.approach}: {o.rounds} rounds of {o.amount:g}")
    remove_state_folder(state_dir, run.reporter.warn)
    run.wrote(*outputs)
    run.emit(doc, _text)


def _prune_channels(run: Run, o: WeightPruningRequest, ckpt: Any, heads: Any, heads_sha: str,
                    weights: list[float], cfg: Any, train_data: Any, eval_data: Any, preprocess: Any,
                    device: Any) -> None:
    """--structure channel: rounds of channel pruning and joint fine-tuning; writes a smaller dense checkpoint."""
    from eetool.classification import channel_pruning as cp
    from eetool.core.artifacts import output_set

    settings = cp.ChannelSettings(o.rounds, o.amount, cfg, train_heads=not o.exit_heads,
                                  round_to=o.round_to)
    pruner = cp.ChannelPruner(ckpt.spec, ckpt.model, heads, weights, settings, train_data, preprocess,
                              eval_data=eval_data, device=device, reporter=run.reporter)
    original = {"macs": pruner.dense_macs, "parameters": cp.parameter_count(ckpt.model),
                "widths": cp.widths(ckpt.model)}
    target = cp.round_targets(o.amount, o.rounds)[-1]
    if not o.resume:
        pruner.check_first_round()
    state_dir, expected = _resumable(run, o, ckpt, train_data, pruner)
    run.reporter.log(f"channel-pruning {ckpt.label}: {o.rounds} rounds of {o.amount:g} of the remaining "
                     f"MACs (to {target:.1%} of them); state after every step in {state_dir}")
    pruner.run(after_step=_saver(state_dir, expected))

    model, heads = pruner.model.cpu().eval(), pruner.heads.cpu().eval()
    em = pruner.exit_model
    final = pruner.records[-1]
    exit_macs = _exit_macs(em, heads, ckpt.spec.input_shape)
    doc: dict[str, Any] = {
        "output": o.output, "heads_output": o.heads_file, "report": o.report_file,
        "approach": o.approach, "structure": o.structure, "rounds": o.rounds, "amount": o.amount,
        "round_to": o.round_to,
        "requested_macs_fraction": round(target, 6),
        "macs_fraction": final["macs_fraction"],
        "original": original,
        "pruned": {"macs": final["macs"], "parameters": final["parameters"], "widths": final["widths"]},
        "exits": list(em.exits),
        "accuracy": final["accuracy"], "baseline_accuracy": pruner.baseline, "eval_split": o.eval_split,
        "costs": {"basis": "dense", "exits": [
            {"exit": name, "macs": m, "of_original": round(m / pruner.dense_macs, 6)}
            for name, m in zip([*em.exits, "final"], exit_macs, strict=True)]},
        "steps": pruner.records,
    }
    dataset = train_data.fingerprint
    args = {**run.args, "pruning": {"requested_macs_fraction": doc["requested_macs_fraction"],
                                    "macs_fraction": final["macs_fraction"]}}
    outputs = [o.output, o.heads_file, o.report_file]
    with output_set(outputs) as temps:  # every output appears, or none
        _write_pruned(dict(zip(outputs, temps, strict=True)), o, ckpt, pruner.spec, model, heads, list(em.exits),
                      dataset, args, heads_sha, doc)
    remove_state_folder(state_dir, run.reporter.warn)
    run.wrote(*outputs)
    run.emit(doc, _channel_text)


def _write_pruned(written: dict[str, str], o: WeightPruningRequest, ckpt: Any, spec: Any, model: Any,
                  heads: Any, exits: list[str], dataset: str, args: dict[str, Any], heads_sha: str,
                  doc: dict[str, Any]) -> Any:
    """Write the pruned checkpoint, its heads (whose provenance names it) and the report where ``written`` says
    (temp files of one output set); return the heads' provenance, which the other members share."""
    from eetool.classification.exit_heads import save_heads
    from eetool.classification.pruning_artifacts import REPORT_KIND, PruningReport
    from eetool.core.artifacts import Provenance, sha256_file
    from eetool.core.checkpoint import model_sha256, save_checkpoint

    save_checkpoint(written[o.output], model, spec,
                    Provenance(kind="checkpoint", checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256,
                               dataset=dataset, args=args, inputs={"exit-heads": heads_sha} if heads_sha else {}))
    made_from = Provenance(kind="exit-heads", checkpoint_sha256=sha256_file(written[o.output]),
                           model_sha256=model_sha256(spec, model), exits=exits, dataset=dataset, args=args)
    save_heads(written[o.heads_file], heads, made_from)
    PruningReport(doc, Provenance(**{**vars(made_from), "kind": REPORT_KIND, "schema": 0})).save(written[o.report_file])
    return made_from


def _exit_macs(em: Any, heads: Any, input_shape: Any) -> list[int]:
    """MACs of leaving at each exit (its head included), then of the whole model."""
    from eetool.classification.rules import HeadsRule, cost_models

    dense, _ = cost_models(HeadsRule(heads, "sdn"), em, input_shape)
    return [round(c * dense.model_macs) for c in dense.normalised_exit_costs()]


def _channel_text(d: dict[str, Any]) -> str:
    o, p = d["original"], d["pruned"]
    head = format_fields([
        ("pruned checkpoint", d["output"]), ("exit heads", d["heads_output"]), ("report", d["report"]),
        ("pruning", f"channels, {d['rounds']} rounds of {d['amount']:g} of the remaining MACs: "
                    f"{d['requested_macs_fraction']:.1%} of the MACs asked for"),
        ("model cost", f"{p['macs']:,} MACs, {d['macs_fraction']:.1%} of the unpruned {o['macs']:,} (a smaller "
                       "dense network: dense kernels run it faster)"),
        ("parameters", f"{p['parameters']:,} of {o['parameters']:,}"),
        ("stage widths", f"{p['widths']['stage_widths']} (unpruned {o['widths']['stage_widths']})"),
        ("block widths", f"{p['widths']['block_widths']}"),
    ])
    base = d["baseline_accuracy"] or {}
    rows = [[e["exit"], f"{e['macs']:,}", e["of_original"], base.get(e["exit"]), (d["accuracy"] or {}).get(e["exit"])]
            for e in d["costs"]["exits"]]
    table = format_table(["exit", "MACs", "of unpruned", "accuracy before", f"{d['eval_split']} accuracy"], rows)
    return f"{head}\n\n{table}"


def _resumable(run: Run, o: WeightPruningRequest, ckpt: Any, train_data: Any, pruner: Any
               ) -> tuple[Path, dict[str, Any]]:
    """The state directory of a run, ``pruner`` loaded from it when resuming (refused when it was saved by a run
    with other settings, checkpoint or data), else made afresh."""
    from eetool.core.training_loop import read_state

    state_dir = Path(f"{o.output}.resume")
    expected = _expected(run, ckpt, train_data)
    if o.resume:
        pruner.load_state_dict(read_state(str(state_dir / "state.pt"), expected))
        run.reporter.log(f"resuming after step {pruner.done} of {len(pruner.steps())}")
    else:
        fresh_state_folder(state_dir, "weight-pruning-state")
    run.resume_state = str(state_dir)
    run.resumable = f"the state of every finished round is in {state_dir}: rerun with --resume"
    return state_dir, expected


def _expected(run: Run, ckpt: Any, train_data: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the state."""
    return {"settings": {k: run.args[k] for k in sorted(run.args) if k not in ("resume", "force", "plot", "report",
                                                                            "masks_output", "heads_output")},
            "checkpoint": ckpt.sha256, "data": train_data.fingerprint}


def _saver(state_dir: Path, expected: dict[str, Any]) -> Any:
    """Saves a pruner's state and its report so far after every step."""
    from eetool.core.artifacts import Provenance, write_yaml
    from eetool.core.training_loop import write_state

    def save(p: Any) -> None:
        write_state(str(state_dir / "state.pt"), {**expected, **p.state_dict()})
        write_yaml(str(state_dir / "report.yaml"), {"rounds": p.records}, Provenance(kind="weight-pruning"))

    return save


def _costs(em: Any, heads: Any, input_shape: Any) -> dict[str, Any]:
    """Dense and effective MACs of the pruned network: the model, and leaving at each exit (head included),
    normalised by the dense model's MACs."""
    from eetool.classification.rules import HeadsRule, cost_models

    dense, sparse = cost_models(HeadsRule(heads, "sdn"), em, input_shape)
    model_macs = dense.model_macs
    return {
        "basis": sparse.basis,
        "model_macs": model_macs,
        "effective_model_macs": int(sum(sparse.stage_macs)),
        "exits": [{"exit": name, "dense": round(d, 6), "effective": round(e, 6)}
                  for name, d, e in zip([*em.exits, "final"], dense.normalised_exit_costs(),
                                        sparse.normalised_exit_costs(), strict=True)],
    }


def _text(d: dict[str, Any]) -> str:
    s = d["sparsity"]
    c = d["costs"]
    head = format_fields([
        ("pruned checkpoint", d["output"]), ("exit heads", d["heads_output"]), ("report", d["report"]),
        *([("masks", d["masks_output"])] if d["masks_output"] else []),
        ("pruning", f"{d['approach']}, {d['rounds']} rounds of {d['amount']:g} of the remaining weights: "
                    f"{d['requested_sparsity']:.1%} asked for"),
        ("sparsity", f"{s['taking_part']:.2%} of the weights taking part; backbone {s['backbone']:.2%}, "
                     f"heads {s['heads']:.2%}"),
        ("model cost", f"{c['model_macs']:,} MACs dense, {c['effective_model_macs']:,} effective (zero weights "
                       "cost nothing; dense kernels take the dense time)"),
    ])
    base = d["baseline_accuracy"] or {}
    rows = [[e["exit"], e["dense"], e["effective"], base.get(e["exit"]), (d["accuracy"] or {}).get(e["exit"])]
            for e in c["exits"]]
    table = format_table(["exit", "dense cost", "effective cost", "accuracy before", f"{d['eval_split']} accuracy"],
                         rows)
    return f"{head}\n\n{table}"
