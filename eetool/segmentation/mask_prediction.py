"""Masks of a segmentation network on new inputs (``eetool predict`` on a segmentation checkpoint): evaluate's
plain or early-exit pass, batch by batch; one mask PNG and one record (exit shares, cost) per input.
Method, palette and file names: docs/predict-and-export.md#segmentation-masks
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eetool.core.artifacts import atomic_write
from eetool.core.errors import InputError, ModelMismatchError, OutputError, UsageError
from eetool.segmentation import IGNORE
from eetool.segmentation.model import EXIT_NAMES, EESegNet

if TYPE_CHECKING:
    from eetool.core.datasets import Dataset
    from eetool.core.options import Run
    from eetool.core.prediction_io import Batch, PredictRequest, RecordWriter
    from eetool.segmentation.networks import SegmentationNet

MAX_MASK_CLASSES = 256  # mask PNGs hold one 8-bit class index a pixel


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (class 0 black, 1 dark red, 2 dark green, ...): the bits of the class index spread
    over the high bits of red, green and blue; 256 colours as 768 values."""
    palette = []
    for k in range(MAX_MASK_CLASSES):
        r = g = b = 0
        c = k
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def source_palette(ds: Dataset) -> list[int] | None:
    """The palette of a ``segmentation-folder`` source's masks, where its first mask is a palette PNG."""
    if ds.name != "segmentation-folder":
        return None
    from PIL import Image

    masks = sorted(p for p in (Path(ds.source) / ds.split / "masks").iterdir() if p.suffix.lower() == ".png")
    with Image.open(masks[0]) as first:
        return first.getpalette() if first.mode == "P" else None


def mask_png(classes: torch.Tensor, palette: list[int]) -> bytes:
    """An H x W class map as an 8-bit palette PNG (the pixel value is the class index)."""
    from PIL import Image

    image = Image.fromarray(classes.to(torch.uint8).cpu().numpy())  # mode L: one byte a pixel
    image.putpalette(palette)  # mode P, the same bytes
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_mask_names(files: list[str]) -> list[str]:
    """One mask name per input file: its name's stem with .png; a name already taken gets -2, -3, ... (the first
    free one) in input order."""
    taken: set[str] = set()
    names = []
    for path in files:
        stem, n = Path(path).stem, 1
        name = f"{stem}.png"
        while name in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name)
        names.append(name)
    return names


def dataset_mask_names(ds: Dataset) -> dict[int, str]:
    """SOURCE-SPLIT-INDEX.png for each sample, by its index in the whole split (zero-padded to the largest)."""
    indices = ds.indices.tolist() if ds.indices is not None else list(range(len(ds)))
    digits = len(str(max(indices, default=0)))
    return {i: f"{ds.name}-{ds.split}-{i:0{digits}d}.png" for i in indices}


# ---------------------------------------------------------------------------------------------
# The network


@dataclass
class MaskPrediction:
    classes: torch.Tensor  # B x H x W class map
    exit_index: torch.Tensor  # B x H x W (uint8): the exit each pixel left by (the plain network: the final)
    macs: torch.Tensor  # float64, B: multiply-adds of each image


@dataclass
class MaskPredictor:
    """The plain network (``thresholds`` None), or its pixel exits under ``thresholds`` (early exits x classes)."""

    model: SegmentationNet
    input_shape: tuple[int, int, int]
    thresholds: torch.Tensor | None = None
    decide_at: str = "pixel"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> MaskPrediction:
        from eetool.segmentation.networks import early_exit_forward, plain_macs

        batch, _, height, width = x.shape
        if self.thresholds is None:
            # max's indices, as evaluate's plain pass takes them
            classes = self.model(x).max(1).indices
            final = torch.full((batch, height, width), len(EXIT_NAMES) - 1, dtype=torch.uint8, device=x.device)
            macs = torch.full((batch,), float(plain_macs(self.model, self.input_shape)), dtype=torch.float64)
            return MaskPrediction(classes, final, macs)
        result = early_exit_forward(self.model, x, self.thresholds, decide_at=self.decide_at)
        return MaskPrediction(result.exit_predictions[-1], result.exit_index,
                              image_macs(self.model, result.exit_index.cpu(), self.input_shape))


def image_macs(model: SegmentationNet, exit_index: torch.Tensor, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """float64, B: each image's multiply-adds in the early-exit pass, from the exit each pixel left by; they add up
    to the pass's ``macs``. Accounting: docs/predict-and-export.md#segmentation-masks"""
    last = len(EXIT_NAMES) - 1
    if isinstance(model, EESegNet):
        from typing import cast

        from torch import nn

        from eetool.segmentation.masked import cover
        from eetool.segmentation.model import Block, PositionCosts, grid_size, neighbourhoods

        costs = PositionCosts.of(model)
        gh, gw = grid_size(model, exit_index.shape[1], exit_index.shape[2])
        macs = torch.full((exit_index.shape[0],), gh * gw * costs.stem, dtype=torch.int64)
        for n in range(last + 1):
            active = cover(exit_index >= n, (gh, gw))  # the positions with a pixel that has not left before exit n
            count = active.flatten(1).sum(1)
            for block in cast(list[Block], list(cast(nn.Sequential, model.stages[n]))):
                macs += (neighbourhoods(active, block.dilation).flatten(1).sum(1) + count) * costs.conv
            macs += count * costs.head
        return macs.double()
    from eetool.segmentation.tv import dense_costs

    dense = dense_costs(model, input_shape)
    out = torch.full((exit_index.shape[0],), float(dense.stages[0] + dense.heads[0]), dtype=torch.float64)
    for n in range(1, last + 1):
        share = (exit_index >= n).flatten(1).double().mean(1)
        out += share * (dense.stages[n] + (dense.heads[n] if n < last else 0))
    return out


# ---------------------------------------------------------------------------------------------
# Records and the summary


COLUMNS = ["input", "mask", *(f"share_{e}" for e in EXIT_NAMES), "cost"]


def flat_record(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, **{f"share_{e}": s for e, s in record["exit_shares"].items()}}


@dataclass
class MaskTally:
    """What the summary on stderr reports."""

    predicted: int = 0
    failed: int = 0
    pixels: list[int] = field(default_factory=lambda: [0] * len(EXIT_NAMES))  # pixels leaving at each exit
    cost: float = 0.0  # summed over the images
    model_seconds: float = 0.0
    decode_seconds: float = 0.0
    write_seconds: float = 0.0  # the mask PNGs'

    def summary(self) -> str:
        total = max(sum(self.pixels), 1)
        shares = ", ".join(f"{e} {c / total:.1%}" for e, c in zip(EXIT_NAMES, self.pixels, strict=True))
        rate = self.predicted / self.model_seconds if self.model_seconds > 0 else float("inf")
        overall = self.predicted / (self.model_seconds + self.decode_seconds) if self.predicted else 0.0
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"predicted {self.predicted} masks{failed}; pixels leaving at: {shares}; mean cost "
                f"{self.cost / max(self.predicted, 1):.4f}; {rate:.1f} images/s in the model, {overall:.1f} with "
                f"decoding ({self.decode_seconds:.2f} s decoding, {self.model_seconds:.2f} s model, "
                f"{self.write_seconds:.2f} s writing masks)")


@dataclass
class MaskOutputs:
    """Where each input's mask goes, and in which colours; the masks a run has created, to remove when it does not
    finish."""

    folder: Path
    names: dict[int, str]  # an input's position (in the file list or the dataset) to its mask file's name
    palette: list[int]
    made_folder: bool = False  # this run created the folder
    created: list[str] = field(default_factory=list)  # the masks this run wrote where no file was

    def path(self, position: int) -> str:
        return str(self.folder / self.names[position])

    def write(self, position: int, png: bytes) -> None:
        """The input's mask, written atomically; noted before it is written, so that an interrupt at any point
        leaves no mask of this run unnoted."""
        path = self.path(position)
        if not Path(path).exists():
            self.created.append(path)
        atomic_write(path, png)

    def remove_unfinished(self) -> None:
        """Remove the masks this run created, and the folder if this run created it and nothing else is in it; the
        masks that replaced files under --force stay (what they replaced is gone)."""
        for path in self.created:
            Path(path).unlink(missing_ok=True)
        if self.made_folder and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def records(batch: Batch, out: MaskPrediction, masks: MaskOutputs, dense: float) -> list[dict[str, Any]]:
    """One record per input: its name, its mask file, the share of its pixels leaving at each exit, its cost and,
    where the data has masks, its pixel accuracy."""
    pixels = out.exit_index[0].numel()
    counts = torch.stack([torch.bincount(e.flatten().long().cpu(), minlength=len(EXIT_NAMES))
                          for e in out.exit_index]).tolist()
    costs = (out.macs / dense).tolist()
    result = []
    for i, name in enumerate(batch.names):
        rec: dict[str, Any] = {"input": name, "mask": masks.path(batch.positions[i]),
                               "exit_shares": {e: round(c / pixels, 6) for e, c in zip(EXIT_NAMES, counts[i],
                                                                                          strict=True)},
                               "cost": round(costs[i], 6)}
        if batch.masks is not None:
            labelled = batch.masks[i] != IGNORE
            if bool(labelled.any()):
                right = (out.classes[i].cpu() == batch.masks[i].long())[labelled]
                rec["pixel_accuracy"] = round(float(right.double().mean()), 6)
        result.append(rec)
    return result


def predict_batches(batches: Iterator[Batch], predictor: MaskPredictor, preprocess: Any, device: torch.device,
                    masks: MaskOutputs, writer: RecordWriter, tally: MaskTally) -> None:
    """Run every batch through the predictor, write its masks (each atomically), then its records, before the next
    batch is read."""
    from eetool.core.prediction_io import timed_predictions
    from eetool.segmentation.networks import plain_macs

    dense = float(plain_macs(predictor.model, predictor.input_shape))
    for batch, out in timed_predictions(batches, predictor, preprocess, device, tally):
        start = time.perf_counter()
        for i, position in enumerate(batch.positions):
            masks.write(position, mask_png(out.classes[i], masks.palette))
        tally.write_seconds += time.perf_counter() - start
        batch_records = records(batch, out, masks, dense)
        for r, e in zip(batch_records, out.exit_index, strict=True):
            tally.cost += r["cost"]
            tally.pixels = [a + b for a, b in zip(tally.pixels, torch.bincount(
                e.flatten().long().cpu(), minlength=len(EXIT_NAMES)).tolist(), strict=True)]
        tally.predicted += len(batch.names)
        writer.write(batch_records)


# ---------------------------------------------------------------------------------------------
# The run


def predict_masks(run: Run, req: PredictRequest) -> None:
    """Predict a mask for each of req's inputs with the plain network or its pixel exits, writing the mask PNGs
    into req.output_dir and one record per input batch by batch, and a summary on stderr (exit 7 when inputs were
    skipped)."""
    from eetool.core.artifacts import STDOUT
    from eetool.core.datasets import Preprocess
    from eetool.core.prediction_io import (
        FailedInputs,
        RecordOutput,
        dataset_batches,
        file_batches,
        list_inputs,
        write_records,
    )
    from eetool.core.run_inputs import open_checkpoint
    from eetool.segmentation.class_thresholds import SegmentationThresholds
    from eetool.segmentation.evaluation import rule_of
    from eetool.segmentation.inputs import load_masks, require_segmentation

    req.check_inputs()
    _check_options(req)
    output = None if req.output == STDOUT else req.output
    assert req.output_dir is not None
    files = list_inputs(req.inputs) if req.inputs else []
    if output:  # the files listed too: an image named on stdin is an input as much as one named here
        run.check_output(output, force=req.force, inputs=(*req.input_paths(), *files))
    folder = _check_folder(req.output_dir)
    ckpt = open_checkpoint(run, req.checkpoint)
    model = require_segmentation(ckpt, "predict with --thresholds" if req.thresholds else "predict",
                                 exits=bool(req.thresholds))
    if model.num_classes > MAX_MASK_CLASSES:
        raise ModelMismatchError(f"{ckpt.label} has {model.num_classes} classes; mask PNGs hold 8-bit class indices "
                                 f"(at most {MAX_MASK_CLASSES} classes)", "use `eetool evaluate` on this network")
    thresholds, decide_at = None, "pixel"
    if req.thresholds:
        fitted = SegmentationThresholds.load_for(req.thresholds, ckpt, model.num_classes)
        thresholds, decide_at = fitted.thresholds, rule_of(fitted, req)
    device = run.torch()
    model.eval().to(device)
    shape = ckpt.spec.input_shape
    preprocess = Preprocess(shape, ckpt.spec.mean, ckpt.spec.std)
    if req.data:
        ds = load_masks(req.data, req.split, None, ckpt)
        names = dataset_mask_names(ds)
        palette = source_palette(ds) or voc_palette()
    else:
        names = dict(enumerate(file_mask_names(files)))
        palette = voc_palette()
    masks = MaskOutputs(folder, names, palette)
    _check_mask_paths(masks, (*req.input_paths(), *files), req.force, output)
    failed = FailedInputs(req.stop_on_error)
    if req.data:
        batches = dataset_batches(ds, req.batch_size)
    else:
        geometry = run.data_options.geometry(ckpt.spec.arch, (shape[1], shape[2]), ckpt.spec.resize)
        batches = file_batches(files, geometry, req.batch_size, failed)
    predictor = MaskPredictor(model, shape, thresholds, decide_at)
    tally = MaskTally()
    if not folder.is_dir():
        try:
            folder.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create the folder {folder}: {e.strerror}",
                              "check the disk space and permissions") from None
        masks.made_folder = True
    finished = False

    def produce(writer: RecordWriter) -> int:
        nonlocal finished
        predict_batches(batches, predictor, preprocess, device, masks, writer, tally)
        finished = True
        run.wrote(f"{tally.predicted} masks in {folder}")
        return tally.predicted

    def summary() -> str:
        tally.failed = failed.count
        return tally.summary()

    try:
        write_records(run, RecordOutput(output, run.format.value, _columns(req), flat_record), failed, produce,
                      summary)
    except BaseException as e:
        # An interrupted or failed run leaves no masks, as it leaves no -o; --on-error stop keeps the masks of the
        # records written before the bad input, as it keeps those records.
        if not finished and not (isinstance(e, InputError) and failed.count):
            masks.remove_unfinished()
        raise


def _columns(req: PredictRequest) -> list[str]:
    return COLUMNS + (["pixel_accuracy"] if req.data else [])


def _check_options(req: PredictRequest) -> None:
    from eetool.core.choices import DECIDE_AT

    if req.output_dir is None:
        raise UsageError("a segmentation checkpoint writes one mask PNG per input: --output-dir is needed",
                         "add --output-dir DIR")
    given = [flag for flag, value in (("--means", req.means), ("--exit-heads", req.exit_heads),
                                      ("--top-k", req.top_k or None)) if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} apply to classifiers, not to a segmentation checkpoint",
                         "predict with a segmentation network's --thresholds from `eetool fit-thresholds --method "
                         "cbt|cbt-ns|adp-c`, or none for the plain network")
    if req.point is not None and not req.thresholds:
        raise UsageError("--point chooses an operating point of --thresholds", "pass --thresholds, or drop --point")
    if req.point is not None and req.point != 0:
        raise UsageError(f"--point {req.point}: a segmentation thresholds file holds one operating point (0)",
                         "drop --point")
    if req.decide_at is not None and not req.thresholds:
        raise UsageError("--decide-at applies to early exits", "give --thresholds, or drop --decide-at for the "
                         "plain network")
    if req.decide_at is not None and req.decide_at not in DECIDE_AT:
        raise UsageError(f"unknown --decide-at {req.decide_at!r}", f"use one of {', '.join(DECIDE_AT)}")


def _check_folder(output_dir: str) -> Path:
    """--output-dir: an existing folder, or one to create in an existing, writable folder."""
    import os

    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output-dir {output_dir} is not a folder", "give a folder for the mask PNGs")
    parent = folder if folder.is_dir() else (folder.parent if str(folder.parent) else Path("."))
    if not parent.is_dir():
        raise OutputError(f"folder {parent} of --output-dir {output_dir} does not exist", "create it first (mkdir -p)")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder {parent} of --output-dir {output_dir} is not writable", "choose a writable folder")
    return folder


def _check_mask_paths(masks: MaskOutputs, inputs: tuple[str | None, ...], force: bool, output: str | None) -> None:
    """Before any mask is written: none replaces an input or -o, and none exists unless --force (the rules of
    ``eetool.core.artifacts.check_output``, each input resolved once)."""
    from eetool.core.artifacts import STDOUT, check_output

    if output is not None and Path(output).resolve().parent == masks.folder.resolve() and Path(
            output).name in set(masks.names.values()):
        raise OutputError(f"-o {output} is also the mask of an input", "write the records to another file")
    if not masks.folder.is_dir() or not masks.names:
        return  # a new folder: nothing in it to replace
    check_output(masks.path(next(iter(masks.names))), force=True)  # the folder: writable, not eetool's demo
    read = {Path(p).resolve() for p in inputs if p and p != STDOUT and Path(p).exists()}
    for position in masks.names:
        path = Path(masks.path(position))
        if path.exists() and path.resolve() in read:
            raise OutputError(f"output {path} is also an input", "write the result to another file")
        if path.exists():
            check_output(str(path), force=force)
