"""``eetool-runtime predict BUNDLE INPUTS...``: eetool predict's command line, records, errors and exit codes, on a
bundle instead of a checkpoint."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np

from eetool_runtime import __version__
from eetool_runtime.bundle import Bundle, Predictions
from eetool_runtime.errors import (
    ExitCode,
    InputError,
    InputsFailedError,
    OutputError,
    RuntimeToolError,
    UsageError,
)
from eetool_runtime.images import decode_image, list_inputs
from eetool_runtime.masks import MaskPredictions, check_outside_bundle

FORMATS = ("jsonl", "csv", "tsv")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as eetool's usage errors
        sys.stderr.write(f"error: {message} (hint: see `{self.prog} --help`)\n")
        sys.exit(ExitCode.USAGE)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="eetool-runtime", description="Run an eetool bundle (eetool export) without PyTorch.")
    top.add_argument("--version", action="version", version=f"eetool-runtime {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("predict", help="classes of images, one record per input",
                       description="Predict the classes of images (files, folders, '-' for paths on stdin) with a "
                       "bundle at one operating point: one record per input, JSON Lines (default), CSV or TSV, "
                       "written batch by batch; a summary on stderr. A segmentation bundle writes one mask PNG per "
                       "input into --output-dir, and its record names the mask.")
    p.add_argument("bundle", help="the folder `eetool export -o` wrote")
    p.add_argument("inputs", nargs="+", help="image files, folders of images (recursive, sorted) or '-'")
    p.add_argument("--point", type=_natural, default=None, help="operating point of the bundle (its index; may be "
                   "left out when it holds one)")
    p.add_argument("--top-k", type=_natural, default=0, help="also the K most probable classes")
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="jsonl, csv or tsv")
    p.add_argument("-b", "--batch-size", type=_positive, default=64, help="images per batch")
    p.add_argument("--threads", type=_positive, default=None, help="onnxruntime threads (default: its own)")
    p.add_argument("--on-error", choices=("skip", "stop"), default="skip", help="an input that cannot be read: skip "
                   "it (the run ends with exit 7) or stop there (exit 3)")
    p.add_argument("--output-dir", default=None, help="segmentation bundles: the folder the mask PNGs go to, one "
                   "per input (created if missing)")
    p.add_argument("-o", "--output", default=None, help="write the records to this file (atomically) instead of "
                   "stdout")
    p.add_argument("--force", action="store_true", help="replace an existing --output (and existing masks in "
                   "--output-dir)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return top


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _natural(text: str) -> int:
    value = _whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _interrupt)
    try:
        predict(args)
    except RuntimeToolError as e:
        _fail(e.exit_code, f"error: {e}", args.debug)
    except KeyboardInterrupt:
        _fail(ExitCode.INTERRUPTED, "interrupted: no output was written (partial files are removed)", args.debug)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(ExitCode.BROKEN_PIPE)
    except Exception as e:  # a bug (or memory run out): one line, as eetool's, unless --debug asks for the traceback
        first = str(e).splitlines()[0] if str(e).strip() else ""
        _fail(ExitCode.INTERNAL, f"internal error: {type(e).__name__}: {first} (hint: rerun with --debug and report "
              "the traceback)", args.debug)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _fail(code: int, line: str, debug: bool = False) -> NoReturn:
    if debug:
        traceback.print_exc()
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.exit(code)


def predict(args: argparse.Namespace) -> None:
    output = None if args.output in (None, "-") else Path(args.output)
    files = list_inputs(args.inputs)
    if output is not None:
        _check_output(output, args.force, files, Path(args.bundle))
    bundle = Bundle(args.bundle, args.threads)
    job: _ClassPredictions | MaskPredictions = (MaskPredictions(args, files, bundle, output)
                                                 if bundle.task == "segmentation" else _ClassPredictions(args, bundle))
    tally = job.tally

    def failed(e: InputError) -> None:
        tally.failed += 1
        if args.on_error == "stop":
            raise e
        sys.stderr.write(f"skipped: {e}\n")

    job.start()
    target = _AtomicTextFile(output) if output else None
    writer = _RecordWriter(target.stream if target else sys.stdout, args.format, job.columns, job.flatten)
    try:
        for names, positions, images, decode_seconds in _batches(files, bundle, args.batch_size, failed):
            tally.decode_seconds += decode_seconds
            writer.write(job(names, positions, images))
    except InputError:
        if target is not None and tally.failed:  # --on-error stop: the records before the bad input stand
            writer.finish()
            target.commit()
        elif target is not None:
            target.discard()
        if not tally.failed:  # --on-error stop keeps the masks of the records before the bad input, as those
            job.abandon()
        if not args.quiet:
            sys.stderr.write(tally.summary() + "\n")
        raise
    except BaseException:
        if target is not None:
            target.discard()
        job.abandon()
        raise
    writer.finish()
    if target is not None:
        target.commit()
    if not args.quiet:
        wrote = job.wrote()
        sys.stderr.write((f"{wrote}\n" if wrote else "") + tally.summary() + "\n")
        if output is not None:
            sys.stderr.write(f"wrote {output}\n")
    if tally.failed:
        raise InputsFailedError(f"{tally.failed} of {tally.failed + tally.predicted} inputs could not be read "
                                "(each is named above); the others were predicted", "remove or re-encode those files")


class _ClassPredictions:
    """``predict`` on a classifier's bundle: a record per input at the chosen operating point."""

    def __init__(self, args: argparse.Namespace, bundle: Bundle) -> None:
        self.thresholds = bundle.thresholds(args.point)
        if args.top_k > len(bundle.classes):
            raise UsageError(f"--top-k {args.top_k} is more than the bundle's {len(bundle.classes)} classes",
                             f"use at most {len(bundle.classes)}")
        if args.output_dir is not None:
            raise UsageError("--output-dir is where a segmentation network's masks go; this bundle holds a "
                             "classifier", "drop --output-dir: a classifier's records carry its classes")
        self.bundle, self.top_k = bundle, args.top_k
        self.tally = _Tally(bundle.exits, bundle.costs, bundle.quantization)
        self.columns = ["input", "class", "class_name", "confidence", "exit", "exit_index", "cost",
                        *(f"top{i}_{f}" for i in range(1, args.top_k + 1)
                          for f in ("class", "class_name", "probability"))]

    def start(self) -> None:
        """Nothing to prepare: the records are the only output."""

    def abandon(self) -> None:
        """Nothing to remove: the records are the only output."""

    @staticmethod
    def flatten(record: dict[str, Any]) -> dict[str, Any]:
        flat = dict(record)
        for i, t in enumerate(record.get("top_k", []), start=1):
            flat.update({f"top{i}_class": t["class"], f"top{i}_class_name": t["class_name"],
                         f"top{i}_probability": t["probability"]})
        return flat

    def __call__(self, names: list[str], positions: list[int], images: np.ndarray) -> list[dict[str, Any]]:
        start = time.perf_counter()
        out = self.bundle(images, self.thresholds, self.top_k)
        self.tally.model_seconds += time.perf_counter() - start
        self.tally.add(out.exit_index)
        return _records(names, out, self.bundle)

    def wrote(self) -> str | None:
        return None


def _batches(files: list[str], bundle: Bundle, batch_size: int, failed: Any
             ) -> Iterator[tuple[list[str], list[int], np.ndarray, float]]:
    """Batches of decodable files: their names, their places in ``files``, the images and the seconds decoding
    them took; a file that cannot be decoded goes to ``failed``."""
    names: list[str] = []
    positions: list[int] = []
    images: list[np.ndarray] = []
    start = time.perf_counter()
    for position, path in enumerate(files):
        try:
            images.append(decode_image(path, bundle.resize, bundle.crop))
        except InputError as e:
            failed(e)
            continue
        names.append(path)
        positions.append(position)
        if len(images) == batch_size:
            yield names, positions, np.stack(images), time.perf_counter() - start
            names, positions, images = [], [], []
            start = time.perf_counter()
    if images:
        yield names, positions, np.stack(images), time.perf_counter() - start


def _records(names: list[str], out: Predictions, bundle: Bundle) -> list[dict[str, Any]]:
    classes, confidence, exit_index = out.classes.tolist(), out.confidence.tolist(), out.exit_index.tolist()
    top_c = out.top_classes.tolist() if out.top_classes is not None else None
    top_p = out.top_probabilities.tolist() if out.top_probabilities is not None else None
    recs = []
    for i, name in enumerate(names):
        k, e = classes[i], exit_index[i]
        rec: dict[str, Any] = {"input": name, "class": k, "class_name": _name(bundle.classes, k),
                               "confidence": round(confidence[i], 6), "exit": bundle.exits[e], "exit_index": e,
                               "cost": round(bundle.costs[e], 6)}
        if top_c is not None and top_p is not None:
            rec["top_k"] = [{"class": c, "class_name": _name(bundle.classes, c), "probability": round(p, 6)}
                            for c, p in zip(top_c[i], top_p[i], strict=True)]
        recs.append(rec)
    return recs


def _name(classes: list[str], k: int) -> str | None:
    return classes[k] if 0 <= k < len(classes) else None


class _RecordWriter:
    """Records as JSON Lines, or CSV/TSV rows of ``columns`` (``flatten`` turns a record's nested fields into
    columns), flushed after each batch."""

    def __init__(self, stream: IO[str], fmt: str, columns: list[str],
                 flatten: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.stream, self.fmt, self.columns, self.flatten = stream, fmt, columns, flatten
        self.header_written = False

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.fmt == "jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer, delimiter="," if self.fmt == "csv" else "\t", lineterminator="\n")
            if not self.header_written:
                writer.writerow(self.columns)
                self.header_written = True
            for r in records:
                flat = self.flatten(r)
                writer.writerow(["" if flat.get(c) is None else str(flat.get(c)) for c in self.columns])
            text = buffer.getvalue()
        self.stream.write(text)
        self.stream.flush()

    def finish(self) -> None:
        if self.fmt != "jsonl" and not self.header_written:
            self.write([])


def _check_output(path: Path, force: bool, inputs: list[str], bundle: Path) -> None:
    """Refuse an output that is an input, lies in the bundle, is a folder, exists without --force, or whose folder
    is missing or unwritable."""
    if path.exists() and path.resolve() in {Path(p).resolve() for p in inputs if os.path.exists(p)}:
        raise OutputError(f"output {path} is also an input", "write the result to another file")
    check_outside_bundle(path, bundle, "output")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder", "give a file name")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists", "pass --force to replace it, or choose another name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"folder {parent} of output {path} does not exist", "create it first (mkdir -p)")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder {parent} of output {path} is not writable", "choose a writable folder")


class _AtomicTextFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        self.stream: IO[str] = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self.tmp, 0o666 & ~mask)
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            raise OutputError(f"cannot write {self.path}: {e.strerror}",
                              "check the disk space and permissions") from None

    def discard(self) -> None:
        self.stream.close()
        Path(self.tmp).unlink(missing_ok=True)


class _Tally:
    def __init__(self, exits: list[str], costs: list[float], quantization: str) -> None:
        self.exits, self.costs, self.quantization = exits, costs, quantization
        self.counts = [0] * len(exits)
        self.predicted = self.failed = 0
        self.model_seconds = self.decode_seconds = 0.0

    def add(self, exit_index: np.ndarray) -> None:
        for e, c in enumerate(np.bincount(exit_index, minlength=len(self.exits)).tolist()):
            self.counts[e] += c
        self.predicted += len(exit_index)

    def summary(self) -> str:
        n = max(self.predicted, 1)
        shares = ", ".join(f"{name} {c / n:.1%}" for name, c in zip(self.exits, self.counts, strict=True))
        mean_cost = sum(c * k for c, k in zip(self.costs, self.counts, strict=True)) / n
        rate = self.predicted / self.model_seconds if self.model_seconds > 0 else math.inf
        overall = self.predicted / (self.model_seconds + self.decode_seconds) if self.predicted else 0.0
        failed = f", {self.failed} failed" if self.failed else ""
        stages = "; int8 stages" if self.quantization == "int8" else ""
        return (f"predicted {self.predicted} inputs{failed}{stages}; exits: {shares}; mean cost {mean_cost:.4f}; "
                f"{rate:.1f} images/s in the model, {overall:.1f} with decoding "
                f"({self.decode_seconds:.2f} s decoding, {self.model_seconds:.2f} s model)")
