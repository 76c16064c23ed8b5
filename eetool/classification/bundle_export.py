"""An early-exit bundle (``eetool export``): one ONNX graph per backbone stage that also computes its exit's decision
(the stage's features, then the exit's confidence, prediction and class probabilities from them), a manifest and
SHA256SUMS, for the PyTorch-free runtime (``runtime/``). Each stage and each decision is ``torch.onnx.export`` of the
very modules and rules eetool runs, exported apart and then joined into one graph (``onnx.compose``), so that an exit
costs the runtime one onnxruntime call instead of two, and an int8 export can quantise the stage's part alone;
stage 0 applies the checkpoint's preprocessing, and the threshold comparison is the runtime's. A bundle with exits
also holds those stage graphs nested into one graph for a single image (``batch_1.onnx``): each later stage sits in
the else branch of an ONNX ``If`` on the exit decision before it, so one onnxruntime call runs an image as far as it
goes, where the stage graphs cost a call per exit (their compaction serves batches of several images).

Layout: docs/predict-and-export.md#eetool-export
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from eetool import __version__
from eetool.classification.prediction import HEAD, Predictor, exit_probabilities
from eetool.core.bundles import BUNDLE_FORMAT, BUNDLE_SCHEMA, OPSET, BundleMismatchError, seal
from eetool.core.datasets import Preprocess
from eetool.core.errors import ModelMismatchError

if TYPE_CHECKING:
    from eetool.classification.e2cm import MeansRule
    from eetool.classification.rules import HeadsRule
    from eetool.core.exits import ExitModel

# Within this of its threshold, a confidence may fall on either side between onnxruntime's float rounding and
# torch's: a different exit (and class) there is rounding, not a wrong graph.
THRESHOLD_TOLERANCE = 1e-5
# The outputs of a stage graph with an exit, in order, and of the last stage
EXIT_OUTPUTS = ["output", "confidence", "prediction", "probabilities"]
HEAD_OUTPUTS = ["logits"]
DECISION_PREFIX = "decision/"  # the names of the decision's nodes and values inside a joined graph
# The graph for a single image: its file, inputs (the images, the operating point's thresholds) and outputs
NETWORK = "batch_1.onnx"
NETWORK_INPUTS = ["images", "thresholds"]
NETWORK_OUTPUTS = ["class", "confidence", "exit_index", "probabilities"]


# ---------------------------------------------------------------------------------------------
# The modules that become graphs


class _PreprocessedStage(nn.Module):
    """Decoded uint8 images through the checkpoint's preprocessing and the first stage."""

    def __init__(self, stage: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.stage, self.preprocess = stage, preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stage(self.preprocess(images))


class _ExitDecision(nn.Module):
    """Exit j's rule on the features: confidence, prediction and class probabilities."""

    def __init__(self, rule: HeadsRule | MeansRule, j: int) -> None:
        super().__init__()
        self.rule, self.j = rule, j
        heads = getattr(rule, "heads", None)
        if heads is not None:
            self.heads = heads  # registered, so that export sees the head's parameters as the module's

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        confidence, prediction = self.rule.scores(self.j, h)
        return confidence.float(), prediction, exit_probabilities(self.rule, self.j, h)


class _MeansDecision(nn.Module):
    """E²CM's decision at exit j (eetool.classification.e2cm.MeansRule.scores and exit_probabilities), with the
    squared distances as one Gemm: ||x||^2 + x.(-2M)^T + ||m||^2, the -2 and the means' squared norms folded into
    the Gemm's weight and bias (scaling by -2 is exact, so only the order of the sums differs from eetool's
    ||x||^2 - 2 x.M^T + ||m||^2)."""

    def __init__(self, rule: MeansRule, j: int) -> None:
        from eetool.classification.e2cm import NEAREST

        super().__init__()
        self.pooling = rule.pooling
        self.register_buffer("weight", -2 * rule.means[j].float())
        self.register_buffer("bias", rule.means_sq[j].float().clone())
        self.register_buffer("normaliser", rule.normalisers[j].float().clone())
        self.nearest = rule.rules[j] == NEAREST

    weight: torch.Tensor
    bias: torch.Tensor
    normaliser: torch.Tensor

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pooling.apply(h)
        squared = torch.nn.functional.linear(x, self.weight, self.bias) + (x * x).sum(1, keepdim=True)
        d = squared.clamp_min(0).sqrt()
        p = torch.softmax(-d / self.normaliser, dim=-1)
        confidence, prediction = p.max(-1)
        if self.nearest:
            prediction = d.argmin(-1)
        return confidence, prediction, p


def _decision(rule: HeadsRule | MeansRule, j: int) -> nn.Module:
    from eetool.classification.e2cm import MeansRule

    return _MeansDecision(rule, j) if isinstance(rule, MeansRule) else _ExitDecision(rule, j)


def _static_adaptive(reduce: str) -> Any:
    """Adaptive max or average pooling as slices of the (static) input: ONNX has no adaptive pooling to sizes
    other than 1, and torch's exporter no translation of it. The windows are torch's (eetool.heads.adaptive_windows),
    so max-pooling gives the same values and averaging the same up to the order of its sums."""
    from eetool.classification.exit_heads import adaptive_windows

    original = getattr(torch.nn.functional, f"adaptive_{reduce}_pool2d")

    def pool(x: torch.Tensor, output_size: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
        out_h, out_w = out_h or x.shape[-2], out_w or x.shape[-1]
        if (out_h, out_w) == (1, 1) or args or kwargs:  # global pooling exports as it is
            return original(x, output_size, *args, **kwargs)
        rows = adaptive_windows(int(x.shape[-2]), out_h)
        cols = adaptive_windows(int(x.shape[-1]), out_w)
        cells = [x[..., r0:r1, c0:c1].amax((-2, -1)) if reduce == "max" else x[..., r0:r1, c0:c1].mean((-2, -1))
                 for r0, r1 in rows for c0, c1 in cols]
        return torch.stack(cells, -1).unflatten(-1, (out_h, out_w))

    return pool


@contextlib.contextmanager
def _exportable_pooling() -> Any:
    functional = torch.nn.functional
    saved = functional.adaptive_max_pool2d, functional.adaptive_avg_pool2d
    functional.adaptive_max_pool2d = _static_adaptive("max")  # type: ignore[assignment]
    functional.adaptive_avg_pool2d = _static_adaptive("avg")  # type: ignore[assignment]
    try:
        yield
    finally:
        functional.adaptive_max_pool2d, functional.adaptive_avg_pool2d = saved  # type: ignore[assignment]


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str]) -> None:
    """One graph with a dynamic batch axis; the exporter's progress lines go to stderr, not among the data."""
    batch = torch.export.Dim("batch", min=1)
    # Traced with autograd on: modules with a CPU inference fast path of their own kernels (eetool.heads.MixedPool)
    # then take their plain, traceable one, which gives the same values.
    with contextlib.redirect_stdout(sys.stderr), torch.enable_grad(), _exportable_pooling():
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=True, input_names=[input_name],
                          output_names=output_names, dynamic_shapes=({0: batch},), opset_version=OPSET,
                          external_data=False, verbose=False)


@dataclass
class BundleSpec:
    """What goes into a bundle: the model (split into stages), the rule and its operating points."""

    model: nn.Module
    preprocess: Preprocess
    input_hw: tuple[int, int]
    classes: list[str]
    stages: list[nn.Module]  # len(exits) + 1; the plain model is one stage
    exits: list[str]
    rule: HeadsRule | MeansRule | None  # None for the plain model
    method: str  # e2cm, sdn, entropy, e2cm+sdn, or plain
    points: list[dict[str, Any]]  # budget, thresholds, cost and accuracy where the thresholds record them
    exit_costs: list[float]  # per exit, then the head: a fraction of the plain model's MACs
    preprocessing: dict[str, Any]  # decode, resize, crop, mean, std
    provenance: dict[str, Any]


def write_graphs(spec: BundleSpec, folder: Path, parts: Path) -> list[dict[str, Any]]:
    """Every stage's and exit decision's graph into ``parts``, each stage joined with its exit's decision into
    ``folder``; the manifest's entries for them, in order."""
    h, w = spec.input_hw
    x = torch.zeros(2, 3, h, w, dtype=torch.uint8)
    entries: list[dict[str, Any]] = []
    for j, stage in enumerate(spec.stages):
        module = _PreprocessedStage(stage, spec.preprocess) if j == 0 else stage
        last = j == len(spec.stages) - 1
        name = f"stage_{j}.onnx"
        _export(module, x, parts / name, "images" if j == 0 else "features",
                HEAD_OUTPUTS if last else EXIT_OUTPUTS[:1])
        with torch.no_grad():
            out = module.eval()(x)
        if isinstance(out, tuple):
            raise ModelMismatchError(f"the stages of {spec.model.__class__.__name__} hand on several tensors (scales), "
                                     "and a bundle's runtime carries one from stage to stage",
                                     "export the plain model (without --thresholds)")
        entry: dict[str, Any] = {"stage": name}
        if not last:
            assert spec.rule is not None, "a bundle with exits has their rule"
            _export(_decision(spec.rule, j), out, parts / decision_part(name), "features", EXIT_OUTPUTS[1:])
            entry.update({"exit": spec.exits[j], "outputs": EXIT_OUTPUTS})
        else:
            entry.update({"exit": HEAD, "outputs": HEAD_OUTPUTS})
        entry["cost"] = round(spec.exit_costs[j], 6)
        join_stage(parts, name, folder)
        entries.append(entry)
        x = out
    return entries


def decision_part(stage_name: str) -> str:
    """The file in the parts folder holding the decision of the exit after the stage ``stage_name``."""
    return stage_name.replace("stage_", "decision_")


def join_stage(parts: Path, name: str, folder: Path, stage_parts: Path | None = None) -> None:
    """``folder / name``: the stage graph ``name`` (from ``stage_parts``, default ``parts``) with its exit's decision
    from ``parts`` where it has one, the decision reading the stage's features; its nodes and values are named
    under DECISION_PREFIX, and the graph's outputs are EXIT_OUTPUTS. The last stage is copied as it is."""
    import onnx
    from onnx import compose

    stage = onnx.load(str((stage_parts or parts) / name))
    if not (parts / decision_part(name)).exists():
        onnx.save(stage, str(folder / name))
        return
    decision = compose.add_prefix(onnx.load(str(parts / decision_part(name))), DECISION_PREFIX, rename_outputs=False)
    # onnxruntime's quantiser may record another IR version for the stage; the decision's graph is valid in both
    decision.ir_version = stage.ir_version
    joined = compose.merge_models(stage, decision, io_map=[(EXIT_OUTPUTS[0], f"{DECISION_PREFIX}features")],
                                  outputs=EXIT_OUTPUTS)
    onnx.save(joined, str(folder / name))


def write_network(folder: Path, stages: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """``folder / NETWORK``: the stage graphs in ``folder`` (float or int8) as one graph for a single image, and its
    manifest entry. Stage 0 runs in the main graph; the exit decision after stage j feeds an If whose then branch
    gives that exit's prediction, confidence, index and probabilities, and whose else branch runs stage j + 1 (and
    the If after it), so a stage after an image's exit is never run. The last stage's branch gives the argmax of
    the logits and their softmax. ``thresholds`` holds the operating point's per-exit thresholds; an image leaves
    where its confidence is greater, as in the runtime's driver. Each stage's weights are initialisers of the
    branch that runs it, not of the outer graph: onnxruntime's blocked-layout convolutions (NCHWc) are only chosen
    for weights it finds in the convolution's own graph."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    models = [onnx.load(str(folder / s["stage"])) for s in stages]
    body_of, weights_of, outputs_of = [], [], []
    features = NETWORK_INPUTS[0]
    for j, model in enumerate(models):
        graph = compose.add_prefix_graph(model.graph, f"stage_{j}/")
        own_input = graph.input[0].name
        for node in graph.node:
            node.input[:] = [features if name == own_input else name for name in node.input]
        body_of.append(list(graph.node))
        weights_of.append(list(graph.initializer))
        outputs_of.append([o.name for o in graph.output])
        features = outputs_of[-1][0]

    def constant(name: str, value: np.ndarray) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))

    kinds = [(TensorProto.INT64, [1]), (TensorProto.FLOAT, [1]), (TensorProto.INT64, [1]),
             (TensorProto.FLOAT, [1, num_classes])]

    def results(names: list[str]) -> list[Any]:
        return [helper.make_tensor_value_info(n, kind, shape) for n, (kind, shape) in zip(names, kinds, strict=True)]

    last = len(models) - 1
    p = f"stage_{last}/head/"  # the stage graphs name nothing under head/ or exit_test/
    logits = outputs_of[last][0]
    body = body_of[last] + [
        helper.make_node("Softmax", [logits], [p + "probabilities"], axis=1),
        helper.make_node("ArgMax", [logits], [p + "class"], axis=1, keepdims=0),
        constant(p + "axis", np.array([1], np.int64)),
        helper.make_node("ReduceMax", [p + "probabilities", p + "axis"], [p + "confidence"], keepdims=0),
        constant(p + "exit_index", np.array([last], np.int64)),
    ]
    body_outputs = [p + "class", p + "confidence", p + "exit_index", p + "probabilities"]
    for j in range(last - 1, -1, -1):
        p = f"stage_{j}/exit_test/"
        _, confidence, prediction, probabilities = outputs_of[j]
        leave = [p + f"leave/{n}" for n in NETWORK_OUTPUTS]
        exit_branch = helper.make_graph(
            [helper.make_node("Identity", [prediction], [leave[0]]),
             helper.make_node("Identity", [confidence], [leave[1]]),
             constant(leave[2], np.array([j], np.int64)),
             helper.make_node("Identity", [probabilities], [leave[3]])],
            f"exit_{j}", [], results(leave))
        go_on = helper.make_graph(body, f"after_exit_{j}", [], results(body_outputs), initializer=weights_of[j + 1])
        names = list(NETWORK_OUTPUTS) if j == 0 else [p + f"go_on/{n}" for n in NETWORK_OUTPUTS]
        body = body_of[j] + [
            constant(p + "exit", np.array(j, np.int64)),
            constant(p + "first", np.array(0, np.int64)),
            helper.make_node("Gather", [NETWORK_INPUTS[1], p + "exit"], [p + "threshold"]),
            helper.make_node("Gather", [confidence, p + "first"], [p + "confidence"]),
            helper.make_node("Greater", [p + "confidence", p + "threshold"], [p + "leaves"]),
            helper.make_node("If", [p + "leaves"], names, name=p + "if", then_branch=exit_branch, else_branch=go_on),
        ]
        body_outputs = names
    h, w = (d.dim_value for d in models[0].graph.input[0].type.tensor_type.shape.dim[2:])
    main = helper.make_graph(
        body, "early_exit_network_batch_1",
        [helper.make_tensor_value_info(NETWORK_INPUTS[0], TensorProto.UINT8, [1, 3, h, w]),
         helper.make_tensor_value_info(NETWORK_INPUTS[1], TensorProto.FLOAT, [last])],
        results(list(NETWORK_OUTPUTS)), initializer=weights_of[0])
    opsets: dict[str, int] = {}
    for model in models:
        for opset in model.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    network = helper.make_model(main, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                                ir_version=max(m.ir_version for m in models), producer_name="eetool")
    onnx.checker.check_model(network)
    onnx.save(network, str(folder / NETWORK))
    return {"graph": NETWORK, "inputs": NETWORK_INPUTS, "outputs": NETWORK_OUTPUTS}


def manifest(spec: BundleSpec, stages: list[dict[str, Any]], network: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest but for ``files`` (the graphs' sha256, which ``seal`` records); ``network`` is the entry of the
    single-image graph (None for the plain model, one graph already)."""
    h, w = spec.input_hw
    return {
        "format": BUNDLE_FORMAT,
        "schema": BUNDLE_SCHEMA,
        "written_by": f"eetool {__version__}",
        "task": "classification",
        "classes": list(spec.classes),
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", 3, h, w], "layout": "NCHW, RGB"},
        "preprocessing": spec.preprocessing,
        "method": spec.method,
        "stages": stages,
        **({"batch_1": network} if network else {}),
        "points": spec.points,
        "provenance": spec.provenance,
        "files": {},
    }


def write_bundle(spec: BundleSpec, folder: Path, parts: Path) -> dict[str, Any]:
    """Graphs, manifest and SHA256SUMS into an empty ``folder`` (the stages and decisions apart into ``parts``, where
    an int8 export quantises the stages); returns the manifest."""
    stages = write_graphs(spec, folder, parts)
    network = write_network(folder, stages, len(spec.classes)) if len(stages) > 1 else None
    return seal(folder, manifest(spec, stages, network))


# ---------------------------------------------------------------------------------------------
# The self-check: the bundle under onnxruntime against eetool's own pass


@dataclass
class BundleRun:
    classes: np.ndarray
    exit_index: np.ndarray
    decided_confidence: np.ndarray  # the confidence at the sample's exit (where it left), NaN at the head


def run_bundle(folder: Path, doc: dict[str, Any], images: np.ndarray, thresholds: list[float],
               stage_folder: Path | None = None, one_by_one: bool = False) -> BundleRun:
    """The bundle's stage graphs (each with its exit's decision) under onnxruntime, one thread, the batch compacted
    after each exit; the graphs from ``stage_folder`` where given (the float ones, beside an int8 bundle). With
    ``one_by_one``, the bundle's single-image graph instead, on each image in turn."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    if one_by_one:
        return _run_network(ort.InferenceSession(str(folder / doc["batch_1"]["graph"]), options,
                                                 providers=["CPUExecutionProvider"]), images, thresholds)
    stages = stage_folder or folder
    sessions = [ort.InferenceSession(str(stages / s["stage"]), options, providers=["CPUExecutionProvider"])
                for s in doc["stages"]]
    n = images.shape[0]
    classes = np.empty(n, dtype=np.int64)
    exit_index = np.full(n, len(sessions) - 1, dtype=np.int64)
    decided = np.full(n, np.nan, dtype=np.float32)
    remaining = np.arange(n)
    x = images
    for j, session in enumerate(sessions):
        if j == len(sessions) - 1:
            classes[remaining] = session.run(HEAD_OUTPUTS, {session.get_inputs()[0].name: x})[0].argmax(1)
            break
        x, confidence, prediction = session.run(EXIT_OUTPUTS[:3], {session.get_inputs()[0].name: x})
        leave = confidence > thresholds[j]
        gone = remaining[leave]
        classes[gone], exit_index[gone], decided[gone] = prediction[leave], j, confidence[leave]
        remaining, x = remaining[~leave], x[~leave]
        if not len(remaining):
            break
    return BundleRun(classes, exit_index, decided)


def _run_network(session: Any, images: np.ndarray, thresholds: list[float]) -> BundleRun:
    n = images.shape[0]
    out = BundleRun(np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.full(n, np.nan, dtype=np.float32))
    feed = {NETWORK_INPUTS[1]: np.asarray(thresholds, dtype=np.float32)}
    for k in range(n):
        classes, confidence, exit_index = session.run(NETWORK_OUTPUTS[:3], {**feed, NETWORK_INPUTS[0]: images[k:k + 1]})
        out.classes[k], out.exit_index[k] = classes[0], exit_index[0]
        if exit_index[0] < len(thresholds):
            out.decided_confidence[k] = confidence[0]
    return out


def self_check(spec: BundleSpec, folder: Path, doc: dict[str, Any], images: torch.Tensor,
               exit_model: ExitModel | None) -> list[dict[str, Any]]:
    """Each operating point (or the plain model) on ``images`` (uint8 N x 3 x H x W) through the bundle (its stage
    graphs on the batch, and its single-image graph on each image) and through eetool's pass: classes and exit
    indices must agree, except where a confidence lies within THRESHOLD_TOLERANCE of its threshold. Returns a line
    of figures per point (``agree``: samples on which both of the bundle's ways agree with eetool); raises
    BundleMismatchError with what differed."""
    x = spec.preprocess(images)
    report = []
    for i, point in enumerate(spec.points or [{"thresholds": []}]):
        thresholds = list(point["thresholds"])
        predictor = Predictor(spec.model, exit_model if spec.rule is not None else None, spec.rule, thresholds)
        ours = predictor(x)
        near: set[int] = set()
        for one_by_one in (False, True) if "batch_1" in doc else (False,):
            theirs = run_bundle(folder, doc, images.numpy(), thresholds, one_by_one=one_by_one)
            differ = np.flatnonzero((ours.classes.numpy() != theirs.classes)
                                    | (ours.exit_index.numpy() != theirs.exit_index))
            close = {int(k) for k in differ if _near_threshold(int(k), ours, theirs, thresholds)}
            if len(close) != len(differ):
                far = [int(k) for k in differ if k not in close]
                k = far[0]
                graphs = f" ({doc['batch_1']['graph']}, image by image)" if one_by_one else ""
                raise BundleMismatchError(
                    f"the exported bundle{graphs} disagrees with eetool's pass on {len(far)} of {len(images)} check "
                    f"samples beyond rounding at a threshold (sample {k}: class {int(ours.classes[k])} at exit "
                    f"{int(ours.exit_index[k])} in eetool, class {int(theirs.classes[k])} at exit "
                    f"{int(theirs.exit_index[k])} in onnxruntime{_point_name(i, point)})",
                    "report this with the checkpoint's architecture; nothing was written")
            near |= close
        report.append({"point": i if spec.points else "plain", "samples": len(images), "agree": len(images) - len(near),
                       "differ_within_tolerance": len(near)})
    return report


def _point_name(i: int, point: dict[str, Any]) -> str:
    return f", operating point {i} (budget {point['budget']:g})" if "budget" in point else ""


def _near_threshold(k: int, ours: Any, theirs: BundleRun, thresholds: list[float]) -> bool:
    """Whether sample k's first differing decision is a confidence within the tolerance of its threshold: the
    exit where one of the two passes let it leave and the other did not."""
    e = int(min(int(ours.exit_index[k]), int(theirs.exit_index[k])))
    if e >= len(thresholds):  # both reached the head and predicted differently: not a threshold's doing
        return False
    confidences = [float(ours.confidence[k]) if int(ours.exit_index[k]) == e else None,
                   float(theirs.decided_confidence[k]) if int(theirs.exit_index[k]) == e else None]
    return any(c is not None and abs(c - thresholds[e]) <= THRESHOLD_TOLERANCE for c in confidences)


# ---------------------------------------------------------------------------------------------
# The folder: written beside the target, renamed into place


def check_exportable(exit_model: ExitModel | None) -> None:
    if exit_model is not None and exit_model.stages is None:
        raise ModelMismatchError("this model cannot be split into stages (eetool runs it whole, with hooks), so its "
                                 "exits cannot stop computation in a bundle",
                                 "export a model eetool splits (see `eetool inspect`), or export the plain model")
