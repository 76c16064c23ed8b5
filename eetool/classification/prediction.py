"""Predictions of a classifier on new inputs (``eetool predict``): the plain model or its exits at one operating
point, with evaluate's checkpoint loader, exit rules and early-exit pass; one record per input. Inputs and records:
``eetool.core.prediction_io``. Method: docs/predict-and-export.md#eetool-predict
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from eetool.core.exits import ExitModel
from eetool.core.prediction_io import Batch, RecordWriter

if TYPE_CHECKING:
    from eetool.core.options import Run
    from eetool.core.prediction_io import PredictRequest

HEAD = "head"  # the exit name of the model's own final layer


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class Predictions:
    """One batch: per sample the class, its confidence, the exit index (len(exits): the model's head) and, when
    asked, the K best classes with their probabilities at the exit the sample left by."""

    classes: torch.Tensor
    confidence: torch.Tensor
    exit_index: torch.Tensor
    top_classes: torch.Tensor | None = None
    top_probabilities: torch.Tensor | None = None


@dataclass
class Predictor:
    """The plain model (``exit_model`` None), or an exit model at one operating point's thresholds."""

    model: torch.nn.Module
    exit_model: ExitModel | None = None
    rule: Any = None  # eetool.classification.e2cm.MeansRule or eetool.classification.rules.HeadsRule
    thresholds: list[float] = field(default_factory=list)
    top_k: int = 0

    def folded(self) -> Predictor:
        """The same predictor on a copy of the network with its batch norms folded into the convolutions
        (eetool.core.batch_norm_folding): the same predictions up to float rounding, in less time."""
        from eetool.core.batch_norm_folding import fold_batch_norm, folded_exit_model

        if self.exit_model is None:
            return replace(self, model=fold_batch_norm(self.model))
        exit_model = folded_exit_model(self.exit_model)
        return replace(self, model=exit_model.model, exit_model=exit_model)

    @property
    def exits(self) -> list[str]:
        return [*(self.exit_model.exits if self.exit_model is not None else []), HEAD]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> Predictions:
        if self.exit_model is None:
            probabilities = torch.softmax(self.model(x).float(), 1)
            confidence, classes = probabilities.max(1)
            out = Predictions(classes, confidence, torch.zeros_like(classes))
            self._top(out, probabilities, torch.arange(len(classes), device=x.device))
            return out
        return self._early_exit(x)

    def _early_exit(self, x: torch.Tensor) -> Predictions:
        from eetool.core.inference import run_early_exit

        assert self.exit_model is not None
        em, n = self.exit_model, x.shape[0]
        confidence = torch.empty(n, device=x.device)
        tops: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions, probabilities) of the samples leaving
        # Positions in the batch of the samples still in it, kept as run_early_exit keeps its own: the samples
        # that stay keep their order, so the rows of each call below are these positions.
        remaining = torch.arange(n, device=x.device)

        def decide(j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal remaining
            conf, pred = self.rule.scores(j, h)
            leave = conf > self.thresholds[j]  # eetool.rules.Thresholded's decision
            gone = remaining[leave]
            confidence[gone] = conf[leave].float()
            if self.top_k:
                tops.append((gone, exit_probabilities(self.rule, j, h[leave])))
            remaining = remaining[~leave]
            return leave, pred

        def head_output(module: torch.nn.Module, args: object, logits: torch.Tensor) -> None:
            # Split mode: the last stage runs on the samples still in the batch. Hook mode (models that cannot be
            # split run whole, eetool.exits): the whole batch reaches the head before any decision is taken, and
            # the exits' records below, made later, replace the head's for the samples that leave there.
            p = torch.softmax(logits.float(), 1)
            confidence[remaining] = p.max(1).values
            if self.top_k:
                tops.append((remaining, p))

        last = em.stages[-1] if em.stages is not None else em.model
        handle = last.register_forward_hook(head_output)
        try:
            classes, exit_index = run_early_exit(em, x, decide)
        finally:
            handle.remove()
        out = Predictions(classes, confidence, exit_index)
        for rows, p in tops:  # in the order they were made
            self._top(out, p, rows)
        return out

    def _top(self, out: Predictions, probabilities: torch.Tensor, rows: torch.Tensor) -> None:
        if not self.top_k:
            return
        if out.top_classes is None:
            n = len(out.classes)
            out.top_classes = torch.empty(n, self.top_k, dtype=torch.int64, device=out.classes.device)
            out.top_probabilities = torch.empty(n, self.top_k, device=out.classes.device)
        assert out.top_probabilities is not None
        values, indices = probabilities.topk(self.top_k, dim=1)
        out.top_classes[rows] = indices
        out.top_probabilities[rows] = values


def exit_probabilities(rule: Any, j: int, h: torch.Tensor) -> torch.Tensor:
    """The class probabilities at exit j that the rule's confidence is the maximum of: E²CM's softmax of the
    normalised negative distances (eq. 2.5), a head's softmax otherwise (for e2cm+sdn the head's, whose prediction
    the rule takes)."""
    from eetool.classification.e2cm import MeansRule, distances

    if isinstance(rule, MeansRule):
        d = distances(rule.pooling.apply(h), rule.means[j], rule.means_sq[j])
        return torch.softmax(-d / rule.normalisers[j], dim=-1)
    normalised = None
    if rule.means_rule is not None:
        r = rule.means_rule
        normalised = distances(r.pooling.apply(h), r.means[j], r.means_sq[j]) / r.normalisers[j]
    logits = rule.heads.heads[j](h, normalised if rule.heads.spec.with_distances else None)
    return torch.softmax(logits.float(), dim=1)


# ---------------------------------------------------------------------------------------------
# Records


def records(batch: Batch, predictions: Predictions, exits: list[str], costs: list[float],
            class_names: list[str] | None) -> list[dict[str, Any]]:
    """One record per input: the fields of ``eetool predict``'s output, in their order."""
    classes = predictions.classes.tolist()
    confidence = predictions.confidence.tolist()
    exit_index = predictions.exit_index.tolist()
    top_c = predictions.top_classes.tolist() if predictions.top_classes is not None else None
    top_p = predictions.top_probabilities.tolist() if predictions.top_probabilities is not None else None
    out = []
    for i, name in enumerate(batch.names):
        k, e = classes[i], exit_index[i]
        rec: dict[str, Any] = {"input": name, "class": k, "class_name": _name(class_names, k),
                               "confidence": round(confidence[i], 6), "exit": exits[e], "exit_index": e,
                               "cost": round(costs[e], 6)}
        if batch.labels[i] >= 0:
            rec["label"] = batch.labels[i]
        if top_c is not None and top_p is not None:
            rec["top_k"] = [{"class": c, "class_name": _name(class_names, c), "probability": round(p, 6)}
                            for c, p in zip(top_c[i], top_p[i], strict=True)]
        out.append(rec)
    return out


def _name(class_names: list[str] | None, k: int) -> str | None:
    return class_names[k] if class_names is not None and 0 <= k < len(class_names) else None


# ---------------------------------------------------------------------------------------------
# The run and its summary


@dataclass
class Tally:
    """What the summary on stderr reports."""

    exits: list[str]
    costs: list[float]
    predicted: int = 0
    failed: int = 0
    counts: list[int] = field(default_factory=list)
    model_seconds: float = 0.0
    decode_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.exits)

    def add(self, exit_index: torch.Tensor) -> None:
        for e, c in enumerate(torch.bincount(exit_index.cpu(), minlength=len(self.exits)).tolist()):
            self.counts[e] += c
        self.predicted += len(exit_index)

    def mean_cost(self) -> float:
        return sum(c * k for c, k in zip(self.costs, self.counts, strict=True)) / max(self.predicted, 1)

    def summary(self) -> str:
        shares = ", ".join(f"{name} {c / max(self.predicted, 1):.1%}"
                           for name, c in zip(self.exits, self.counts, strict=True))
        rate = self.predicted / self.model_seconds if self.model_seconds > 0 else math.inf
        overall = self.predicted / (self.model_seconds + self.decode_seconds) if self.predicted else 0.0
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"predicted {self.predicted} inputs{failed}; exits: {shares}; mean cost {self.mean_cost():.4f}; "
                f"{rate:.1f} images/s in the model, {overall:.1f} with decoding "
                f"({self.decode_seconds:.2f} s decoding, {self.model_seconds:.2f} s model)")


def predict_batches(batches: Iterator[Batch], predictor: Predictor, preprocess: Any, device: Any,
                    writer: RecordWriter, tally: Tally, class_names: list[str] | None) -> None:
    """Run every batch through the predictor and write its records before the next batch is read."""
    from eetool.core.prediction_io import timed_predictions

    for batch, out in timed_predictions(batches, predictor, preprocess, device, tally):
        tally.add(out.exit_index)
        writer.write(records(batch, out, tally.exits, tally.costs, class_names))


def record_columns(labelled: bool, top_k: int) -> list[str]:
    """The CSV/TSV header: a record's fields, the K best classes' flattened."""
    return ["input", "class", "class_name", "confidence", "exit", "exit_index", "cost",
            *(["label"] if labelled else []),
            *(f"top{i}_{f}" for i in range(1, top_k + 1) for f in ("class", "class_name", "probability"))]


def flat_record(record: dict[str, Any]) -> dict[str, Any]:
    flat = dict(record)
    for i, t in enumerate(record.get("top_k", []), start=1):
        flat.update({f"top{i}_class": t["class"], f"top{i}_class_name": t["class_name"],
                     f"top{i}_probability": t["probability"]})
    return flat


def predict_classes(run: Run, req: PredictRequest) -> None:
    """Predict the classes of req's inputs with the plain model or at one operating point, writing one record per
    input batch by batch and a summary on stderr (exit 7 when inputs were skipped)."""
    from eetool.classification.early_exit_evaluation import early_exit_setup
    from eetool.core.artifacts import STDOUT
    from eetool.core.datasets import Preprocess, check_labels
    from eetool.core.errors import UsageError
    from eetool.core.prediction_io import (
        FailedInputs,
        RecordOutput,
        dataset_batches,
        file_batches,
        list_inputs,
        write_records,
    )
    from eetool.core.run_inputs import load_data, open_checkpoint

    req.check_inputs()
    if bool(req.means or req.exit_heads) != bool(req.thresholds):
        raise UsageError("early exits need --means and --thresholds (or --exit-heads and --thresholds)",
                         "pass them together, or none for the plain model")
    if req.point is not None and not req.thresholds:
        raise UsageError("--point chooses an operating point of --thresholds", "pass --thresholds, or drop --point")
    if req.output_dir is not None:
        raise UsageError("--output-dir is where a segmentation network's masks go; this checkpoint is a classifier",
                         "drop --output-dir: a classifier's records carry its classes")
    if req.decide_at is not None:
        raise UsageError("--decide-at applies to segmentation thresholds", "drop --decide-at: a classifier's "
                         "exits decide per sample")
    output = None if req.output == STDOUT else req.output
    files = list_inputs(req.inputs) if req.inputs else []
    if output:  # the files listed too: an image named on stdin is an input as much as one named here
        run.check_output(output, force=req.force, inputs=(*req.input_paths(), *files))
    ckpt = open_checkpoint(run, req.checkpoint)
    if req.top_k > ckpt.spec.num_classes:
        raise UsageError(f"--top-k {req.top_k} is more than the model's {ckpt.spec.num_classes} classes",
                         f"use at most {ckpt.spec.num_classes}")
    device = run.torch()
    ckpt.model.eval().to(device)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    if req.thresholds:
        em, rule, (cost_model, _), chosen, clusters, _ = early_exit_setup(
            ckpt, req.means, req.exit_heads, req.thresholds, "all" if req.point is None else str(req.point), device)
        if req.point is None and len(chosen) > 1:
            budgets = ", ".join(f"{i}: budget {p['budget']:g}" for i, p in chosen)
            raise UsageError(f"{req.thresholds} holds {len(chosen)} operating points ({budgets})",
                             "choose one: --point N")
        _, chosen_point = chosen[0]
        predictor = Predictor(ckpt.model, em, rule, list(chosen_point["thresholds"]), req.top_k)
        costs = cost_model.normalised_exit_costs()
    else:
        predictor, costs, clusters = Predictor(ckpt.model, top_k=req.top_k), [1.0], False
    if req.fold_batch_norm:
        predictor = predictor.folded()
    # cluster ids (E²CM on clustered means) have no class names
    class_names = None if clusters else (ckpt.spec.classes or [str(k) for k in range(ckpt.spec.num_classes)])
    tally = Tally(predictor.exits, costs)
    failed = FailedInputs(req.stop_on_error)
    labelled = False
    if req.data:
        ds = load_data(run, req.data, req.split, None, ckpt.spec)
        check_labels(ds, ckpt.spec.num_classes)
        labelled = bool((ds.labels >= 0).any())
        batches = dataset_batches(ds, req.batch_size)
    else:
        geometry = run.data_options.geometry(ckpt.spec.arch, (ckpt.spec.input_shape[1], ckpt.spec.input_shape[2]),
                                           ckpt.spec.resize)
        batches = file_batches(files, geometry, req.batch_size, failed)

    def produce(writer: RecordWriter) -> int:
        with torch.inference_mode():
            predict_batches(batches, predictor, preprocess, device, writer, tally, class_names)
        return tally.predicted

    def summary() -> str:
        tally.failed = failed.count
        return tally.summary()

    write_records(run, RecordOutput(output, run.format.value, record_columns(labelled, req.top_k), flat_record),
                  failed, produce, summary)
