"""The indices artifact (kind ``indices``): the samples of a dataset split that a run keeps. `prune-dataset`
writes it (with its pruning run's per-sample records); every command's ``--indices`` reads it, or a text file
with one index per line. This module owns the format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from eetool.core.artifacts import ArtifactFile, Provenance
from eetool.core.errors import InputError

KIND = "indices"
MAKE = "make it with `eetool prune-dataset`"
RECORDS_PREFIX = "records."


@dataclass
class SampleIndices(ArtifactFile):
    """Positions in one dataset split. Files from `prune-dataset -o` also hold the positions that run scored,
    their priority scores and the pruning phase's records; a text file holds the indices alone."""

    indices: torch.Tensor
    provenance: Provenance = field(default_factory=lambda: Provenance(kind=KIND))
    source: str = ""
    pruned: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    priority: torch.Tensor | None = None
    records: dict[str, torch.Tensor] = field(default_factory=dict)
    from_text: bool = False  # a text file: no provenance to verify

    def save(self, path: str) -> None:
        """Atomically, as safetensors with the provenance."""
        from eetool.core.artifacts import write_tensors

        optional = {"pruned": self.pruned, "positions": self.positions, "priority": self.priority}
        tensors = {"indices": self.indices, **{k: v for k, v in optional.items() if v is not None},
                   **{RECORDS_PREFIX + k: v for k, v in self.records.items()}}
        write_tensors(path, tensors, self.provenance)

    @classmethod
    def load(cls, path: str) -> SampleIndices:
        """An indices artifact (``.safetensors``) or a text file of indices; their values are checked against the
        dataset they select from by ``positions_in``."""
        if path.endswith(".safetensors"):
            from eetool.core.artifacts import read_tensors

            tensors, prov, _ = read_tensors(path, KIND)
            if "indices" not in tensors:
                raise InputError(f"{path} has no 'indices' tensor", MAKE)
            records = {k.removeprefix(RECORDS_PREFIX): v for k, v in tensors.items() if k.startswith(RECORDS_PREFIX)}
            return cls(tensors["indices"], prov, path, pruned=tensors.get("pruned"),
                       positions=tensors.get("positions"), priority=tensors.get("priority"), records=records)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InputError(f"cannot read indices file {path}: {e.strerror}", "check the path") from None
        try:
            idx = torch.tensor([int(tok) for tok in text.split()], dtype=torch.int64)
        except ValueError:
            if "provenance:" in text:  # another eetool artifact (YAML) given where indices belong
                from eetool.core.artifacts import read_yaml

                read_yaml(path, KIND)  # raises the provenance error naming the kind found
            raise InputError(f"{path} holds something other than integers", "write one index per line") from None
        return cls(idx, source=path, from_text=True)

    def positions_in(self, dataset: str, size: int, fingerprint: str) -> torch.Tensor:
        """The indices as int64 positions in the dataset ``dataset`` (its spec, for messages) of ``size``
        samples, refused when the artifact was made for another dataset (``fingerprint``) or they do not fit."""
        path, idx = self.source, self.indices
        if not self.from_text:
            self.verify(dataset=fingerprint)
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{path}: indices must be a 1-D integer tensor", MAKE)
        if idx.numel() == 0:
            raise InputError(f"{path} holds no indices", "a subset needs at least one sample")
        if int(idx.min()) < 0 or int(idx.max()) >= size:
            raise InputError(f"{path} has indices outside 0..{size - 1} of {dataset}",
                             "use indices made for this dataset and split")
        if torch.unique(idx).numel() != idx.numel():
            raise InputError(f"{path} repeats indices", "list each sample once")
        return idx.to(torch.int64)
