"""Trained exit heads: Shallow-Deep Network internal classifiers (Kaya et al. 2019) and BranchyNet branches
(Teerapittayanon et al. 2016), optionally reading E²CM's distances (thesis 2.3.2), and their artifact
(``ExitHeadsArtifact``).

Method: docs/trained-exits.md
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from eetool.core.artifacts import ArtifactFile, Provenance, read_tensors, write_tensors
from eetool.core.choices import HEAD_KINDS
from eetool.core.errors import InputError, UsageError


class MixedPool(nn.Module):
    """alpha * max-pool + (1 - alpha) * average-pool to ``size`` x ``size``, alpha learned in (0, 1). Out of
    training on the CPU it pools channels-last (``exact_pools``), with the same values bit for bit."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.mix = nn.Parameter(torch.zeros(1))  # alpha = sigmoid(mix), 0.5 at the start
        self._plans: dict[tuple[int, int], AvgPlan | None] = {}
        # mix's (storage, version) when last read, alpha, 1 - alpha
        self._weights: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return x.flatten(1)
        if x.shape[-1] > self.size or x.shape[-2] > self.size:
            if torch.is_grad_enabled() or x.device.type != "cpu":  # the equality is shown for the CPU kernels
                alpha = torch.sigmoid(self.mix)
                x = alpha * F.adaptive_max_pool2d(x, self.size) + (1 - alpha) * F.adaptive_avg_pool2d(x, self.size)
            else:
                pooled_max, pooled_avg = exact_pools(x, self.size, self._plan(x.shape[-2], x.shape[-1]))
                alpha, rest = self._mix_weights()
                x = alpha * pooled_max + rest * pooled_avg
        return x.flatten(1)

    def _mix_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha and 1 - alpha, computed again only when ``mix`` changed (training and loading write it in place,
        which bumps its version; moving it replaces its storage): two operations fewer per exit, which counts at
        batch 1."""
        version = (self.mix.data_ptr(), self.mix._version)
        if self._weights is None or self._weights[0] != version:
            with torch.no_grad():
                alpha = torch.sigmoid(self.mix)
                self._weights = version, alpha, 1 - alpha
        return self._weights[1], self._weights[2]

    def _plan(self, height: int, width: int) -> AvgPlan | None:
        key = (height, width)
        if key not in self._plans:
            self._plans[key] = avg_plan(height, width, self.size)
        return self._plans[key]


def adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """The [start, end) input windows of adaptive pooling from n_in to n_out, as torch computes them."""
    return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


@dataclass(frozen=True)
class AvgPlan:
    """How to reproduce adaptive average pooling from faster kernels: a sum pooling (kernel, stride, padding per
    axis) divided by the window heights, then widths; or (``sum_pool`` None) the channels-last adaptive kernel.
    Method: docs/performance.md#exact-pooling-in-the-exit-heads"""

    sum_pool: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None
    rows: torch.Tensor  # size x 1: window heights
    cols: torch.Tensor  # size: window widths


def _sum_pool_axis(n_in: int, n_out: int) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of a pooling whose clipped windows are adaptive pooling's on one axis; None if none."""
    want = adaptive_windows(n_in, n_out)
    widest = max(e - s for s, e in want)
    for kernel in range(widest, widest + 3):
        for padding in range(kernel // 2 + 1):  # torch's pooling allows at most half the kernel
            for stride in range(1, n_in + 1):
                if (n_in + 2 * padding - kernel) // stride + 1 != n_out:
                    continue
                got = [(max(i * stride - padding, 0), min(i * stride - padding + kernel, n_in)) for i in range(n_out)]
                if got == want:
                    return kernel, stride, padding
    return None


def avg_plan(height: int, width: int, size: int) -> AvgPlan | None:
    """The faster way to ``height`` x ``width`` -> ``size`` x ``size`` average pooling; None: the NCHW kernel."""
    heights = [e - s for s, e in adaptive_windows(height, size)]
    widths = [e - s for s, e in adaptive_windows(width, size)]
    rows, cols = torch.tensor(heights, dtype=torch.float32).view(-1, 1), torch.tensor(widths, dtype=torch.float32)
    along_rows, along_cols = _sum_pool_axis(height, size), _sum_pool_axis(width, size)
    if along_rows is not None and along_cols is not None:
        return AvgPlan(tuple(zip(along_rows, along_cols, strict=True)), rows, cols)  # type: ignore[arg-type]
    if all(h & (h - 1) == 0 for h in heights) or all(w & (w - 1) == 0 for w in widths):
        return AvgPlan(None, rows, cols)
    return None


def exact_pools(x: torch.Tensor, size: int, plan: AvgPlan | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive max and average pooling of N x C x H x W ``x`` to ``size`` x ``size`` from faster kernels, equal bit
    for bit to ``F.adaptive_max_pool2d`` and ``F.adaptive_avg_pool2d`` on the NCHW tensor (``plan`` None: the
    NCHW average kernel). Method: docs/performance.md#exact-pooling-in-the-exit-heads"""
    channels_last = x.contiguous(memory_format=torch.channels_last)
    if plan is None or plan.sum_pool is None:
        pooled_max = F.adaptive_max_pool2d(channels_last, size)
        if plan is None:
            return pooled_max, F.adaptive_avg_pool2d(x, size)
        return pooled_max, F.adaptive_avg_pool2d(channels_last, size)
    kernel, stride, padding = plan.sum_pool
    # The plain max pooling over the same windows (its padding is never the maximum) is faster than the adaptive
    # one: 2.8-3.6 against 3.7-10 ms per 256 x 16 x 28 x 28 batch on one thread of a loaded machine.
    pooled_max = F.max_pool2d(channels_last, kernel, stride, padding)
    sums = F.avg_pool2d(channels_last, kernel, stride, padding, divisor_override=1)
    return pooled_max, sums / plan.rows.to(x.device) / plan.cols.to(x.device)


class ExitHead(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, *, kind: str, pool_size: int,
                 distances: int = 0) -> None:
        super().__init__()
        self.branch: nn.Module = nn.Identity()
        if kind == "branchy" and len(in_shape) == 3:
            c = in_shape[0]
            self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                        nn.ReLU(inplace=True))
        self.pool = MixedPool(pool_size)
        with torch.no_grad():
            width = self.pool(self.branch.eval()(torch.zeros(1, *in_shape))).shape[1]
        self.linear = nn.Linear(width + distances, num_classes)

    def forward(self, x: torch.Tensor, distances: torch.Tensor | None = None) -> torch.Tensor:
        z = self.pool(self.branch(x))
        if distances is not None:
            z = torch.cat([z, distances], 1)
        return self.linear(z)


@dataclass
class HeadsSpec:
    """What rebuilds the heads; stored in the exit-heads artifact's metadata."""

    kind: str
    exits: list[str]
    in_shapes: list[list[int]]
    num_classes: int
    pool_size: int = 4
    with_distances: bool = False
    weights: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HeadsSpec:
        return cls(**json.loads(text))


class ExitHeads(nn.Module):
    def __init__(self, spec: HeadsSpec) -> None:
        super().__init__()
        if spec.kind not in HEAD_KINDS:
            raise UsageError(f"unknown head {spec.kind!r}", f"use one of {', '.join(HEAD_KINDS)}")
        self.spec = spec
        k = spec.num_classes if spec.with_distances else 0
        self.heads = nn.ModuleList(ExitHead(tuple(s), spec.num_classes, kind=spec.kind, pool_size=spec.pool_size,
                                            distances=k) for s in spec.in_shapes)

    def forward(self, features: list[torch.Tensor], distances: list[torch.Tensor] | None = None
                ) -> list[torch.Tensor]:
        return [head(f, None if distances is None else distances[j])
                for j, (head, f) in enumerate(zip(self.heads, features, strict=True))]

    def macs(self, effective: bool = False) -> list[int]:
        """MACs of each head for one sample: branch convolution, pooling (one operation per element read), linear.

        ``effective``: the convolution and the linear layer at their MACs times their fraction of non-zero
        weights (a pruned head's cost, see eetool.core.costs)."""
        def share(layer: nn.Module) -> float:
            if not effective:
                return 1.0
            w = layer.weight
            assert isinstance(w, torch.Tensor)
            return int((w != 0).sum()) / w.numel()

        out = []
        for head, shape in zip(self.heads, self.spec.in_shapes, strict=True):
            assert isinstance(head, ExitHead)
            n = math.prod(shape)
            conv = 0
            if isinstance(head.branch, nn.Sequential):
                c = shape[0]
                # convolution, batch norm and ReLU
                conv = round(c * c * 9 * math.prod(shape[1:]) * share(head.branch[0])) + 2 * n
            pool = 2 * n if len(shape) == 3 and max(shape[1:]) > self.spec.pool_size else 0
            out.append(int(conv + pool + round(head.linear.in_features * head.linear.out_features
                                               * share(head.linear))))
        return out


def sdn_weights(n: int) -> list[float]:
    """SDN's loss weights for internal classifiers at 15%, 30%, ... of the network: 0.15, 0.3, ..., capped at 1."""
    return [min(1.0, round(0.15 * (j + 1), 4)) for j in range(n)]


def parse_weights(text: str | None, n: int) -> list[float]:
    if not text:
        return [1.0] * n
    if text == "sdn":
        return sdn_weights(n)
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        weights = []
    # Written as a range so that nan (every comparison false) and inf, which would poison the loss, fail too.
    if len(weights) != n or not all(0 <= w < math.inf for w in weights):
        raise UsageError(f"--exit-weights {text!r} is not {n} finite non-negative numbers",
                         "give one weight per exit, or 'sdn'")
    return weights


# The metadata key of the heads' spec. Exit-heads files written by the releases whose layout change renamed it by
# accident carry RENAMED_HEADS_KEY; they are still read.
HEADS_KEY = "eetool.heads"
RENAMED_HEADS_KEY = "eetool.classification.exit_heads"


# No exit's feature map is larger (elements per sample): a bound on what a spec read from a file may make
# the heads allocate while they are built.
MAX_FEATURE_ELEMENTS = 1 << 26
REMAKE = "re-make it with `eetool train-exits`"


@dataclass
class ExitHeadsArtifact(ArtifactFile):
    """An exit-heads artifact (kind ``exit-heads``, safetensors): the heads' weights, the spec that rebuilds them
    and the provenance naming the backbone they were trained on. This class owns the format."""

    heads: ExitHeads
    provenance: Provenance = field(default_factory=lambda: Provenance(kind="exit-heads"))
    source: str = ""  # the file it was loaded from, for messages

    def save(self, path: str) -> None:
        """Atomically, with the spec in the metadata."""
        state = {k: v.detach().cpu() for k, v in self.heads.state_dict().items()}
        write_tensors(path, state, self.provenance, extra={HEADS_KEY: self.heads.spec.to_json()})

    @classmethod
    def load(cls, path: str) -> ExitHeadsArtifact:
        """The heads in eval mode, refused when the spec or the weights are malformed or do not fit each other."""
        tensors, prov, meta = read_tensors(path, "exit-heads")
        try:
            spec = HeadsSpec.from_json(meta[HEADS_KEY] if HEADS_KEY in meta else meta[RENAMED_HEADS_KEY])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path} is an incomplete exit-heads artifact ({type(e).__name__}: {e})",
                             REMAKE) from None
        problem = _spec_problem(spec)
        if problem:
            raise InputError(f"{path} is a malformed exit-heads artifact ({problem})", REMAKE)
        bad = [k for k, v in tensors.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())]
        if bad:
            raise InputError(f"{path} holds weights that are not finite numbers ({bad[0]})", REMAKE)
        try:
            heads = ExitHeads(spec)
            heads.load_state_dict(tensors)
        except RuntimeError as e:  # missing, unexpected or misshapen tensors: the first one, under torch's heading
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
            raise InputError(f"{path} is an incomplete exit-heads artifact ({reason})", REMAKE) from None
        return cls(heads.eval(), prov, path)


def save_heads(path: str, heads: ExitHeads, prov: Provenance) -> None:
    """``ExitHeadsArtifact(heads, prov).save(path)``, for the callers not yet moved to the class (pruning_rounds)."""
    ExitHeadsArtifact(heads, prov).save(path)


def load_heads(path: str) -> tuple[ExitHeads, Provenance]:
    """``ExitHeadsArtifact.load(path)`` as a pair, for the callers not yet moved to the class (pruning_rounds)."""
    loaded = ExitHeadsArtifact.load(path)
    return loaded.heads, loaded.provenance


def _spec_problem(spec: HeadsSpec) -> str | None:
    """What is wrong with a spec read from a file, before anything is built from it (None: nothing)."""
    def positive_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if spec.kind not in HEAD_KINDS:
        return f"head kind {spec.kind!r} is not one of {', '.join(HEAD_KINDS)}"
    if not isinstance(spec.exits, list) or not spec.exits or not all(isinstance(e, str) for e in spec.exits):
        return "exits is not a list of exit names"
    if not isinstance(spec.in_shapes, list) or len(spec.in_shapes) != len(spec.exits):
        return f"in_shapes is not a list of {len(spec.exits)} shapes, one per exit"
    for shape in spec.in_shapes:
        if (not isinstance(shape, list) or len(shape) not in (1, 3) or not all(positive_int(d) for d in shape)
                or math.prod(shape) > MAX_FEATURE_ELEMENTS):
            return f"in_shape {shape!r} is not C x H x W or D positive sizes of at most {MAX_FEATURE_ELEMENTS} elements"
    if not positive_int(spec.num_classes) or not positive_int(spec.pool_size):
        return "num_classes and pool_size are not positive integers"
    if not isinstance(spec.with_distances, bool):
        return "with_distances is not true or false"
    if not isinstance(spec.weights, list) or (spec.weights and len(spec.weights) != len(spec.exits)) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and 0 <= w < math.inf for w in spec.weights):
        return "weights is not one finite non-negative number per exit"
    return None
