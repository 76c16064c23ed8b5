"""`fit-thresholds --method cbt|cbt-ns|adp-c` on a segmentation checkpoint: fixed or budget-searched pixel-exit
thresholds, and the thresholds file (``SegmentationThresholds`` in class_thresholds.py)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from eetool.core.choices import DECIDE_AT, SEARCH_OVER
from eetool.core.errors import UsageError
from eetool.core.reporting import format_fields, format_table
from eetool.core.run_inputs import data_path, open_checkpoint
from eetool.segmentation.class_thresholds import EARLY_EXITS, KIND, SegmentationThresholds
from eetool.segmentation.inputs import (
    class_statistics,
    load_masks,
    preprocessed_batches,
    require_segmentation,
)
from eetool.segmentation.model import EXIT_NAMES
from eetool.segmentation.networks import early_exit_forward, first_exit_macs, plain_macs
from eetool.segmentation.pixel_thresholds import (
    BudgetFit,
    ClassStats,
    adp_c,
    budget_evaluations,
    cbt,
    cbt_ns,
    check_range,
    fit_budget,
)

if TYPE_CHECKING:
    from eetool.core.checkpoint import Checkpoint
    from eetool.core.datasets import Dataset, Preprocess
    from eetool.core.options import Run
    from eetool.segmentation.networks import SegmentationNet


# The exit rule fit-thresholds uses unless told, for every network: the thesis's per pixel. Per feature, on
# eeseg, matched its mIoU within 0.06-0.10 points at ADP-C 0.998, CBT [0.99, 0.998] and ADP-C 0.9 in `make
# segmentation` (52.03 / 51.95 / 51.88% against 52.09 / 52.03 / 51.98%) at about twice its images/s, on one
# network: at the boundary of issue 24's 0.1-point bar; on a small LR-ASPP it lost 0.9-1.9 points. So it is asked
# for with --decide-at feature.
DEFAULT_RULE = "pixel"


# Timing rounds of fit-thresholds --budget's check of the fitted point against the plain network
SPEED_ROUNDS = 3


def measured_speedup(model: SegmentationNet, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     thresholds: torch.Tensor, decide_at: str, rounds: int = SPEED_ROUNDS) -> float:
    """Images/s of early exit with ``thresholds`` over the plain network's on ``batches``, the median over
    ``rounds`` interleaved rounds (wall clock), each after one warm-up pass."""
    import statistics

    def plain() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for x, _ in batches:
                model(x).max(1)
        return time.perf_counter() - start

    def early() -> float:
        start = time.perf_counter()
        for x, _ in batches:
            early_exit_forward(model, x, thresholds, decide_at=decide_at)
        return time.perf_counter() - start

    plain(), early()
    return statistics.median(p / e for p, e in ((plain(), early()) for _ in range(rounds)))


def warn_if_slower(run: Run, what: str, speedup: float, measured: str) -> None:
    """One warning line when an operating point ran slower than the plain network (fit-thresholds --budget and
    evaluate)."""
    if speedup < 1:
        run.reporter.warn(f"{what} ran at {speedup:.2f}x the plain network's images/s ({measured}): slower than "
                          "the plain network on this machine; its cost counts multiply-adds, not time")


@dataclass
class ThresholdRequest:
    method: str
    output: str
    checkpoint: str | None
    data: str | None
    split: str
    indices: str | None
    batch_size: int
    alpha: float
    beta: float
    threshold: float
    force: bool
    budget: float | None = None  # search alpha (cbt, cbt-ns) or the threshold (adp-c) to meet this mean cost
    search_over: str = "alpha"  # cbt, cbt-ns with a budget: alpha (beta fixed), beta (alpha fixed) or both
    means: str | None = None  # cbt, cbt-ns: class statistics from `calibrate-means` instead of a pass over --data
    split_given: bool = False  # --split was given (on the command line or in a config), not left at its default
    # where the exit decision is taken (DECIDE_AT): --budget's runs, and recorded for evaluate; None: DEFAULT_RULE
    decide_at: str | None = None


def fit_segmentation_thresholds(run: Run, req: ThresholdRequest) -> None:
    from eetool.core.artifacts import STDOUT, Provenance
    from eetool.core.datasets import Preprocess

    if req.search_over not in SEARCH_OVER:
        raise UsageError(f"unknown --search-over {req.search_over!r}", f"use one of {', '.join(SEARCH_OVER)}")
    if req.decide_at is not None and req.decide_at not in DECIDE_AT:
        raise UsageError(f"unknown --decide-at {req.decide_at!r}", f"use one of {', '.join(DECIDE_AT)}")
    if req.search_over != "alpha" and (req.budget is None or req.method == "adp-c"):
        raise UsageError(f"--search-over {req.search_over} applies to --method cbt or cbt-ns with --budget",
                         "drop --search-over, or give --method cbt --budget B")
    if req.budget is not None and req.search_over == "beta":
        check_range(req.alpha, 1.0)  # beta is searched above alpha
    elif req.budget is not None:
        check_range(0.0, req.beta)  # alpha is searched below beta (--search-over both: --beta is not used)
    elif req.method == "adp-c":
        adp_c(req.threshold, 1, 1)  # the range check, before anything is read
    else:
        check_range(req.alpha, req.beta)
    if not req.data and ((req.method != "adp-c" and not req.means) or req.budget is not None):
        raise UsageError(f"--method {req.method}{' --budget' if req.budget is not None else ''} needs --data",
                         "give the training data, or its class statistics from `eetool calibrate-means` as --means"
                         if req.budget is None else "give the data to fit on: the budget is its mean cost")
    reads_data = req.budget is not None or (req.method != "adp-c" and not req.means)
    if req.data and not reads_data:
        if req.means:
            raise UsageError("--data is not read: the class statistics come from --means",
                             "drop --data (it is used with --budget), or drop --means to calibrate on --data")
        raise UsageError("--data is not read: adp-c's one threshold is --threshold",
                         "drop --data, or give --budget B to fit the threshold on it")
    if not req.data and (req.indices or req.split_given):
        flag = "--split" if req.split_given else "--indices"
        raise UsageError(f"{flag} selects samples of --data, which this run does not read",
                         f"drop {flag}" + (": the class statistics come from --means" if req.means else ""))
    if not req.checkpoint:
        raise UsageError(f"--method {req.method} needs --checkpoint", "give the segmentation checkpoint")
    run.check_output(req.output, force=req.force,
                     inputs=(req.checkpoint, req.indices, data_path(req.data) if req.data else None, req.means))
    ckpt = open_checkpoint(run, req.checkpoint)
    model = require_segmentation(ckpt, f"--method {req.method}", exits=True)
    rule = req.decide_at or DEFAULT_RULE
    classes = ckpt.spec.classes or [str(k) for k in range(model.num_classes)]
    # the rule the thresholds are for: evaluate refuses to run them by the other
    doc: dict[str, Any] = {"method": req.method, "exits": list(EARLY_EXITS), "classes": classes,
                           "decide_at": rule}
    dataset = ""
    inputs: dict[str, str] = {}
    fitted: BudgetFit | None = None
    if req.method == "adp-c" and req.budget is None:
        thresholds = adp_c(req.threshold, len(EARLY_EXITS), model.num_classes)
        doc["threshold"] = req.threshold
    else:
        device = run.torch()
        ds = load_masks(req.data, req.split, req.indices, ckpt) if req.data else None
        dataset = ds.fingerprint if ds is not None else ""
        preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
        if req.method == "adp-c":
            assert ds is not None
            fitted = _fit_adp_c_budget(run, req, model, ckpt, ds, preprocess, device)
            thresholds = adp_c(fitted.value, len(EARLY_EXITS), model.num_classes)
            doc["threshold"] = fitted.value
        else:
            if req.means:
                from eetool.core.artifacts import sha256_file
                from eetool.segmentation.statistics import KIND as STATISTICS
                from eetool.segmentation.statistics import SegmentationClassStatistics

                calibrated = SegmentationClassStatistics.load_for(req.means, ckpt, model.num_classes)
                stats = calibrated.stats
                inputs[STATISTICS] = sha256_file(req.means)
                calibrated_on = calibrated.provenance.dataset
                dataset = dataset or calibrated_on  # without --budget, the statistics are all it is fitted on
            else:
                assert ds is not None
                stats = class_statistics(model, ds, preprocess, req.batch_size, device, run.reporter,
                                         run.world)
                calibrated_on = dataset
            fit = cbt if req.method == "cbt" else cbt_ns
            alpha, beta = req.alpha, req.beta
            if req.budget is not None:
                assert ds is not None
                searched = _fit_cbt_budget(run, req, model, ckpt, ds, preprocess, device, stats)
                fitted, alpha, beta = searched.fit, searched.alpha, searched.beta
            thresholds, scores = fit(stats, alpha, beta, len(EARLY_EXITS))
            present = stats.present
            spread = [round(float(row[present].std(unbiased=False)), 6) if bool(present.any()) else 0.0
                      for row in thresholds[: 1 if req.method == "cbt" else len(EARLY_EXITS)]]
            doc.update({
                "alpha": alpha, "beta": beta, "fitted_on": dataset, "calibrated_on": calibrated_on,
                # sigma of the thresholds over the classes present in the calibration data (per exit for cbt-ns)
                "spread": spread[0] if req.method == "cbt" else spread,
                "statistics": {
                    "pixels": {c: int(n) for c, n in zip(classes, stats.counts.tolist(), strict=True)},
                    "absent": [c for c, p in zip(classes, present.tolist(), strict=True) if not p],
                    # top1 - top2 of P_k (cbt) or of each early exit's p_{n,k} (cbt-ns); null for absent classes
                    "scores": _rounded(scores),
                    "exit_scores": _rounded(scores if req.method == "cbt-ns"
                                            else _exit_scores(stats)),
                },
            })
        if fitted is not None:
            doc["fitted_on"] = dataset
            # the mean cost (normalised to the plain network) on the fitting data, of the value found and of the
            # nearest value tried above it, which misses the budget (null when every value tried met it)
            # (--search-over both: of alpha at the beta chosen; "candidates" holds every beta of the grid)
            doc["budget"] = {"target": fitted.budget, "cost": round(fitted.cost, 6),
                             "searched": "threshold" if req.method == "adp-c" else req.search_over,
                             "over": fitted.over,
                             "over_cost": None if fitted.over_cost is None else round(fitted.over_cost, 6),
                             "evaluations": fitted.evaluations}
            if req.method != "adp-c":
                doc["budget"].update({"miou": round(searched.miou, 6), "candidates": searched.candidates})
            assert ds is not None
            # images/s against the plain network on the fitting data, on this machine: said, not written (the
            # file stays the same whenever the same fit is made)
            speedup = measured_speedup(model, list(preprocessed_batches(ds, preprocess, req.batch_size, device)),
                                       thresholds.float(), rule)
            warn_if_slower(run, f"{req.method} at budget {fitted.budget:g} (cost {fitted.cost:.4f})", speedup,
                           f"{SPEED_ROUNDS} rounds on the fitting data")
    fitted_file = SegmentationThresholds(thresholds, doc, Provenance(
        kind=KIND, checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256, exits=list(EARLY_EXITS),
        dataset=dataset, args=run.args, inputs=inputs))
    fitted_file.save(req.output)
    if req.output == STDOUT:
        return
    run.wrote(req.output)

    def text(d: dict[str, Any]) -> str:
        head = format_fields([("thresholds", req.output), ("method", d["method"]), ("decided per", d["decide_at"]),
                              *([("alpha, beta", f"{d['alpha']}, {d['beta']}"), ("fitted on", d["fitted_on"]),
                                 ("spread (sigma)", d["spread"])] if "alpha" in d else
                                [("threshold", d["threshold"])]),
                              *([("budget, cost", f"{d['budget']['target']}, {d['budget']['cost']:.4f} (of the "
                                  "plain network, on the fitting data)")] if "budget" in d else [])])
        table = format_table(["class", *d["exits"]],
                             [[c, *(row[k] for row in d["thresholds"])] for k, c in enumerate(d["classes"])])
        return f"{head}\n\n{table}"

    run.emit(fitted_file.to_doc(), text)


def _budget_costs(model: SegmentationNet, ckpt: Checkpoint, ds: Dataset, preprocess: Preprocess, batch_size: int,
                  device: torch.device, decide_at: str = "pixel") -> Any:
    """The mean cost of thresholds on ``ds`` (normalised to the plain network) and their mIoU there, by the masked
    inference that `evaluate` runs: its exit decisions read features that inactive positions keep, so they are not
    those of the dense exits, and each candidate is run."""
    from eetool.segmentation.metrics import confusion, mean_iou

    model.eval().to(device)
    batches = list(preprocessed_batches(ds, preprocess, batch_size, device))  # decoded once for every candidate
    dense = plain_macs(model, ckpt.spec.input_shape) * len(ds)
    k = model.num_classes

    def cost_of(thresholds: torch.Tensor) -> tuple[float, float]:
        t = thresholds.float()  # float32, as `evaluate` reads them back from the YAML
        macs, matrix = 0, torch.zeros(k, k, dtype=torch.int64)
        for x, masks in batches:
            result = early_exit_forward(model, x, t, decide_at=decide_at)
            macs += result.macs
            matrix += confusion(result.exit_predictions[-1].cpu(), masks, k)  # the final class map: the logits' argmax
        return macs / dense, mean_iou(matrix)

    return cost_of


def _floor_hint(model: SegmentationNet, ckpt: Checkpoint) -> str:
    floor = first_exit_macs(model, ckpt.spec.input_shape) / plain_macs(model, ckpt.spec.input_shape)
    return f"no thresholds cost less than {floor:.4f} (every pixel leaving at {EXIT_NAMES[0]})"


# --search-over both: the betas tried, each with the largest alpha below it that meets the budget
BETA_GRID = (0.99, 0.995, 0.998, 0.999, 0.9995)


@dataclass(frozen=True)
class CbtBudgetFit:
    """The (alpha, beta) a budget search chose, the bisection that found the searched one, the mIoU on the fitting
    data, and for --search-over both every beta of the grid with its alpha, cost and mIoU."""

    alpha: float
    beta: float
    fit: BudgetFit
    miou: float
    candidates: list[dict[str, Any]]


def _fit_cbt_budget(run: Run, req: ThresholdRequest, model: SegmentationNet, ckpt: Checkpoint, ds: Dataset,
                    preprocess: Preprocess, device: torch.device, stats: ClassStats) -> CbtBudgetFit:
    """--budget for cbt and cbt-ns by bisection (the cost rises with alpha and beta): the largest alpha below --beta,
    the largest beta above --alpha, or (both) for each beta of BETA_GRID the largest alpha, then the pair with the
    highest mIoU on the fitting data."""
    budget = req.budget
    assert budget is not None
    cost_of = _budget_costs(model, ckpt, ds, preprocess, req.batch_size, device, req.decide_at or DEFAULT_RULE)
    fit = cbt if req.method == "cbt" else cbt_ns
    early = len(EARLY_EXITS)
    costs: dict[tuple[float, float], float] = {}
    mious: dict[tuple[float, float], float] = {}

    def cost_at(alpha: float, beta: float) -> float:
        bar.advance()
        thresholds = adp_c(alpha, early, model.num_classes) if beta == alpha else fit(stats, alpha, beta, early)[0]
        costs[alpha, beta], mious[alpha, beta] = cost_of(thresholds)
        return costs[alpha, beta]

    floor = _floor_hint(model, ckpt)
    if req.search_over == "beta":
        def unmet_beta(cost: float) -> UsageError:
            return UsageError(f"--budget {budget:g} cannot be met with --alpha {req.alpha:g}: even every class at "
                              f"alpha costs {cost:.4f}", f"raise the budget or lower --alpha; {floor}")

        with run.reporter.bar(budget_evaluations(req.alpha, 1.0), f"beta for budget {budget:g}") as bar:
            found = fit_budget(lambda b: cost_at(req.alpha, b), budget, req.alpha, 1.0, unmet_beta)
        if found.value == req.alpha:  # only the limit beta = alpha met it: no CBT thresholds do
            raise unmet_beta(found.over_cost if found.over_cost is not None else found.cost)
        chosen = CbtBudgetFit(req.alpha, found.value, found, mious[req.alpha, found.value], [])
        run.reporter.log(f"beta {found.value:.6f} costs {found.cost:.4f} for budget {budget:g} "
                         f"({found.evaluations} evaluations)")
        if found.over is None:
            run.reporter.warn(f"--budget {budget:g} does not bind: beta {found.value:.6f}, the largest tried below 1, "
                              f"costs {found.cost:.4f}")
        return chosen

    betas = BETA_GRID if req.search_over == "both" else (req.beta,)
    candidates: list[CbtBudgetFit] = []
    unmet: list[float] = []  # the betas at which even alpha 0 misses the budget
    total = sum(budget_evaluations(0.0, b) for b in betas)
    with run.reporter.bar(total, f"alpha for budget {budget:g}") as bar:
        for beta in betas:
            def unmet_alpha(cost: float, beta: float = beta) -> UsageError:
                return UsageError(f"--budget {budget:g} cannot be met with --beta {beta:g}: even --alpha 0 costs "
                                  f"{cost:.4f}", f"raise the budget or lower --beta; {floor}")

            def cost_at_alpha(alpha: float, beta: float = beta) -> float:
                return cost_at(alpha, beta)

            try:
                found = fit_budget(cost_at_alpha, budget, 0.0, beta, unmet_alpha)
            except UsageError:
                if req.search_over == "alpha":
                    raise
                unmet.append(beta)
                continue
            candidates.append(CbtBudgetFit(found.value, beta, found, mious[found.value, beta], []))
    if not candidates:
        raise UsageError(f"--budget {budget:g} cannot be met at any beta of {', '.join(map(str, betas))}: even "
                         f"--alpha 0 costs {min(costs[0.0, b] for b in betas):.4f}", f"raise the budget; {floor}")
    best = max(candidates, key=lambda c: (c.miou, -c.fit.cost))
    found = best.fit
    run.reporter.log(f"alpha {best.alpha:.6f}, beta {best.beta:g} cost {found.cost:.4f} for budget {budget:g} "
                     f"(mIoU {best.miou:.4f} on the fitting data; {found.evaluations} evaluations)")
    if found.over is None:
        run.reporter.warn(f"--budget {budget:g} does not bind: alpha {best.alpha:.6f}, the largest tried below "
                          f"--beta {best.beta:g}, costs {found.cost:.4f}; raise --beta to spend more of it")
    table: list[dict[str, Any]] = []
    if req.search_over == "both":
        table = [*({"beta": c.beta, "alpha": c.alpha, "cost": round(c.fit.cost, 6), "miou": round(c.miou, 6)}
                   for c in candidates),
                 *({"beta": b, "alpha": None, "cost": round(costs[0.0, b], 6), "miou": None} for b in unmet)]
    return CbtBudgetFit(best.alpha, best.beta, found, best.miou, table)


def _fit_adp_c_budget(run: Run, req: ThresholdRequest, model: SegmentationNet, ckpt: Checkpoint, ds: Dataset,
                      preprocess: Preprocess, device: torch.device) -> BudgetFit:
    assert req.budget is not None
    cost_of = _budget_costs(model, ckpt, ds, preprocess, req.batch_size, device, req.decide_at or DEFAULT_RULE)

    def unmet(cost: float) -> UsageError:
        return UsageError(f"--budget {req.budget:g} cannot be met: {_floor_hint(model, ckpt)}",
                          "raise the budget")

    with run.reporter.bar(budget_evaluations(0.0, 1.0), f"threshold for budget {req.budget:g}") as bar:
        def cost_at(threshold: float) -> float:
            bar.advance()
            return float(cost_of(adp_c(threshold, len(EARLY_EXITS), model.num_classes))[0])

        # threshold 0 sends every pixel out at the first exit: the floor; 1 keeps every pixel to the end
        found = fit_budget(cost_at, req.budget, 0.0, 1.0, unmet)
    run.reporter.log(f"threshold {found.value:.6f} costs {found.cost:.4f} for budget {req.budget:g} "
                     f"({found.evaluations} evaluations)")
    return found


def _exit_scores(stats: ClassStats) -> torch.Tensor:
    from eetool.segmentation.pixel_thresholds import margins

    return margins(stats.exit_means())


def _rounded(t: torch.Tensor) -> Any:
    def one(v: float) -> float | None:
        return None if math.isnan(v) else round(v, 6)

    values = t.tolist()
    return [one(v) for v in values] if t.dim() == 1 else [[one(v) for v in row] for row in values]
