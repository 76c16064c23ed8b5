"""``eetool export`` for a segmentation checkpoint: a bundle of the plain network (its final exit), which
``eetool-runtime predict`` turns into mask PNGs as ``eetool predict --output-dir`` writes them.

The one graph is ``torch.onnx.export`` of the decoded images through the checkpoint's preprocessing, the network,
its final exit's logits upsampled to the input and their argmax (the class map, one byte a pixel). Pixel exits
(CBT, CBT-ns, ADP-C) are not exported: their saving comes from computing only the pixels still active (gathered
convolutions over a changing set of positions), which a stage graph of fixed layout would compute densely, so a
bundle of them would cost what the plain network costs. The bundle's layout, manifest and SHA256SUMS are those of
a classifier's (eetool.classification.bundle_export), with ``task: segmentation``.

Layout: docs/predict-and-export.md#segmentation-bundles
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eetool.core.bundles import (
    BUNDLE_FORMAT,
    BUNDLE_SCHEMA,
    OPSET,
    BundleMismatchError,
    ExportRequest,
    bundle_folder,
    check_target,
    preprocessing_record,
    require_onnx,
    seal,
)
from eetool.core.errors import ModelMismatchError, UsageError
from eetool.segmentation.mask_prediction import MAX_MASK_CLASSES, MaskPredictor, source_palette, voc_palette
from eetool.segmentation.model import EXIT_NAMES

if TYPE_CHECKING:
    from eetool.core.checkpoint import Checkpoint
    from eetool.core.datasets import Preprocess
    from eetool.core.options import Run
    from eetool.segmentation.networks import SegmentationNet

TASK = "segmentation"
GRAPH = "stage_0.onnx"
# The outputs of the graph, in order: the class of every pixel (uint8 N x H x W, at the input size), and the
# final exit's logits it is the argmax of (float32 N x K x H x W)
MASK_OUTPUTS = ["classes", "logits"]
# A pixel whose class differs between onnxruntime and eetool's pass is rounding when eetool's logits of the two
# classes lie within this of each other (relative to the larger logit's size, at least 1): the float32 logits of the
# two agree to about 1e-6 on eeseg, so a gap below 1e-4 is a tie that either may break either way.
TIE_TOLERANCE = 1e-4
CHECK_BATCH = 64  # images per onnxruntime and torch call in the self-check


class _MaskGraph(nn.Module):
    """Decoded uint8 images to the class map: preprocessing, the plain network (logits upsampled to the input)
    and the argmax over the classes, as ``eetool predict``'s plain pass."""

    def __init__(self, model: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.preprocess(images))
        return logits.argmax(1).to(torch.uint8), logits


def palette_hex(palette: list[int]) -> str:
    """A PNG palette (red, green, blue of up to 256 colours: PASCAL VOC's 256, a source's as its masks hold it) as
    6 hex digits a colour, one line of the manifest."""
    return bytes(palette).hex()


def check_request(req: ExportRequest) -> None:
    """The options a segmentation bundle does not take, before anything is read."""
    given = [flag for flag, value in (("--means", req.means), ("--exit-heads", req.exit_heads)) if value]
    if given:
        raise UsageError(f"{', '.join(given)} apply to classifiers, not to a segmentation checkpoint",
                         "drop them: a segmentation network exports as its plain network")
    if req.thresholds:
        raise UsageError("--thresholds: a segmentation network's exits are per pixel (CBT, CBT-ns, ADP-C), and pixel "
                         "exits do not export yet", "drop --thresholds: the plain network exports "
                         "(docs/predict-and-export.md#what-exports-and-what-does-not)")
    if req.quantize != "none" or req.calibration_data is not None:
        raise UsageError("--quantize and --calibration-data apply to classifier bundles; a segmentation bundle is "
                         "float", "drop them")


@dataclass
class MaskCheck:
    samples: int
    pixels: int
    differ_at_ties: int  # pixels of another class in onnxruntime, each a tie of eetool's logits


def self_check(folder: Path, model: SegmentationNet, preprocess: Preprocess, input_shape: tuple[int, int, int],
               images: torch.Tensor) -> MaskCheck:
    """The bundle's class maps under onnxruntime (one thread) against eetool predict's plain pass on ``images``
    (uint8 N x 3 x H x W): every pixel of another class must be a tie of eetool's logits (TIE_TOLERANCE), else
    BundleMismatchError says where."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / GRAPH), options, providers=["CPUExecutionProvider"])
    predictor = MaskPredictor(model, input_shape)
    ties = far = 0
    first_far = ""
    for start in range(0, len(images), CHECK_BATCH):
        batch = images[start:start + CHECK_BATCH]
        theirs = torch.from_numpy(session.run(MASK_OUTPUTS[:1], {"images": batch.numpy()})[0]).long()
        x = preprocess(batch)
        ours = predictor(x).classes
        differ = ours != theirs
        if not bool(differ.any()):
            continue
        with torch.no_grad():
            logits = model(x).movedim(1, -1)[differ]  # the differing pixels' logits, P x K
        mine, other = ours[differ], theirs[differ]
        pair = torch.cat([logits.gather(1, mine[:, None]), logits.gather(1, other[:, None])], 1)  # P x 2
        scale = pair.abs().amax(1).clamp_min(1.0)
        tie = (pair[:, 0] - pair[:, 1]).abs() <= TIE_TOLERANCE * scale
        ties += int(tie.sum())
        if not bool(tie.all()):
            far += int((~tie).sum())
            if not first_far:
                n, i, j = (int(v) for v in differ.nonzero()[int((~tie).nonzero()[0, 0])])
                first_far = (f"image {start + n} pixel ({i}, {j}): class {int(ours[n, i, j])} in eetool, "
                             f"{int(theirs[n, i, j])} in onnxruntime")
    pixels = int(images.shape[0] * images.shape[2] * images.shape[3])
    if far:
        raise BundleMismatchError(f"the exported segmentation graph disagrees with eetool's pass on {far} of "
                                  f"{pixels} check pixels beyond a tie of the logits ({first_far})",
                                  "report this with the checkpoint's architecture; nothing was written")
    return MaskCheck(len(images), pixels, ties)


def _export_graph(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The graph with a dynamic batch axis; the exporter's progress lines go to stderr, not among the data.
    Traced with autograd on, so that the network runs as it is rather than its cached inference copy (BatchNorm
    folded, channels last), which onnxruntime's own optimiser makes of the graph."""
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(sys.stderr), torch.enable_grad():
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=True, input_names=["images"],
                          output_names=MASK_OUTPUTS, dynamic_shapes=({0: batch},), opset_version=OPSET,
                          external_data=False, verbose=False)


def export_mask_bundle(run: Run, req: ExportRequest) -> None:
    """Write req.output as a checked bundle of the segmentation checkpoint's plain network (exit 5 when
    onnxruntime and eetool disagree beyond ties), then report it."""
    from eetool import __version__
    from eetool.core.datasets import Preprocess
    from eetool.core.run_inputs import open_checkpoint
    from eetool.segmentation.inputs import require_segmentation

    check_request(req)
    require_onnx()
    target = Path(req.output)
    check_target(target, req.force, (req.checkpoint,))
    ckpt = open_checkpoint(run, req.checkpoint)
    model = require_segmentation(ckpt, "export")
    if model.num_classes > MAX_MASK_CLASSES:
        raise ModelMismatchError(f"{ckpt.label} has {model.num_classes} classes; mask PNGs hold 8-bit class indices "
                                 f"(at most {MAX_MASK_CLASSES} classes)", "use `eetool evaluate` on this network")
    run.torch()
    model.eval()
    spec = ckpt.spec
    input_hw = (spec.input_shape[1], spec.input_shape[2])
    geometry = run.data_options.geometry(spec.arch, input_hw, spec.resize)
    if geometry.crop != input_hw:
        raise UsageError(f"--crop {geometry.crop} differs from the model's input {input_hw}",
                         "a bundle takes images at the model's input size: drop --crop")
    preprocess = Preprocess(spec.input_shape, spec.mean, spec.std)
    images, sample_name, palette, palette_source = _check_images(run, req, ckpt)
    h, w = input_hw
    doc: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "schema": BUNDLE_SCHEMA,
        "written_by": f"eetool {__version__}",
        "task": TASK,
        "classes": list(spec.classes or [str(k) for k in range(spec.num_classes)]),
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 3, h, w], "layout": "NCHW, RGB"},
        "preprocessing": preprocessing_record(spec, geometry),
        "method": "plain",
        "stages": [{"stage": GRAPH, "exit": EXIT_NAMES[-1], "outputs": MASK_OUTPUTS, "cost": 1.0}],
        "points": [],
        "segmentation": {
            "classes_output": "uint8 N x H x W at the input size: the argmax of the final exit's logits, upsampled "
                              "(bilinear) to the input",
            "exits": list(EXIT_NAMES),  # the network's; the bundle computes the last alone (no pixel exits)
            "palette": {"source": palette_source, "rgb": palette_hex(palette)},
        },
        "provenance": {"sources": {"checkpoint": {"path": ckpt.path, "sha256": ckpt.sha256,
                                                  "model_sha256": ckpt.model_sha256}},
                       "args": run.args, "torch": str(torch.__version__)},
        "files": {},
    }
    with bundle_folder(target, req.force, (req.checkpoint,)) as tmp:
        run.reporter.log(f"exporting the plain {spec.arch} network")
        _export_graph(_MaskGraph(model, preprocess), torch.zeros(2, 3, h, w, dtype=torch.uint8), tmp / GRAPH)
        seal(tmp, doc)
        check = self_check(tmp, model, preprocess, spec.input_shape, images)
    run.reporter.log(f"checked the plain network on {check.samples} samples of {sample_name}: {check.pixels} pixels, "
                     f"{check.differ_at_ties} of another class at a tie of the logits")
    run.wrote(req.output)
    result = {"bundle": req.output, "task": TASK, "stages": 1, "exits": [], "points": 0,
              "check": {"data": sample_name, "samples": check.samples, "pixels": check.pixels,
                        "differ_at_ties": check.differ_at_ties},
              "files": doc["files"]}
    run.emit(result, lambda d: "\n".join(f"{name}  {sha}" for name, sha in d["files"].items()))


def _check_images(run: Run, req: ExportRequest, ckpt: Checkpoint) -> tuple[torch.Tensor, str, list[int], str]:
    """uint8 N x 3 x H x W images to check the bundle on and what they are, and the masks' palette and where it
    comes from: --data's images and its masks' palette where it has one (as ``eetool predict --data``), else the
    demo set where it fits the model's input, else seeded random images, with the PASCAL VOC colours."""
    from eetool.core.datasets import load_dataset
    from eetool.core.errors import InputError
    from eetool.segmentation.inputs import load_masks

    _, h, w = ckpt.spec.input_shape
    if req.data is None:
        ds = load_dataset("demo", "test")
        if tuple(ds.image_shape[1:]) != (h, w):
            gen = torch.Generator().manual_seed(run.seed)
            images = torch.randint(0, 256, (req.check_samples, 3, h, w), dtype=torch.uint8, generator=gen)
            return images, "seeded random images", voc_palette(), "pascal-voc"
        own = None
    else:
        ds = load_masks(req.data, req.split, None, ckpt)
        own = source_palette(ds)
    batch, _, _ = next(ds.batches(min(req.check_samples, len(ds))))
    if tuple(batch.shape[2:]) != (h, w):
        raise InputError(f"{ds.spec}'s images are {tuple(batch.shape[2:])}, the model takes {(h, w)}",
                         "check the bundle on data of the model's input size")
    rgb = batch.expand(-1, 3, -1, -1).contiguous() if batch.shape[1] == 1 else batch[:, :3].contiguous()
    return rgb, f"{ds.spec}", own or voc_palette(), f"--data {req.data} --split {req.split}" if own else "pascal-voc"

