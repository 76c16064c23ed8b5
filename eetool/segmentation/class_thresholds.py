"""The thresholds artifact of a segmentation network (kind ``segmentation-thresholds``, YAML): per early exit and
class, the confidence a pixel must reach to leave there, with what the fit recorded. This module owns the format:
`fit-thresholds --method cbt|cbt-ns|adp-c` builds one and saves it, `evaluate` loads it for its checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from eetool.core.artifacts import ArtifactFile, Provenance
from eetool.core.errors import InputError, ProvenanceError
from eetool.core.exit_methods import SEGMENTATION_METHODS
from eetool.segmentation.model import EXIT_NAMES

if TYPE_CHECKING:
    from eetool.core.checkpoint import Checkpoint

KIND = "segmentation-thresholds"
EARLY_EXITS = EXIT_NAMES[:-1]
REMAKE = "re-make it with `eetool fit-thresholds --method cbt|cbt-ns|adp-c`"


@dataclass
class SegmentationThresholds(ArtifactFile):
    """``thresholds``: early exits x classes. ``record``: the rest of the document in the order it is written
    (method, exits, classes, decide_at, and what the method recorded of its fit)."""

    thresholds: torch.Tensor
    record: dict[str, Any]
    provenance: Provenance = field(default_factory=lambda: Provenance(kind=KIND))
    source: str = ""  # the file it was loaded from, for messages

    @property
    def method(self) -> str:
        return str(self.record["method"])

    def to_doc(self) -> dict[str, Any]:
        """The YAML document (provenance aside)."""
        return {**self.record, "thresholds": [[float(v) for v in row] for row in self.thresholds.tolist()]}

    def save(self, path: str) -> None:
        """Atomically, with the provenance; ``-`` writes to stdout."""
        from eetool.core.artifacts import write_yaml

        write_yaml(path, self.to_doc(), self.provenance)

    @classmethod
    def load_for(cls, path: str, ckpt: Checkpoint, num_classes: int) -> SegmentationThresholds:
        """The thresholds of ``path`` (float32), refused when made from another checkpoint or for other exits or
        classes, or when they are not one finite confidence in 0..1 per early exit and class."""
        from eetool.core.artifacts import read_yaml, verify

        doc, prov = read_yaml(path, KIND)
        verify(path, prov, checkpoint=ckpt.identity, exits=list(EARLY_EXITS))
        rows = doc.get("thresholds")
        if (not isinstance(rows, list) or len(rows) != len(EARLY_EXITS)
                or not all(isinstance(r, list) and len(r) == num_classes for r in rows)):
            raise InputError(f"{path} holds no {len(EARLY_EXITS)} x {num_classes} thresholds", REMAKE)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                   for r in rows for v in r):
            raise InputError(f"{path} has thresholds that are not finite numbers", REMAKE)
        if not all(0 <= v <= 1 for r in rows for v in r):  # thresholds on a softmax confidence (a hand edit otherwise)
            raise InputError(f"{path} has thresholds outside 0..1, which no confidence can be compared with", REMAKE)
        if doc.get("method") not in SEGMENTATION_METHODS:
            raise InputError(f"{path} names the method {doc.get('method')!r}, not one of "
                             f"{', '.join(SEGMENTATION_METHODS)}", REMAKE)
        classes = ckpt.spec.classes or [str(k) for k in range(num_classes)]
        if doc.get("classes") != classes:
            raise ProvenanceError(f"{path} was fitted for the classes {doc.get('classes')!r}, the checkpoint has "
                                  f"{classes}", REMAKE)
        record = {k: v for k, v in doc.items() if k not in ("schema", "thresholds", "provenance")}
        return cls(torch.tensor(rows, dtype=torch.float32), record, prov, path)
