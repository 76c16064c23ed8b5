"""A bundle written by ``eetool export``, checked and run with onnxruntime.

The driver is eetool's early-exit pass over ONNX sessions: the stages run in order on the samples still in the
batch, one onnxruntime call each; a stage's graph but the last's also computes its exit's decision, giving every
remaining sample a confidence and a prediction beside the features; the samples whose confidence exceeds the
operating point's threshold leave with their prediction, and the batch is compacted to the others before the next
stage (not at all where none leave). Samples that reach the last stage take the argmax of its logits, with the softmax
maximum as their confidence. A single image instead goes through the bundle's single-image graph in one
onnxruntime call: the same stage graphs nested in ONNX If branches, each later stage in the else branch of the exit
decision before it, which gives the image's class, confidence, exit index and class probabilities; the stage graphs'
calls cost a session call each, which at batch 1 weighs as much as an exit saves.

A segmentation bundle (``task: segmentation``) holds one graph, the plain network, which gives the class of every
pixel (``class_maps``); ``eetool_runtime.masks`` writes its masks.

Every file the manifest names, and the manifest itself, is checked against ``SHA256SUMS`` before a session is made:
a changed graph, threshold or manifest is refused. An int8 bundle (``eetool export --quantize int8``) runs the same
way, its stage graphs being QDQ graphs that onnxruntime executes as they are; its manifest's provenance must record
how it was quantised and on what data.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from eetool_runtime.errors import BundleError, InputError, UsageError

BUNDLE_FORMAT = "eetool-bundle"
# 3: the stages also nested in one graph for a single image (2: without it; 1: a decision graph beside each stage)
SCHEMA = 3
EXIT_OUTPUTS = ["output", "confidence", "prediction", "probabilities"]  # of a stage graph with an exit, in order
HEAD_OUTPUTS = ["logits"]  # of the last stage's graph
# A segmentation bundle (task: segmentation) holds one graph, the plain network: the class of every pixel (uint8
# N x H x W) and the logits it is the argmax of
MASK_OUTPUTS = ["classes", "logits"]
TASKS = ("classification", "segmentation")
NETWORK_INPUTS = ["images", "thresholds"]  # of the single-image graph (batch_1 in the manifest)
NETWORK_OUTPUTS = ["class", "confidence", "exit_index", "probabilities"]
OLDER_SCHEMAS = {1: "a graph per exit decision", 2: "no single-image graph"}
MANIFEST = "manifest.yaml"
SUMS = "SHA256SUMS"
HEAD = "head"
# The largest resize and crop side a manifest may name: eetool's (eetool.core.architectures.MAX_INPUT_SIDE), so that
# an edited manifest cannot make each decoded image gigabytes
MAX_SIDE = 4096
MAX_CLASSES = 1_000_000  # eetool's --num-classes limit
MAX_MANIFEST_BYTES = 16 << 20  # eetool's limit on a YAML file it reads


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, after every file's sha256 (the manifest's included) is checked against SHA256SUMS."""
    remake = "export the bundle again with `eetool export`"
    if not folder.exists():
        raise InputError(f"bundle {folder} does not exist", "check the path: the folder `eetool export -o` wrote")
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} is not a folder", "give the folder `eetool export -o` wrote")
    try:
        lines = (folder / SUMS).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {folder} has no readable {SUMS} ({e})", remake) from None
    sums = {}
    for line in lines:
        sha, _, name = line.partition("  ")
        if len(sha) != 64 or not name or "/" in name or name.startswith("."):
            raise BundleError(f"{folder / SUMS} has a malformed line: {line[:80]!r}", remake)
        sums[name] = sha
    if MANIFEST not in sums:
        raise BundleError(f"{folder / SUMS} does not cover {MANIFEST}", remake)
    for name, sha in sums.items():
        path = folder / name
        try:
            found = _sha256(path)
        except OSError as e:
            raise BundleError(f"cannot read {path}: {e.strerror}", remake) from None
        if found != sha:
            raise BundleError(f"{path} has changed since export (sha256 {found[:12]}, recorded {sha[:12]})", remake)
    if (folder / MANIFEST).stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{folder / MANIFEST} is over {MAX_MANIFEST_BYTES >> 20} MiB", remake)
    try:
        doc = yaml.safe_load((folder / MANIFEST).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BundleError(f"{folder / MANIFEST} is not valid YAML ({e})", remake) from None
    except RecursionError:
        raise BundleError(f"{folder / MANIFEST} nests deeper than YAML can be read", remake) from None
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder} is not an eetool bundle (its manifest's format is not {BUNDLE_FORMAT})", remake)
    schema = doc.get("schema")
    if isinstance(schema, int) and schema < SCHEMA:
        layout = f" ({OLDER_SCHEMAS[schema]})" if schema in OLDER_SCHEMAS else ""
        raise BundleError(f"{folder} is a bundle of schema {schema}{layout}, this runtime reads schema {SCHEMA} "
                          "(each stage's graph with its exit's decision, and the stages nested for a single image)",
                          "export the bundle again with the eetool of this runtime's version")
    if schema != SCHEMA:
        raise BundleError(f"{folder} is a bundle of schema {schema!r}, this runtime reads {SCHEMA}",
                          "install the eetool-runtime of the eetool that exported it")
    files = doc.get("files")
    if not isinstance(files, dict) or any(sums.get(name) != sha for name, sha in files.items()):
        raise BundleError(f"{folder / MANIFEST}'s files do not match {SUMS}", remake)
    task = doc.get("task", TASKS[0])  # bundles written before segmentation exported name no task
    if task not in TASKS:
        raise BundleError(f"{folder} is a bundle for the task {task!r}, this runtime reads {' and '.join(TASKS)}",
                          "install the eetool-runtime of the eetool that exported it")
    _check_fields(doc, folder / MANIFEST, remake)
    stages = doc["stages"]
    if task == "segmentation":
        _check_segmentation(doc, folder / MANIFEST, remake)
    for j, stage in enumerate(stages):
        if stage.get("stage") not in files:
            raise BundleError(f"{folder / MANIFEST} names {stage.get('stage')}, which it does not record", remake)
        expected = MASK_OUTPUTS if task == "segmentation" else HEAD_OUTPUTS if j == len(stages) - 1 else EXIT_OUTPUTS
        if stage.get("outputs") != expected:
            raise BundleError(f"{folder / MANIFEST}: stage {j}'s graph gives {stage.get('outputs')}, this runtime "
                              f"reads {expected}", remake)
    network = doc.get("batch_1")
    if len(stages) > 1 and not (isinstance(network, dict) and network.get("graph") in files
                                and network.get("inputs") == NETWORK_INPUTS
                                and network.get("outputs") == NETWORK_OUTPUTS):
        raise BundleError(f"{folder / MANIFEST} records no single-image graph this runtime reads (batch_1: graph "
                          f"in its files, inputs {NETWORK_INPUTS}, outputs {NETWORK_OUTPUTS})", remake)
    return doc


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIDE


def _check_fields(doc: dict[str, Any], manifest: Path, remake: str) -> None:
    """Every field the runtime reads, of the type and within the sizes it reads them as: a manifest whose sums were
    made to match after an edit is refused by what it says, not by a traceback or an allocation of gigabytes."""

    def refuse(what: str) -> BundleError:
        return BundleError(f"{manifest}: {what}", remake)

    classes = doc.get("classes")
    if not (isinstance(classes, list) and 1 <= len(classes) <= MAX_CLASSES
            and all(isinstance(c, str) for c in classes)):
        raise refuse(f"classes is not a list of 1 to {MAX_CLASSES} names")
    stages = doc.get("stages")
    if not (isinstance(stages, list) and stages and all(isinstance(s, dict) for s in stages)):
        raise refuse("stages is not a list of one or more stages")
    for j, stage in enumerate(stages):
        if not isinstance(stage.get("exit"), str) or not (_number(stage.get("cost")) and stage["cost"] >= 0):
            raise refuse(f"stage {j} has no exit name or no cost of 0 or more")
    pre = doc.get("preprocessing")
    crop = pre.get("crop") if isinstance(pre, dict) else None
    if not (isinstance(pre, dict) and _side(pre.get("resize")) and isinstance(crop, list) and len(crop) == 2
            and all(_side(c) for c in crop)):
        raise refuse(f"preprocessing's resize and crop (height, width) are not whole numbers of 1 to {MAX_SIDE} "
                     "pixels")
    points = doc.get("points") or []
    if not (isinstance(points, list) and all(isinstance(p, dict) for p in points)):
        raise refuse("points is not a list of operating points")
    for i, point in enumerate(points):
        thresholds = point.get("thresholds")
        if not (_number(point.get("budget")) and isinstance(thresholds, list)
                and len(thresholds) == len(stages) - 1 and all(_number(t) for t in thresholds)):
            raise refuse(f"operating point {i} has no budget, or not one threshold (a number) for each of the "
                         f"{len(stages) - 1} exits")


def _check_segmentation(doc: dict[str, Any], manifest: Path, remake: str) -> None:
    """A segmentation bundle's manifest: one stage (the plain network, no operating points), the network's exits
    ending with that stage's, a palette of 256 colours, at most 256 classes (mask PNGs hold a byte a pixel)."""
    seg = doc.get("segmentation")
    stages = doc.get("stages") or []
    exits = seg.get("exits") if isinstance(seg, dict) else None
    palette = seg.get("palette") if isinstance(seg, dict) else None
    rgb = palette.get("rgb") if isinstance(palette, dict) else None
    if len(stages) != 1 or doc.get("points"):
        raise BundleError(f"{manifest}: a segmentation bundle holds the plain network (one stage, no operating "
                          f"points), not {len(stages)} stages and {len(doc.get('points') or [])} points", remake)
    if not (isinstance(exits, list) and exits and all(isinstance(e, str) for e in exits)
            and exits[-1] == stages[0].get("exit")):
        raise BundleError(f"{manifest}: the segmentation exits {exits!r} do not end with the stage's exit "
                          f"{stages[0].get('exit')!r}", remake)
    if not (isinstance(rgb, str) and 0 < len(rgb) <= 6 * 256 and len(rgb) % 6 == 0
            and all(c in "0123456789abcdef" for c in rgb)):
        raise BundleError(f"{manifest}: the masks' palette is not 1 to 256 colours of 6 hex digits", remake)
    if len(doc["classes"]) > 256:
        raise BundleError(f"{manifest}: a segmentation bundle names at most 256 classes (mask PNGs hold a byte a "
                          "pixel)", remake)


QUANTIZATIONS = ("none", "int8")


def quantization(doc: dict[str, Any], folder: Path) -> str:
    """How the bundle's stage graphs are quantised (``none`` without a record), after checking that an int8
    bundle's provenance records its method and calibration data."""
    provenance = doc.get("provenance")
    record = provenance.get("quantization") if isinstance(provenance, dict) else None
    if record is None:
        return "none"
    remake = "export the bundle again with `eetool export --quantize int8`"
    method = record.get("method") if isinstance(record, dict) else None
    if method not in QUANTIZATIONS:
        raise BundleError(f"{folder / MANIFEST} records a quantization this runtime does not know ({method!r})",
                          "install the eetool-runtime of the eetool that exported it")
    calibration = record.get("calibration")
    if method != "none" and not (isinstance(calibration, dict) and calibration.get("fingerprint")
                                 and isinstance(calibration.get("samples"), int) and calibration["samples"] > 0):
        raise BundleError(f"{folder / MANIFEST} records {method} stages without their calibration data "
                          "(fingerprint and samples)", remake)
    return str(method)


@dataclass
class Predictions:
    classes: np.ndarray  # int64 per sample
    confidence: np.ndarray  # float32 per sample
    exit_index: np.ndarray  # int64 per sample; len(stages) - 1 is the model's head
    top_classes: np.ndarray | None = None
    top_probabilities: np.ndarray | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


class Bundle:
    """The sessions of a checked bundle, and its operating points."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        self.classes: list[str] = list(m["classes"])
        self.stages: list[dict[str, Any]] = list(m["stages"])
        self.points: list[dict[str, Any]] = list(m.get("points") or [])
        self.quantization = quantization(m, self.folder)
        self.exits = [str(s["exit"]) for s in self.stages]
        self.costs = [float(s["cost"]) for s in self.stages]
        self.task: str = m.get("task", TASKS[0])
        if self.task == "segmentation":
            self.mask_exits = [str(e) for e in m["segmentation"]["exits"]]  # the network's, for the records
            self.palette = list(bytes.fromhex(m["segmentation"]["palette"]["rgb"]))
        pre = m["preprocessing"]
        self.resize, self.crop = int(pre["resize"]), (int(pre["crop"][0]), int(pre["crop"][1]))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a stage is a chain: no branches to overlap
        options.enable_cpu_mem_arena = True  # batches of one size reuse their buffers
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.sessions = [self._session(ort, options, s["stage"], s["outputs"]) for s in self.stages]
        self.input_names = [session.get_inputs()[0].name for session in self.sessions]
        images = self.sessions[0].get_inputs()[0]
        if images.type != "tensor(uint8)" or list(images.shape[1:]) != [3, *self.crop]:
            raise BundleError(f"{self.folder / self.stages[0]['stage']} takes {images.type} {images.shape}, not the "
                              f"uint8 images of 3 x {self.crop[0]} x {self.crop[1]} its manifest's crop gives",
                              "export the bundle again with `eetool export`")
        # the plain model's one stage is already one call
        self.network = (self._session(ort, options, m["batch_1"]["graph"], NETWORK_OUTPUTS, NETWORK_INPUTS)
                        if len(self.stages) > 1 else None)

    def _session(self, ort: Any, options: Any, name: str, outputs: list[str], inputs: list[str] | None = None
                 ) -> Any:
        """The onnxruntime session of the bundle's graph ``name``, which must give ``outputs`` (and take
        ``inputs``): a graph that onnxruntime cannot load, or of another interface, is refused as the bundle's."""
        path = self.folder / name
        remake = "export the bundle again with `eetool export`"
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types, one per status code
            reason = " ".join(str(e).split())[:200]
            raise BundleError(f"onnxruntime cannot load {path}: {reason}", remake) from None
        given = [o.name for o in session.get_outputs()]
        taken = [i.name for i in session.get_inputs()]
        if not set(outputs) <= set(given) or (inputs is not None and taken != inputs):
            raise BundleError(f"{path} takes {taken} and gives {given}, not what its manifest records "
                              f"({outputs})", remake)
        return session

    def thresholds(self, point: int | None) -> list[float]:
        if not self.points:
            if point is not None:
                raise UsageError(f"--point {point}: bundle {self.folder} holds the plain model, no operating points",
                                 "drop --point")
            return []
        if point is None:
            if len(self.points) > 1:
                budgets = ", ".join(f"{i}: budget {p['budget']:g}" for i, p in enumerate(self.points))
                raise UsageError(f"bundle {self.folder} holds {len(self.points)} operating points ({budgets})",
                                 "choose one: --point N")
            point = 0
        if not 0 <= point < len(self.points):
            raise UsageError(f"--point {point} is not below the bundle's {len(self.points)} operating points",
                             f"use 0 to {len(self.points) - 1}")
        return [float(t) for t in self.points[point]["thresholds"]]

    def class_maps(self, images: np.ndarray) -> np.ndarray:
        """A segmentation bundle's class of every pixel of uint8 images N x 3 x H x W: uint8 N x H x W."""
        return self.sessions[0].run(MASK_OUTPUTS[:1], {self.input_names[0]: images})[0]

    def __call__(self, images: np.ndarray, thresholds: list[float], top_k: int = 0) -> Predictions:
        """Predictions for uint8 images N x 3 x H x W: one image through the single-image graph, several through
        the stage graphs with the batch compacted after each exit."""
        n = images.shape[0]
        out = Predictions(np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32),
                          np.full(n, len(self.sessions) - 1, dtype=np.int64))
        if top_k:
            out.top_classes = np.empty((n, top_k), dtype=np.int64)
            out.top_probabilities = np.empty((n, top_k), dtype=np.float32)
        if n == 1 and self.network is not None:
            fetched = NETWORK_OUTPUTS if top_k else NETWORK_OUTPUTS[:3]
            out.classes[:], out.confidence[:], out.exit_index[:], *probabilities = self.network.run(
                fetched, {NETWORK_INPUTS[0]: images, NETWORK_INPUTS[1]: np.asarray(thresholds, dtype=np.float32)})
            if top_k:
                self._top(out, np.arange(1), probabilities[0], top_k)
            return out
        remaining = np.arange(n)
        x = images
        last = len(self.sessions) - 1
        fetch = EXIT_OUTPUTS if top_k else EXIT_OUTPUTS[:3]  # the probabilities only for --top-k
        for j, session in enumerate(self.sessions):
            if j == last:
                p = softmax(session.run(HEAD_OUTPUTS, {self.input_names[j]: x})[0].astype(np.float32))
                out.classes[remaining] = p.argmax(1)
                out.confidence[remaining] = p.max(1)
                self._top(out, remaining, p, top_k)
                break
            x, confidence, prediction, *probabilities = session.run(fetch, {self.input_names[j]: x})
            leave = confidence > thresholds[j]
            leaving = int(np.count_nonzero(leave))
            if leaving:
                gone = remaining[leave]
                out.classes[gone], out.confidence[gone], out.exit_index[gone] = prediction[leave], confidence[leave], j
                if top_k:
                    self._top(out, gone, probabilities[0][leave], top_k)
                if leaving == len(remaining):
                    break
                stay = np.flatnonzero(~leave)
                remaining, x = remaining[stay], x.take(stay, axis=0)  # rows gathered once, into a new array
        return out

    @staticmethod
    def _top(out: Predictions, rows: np.ndarray, probabilities: np.ndarray, top_k: int) -> None:
        if not top_k:
            return
        assert out.top_classes is not None and out.top_probabilities is not None
        # the K largest, highest first; ties by the lower class index, as torch.topk on CPU gives them
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        out.top_classes[rows] = order
        out.top_probabilities[rows] = np.take_along_axis(probabilities, order, 1)
