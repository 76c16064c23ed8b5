"""int8 stage graphs for a bundle (``eetool export --quantize int8``): onnxruntime's static QDQ quantisation of
each stage, calibrated on what it receives in the float bundle, and quantised before it is joined with its exit's
decision, so the decisions stay float; the single-image graph is nested again from the int8 stages. A bundle whose
classes agree with the float one's on less than MIN_AGREEMENT of the check sample is refused, and one whose
single-image graph and stage graphs disagree beyond rounding at a threshold.

Method: docs/predict-and-export.md#int8-bundles-quantize-int8
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eetool.classification.bundle_export import THRESHOLD_TOLERANCE, BundleRun, run_bundle
from eetool.core.bundles import BundleMismatchError

MIN_AGREEMENT = 0.95
CALIBRATION_BATCH = 64


@dataclass
class Calibration:
    images: np.ndarray  # uint8 N x 3 x H x W, as the bundle's first stage takes them
    data: str  # the source and split, e.g. fashion-mnist/train
    fingerprint: str  # the dataset's fingerprint, of the chosen samples


class _StageInputs:
    """onnxruntime's CalibrationDataReader for stage j: the calibration images through the float stages before
    it, a batch at a time (recomputed per stage rather than held: early features of large inputs are big)."""

    def __init__(self, before: list[Any], input_name: str, images: np.ndarray) -> None:
        self.batches = self._batches(before, input_name, images)

    @staticmethod
    def _batches(before: list[Any], input_name: str, images: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(images), CALIBRATION_BATCH):
            x = images[start:start + CALIBRATION_BATCH]
            for session in before:
                x = session.run(None, {session.get_inputs()[0].name: x})[0]
            yield {input_name: x}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantiser logs advice (pre-processing, unused initialisers) on the root logger and its C++
    logger: nothing a user of export can act on, so neither reaches the terminal; its prints go to stderr."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_bundle(folder: Path, parts: Path, doc: dict[str, Any], calibration: Calibration, images: np.ndarray,
                    labels: np.ndarray | None, sample_name: str) -> dict[str, Any]:
    """Replace every stage graph of the bundle in ``folder`` (written, not yet sealed) by its int8 version: the
    stage's part in ``parts`` quantised, joined again with its exit's float decision. Then compare the int8 bundle
    with the float one on ``images`` at every operating point. Returns the record for the manifest's provenance;
    raises BundleMismatchError when the classes agree on less than MIN_AGREEMENT."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from eetool.classification.bundle_export import join_stage, write_network

    stages = [s["stage"] for s in doc["stages"]]
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.float.", dir=folder.parent) as scratch:
        float_folder, int8_parts = Path(scratch) / "float", Path(scratch) / "int8"
        float_folder.mkdir()
        int8_parts.mkdir()
        for name in stages:
            shutil.copyfile(folder / name, float_folder / name)
        float_sessions = [_session(parts / name) for name in stages]  # the stages alone: their features
        with _quiet_quantizer():
            for j, name in enumerate(stages):
                reader = _StageInputs(float_sessions[:j], float_sessions[j].get_inputs()[0].name, calibration.images)
                quantize_static(str(parts / name), str(int8_parts / name), reader, quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
                join_stage(parts, name, folder, stage_parts=int8_parts)
        if "batch_1" in doc:
            write_network(folder, doc["stages"], len(doc["classes"]))
        check = compare(folder, float_folder, doc, images, labels)
    record = {
        "method": "int8",
        "tool": f"onnxruntime {ort.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8, symmetric, one scale per output channel",
        "activations": "uint8, one scale per tensor, min-max over the calibration samples",
        "graphs": "stages (the exit decisions stay float)",
        "calibration": {"data": calibration.data, "fingerprint": calibration.fingerprint,
                        "samples": int(len(calibration.images))},
        "check": {"data": sample_name, "samples": int(len(images)), "min_agreement": MIN_AGREEMENT,
                  "points": check},
    }
    return record


def compare(folder: Path, float_folder: Path, doc: dict[str, Any], images: np.ndarray,
            labels: np.ndarray | None) -> list[dict[str, Any]]:
    """The int8 bundle (``folder``) against the float one (its stage graphs in ``float_folder``, the decisions
    shared) at each operating point, or the plain model: the share of samples with the same class and with the same
    exit, the mean cost of each and, with labels, the accuracy of each."""
    points = doc.get("points") or [{"thresholds": []}]
    costs = np.array([float(s["cost"]) for s in doc["stages"]])
    rows = []
    for i, point in enumerate(points):
        thresholds = [float(t) for t in point["thresholds"]]
        ref = run_bundle(folder, doc, images, thresholds, stage_folder=float_folder)
        q = run_bundle(folder, doc, images, thresholds)
        if "batch_1" in doc:
            _check_single_image_graph(q, run_bundle(folder, doc, images, thresholds, one_by_one=True), thresholds)
        agreement = float(np.mean(ref.classes == q.classes))
        row: dict[str, Any] = {
            "point": i if doc.get("points") else "plain",
            "class_agreement": round(agreement, 4),
            "exit_agreement": round(float(np.mean(ref.exit_index == q.exit_index)), 4),
            "cost": {"float": round(float(costs[ref.exit_index].mean()), 4),
                     "int8": round(float(costs[q.exit_index].mean()), 4)},
        }
        if labels is not None:
            row["accuracy"] = {"float": round(float(np.mean(ref.classes == labels)), 4),
                               "int8": round(float(np.mean(q.classes == labels)), 4)}
        if agreement < MIN_AGREEMENT:
            name = f"operating point {i}" if doc.get("points") else "the plain model"
            raise BundleMismatchError(
                f"the int8 bundle's classes agree with the float bundle's on {agreement:.1%} of "
                f"{len(images)} check samples at {name}, below {MIN_AGREEMENT:.0%}",
                "export without --quantize, or calibrate on more samples of the model's own data; nothing was "
                "written")
        rows.append(row)
    return rows


def _check_single_image_graph(stages: BundleRun, network: BundleRun, thresholds: list[float]) -> None:
    """The int8 single-image graph nests the very int8 stage graphs: their classes and exits must agree, but where
    a confidence lies within THRESHOLD_TOLERANCE of its threshold (the two graphs' kernels may round apart)."""
    for k in np.flatnonzero((stages.classes != network.classes) | (stages.exit_index != network.exit_index)):
        e = int(min(stages.exit_index[k], network.exit_index[k]))
        decided = [run.decided_confidence[k] for run in (stages, network) if run.exit_index[k] == e]
        if e >= len(thresholds) or not any(abs(float(c) - thresholds[e]) <= THRESHOLD_TOLERANCE for c in decided):
            raise BundleMismatchError(
                f"the int8 bundle's single-image graph disagrees with its stage graphs on check sample {k} (class "
                f"{int(network.classes[k])} at exit {int(network.exit_index[k])}, the stages class "
                f"{int(stages.classes[k])} at exit {int(stages.exit_index[k])})",
                "report this with the checkpoint's architecture; nothing was written")
