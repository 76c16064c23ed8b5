"""The thresholds artifact of a classifier (kind ``thresholds``, YAML): the operating points an exit method was
fitted to, with what their costs are of. This module owns the format: `fit-thresholds` builds one and saves it,
`evaluate`, `predict` and `export` load it, check it against what they run and pick their points from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypedDict

from eetool.core.artifacts import Provenance
from eetool.core.choices import COMBINES
from eetool.core.errors import InputError, UsageError
from eetool.core.exit_methods import CLASSIFICATION_METHODS, combines_with_means

KIND = "thresholds"
REMAKE = "re-make it with `eetool fit-thresholds`"


class OperatingPoint(TypedDict, total=False):
    """One fitted point. Costs are fractions of the plain model's cost on the artifact's cost basis; ``dense_cost``
    (a pruned network's dense MACs) or ``macs_cost`` (beside measured wall-time costs) where there is another."""

    budget: float
    cost: float
    accuracy: float
    dense_cost: float
    macs_cost: float
    fits: int  # the fits the wall-time loop made for the point
    converged: bool  # whether that loop reached a fixed point
    thresholds: list[float]  # one per early exit, unrounded: each lies one float32 step below a confidence


@dataclass
class ExitThresholds:
    """Operating points of one exit method on one checkpoint's exits (the provenance names both)."""

    method: str
    combine: str  # how E²CM's test combines with another method's; recorded only where the method has one
    search: str
    cost_basis: str  # dense, effective or wall-time
    fitted_on: str  # the fingerprint of the data the points were fitted on
    reachable: tuple[float, float]
    swept: int  # budgets swept (0 when only --budget was asked)
    points: list[OperatingPoint]
    provenance: Provenance = field(default_factory=lambda: Provenance(kind=KIND))
    wall_time: dict[str, Any] | None = None  # the measurement wall-time costs are fractions of
    source: str = ""  # the file it was loaded from, for messages

    def to_doc(self) -> dict[str, Any]:
        """The YAML document (provenance aside), in the order users read it."""
        return {
            "method": self.method,
            **({"combine": self.combine} if combines_with_means(self.method) else {}),
            "search": self.search,
            "cost_basis": self.cost_basis,
            **({"wall_time": self.wall_time} if self.wall_time is not None else {}),
            "fitted_on": self.fitted_on,
            "reachable": [round(self.reachable[0], 6), round(self.reachable[1], 6)],
            "swept": self.swept,
            "points": [dict(p) for p in self.points],
        }

    def save(self, path: str) -> None:
        """Atomically, with the provenance; ``-`` writes to stdout."""
        from eetool.core.artifacts import write_yaml

        write_yaml(path, self.to_doc(), self.provenance)

    @classmethod
    def load(cls, path: str) -> ExitThresholds:
        """Read a thresholds file and check what it holds on its own (against a model's exits: `check`)."""
        from eetool.core.artifacts import read_tensors, read_yaml

        if path.endswith(".safetensors"):  # another eetool artifact (tensors) given where thresholds belong
            read_tensors(path, KIND)  # raises the provenance error naming the kind found
        doc, prov = read_yaml(path, KIND)
        method, combine = str(doc.get("method", "e2cm")), str(doc.get("combine", "and"))
        if method not in CLASSIFICATION_METHODS or combine not in COMBINES:
            raise InputError(f"{path} records an unknown method {method!r} or combine {combine!r}", REMAKE)
        reachable = doc.get("reachable")
        low, high = reachable if isinstance(reachable, list) and len(reachable) == 2 else (0.0, 1.0)
        wall_time = doc.get("wall_time")
        return cls(method=method, combine=combine, search=str(doc.get("search", "")),
                   cost_basis=str(doc.get("cost_basis", "dense")), fitted_on=str(doc.get("fitted_on", "")),
                   reachable=(low, high), swept=int(doc.get("swept", 0) or 0), points=_points(path, doc),
                   provenance=prov, wall_time=wall_time if isinstance(wall_time, dict) else None, source=path)

    def check(self, num_exits: int) -> None:
        """Refuse points that do not hold one finite threshold per exit of the model they are to run on, or no
        finite budget: a hand-edited file (a NaN threshold lets no sample leave, a string one fails mid-run) is
        refused before anything runs."""

        def finite(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        path = self.source
        for i, p in enumerate(self.points):
            t = p.get("thresholds")
            if not isinstance(t, list) or len(t) != num_exits:
                held = f"{len(t)} thresholds" if isinstance(t, list) else "no list of thresholds"
                raise InputError(f"{path}: operating point {i} has {held} for {num_exits} exits", REMAKE)
            if not all(finite(v) for v in t):
                raise InputError(f"{path}: operating point {i} has thresholds that are not finite numbers ({t})",
                                 REMAKE)
            if not finite(p.get("budget")):
                raise InputError(f"{path}: operating point {i} has no budget that is a finite number", REMAKE)

    def pick(self, point: str) -> list[tuple[int, OperatingPoint]]:
        """The points ``--point`` names (all, or comma-separated indices), each with its index."""
        if point == "all":
            return list(enumerate(self.points))
        try:
            picked = [int(v) for v in point.split(",")]
        except ValueError:
            picked = [-1]
        if any(not 0 <= i < len(self.points) for i in picked):
            raise UsageError(f"--point {point!r} is not all or indices below {len(self.points)}", "e.g. --point 0,2")
        return [(i, self.points[i]) for i in picked]

    def fitted_basis(self) -> dict[str, Any]:
        """What the budgets were costs of, for a report: MACs (dense or effective), or measured wall time with the
        measurement (fit-thresholds --overhead measured)."""
        return {"thresholds_cost_basis": self.cost_basis,
                **({"thresholds_wall_time": self.wall_time} if self.wall_time is not None else {})}


def _points(path: str, doc: dict[str, Any]) -> list[OperatingPoint]:
    """The document's points: a non-empty list of mappings (their values are checked against the model: `check`)."""
    points = doc.get("points")
    if not isinstance(points, list) or not points:
        raise InputError(f"{path} holds no list of operating points", REMAKE)
    for i, p in enumerate(points):
        if not isinstance(p, dict):
            raise InputError(f"{path}: operating point {i} is not a mapping", REMAKE)
    return [OperatingPoint(**p) for p in points]  # type: ignore[typeddict-item]
