"""E²CM, early exit via class means (thesis chapter 2): calibration. Per exit, class means of the (optionally
pooled) features from float64 sums and counts, normalised distances, each sample's confidence (eq. 2.5) and
prediction (eq. 2.7, or the nearest class mean, recorded per exit by ``calibrate``).

Method: docs/e2cm.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from eetool.classification.clustering import best_mapping, kmeans
from eetool.classification.distances import distances
from eetool.core.artifacts import ArtifactFile, Provenance, read_tensors, read_yaml, write_tensors
from eetool.core.budget_search import ExitStats
from eetool.core.costs import EFFECTIVE, CostModel
from eetool.core.datasets import Dataset, Preprocess, require_labels
from eetool.core.distributed import World, all_sum, gather_rows, shard_batches
from eetool.core.errors import InputError, UsageError
from eetool.core.exits import ExitModel
from eetool.core.reporting import Reporter


@dataclass(frozen=True)
class Pooling:
    """Feature reduction before the means: spatial max-pooling to ``spatial`` x ``spatial`` and
    channel max-pooling in groups down to ``channels`` (the thesis pools 14x14x80 to 7x7x10)."""

    spatial: int | None = None
    channels: int | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """N x ... features to N x D (float32)."""
        if x.dim() == 4:
            if self.channels and self.channels < x.shape[1]:
                if x.shape[1] % self.channels:
                    raise UsageError(f"--pool-channels {self.channels} does not divide {x.shape[1]} channels",
                                     "choose a divisor of every pooled exit's channel count")
                n, c, h, w = x.shape
                x = x.view(n, self.channels, c // self.channels, h, w).amax(2)
            if self.spatial and (x.shape[2] > self.spatial or x.shape[3] > self.spatial):
                x = F.adaptive_max_pool2d(x, self.spatial)
        return x.flatten(1).float()

    def out_dim(self, shape: tuple[int, ...]) -> int:
        return int(self.apply(torch.zeros(1, *shape)).shape[1])


class ClassMeanSums:
    """Per exit, float64 sums of features per class and the class counts; shards add up."""

    def __init__(self, dims: list[int], num_classes: int) -> None:
        self.sums = [torch.zeros(num_classes, d, dtype=torch.float64) for d in dims]
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, features: list[torch.Tensor], labels: torch.Tensor) -> None:
        labels = labels.to(features[0].device)
        for s, f in zip(self.sums, features, strict=True):
            s.index_add_(0, labels.cpu(), f.double().cpu())
        self.counts += torch.bincount(labels.cpu(), minlength=self.counts.numel())

    def all_reduce(self, world: World) -> None:
        """The sums and counts of every rank's shard, on every rank."""
        for s in self.sums:
            all_sum(s, world)
        all_sum(self.counts, world)

    def merge(self, other: ClassMeanSums) -> None:
        for s, o in zip(self.sums, other.sums, strict=True):
            s += o
        self.counts += other.counts

    def means(self) -> list[torch.Tensor]:
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise InputError(f"no calibration samples of class {empty[0]} ({len(empty)} classes empty)",
                             "calibrate on data with every class, e.g. the training split")
        return [(s / self.counts[:, None]).float() for s in self.sums]


SOFTMAX, NEAREST = "softmax", "nearest"
PREDICT_RULES = (SOFTMAX, NEAREST)


def decide(d: torch.Tensor, normaliser: torch.Tensor, rule: str = SOFTMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence max_k softmax(-d/normaliser) (eq. 2.5), over the last (class) dimension, and the
    prediction: its argmax (eq. 2.7) under ``softmax``, the nearest class mean argmin_k d under ``nearest``."""
    p = torch.softmax(-d / normaliser, dim=-1)
    conf, pred = p.max(-1)
    if rule == NEAREST:
        pred = d.argmin(-1)
    return conf, pred


def choose_rules(predictions: dict[str, torch.Tensor], labels: torch.Tensor | None, predict: str) -> list[str]:
    """The prediction rule of each exit: ``predict`` itself, or under ``auto`` the rule whose N x J
    ``predictions`` match more ``labels`` at that exit; a tie, or no labels, keeps eq. 2.7's softmax."""
    exits = int(predictions[SOFTMAX].shape[1])
    if predict in PREDICT_RULES:
        return [predict] * exits
    if predict != "auto":
        raise UsageError(f"unknown prediction rule {predict!r}", "use softmax, nearest or auto")
    if labels is None:
        return [SOFTMAX] * exits
    hits = {rule: (p == labels[:, None]).sum(0) for rule, p in predictions.items()}
    return [NEAREST if int(hits[NEAREST][j]) > int(hits[SOFTMAX][j]) else SOFTMAX for j in range(exits)]


def distance_macs(dim: int, num_classes: int) -> int:
    """MACs of one sample's decision at an exit: K dot products of length D, plus the norms, the
    normalisation and the softmax (a few operations per class)."""
    return num_classes * dim + dim + 4 * num_classes


@dataclass
class Calibration:
    """What calibrate-means computes: means, normalisers, and the per-sample cache fit-thresholds uses."""

    means: list[torch.Tensor]  # per exit: K x D
    normalisers: torch.Tensor  # J x K: mean distance to each class mean over all samples
    counts: torch.Tensor  # K
    confidence: torch.Tensor  # N x J
    prediction: torch.Tensor  # N x J, by each exit's rule in ``rules``
    final_prediction: torch.Tensor  # N: the model's own head
    labels: torch.Tensor  # N
    dims: list[int]
    seconds: tuple[float, float]  # pass 1 (means), the rest (normalisers and confidences)
    rules: list[str] = field(default_factory=list)  # per exit, softmax or nearest; empty: softmax at every exit
    rule_predictions: dict[str, torch.Tensor] = field(default_factory=dict)  # N x J by each rule (not stored)


@torch.no_grad()
def calibrate(exit_model: ExitModel, data: Dataset, preprocess: Preprocess, num_classes: int, *,
              pooling: Pooling = Pooling(), batch_size: int = 256, device: torch.device | str = "cpu",
              reporter: Reporter | None = None, raw_cache_bytes: int = 256 * 2**20,
              centres: list[torch.Tensor] | None = None, predict: str = SOFTMAX, world: World = World()
              ) -> Calibration:
    """Streaming passes: class means; then normalisers, confidences and predictions. ``predict``: softmax,
    nearest, or auto (per exit, the more accurate here; ``choose_rules``). With ``centres`` (clusters) the first
    pass is skipped and no labels are used. Under torchrun every rank returns the whole result."""
    import time

    reporter = reporter or Reporter()
    shapes = exit_model.exit_shapes(preprocess.input_shape)
    dims = [pooling.out_dim(s) for s in shapes]
    batches = len(shard_batches(list(range(-(-len(data) // batch_size))), world))
    t0 = time.perf_counter()
    counts = None
    clusters = centres is not None
    if centres is None:
        require_labels(data, "class means need labels (or use --clusters)")
        sums = ClassMeanSums(dims, num_classes)
        with reporter.bar(batches, "class means") as bar:
            for images, labels, _ in data.batches(batch_size, world=world):
                feats, _ = exit_model.features(preprocess(images, device))
                sums.update([pooling.apply(f) for f in feats], labels)
                bar.advance()
        sums.all_reduce(world)
        centres, counts = sums.means(), sums.counts
        for name, m in zip(exit_model.exits, centres, strict=True):
            _require_finite(m, f"the class means at exit {name}")
    t1 = time.perf_counter()
    means = [m.to(device) for m in centres]
    means_sq = [(m * m).sum(1) for m in means]
    n, j = len(data), len(dims)
    dist_sum = torch.zeros(j, num_classes, dtype=torch.float64)
    # zeros, not empty: several processes fill their own rows and all-reduce the rest in
    final = torch.zeros(n, dtype=torch.int64)
    # The normalisers need every sample's distances before any confidence can be computed. Small
    # caches keep the raw distances (N x J x K); larger ones run a third pass, so that memory stays
    # at the N x J confidence cache however many classes and samples there are.
    keep_raw = n * j * num_classes * 4 <= raw_cache_bytes
    raw = torch.zeros(n, j, num_classes, dtype=torch.float32) if keep_raw else None
    with reporter.bar(batches, "distances") as bar:
        for images, _, pos in data.batches(batch_size, world=world):
            feats, logits = exit_model.features(preprocess(images, device))
            for e, f in enumerate(feats):
                d = distances(pooling.apply(f), means[e], means_sq[e])
                dist_sum[e] += d.double().sum(0).cpu()
                if raw is not None:
                    raw[pos, e] = d.cpu()
            _require_finite(logits, "the model's outputs")
            final[pos] = logits.argmax(1).cpu()
            bar.advance()
    for gathered in (dist_sum, final, *([raw] if raw is not None else [])):
        all_sum(gathered, world)
    normalisers = (dist_sum / n).float()
    for name, row in zip(exit_model.exits, normalisers, strict=True):
        _require_finite(row, f"the distances at exit {name}")
    conf = torch.zeros(n, j)
    by_rule = {rule: torch.zeros(n, j, dtype=torch.int64) for rule in PREDICT_RULES}
    if raw is not None:
        for start in range(0, n, 4096):  # in chunks: the softmax's temporaries stay small
            chunk = raw[start:start + 4096]
            conf[start:start + 4096], by_rule[SOFTMAX][start:start + 4096] = decide(chunk, normalisers)
            by_rule[NEAREST][start:start + 4096] = chunk.argmin(-1)
    else:
        norm = normalisers.to(device)
        with reporter.bar(batches, "confidences") as bar:
            for images, _, pos in data.batches(batch_size, world=world):
                feats, _ = exit_model.features(preprocess(images, device))
                for e, f in enumerate(feats):
                    d = distances(pooling.apply(f), means[e], means_sq[e])
                    c, p = decide(d, norm[e])
                    conf[pos, e], by_rule[SOFTMAX][pos, e] = c.cpu(), p.cpu()
                    by_rule[NEAREST][pos, e] = d.argmin(-1).cpu()
                bar.advance()
        for gathered in (conf, *by_rule.values()):
            all_sum(gathered, world)
    t2 = time.perf_counter()
    if counts is None:  # cluster centres: the sizes of the head's clusters
        counts = torch.bincount(final, minlength=num_classes)
    rules = choose_rules(by_rule, None if clusters else data.labels, predict)
    pred = torch.stack([by_rule[rule][:, e] for e, rule in enumerate(rules)], 1)
    return Calibration([m.cpu() for m in means], normalisers, counts, conf, pred,
                       final, data.labels.clone(), dims, (t1 - t0, t2 - t1), rules, by_rule)


def _require_finite(values: torch.Tensor, what: str) -> None:
    """NaN or infinite features (weights that are, or activations that overflow) must not become an artifact."""
    if not bool(torch.isfinite(values).all()):
        raise InputError(f"{what} are NaN or infinite: the model produces non-finite values",
                         "check the checkpoint's weights (and --mean/--std of foreign weights)")


# ---------------------------------------------------------------------------------------------
# The class-means artifact and the exit rule that uses it


@dataclass
class ClassMeans(ArtifactFile):
    """A class-means artifact: what evaluate needs to exit, and the calibration cache for fit-thresholds."""

    exits: list[str]
    means: list[torch.Tensor]
    normalisers: torch.Tensor
    counts: torch.Tensor
    pooling: Pooling
    stage_macs: list[int]
    calibration: Calibration | None = None
    clusters: bool = False  # cluster centres (unsupervised) rather than class means
    feature_sizes: list[int] = field(default_factory=list)  # elements of each exit's output before pooling
    rules: list[str] = field(default_factory=list)  # prediction rule per exit; none given: softmax (eq. 2.7)
    # A pruned network's stage MACs with zero weights costing nothing (eetool.core.costs): thresholds are fitted on them
    effective_stage_macs: list[int] = field(default_factory=list)
    provenance: Provenance = field(default_factory=lambda: Provenance(kind="class-means"))
    source: str = ""  # the file it was loaded from, for messages

    def __post_init__(self) -> None:
        if not self.rules:
            self.rules = [SOFTMAX] * len(self.exits)

    @property
    def num_classes(self) -> int:
        return int(self.normalisers.shape[1])

    def cost_model(self, effective: bool = False) -> CostModel:
        """Dense costs; with ``effective``, a pruned network's effective ones (normalised by its dense MACs) where
        the artifact records them, else the dense ones."""
        sizes = self.feature_sizes or [int(m.shape[1]) for m in self.means]
        # pooling reads every element of the exit's output once (one comparison each)
        overheads = [distance_macs(int(m.shape[1]), self.num_classes) + (size if size > m.shape[1] else 0)
                     for m, size in zip(self.means, sizes, strict=True)]
        if effective and self.effective_stage_macs:
            return CostModel(list(self.exits), list(self.effective_stage_macs), overheads,
                             reference_macs=sum(self.stage_macs), basis=EFFECTIVE)
        return CostModel(list(self.exits), list(self.stage_macs), overheads)

    def memory_bytes(self) -> list[int]:
        """Bytes of the stored means (float32) per exit."""
        return [m.numel() * 4 for m in self.means]

    def exit_stats(self, confidence: torch.Tensor, prediction: torch.Tensor, final_prediction: torch.Tensor,
                   labels: torch.Tensor) -> ExitStats:
        """Per-sample correctness at each exit. Cluster ids are scored under the Hungarian matching of
        the head's clusters to the labels, or, without labels, by agreement with the head."""
        if self.clusters:
            if bool((labels < 0).any()):
                labels = final_prediction
            else:
                mapping = best_mapping(final_prediction, labels, self.num_classes)
                prediction, final_prediction = mapping[prediction], mapping[final_prediction]
        correct = torch.cat([prediction == labels[:, None], (final_prediction == labels)[:, None]], 1)
        costs = torch.tensor(self.cost_model(effective=True).normalised_exit_costs(), dtype=torch.float64)
        return ExitStats(confidence, correct, costs)

    def save(self, path: str) -> None:
        """Atomically, as safetensors with the provenance."""
        tensors = {f"means.{j}": m for j, m in enumerate(self.means)}
        tensors |= {"normalisers": self.normalisers, "counts": self.counts,
                    "stage_macs": torch.tensor(self.stage_macs, dtype=torch.int64)}
        if self.feature_sizes:
            tensors["feature_sizes"] = torch.tensor(self.feature_sizes, dtype=torch.int64)
        if self.effective_stage_macs:
            tensors["effective_stage_macs"] = torch.tensor(self.effective_stage_macs, dtype=torch.int64)
        if self.calibration is not None:
            c = self.calibration
            tensors |= {"calibration.confidence": c.confidence, "calibration.prediction": c.prediction.to(torch.int32),
                        "calibration.final_prediction": c.final_prediction, "calibration.labels": c.labels}
        extra = {"eetool.pooling": json.dumps({"spatial": self.pooling.spatial, "channels": self.pooling.channels}),
                 "eetool.clusters": json.dumps(self.clusters), "eetool.predict": json.dumps(self.rules)}
        write_tensors(path, tensors, self.provenance, extra=extra)

    @classmethod
    def load(cls, path: str) -> ClassMeans:
        """Read a class-means file and check that its tensors agree with each other (against a model: ``verify``)."""
        if path.endswith((".yaml", ".yml")):  # another eetool artifact (YAML) given where class means belong
            read_yaml(path, "class-means")  # raises the provenance error naming the kind found
        tensors, prov, meta = read_tensors(path, "class-means")
        try:
            j = len(prov.exits)
            pooling = Pooling(**json.loads(meta.get("eetool.pooling", "{}")))
            calibration = None
            if "calibration.confidence" in tensors:
                labels = tensors["calibration.labels"]
                calibration = Calibration(
                    [], tensors["normalisers"], tensors["counts"], tensors["calibration.confidence"],
                    tensors["calibration.prediction"].to(torch.int64), tensors["calibration.final_prediction"], labels,
                    [], (0.0, 0.0))
            cm = cls(list(prov.exits), [tensors[f"means.{e}"] for e in range(j)], tensors["normalisers"],
                     tensors["counts"], pooling, tensors["stage_macs"].tolist(), calibration,
                     clusters=bool(json.loads(meta.get("eetool.clusters", "false"))),
                     feature_sizes=tensors["feature_sizes"].tolist() if "feature_sizes" in tensors else [],
                     effective_stage_macs=(tensors["effective_stage_macs"].tolist()
                                           if "effective_stage_macs" in tensors else []),
                     rules=_read_rules(meta, j), provenance=prov, source=path)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path} is an incomplete class-means artifact ({e})",
                             "re-make it with `eetool calibrate-means`") from None
        _check_consistent(cm, path)
        return cm


def _check_consistent(cm: ClassMeans, path: str) -> None:
    """Refuse a class-means artifact whose tensors disagree with each other, before any of them is used:
    J exits, K classes, means.j K x D_j, normalisers J x K, J + 1 stages, and N calibration samples."""
    j = len(cm.exits)

    def refuse(problem: str) -> None:
        raise InputError(f"{path} is an inconsistent class-means artifact ({problem})",
                         "re-make it with `eetool calibrate-means`")

    def floats(t: torch.Tensor) -> bool:
        return t.dtype.is_floating_point and bool(torch.isfinite(t).all())

    if j == 0:
        refuse("it records no exits")
    if cm.normalisers.dim() != 2 or cm.normalisers.shape[0] != j or not floats(cm.normalisers):
        refuse(f"normalisers are {tuple(cm.normalisers.shape)} {cm.normalisers.dtype}, not {j} x K finite floats")
    k = cm.num_classes
    if k == 0:
        refuse("it has no classes")
    for e, m in enumerate(cm.means):
        if m.dim() != 2 or m.shape[0] != k or m.shape[1] == 0 or not floats(m):
            refuse(f"means.{e} is {tuple(m.shape)} {m.dtype}, not {k} x D finite floats")
    if cm.counts.shape != (k,) or cm.counts.dtype.is_floating_point:
        refuse(f"counts are {tuple(cm.counts.shape)} {cm.counts.dtype}, not {k} integers")
    if len(cm.stage_macs) != j + 1 or any(not isinstance(v, int) or v < 0 for v in cm.stage_macs):
        refuse(f"stage_macs has {len(cm.stage_macs)} entries for {j} exits, not {j + 1} counts")
    effective = cm.effective_stage_macs
    if effective and (len(effective) != j + 1 or any(not isinstance(v, int) or not 0 <= v <= d
                                                     for v, d in zip(effective, cm.stage_macs, strict=False))):
        refuse(f"effective_stage_macs is {effective}, not {j + 1} counts each at most its dense stage's")
    if cm.feature_sizes and len(cm.feature_sizes) != j:
        refuse(f"feature_sizes has {len(cm.feature_sizes)} entries for {j} exits")
    for name, value in (("spatial", cm.pooling.spatial), ("channels", cm.pooling.channels)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            refuse(f"pooling {name} is {value!r}, not a positive integer or null")
    c = cm.calibration
    if c is None:
        return
    n = c.labels.shape[0] if c.labels.dim() == 1 else -1
    if n < 0 or c.labels.dtype.is_floating_point:
        refuse(f"calibration.labels is {tuple(c.labels.shape)} {c.labels.dtype}, not N integers")
    if c.confidence.shape != (n, j) or not floats(c.confidence):
        refuse(f"calibration.confidence is {tuple(c.confidence.shape)}, not {n} x {j} finite floats")
    for name, t, shape in (("prediction", c.prediction, (n, j)), ("final_prediction", c.final_prediction, (n,))):
        if t.shape != shape or t.dtype.is_floating_point or (t.numel() and not 0 <= int(t.min()) <= int(t.max()) < k):
            refuse(f"calibration.{name} is {tuple(t.shape)} {t.dtype}, not {' x '.join(map(str, shape))} "
                   f"class ids below {k}")


def _read_rules(meta: dict[str, str], exits: int) -> list[str]:
    """The per-exit prediction rules of an artifact; one written before they were recorded predicts
    with the softmax (eq. 2.7) at every exit, as eetool did then."""
    if "eetool.predict" not in meta:
        return [SOFTMAX] * exits
    rules = json.loads(meta["eetool.predict"])
    if not isinstance(rules, list) or len(rules) != exits or any(r not in PREDICT_RULES for r in rules):
        raise ValueError(f"eetool.predict is {meta['eetool.predict']!r}, not one of {', '.join(PREDICT_RULES)} "
                         f"for each of the {exits} exits")
    return rules


class MeansRule:
    """E²CM's confidence at exit j: max_k softmax(-d/normaliser) (eq. 2.5), with the prediction of
    the exit's recorded rule (the softmax's argmax, or the nearest class mean).
    ``eetool.classification.rules.Thresholded`` turns it into the exit decision conf > T_j (eq. 2.6)."""

    def __init__(self, cm: ClassMeans, device: torch.device | str = "cpu") -> None:
        self.pooling = cm.pooling
        self.means = [m.to(device) for m in cm.means]
        self.means_sq = [(m * m).sum(1) for m in self.means]
        self.normalisers = cm.normalisers.to(device)
        self.rules = list(cm.rules)

    def scores(self, j: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = distances(self.pooling.apply(h), self.means[j], self.means_sq[j])
        return decide(d, self.normalisers[j], self.rules[j])


@torch.no_grad()
def cluster_centres(exit_model: ExitModel, data: Dataset, preprocess: Preprocess, k: int, *, pooling: Pooling,
                    batch_size: int = 256, device: torch.device | str = "cpu", iterations: int = 50,
                    generator: torch.Generator | None = None, max_bytes: int = 2 * 2**30,
                    reporter: Reporter | None = None, world: World = World()
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """k-means centres at every exit, matched one-to-one to the head's predicted classes (Hungarian matching on
    their co-occurrence), and the head's predictions; no labels are used. Under torchrun the features are gathered
    in order and every rank runs the same k-means (docs/scale-out.md)."""

    reporter = reporter or Reporter()
    dims = [pooling.out_dim(s) for s in exit_model.exit_shapes(preprocess.input_shape)]
    need = len(data) * sum(dims) * 4
    if need > max_bytes:
        raise UsageError(f"k-means would hold {need / 2**30:.1f} GiB of features in memory",
                         "pool them (--pool-spatial 2, --pool-channels) or cluster fewer samples (--indices)")
    feats: list[list[torch.Tensor]] = [[torch.empty(0, d)] for d in dims]
    head = [torch.empty(0, dtype=torch.int64)]
    positions = [torch.empty(0, dtype=torch.int64)]
    n = len(data)
    with reporter.bar(len(shard_batches(list(range(-(-n // batch_size))), world)), "features") as bar:
        for images, _, pos in data.batches(batch_size, world=world):
            outs, logits = exit_model.features(preprocess(images, device))
            for store, f in zip(feats, outs, strict=True):
                store.append(pooling.apply(f).cpu())
            head.append(logits.argmax(1).cpu())
            positions.append(pos)
            bar.advance()
    mine = torch.cat(positions)
    head_pred = gather_rows(torch.cat(head), mine, n, world)
    centres = []
    for store in feats:
        x = gather_rows(torch.cat(store), mine, n, world)
        c = kmeans(x, k, iterations=iterations, generator=generator)
        assign = distances(x, c).argmin(1)
        mapping = best_mapping(assign, head_pred, k)  # cluster -> head class
        ordered = torch.empty_like(c)
        ordered[mapping] = c
        centres.append(ordered)
    return centres, head_pred
