"""What every eetool bundle shares, whichever task exported it: the request of `eetool export`, the format and schema
the runtime checks, the manifest's preprocessing record, the folder written atomically and sealed with the sha256 of
every file (SHA256SUMS), and the export extra's check. The graphs are the task's (``eetool.classification.
bundle_export``, ``eetool.segmentation.mask_bundle``).

Layout: docs/predict-and-export.md#eetool-export
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from eetool.core.artifacts import sha256_file
from eetool.core.errors import EetoolError, ExitCode, OutputError, UsageError
from eetool.core.interrupts import deferred
from eetool.core.owned_folders import check_folder_output, publish_folder

BUNDLE_FORMAT = "eetool-bundle"
# 2: a stage and its exit's decision in one graph (schema 1 had a graph per decision beside each stage's);
# 3: and the stages nested in If branches as one graph for a single image (batch_1.onnx)
BUNDLE_SCHEMA = 3
MANIFEST = "manifest.yaml"
SUMS = "SHA256SUMS"
OPSET = 18


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: str
    output: str
    means: str | None
    exit_heads: str | None
    thresholds: str | None
    data: str | None  # the samples the bundle is checked on (None: the demo set, or seeded random images)
    split: str
    check_samples: int
    quantize: str  # none or int8
    calibration_data: str | None
    calibration_split: str
    calibration_samples: int
    force: bool


class BundleMismatchError(EetoolError):
    """The exported graphs disagree with eetool's own pass beyond rounding at a threshold."""

    exit_code = ExitCode.PROVENANCE


def preprocessing_record(spec: Any, geometry: Any) -> dict[str, Any]:
    """The manifest's ``preprocessing``: how the runtime decodes, resizes and crops an image file (as eetool's
    folder datasets do), and what stage 0's graph does to it (the checkpoint's Preprocess)."""
    return {"decode": "RGB (PIL), 8 bits per channel", "resize": geometry.resize,
            "resize_rule": "shorter side to resize pixels, PIL bilinear",
            "crop": list(geometry.crop), "crop_rule": "centre crop, zero padding where smaller",
            "in_graph": "stage 0: x / 255, channels to the model's (ITU-R 601 luma for one), (x - mean) / std",
            "channels": spec.input_shape[0], "mean": list(spec.mean), "std": list(spec.std)}


def seal(folder: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """Record the sha256 of every graph in ``folder`` in ``doc``, and write it as the manifest with SHA256SUMS over
    both (again, after the graphs were replaced by their int8 versions); returns ``doc``."""
    doc["files"] = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.suffix == ".onnx"}
    (folder / MANIFEST).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    sums = {**doc["files"], MANIFEST: sha256_file(folder / MANIFEST)}
    (folder / SUMS).write_text("".join(f"{sha}  {name}\n" for name, sha in sums.items()), encoding="utf-8")
    return doc


def check_target(target: Path, force: bool, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse a bundle folder that exists without --force, that eetool did not write, that overlaps an input, or
    whose parent is missing (the rules of every folder eetool writes: eetool.core.owned_folders)."""
    check_folder_output(str(target), flag="-o", force=force, inputs=inputs)


@contextlib.contextmanager
def bundle_folder(target: Path, force: bool, inputs: tuple[str | None, ...] = ()) -> Any:
    """A temp folder beside ``target`` to write the bundle in; published onto ``target`` when the block ends
    normally (marked as eetool's; an older bundle there replaced only when eetool wrote it), removed when it fails
    or is interrupted."""
    check_target(target, force, inputs)
    with deferred():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give the folder the usual permissions
        yield tmp
        publish_folder(tmp, target, "bundle")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write bundle {target}: {e.strerror}",
                              "check the disk space and permissions") from None
        raise


def require_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise UsageError(f"eetool export needs {name}, which is not installed",
                             "pip install 'eetool[export]'") from None
