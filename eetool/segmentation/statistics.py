"""CBT's class statistics as an artifact (``SegmentationClassStatistics``, kind
``segmentation-class-statistics``): eq. 3.1's sums (exits x K x K float64) and pixel counts (K int64), made by
`calibrate-means` on a segmentation checkpoint and read by `fit-thresholds --method cbt|cbt-ns --means`.

Method: docs/segmentation.md
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from eetool.core.artifacts import ArtifactFile, Provenance
from eetool.core.errors import InputError, UsageError
from eetool.core.reporting import format_fields, format_table
from eetool.core.run_inputs import data_path, open_checkpoint
from eetool.segmentation.model import EXIT_NAMES
from eetool.segmentation.pixel_thresholds import ClassStats, margins

if TYPE_CHECKING:
    from eetool.core.checkpoint import Checkpoint
    from eetool.core.options import Run

KIND = "segmentation-class-statistics"
CLASSES_KEY = "eetool.classes"


@dataclass
class SegmentationClassStatistics(ArtifactFile):
    """A ``segmentation-class-statistics`` file: eq. 3.1's sums and counts with the classes' names. This class
    owns the format."""

    stats: ClassStats
    classes: list[str]
    provenance: Provenance = field(default_factory=lambda: Provenance(kind=KIND))
    source: str = ""  # the file it was loaded from, for messages

    def save(self, path: str) -> None:
        """Atomically, as safetensors with the provenance."""
        from eetool.core.artifacts import write_tensors

        write_tensors(path, {"sums": self.stats.sums, "counts": self.stats.counts}, self.provenance,
                      extra={CLASSES_KEY: json.dumps(self.classes)})

    @classmethod
    def load_for(cls, path: str, ckpt: Checkpoint, num_classes: int) -> SegmentationClassStatistics:
        """The statistics of ``path``, refused (with the documented exit codes) when the file is another kind of
        artifact, was made from another checkpoint or for other exits, or its tensors do not fit the network."""
        from eetool.core.artifacts import read_tensors, read_yaml, verify

        if path.endswith((".yaml", ".yml")):  # a YAML artifact given where the statistics belong
            read_yaml(path, KIND)  # raises the provenance error naming the kind found
        tensors, prov, meta = read_tensors(path, KIND)
        verify(path, prov, checkpoint=ckpt.identity, exits=list(EXIT_NAMES))
        sums, counts = tensors.get("sums"), tensors.get("counts")
        shape = (len(EXIT_NAMES), num_classes, num_classes)
        remake = "re-make it with `eetool calibrate-means -c CHECKPOINT -d DATA -o FILE`"
        if (sums is None or counts is None or sums.dtype != torch.float64 or counts.dtype != torch.int64
                or tuple(sums.shape) != shape or tuple(counts.shape) != (num_classes,)):
            raise InputError(f"{path} holds no {' x '.join(map(str, shape))} float64 sums with {num_classes} int64 "
                             "pixel counts", remake)
        if not bool(torch.isfinite(sums).all()) or bool((sums < 0).any()) or bool((counts < 0).any()):
            raise InputError(f"{path} has sums or counts that are negative or not finite", remake)
        try:
            classes = json.loads(meta.get(CLASSES_KEY, "[]"))
        except ValueError:  # the names are for readers of the file; the checkpoint's are the ones used
            classes = []
        return cls(ClassStats(sums, counts), classes if isinstance(classes, list) else [], prov, path)


@dataclass
class StatisticsRequest:
    """`calibrate-means` on a segmentation checkpoint: what it reads and writes."""

    checkpoint: str
    data: str
    output: str
    split: str
    indices: str | None
    batch_size: int
    force: bool
    classification_only: dict[str, bool]  # option -> whether it was given (they do not apply here)


def calibrate_statistics(run: Run, req: StatisticsRequest) -> None:
    """One streaming pass over ``req.data``: eq. 3.1's sums and counts at every exit, written to ``req.output``."""
    from eetool.core.datasets import Preprocess
    from eetool.core.distributed import all_max
    from eetool.segmentation.inputs import class_statistics, load_masks, require_segmentation

    given = [flag for flag, value in req.classification_only.items() if value]
    if given:
        raise UsageError(f"{', '.join(given)} apply to classifiers, not to a segmentation checkpoint",
                         "drop them: a segmentation checkpoint's statistics are per exit and class at every exit")
    run.check_output(req.output, force=req.force, inputs=(req.checkpoint, req.indices, data_path(req.data)),
                     binary=True)
    ckpt = open_checkpoint(run, req.checkpoint)
    model = require_segmentation(ckpt, "this calibration", exits=True)
    device = run.torch()
    ds = load_masks(req.data, req.split, req.indices, ckpt)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    start = time.perf_counter()
    stats = class_statistics(model, ds, preprocess, req.batch_size, device, run.reporter, run.world)
    seconds = all_max(time.perf_counter() - start, run.world)  # the pass ends with its slowest rank
    classes = ckpt.spec.classes or [str(k) for k in range(model.num_classes)]
    prov = Provenance(kind=KIND, checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256,
                      exits=list(EXIT_NAMES), dataset=ds.fingerprint, args=run.args)
    if run.world.main:  # under torchrun every rank holds the summed statistics; rank 0 writes them
        SegmentationClassStatistics(stats, classes, prov).save(req.output)
        run.wrote(req.output)
    present = stats.present
    scores = margins(stats.exit_means().mean(0))  # c_k of P_k (eq. 3.2), the score CBT scales
    doc: dict[str, Any] = {
        "output": req.output, "checkpoint": ckpt.path, "dataset": ds.fingerprint, "samples": len(ds),
        "pixels": int(stats.counts.sum()), "exits": list(EXIT_NAMES),
        "classes": [{"class": c, "pixels": int(n), "score": round(float(s), 6) if p else None}
                    for c, n, s, p in zip(classes, stats.counts.tolist(), scores.tolist(), present.tolist(),
                                          strict=True)],
        "absent": [c for c, p in zip(classes, present.tolist(), strict=True) if not p],
        "seconds": round(seconds, 3), "images_per_second": round(len(ds) / seconds, 1) if seconds else None,
    }

    def text(d: dict[str, Any]) -> str:
        head = format_fields([("class statistics", f"{d['output']} ({d['samples']} images of {d['dataset']}, "
                                                   f"{d['pixels']:,} labelled pixels)"),
                              ("exits", ", ".join(d["exits"])),
                              ("absent classes", ", ".join(d["absent"]) or "none"),
                              ("speed", f"{d['images_per_second']} images/s")])
        table = format_table(["class", "pixels", "score (top1 - top2 of P_k)"],
                             [[c["class"], f"{c['pixels']:,}", "absent" if c["score"] is None else c["score"]]
                              for c in d["classes"]])
        return f"{head}\n\n{table}"

    run.schema = f"eetool/{KIND}@1"  # not the class means' document: say so to JSON readers
    run.emit(doc, text)
