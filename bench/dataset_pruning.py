"""The cost of dataset pruning's pruning phases, in one run on the same data and model.

    python bench/dataset_pruning.py                  # 5,000 demo images, ResNet-20 of width 8
    python bench/dataset_pruning.py --samples 1000   # quicker

Three measurements:

1. Pruning phases at the thesis's proportions scaled down (EEPrune E epochs; EL2N 10 models x
   1.5E epochs, rounded; forgetting 20E epochs, the full run): samples seen and wall time of each,
   as ratios to EEPrune's. EEPrune also trains a linear exit and scores the set once (forward only)
   after training, so its phase should cost about E epochs of one model "plus little": measured in
   epochs of the forgetting run (plain training of the same model), goal at most E + 0.5.
2. Per-sample bookkeeping: one epoch of EEPrune's training with the qualification tracker against
   the same epoch without it (goal: ratio <= 1.05; the tracker is O(N) tensors updated in place).
3. The tracker's update alone at N = 1,000,000 samples against N = 1,000: the time per batch must
   not grow with N (goal: ratio <= 2), and its memory is 8 bytes per sample.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from eetool.classification import dataset_pruning as dp
from eetool.core.checkpoint import ModelSpec
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.training_loop import TrainConfig, fit


def phase(method: str, spec: ModelSpec, data: object, pre: Preprocess, epochs: int, models: int = 1
          ) -> dp.PhaseResult:
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.1, seed=0)
    return dp.pruning_phase(dp.PhaseSettings(method, cfg, models=models), lambda _: spec.build(), data,  # type: ignore[arg-type]
                            pre, num_classes=spec.num_classes)


def tracker_overhead(spec: ModelSpec, data: object, pre: Preprocess) -> float:
    """Seconds of an EEPrune epoch with the tracker over the same epoch without it (best of two each)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(2):
        for tracked in (False, True):
            torch.manual_seed(0)
            net = dp.EarlyExitNetwork(spec.build(), dp.exit_point(spec.build(), "mid"), spec.input_shape,
                                      spec.num_classes)
            tracker = dp.QualificationTracker(len(data))  # type: ignore[arg-type]
            result = fit(net, data, pre, TrainConfig(epochs=1, batch_size=128, seed=0),  # type: ignore[arg-type]
                         step=tracker.step, tracker=tracker if tracked else None)
            times[tracked].append(result.seconds)
    return min(times[True]) / min(times[False])


def update_time(n: int, batch: int = 128, repeats: int = 2000) -> float:
    tracker = dp.QualificationTracker(n)
    gen = torch.Generator().manual_seed(0)
    early, final = torch.randn(batch, 10, generator=gen), torch.randn(batch, 10, generator=gen)
    y = early.argmax(1)
    tracker._last = (early, final, y)
    positions = torch.randint(0, n, (repeats, batch), generator=gen)
    t0 = time.perf_counter()
    for r in range(repeats):
        tracker.after_step(positions[r])
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=1, help="EEPrune's E; the others scale with it")
    args = ap.parse_args()
    data = load_dataset(args.data, "train")
    data = data.subset(torch.arange(min(args.samples, len(data))))
    mean, std = data.channel_stats()
    spec = ModelSpec("resnet20", data.num_classes, tuple(data.images.shape[1:]), mean, std,  # type: ignore[arg-type]
                     arch_args={"width": 8})
    pre = Preprocess(spec.input_shape, spec.mean, spec.std)
    e = args.epochs
    el2n_epochs = max(1, round(1.5 * e))
    runs = {
        "eeprune": phase("eeprune", spec, data, pre, e),
        "el2n": phase("el2n", spec, data, pre, el2n_epochs, models=10),
        "forgetting": phase("forgetting", spec, data, pre, 20 * e),
    }
    base = runs["eeprune"]
    results: dict[str, object] = {"data": args.data, "samples": len(data), "threads": torch.get_num_threads(),
                                  "eeprune_epochs": e}
    for name, r in runs.items():
        results[name] = {"samples_seen": r.samples_seen, "samples_scored": r.samples_scored,
                         "seconds": round(r.seconds, 1)}
    for name, epochs in (("el2n", 10 * el2n_epochs), ("forgetting", 20 * e)):
        results[f"{name}_over_eeprune_seconds"] = round(runs[name].seconds / base.seconds, 2)
        results[f"{name}_over_eeprune_epochs"] = round(epochs / e, 2)
    plain_epoch = runs["forgetting"].seconds / (20 * e)
    results["eeprune_phase_in_plain_epochs"] = round(base.seconds / plain_epoch, 2)
    ok = base.seconds / plain_epoch <= e + 0.5
    results["tracker_epoch_ratio"] = round(tracker_overhead(spec, data, pre), 3)
    small, large = update_time(1000), update_time(1_000_000)
    results["update_us_n1e3"] = round(1e6 * small, 1)
    results["update_us_n1e6"] = round(1e6 * large, 1)
    results["update_ratio_n1e6_over_n1e3"] = round(large / small, 2)
    results["tracker_bytes_per_sample"] = dp.QualificationTracker(1000).qualified.element_size()
    results["goals_met"] = bool(ok and results["tracker_epoch_ratio"] <= 1.05  # type: ignore[operator]
                                and results["update_ratio_n1e6_over_n1e3"] <= 2)  # type: ignore[operator]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
