"""`eetool predict`'s inputs and outputs, for classifiers and segmentation networks: inputs listed and decoded by
batch (as folder datasets decode them), records as JSON Lines, CSV or TSV flushed batch by batch (or ``-o``,
atomically), and the inputs ``--on-error`` skips.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from eetool.core.errors import EetoolError, ExitCode, InputError, OutputError
from eetool.core.interrupts import deferred
from eetool.core.loading import Geometry
from eetool.core.streaming import IMAGE_SUFFIXES, decode_image

if TYPE_CHECKING:
    from eetool.core.datasets import Dataset
    from eetool.core.options import Run


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
    """Decoded inputs, their names and labels (-1 where unknown; a segmentation dataset's masks in ``masks``)."""

    images: torch.Tensor  # uint8 N x C x H x W
    names: list[str]
    labels: list[int]
    positions: list[int]  # each input's place in the input list (files) or in the dataset
    masks: torch.Tensor | None = None  # int16 N x H x W, IGNORE where unlabelled


class Timings(Protocol):
    """Where a prediction run adds the seconds it spent decoding inputs and in the model."""

    decode_seconds: float
    model_seconds: float


Output = TypeVar("Output")


def timed_predictions(batches: Iterator[Batch], predict: Callable[[torch.Tensor], Output],
                      preprocess: Callable[[torch.Tensor, torch.device], torch.Tensor], device: torch.device,
                      timings: Timings) -> Iterator[tuple[Batch, Output]]:
    """Each batch with ``predict``'s output on it, the next batch read only once the caller has handled this one;
    the seconds decoding and in the model are added to ``timings``."""
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        timings.decode_seconds += time.perf_counter() - start
        if batch is None:
            return
        start = time.perf_counter()
        out = predict(preprocess(batch.images, device))
        timings.model_seconds += time.perf_counter() - start
        yield batch, out


class FailedInputs:
    """``--on-error``: counts the inputs that cannot be read; ``stop`` raises at the first, ``skip`` names it on
    stderr and goes on."""

    def __init__(self, stop: bool) -> None:
        self.stop, self.count = stop, 0

    def __call__(self, e: InputError) -> None:
        self.count += 1
        if self.stop:
            raise e
        sys.stderr.write(f"skipped: {e}\n")  # an error about an input: shown under -q too


def file_batches(files: Sequence[str], geometry: Geometry, batch_size: int,
                 failed: Callable[[InputError], None]) -> Iterator[Batch]:
    """Batches of ``batch_size`` decodable files, in order; each file that cannot be decoded goes to ``failed``
    (which raises to stop the run, or returns to go on without it)."""
    images: list[torch.Tensor] = []
    names: list[str] = []
    positions: list[int] = []
    for position, path in enumerate(files):
        try:
            images.append(decode_image(path, geometry))
        except InputError as e:
            failed(e)
            continue
        names.append(path)
        positions.append(position)
        if len(images) == batch_size:
            yield Batch(torch.stack(images), names, [-1] * len(names), positions)
            images, names, positions = [], [], []
    if images:
        yield Batch(torch.stack(images), names, [-1] * len(names), positions)


def dataset_batches(ds: Dataset, batch_size: int) -> Iterator[Batch]:
    """A loaded dataset's batches, each sample named by its file (streamed folder data) or SOURCE/SPLIT#INDEX; a
    segmentation dataset's masks go into ``masks`` (its labels are all -1)."""
    files = ds.stream.files if ds.stream is not None else None
    for images, labels, pos in ds.batches(batch_size):
        index = ds.indices[pos] if ds.indices is not None else pos
        names = ([files[i] for i in pos.tolist()] if files is not None
                 else [f"{ds.spec}#{i}" for i in index.tolist()])
        if labels.dim() == 3:
            yield Batch(images, names, [-1] * len(names), index.tolist(), labels)
        else:
            yield Batch(images, names, labels.tolist(), index.tolist())


# ---------------------------------------------------------------------------------------------
# Records


class RecordWriter:
    """Records to a text stream, JSON Lines or CSV/TSV with a header of ``columns``, flushed after each batch;
    ``flatten`` turns a record's nested fields into columns."""

    def __init__(self, stream: IO[str], fmt: str, columns: list[str],
                 flatten: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.stream, self.fmt, self.columns, self.flatten = stream, fmt, columns, flatten
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
                flat = self.flatten(r)
                writer.writerow(["" if flat.get(c) is None else str(flat.get(c)) for c in self.columns])
            text = buffer.getvalue()
        self.stream.write(text)
        self.stream.flush()

    def finish(self) -> None:
        """A CSV/TSV of no records still has its header."""
        if self.fmt != "jsonl" and not self.header_written:
            self.write([])


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


@dataclass
class RecordOutput:
    """Where the records go (stdout, or ``output`` atomically), their format and columns."""

    output: str | None
    fmt: str
    columns: list[str]
    flatten: Callable[[dict[str, Any]], dict[str, Any]]


def write_records(run: Run, out: RecordOutput, failed: FailedInputs, produce: Callable[[RecordWriter], int],
                  summary: Callable[[], str]) -> None:
    """Run ``produce`` (which writes the records batch by batch and returns how many inputs it predicted), then
    commit ``-o``, log ``summary`` and end with InputsFailedError when inputs were skipped. On --on-error stop the
    records written before the bad input stand; on any other failure ``-o`` is left as it was."""
    target = AtomicTextFile(out.output) if out.output else None
    writer = RecordWriter(target.stream if target else sys.stdout, out.fmt, out.columns, out.flatten)
    try:
        predicted = produce(writer)
    except InputError as e:
        if target is not None and failed.count:  # --on-error stop: the records before the bad input stand
            writer.finish()
            target.commit()
        elif target is not None:
            target.discard()
        run.reporter.log(summary())
        raise e from None
    except BaseException:
        if target is not None:
            target.discard()
        raise
    writer.finish()
    if target is not None:
        target.commit()
    run.reporter.log(summary())
    if out.output:
        run.wrote(out.output)
    if failed.count:
        raise InputsFailedError(f"{failed.count} of {failed.count + predicted} inputs could not be read "
                                "(each is named above); the others were predicted",
                                "remove or re-encode those files")


@dataclass(frozen=True)
class PredictRequest:
    """``eetool predict``'s options, for a classifier (``predict_classes``) or a segmentation network
    (``predict_masks``)."""

    checkpoint: str
    inputs: list[str]  # image files, folders, '-' (empty: --data)
    data: str | None
    split: str
    means: str | None
    exit_heads: str | None
    thresholds: str | None
    point: int | None
    top_k: int
    batch_size: int
    stop_on_error: bool  # --on-error stop (else skip)
    output: str | None  # the records' file (None: stdout)
    force: bool
    output_dir: str | None = None  # segmentation: the folder of the mask PNGs
    decide_at: str | None = None  # segmentation thresholds: pixel or feature (None: the file's)
    fold_batch_norm: bool = True  # classifiers: run a copy with batch norm folded into the convolutions

    def check_inputs(self) -> None:
        """INPUTS or --data, one of the two."""
        from eetool.core.errors import UsageError

        if bool(self.inputs) == bool(self.data):
            raise UsageError("predict takes INPUTS or --data, one of the two",
                             "name image files or folders (or '-' for paths on stdin), or give --data NAME[:PATH]")

    def input_paths(self) -> tuple[str | None, ...]:
        """The files the run reads, which no output may replace."""
        from eetool.core.run_inputs import data_path

        return (self.checkpoint, self.means, self.exit_heads, self.thresholds,
                data_path(self.data) if self.data else None, *self.inputs)
