"""Predictions on new inputs (``eetool predict``): inputs listed, decoded, classified by batch, written as records.

The model is evaluate's: the same checkpoint loader, exit rules and thresholds, and the early-exit pass of
``eetool.inference.run_early_exit`` (exits stop computation: the batch is compacted after each one). What a
record adds beyond evaluate's per-sample predictions is read beside that pass, not by another one: the confidence
of the decision that let a sample leave (the rule's score at its exit, the softmax maximum at the model's own
head), taken from the rule's scores and from a forward hook on the last stage, in the order in which the pass
compacts its batch.

Images are decoded by the folder datasets' own ``eetool.streaming.decode_image`` (resize, centre crop) and fed
through the checkpoint's ``Preprocess`` (channels, mean, std), so a file gives the pixels it would as part of a
``--data folder:PATH`` dataset.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from eetool.core.errors import EetoolError, ExitCode, InputError, OutputError
from eetool.core.exits import ExitModel
from eetool.core.interrupts import deferred
from eetool.core.loading import Geometry
from eetool.core.streaming import IMAGE_SUFFIXES, decode_image

HEAD = "head"  # the exit name of the model's own final layer


FORMATS = ("jsonl", "csv", "tsv")  # JSON Lines, or a table with a header row, separated by commas or tabs


class InputsFailedError(EetoolError):
    """Some inputs could not be read; every other input's record was written."""

    exit_code = ExitCode.INPUTS_FAILED


# ---------------------------------------------------------------------------------------------
# Inputs


def list_inputs(paths: Sequence[str], stdin: IO[str] | None = None) -> list[str]:
    """Files as given, folders as their image files (recursive, sorted by path), ``-`` as the paths on stdin (one a
    line, blank lines skipped). A path that does not exist stays in the list: reading it fails as for any
    unreadable input, with its own line on stderr. An empty list is an error."""
    out: list[str] = []
    for path in paths:
        if path == "-":
            lines = (stdin or sys.stdin).read().splitlines()
            out += [p for line in lines if (p := line.strip())]
        elif os.path.isdir(path):
            out += folder_images(path)
        else:
            out.append(path)
    if not out:
        given = " ".join(paths) if paths else "nothing"
        raise InputError(f"no inputs to predict on (given: {given})",
                         "name image files or folders of images, '-' for paths on stdin, or --data NAME[:PATH]")
    return out


def folder_images(folder: str) -> list[str]:
    """The image files under ``folder`` (the suffixes of folder datasets), sorted by their path."""
    found = []
    for root, dirs, files in os.walk(folder, onerror=_raise_unreadable):
        dirs.sort()
        found += [os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _raise_unreadable(e: OSError) -> None:
    raise InputError(f"cannot read folder {e.filename}: {e.strerror}", "check its permissions")


@dataclass
class Batch:
    """Decoded inputs, their names and labels (-1 where unknown)."""

    images: torch.Tensor  # uint8 N x C x H x W
    names: list[str]
    labels: list[int]


def file_batches(files: Sequence[str], geometry: Geometry, batch_size: int,
                 failed: Callable[[InputError], None]) -> Iterator[Batch]:
    """Batches of ``batch_size`` decodable files, in order; each file that cannot be decoded goes to ``failed``
    (which raises to stop the run, or returns to go on without it)."""
    images: list[torch.Tensor] = []
    names: list[str] = []
    for path in files:
        try:
            images.append(decode_image(path, geometry))
        except InputError as e:
            failed(e)
            continue
        names.append(path)
        if len(images) == batch_size:
            yield Batch(torch.stack(images), names, [-1] * len(names))
            images, names = [], []
    if images:
        yield Batch(torch.stack(images), names, [-1] * len(names))


def dataset_batches(ds: Any, batch_size: int) -> Iterator[Batch]:
    """A loaded dataset's batches, each sample named by its file (streamed folder data) or SOURCE/SPLIT#INDEX."""
    files = ds.stream.files if ds.stream is not None else None
    for images, labels, pos in ds.batches(batch_size):
        index = ds.indices[pos] if ds.indices is not None else pos
        names = ([files[i] for i in pos.tolist()] if files is not None
                 else [f"{ds.spec}#{i}" for i in index.tolist()])
        yield Batch(images, names, labels.tolist())


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


class RecordWriter:
    """Records to a text stream, JSON Lines or CSV/TSV with a header, flushed after each batch."""

    def __init__(self, stream: IO[str], fmt: str, labelled: bool, top_k: int) -> None:
        self.stream, self.fmt = stream, fmt
        self.columns = ["input", "class", "class_name", "confidence", "exit", "exit_index", "cost",
                        *(["label"] if labelled else []),
                        *(f"top{i}_{f}" for i in range(1, top_k + 1) for f in ("class", "class_name", "probability"))]
        self.header_written = False

    def write(self, batch_records: list[dict[str, Any]]) -> None:
        if self.fmt == "jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in batch_records)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer, delimiter="," if self.fmt == "csv" else "\t", lineterminator="\n")
            if not self.header_written:
                writer.writerow(self.columns)
                self.header_written = True
            for r in batch_records:
                writer.writerow([_cell(v) for v in _flat(r, self.columns)])
            text = buffer.getvalue()
        self.stream.write(text)
        self.stream.flush()

    def finish(self) -> None:
        """A CSV/TSV of no records still has its header."""
        if self.fmt != "jsonl" and not self.header_written:
            self.write([])


def _flat(record: dict[str, Any], columns: list[str]) -> list[Any]:
    flat = dict(record)
    for i, t in enumerate(record.get("top_k", []), start=1):
        flat.update({f"top{i}_class": t["class"], f"top{i}_class_name": t["class_name"],
                     f"top{i}_probability": t["probability"]})
    return [flat.get(c) for c in columns]


def _cell(v: Any) -> str:
    return "" if v is None else str(v)


class AtomicTextFile:
    """``-o FILE``: records go to a temp file beside FILE, renamed onto it by ``commit``; ``discard`` removes it."""

    def __init__(self, path: str) -> None:
        target = Path(path)
        self.path = path
        with deferred():
            fd, self.tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
            self.stream: IO[str] = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self.tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
            with deferred():
                os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            raise OutputError(f"cannot write {self.path}: {e.strerror}",
                              "check the disk space and permissions") from None

    def discard(self) -> None:
        self.stream.close()
        Path(self.tmp).unlink(missing_ok=True)


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
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        tally.decode_seconds += time.perf_counter() - start
        if batch is None:
            return
        start = time.perf_counter()
        out = predictor(preprocess(batch.images, device))
        tally.model_seconds += time.perf_counter() - start
        tally.add(out.exit_index)
        writer.write(records(batch, out, tally.exits, tally.costs, class_names))
