"""The outputs of weight pruning besides the checkpoint and heads: the report (kind ``weight-pruning``, YAML: every
round and the end) and the masks (kind ``masks``, safetensors: one bit per weight, 1 where it is kept). This module
owns both formats: `prune-weights` builds and saves them; a Python caller loads them, checked."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eetool.core.artifacts import Provenance
from eetool.core.errors import InputError

if TYPE_CHECKING:
    import torch

REPORT_KIND = "weight-pruning"
MASKS_KIND = "masks"
REMAKE = "re-make it with `eetool prune-weights`"
# What every report holds, whatever the structure (unstructured, channel) it records.
REPORT_KEYS = ("output", "heads_output", "report", "approach", "structure", "rounds", "amount", "accuracy",
               "baseline_accuracy", "eval_split")


@dataclass
class PruningReport:
    """What a prune-weights run did: its settings, every step and the end (the document ``prune-weights`` also
    emits as JSON)."""

    doc: dict[str, Any]
    provenance: Provenance = field(default_factory=lambda: Provenance(kind=REPORT_KIND))
    source: str = ""  # the file it was loaded from, for messages

    def validate(self) -> None:
        missing = [k for k in REPORT_KEYS if k not in self.doc]
        if missing:
            raise InputError(f"{self.source or 'the weight-pruning report'} lacks {', '.join(missing)}", REMAKE)

    def save(self, path: str) -> None:
        """Atomically, with the provenance."""
        from eetool.core.artifacts import write_yaml

        self.validate()
        write_yaml(path, self.doc, self.provenance)

    @classmethod
    def load(cls, path: str) -> PruningReport:
        from eetool.core.artifacts import read_tensors, read_yaml

        if path.endswith(".safetensors"):  # another eetool artifact (tensors) given where the report belongs
            read_tensors(path, REPORT_KIND)  # raises the provenance error naming the kind found
        doc, prov = read_yaml(path, REPORT_KIND)
        report = cls({k: v for k, v in doc.items() if k not in ("provenance", "schema")}, prov, source=path)
        report.validate()
        return report


@dataclass
class PruningMasks:
    """Which weights of the pruned checkpoint are kept (True), by its parameter names; on disk one bit each."""

    masks: dict[str, torch.Tensor]
    provenance: Provenance = field(default_factory=lambda: Provenance(kind=MASKS_KIND))
    source: str = ""

    def validate(self) -> None:
        import torch

        for name, mask in self.masks.items():
            if mask.dtype != torch.bool:
                raise InputError(f"{self.source or 'the masks'}: {name} is {mask.dtype}, not a mask of booleans",
                                 REMAKE)

    def save(self, path: str) -> None:
        """Packed eight weights a byte, atomically, with the provenance."""
        from eetool.classification.weight_pruning import pack_masks
        from eetool.core.artifacts import write_tensors

        self.validate()
        packed, meta = pack_masks(self.masks)
        write_tensors(path, packed, self.provenance, extra=meta)

    @classmethod
    def load(cls, path: str) -> PruningMasks:
        """Read a masks file; refuse one whose recorded shapes do not match its bits (a hand edit or another
        file's metadata)."""
        from eetool.classification.weight_pruning import MASK_SHAPES_KEY, unpack_masks
        from eetool.core.artifacts import read_tensors

        packed, prov, meta = read_tensors(path, MASKS_KIND)
        try:
            shapes = json.loads(meta[MASK_SHAPES_KEY])
            fits = (isinstance(shapes, dict) and shapes.keys() == packed.keys() and all(
                isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s)
                and packed[k].numel() == -(-math.prod(s) // 8) for k, s in shapes.items()))
        except (KeyError, ValueError):
            fits = False
        if not fits:
            raise InputError(f"{path} does not record the shape of every mask it packs", REMAKE)
        masks = cls(unpack_masks(packed, meta), prov, source=path)
        masks.validate()
        return masks
