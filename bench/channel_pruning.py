"""Channel pruning's real speed-up: the dense demo checkpoint against its channel-pruned copy, in one run.

    python bench/channel_pruning.py                     # 50% of the MACs, batch 256, 11 interleaved repeats
    python bench/channel_pruning.py --target 0.3 --finetune-epochs 0

The demo checkpoint (ResNet-20, Fashion-MNIST) is pruned with L1-norm channel pruning to --target of its
MACs; both models then classify the same batches on the CPU, alternating, and the median time of each gives
the speed-up, set against the MACs ratio (goal: speed-up >= 0.7 x dense MACs / pruned MACs), for channel
counts as pruning leaves them and rounded to multiples of 8. The early exit halfway (layer2.0) is timed on
the pruned model too: exits on top of it still stop computation. Accuracy on the demo test split is reported
dense, pruned, pruned with its batch-norm statistics re-estimated on 2,000 training samples, and after a
short fine-tune (1 epoch on the 5,000 demo training samples).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from eetool.classification.channel_pruning import prune_channels, pruned_spec, recalibrate_batch_norm
from eetool.core.checkpoint import load_checkpoint
from eetool.core.costs import measure
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.errors import EetoolError
from eetool.core.exits import build_exit_model
from eetool.core.training_loop import TrainConfig, accuracy, fit

MIDDLE_EXIT = "layer2.0"
# Channel counts as the MACs target leaves them, and rounded to multiples of 8 (what vectorised CPU kernels like).
VARIANTS: dict[str, int | None] = {"pruned": None, "pruned_round8": 8}


def batch_seconds(run: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    run(x)
    return time.perf_counter() - start


class UpToExit(nn.Module):
    """The stages before an exit and the exit itself: what a sample leaving there runs."""

    def __init__(self, model: nn.Module, exit_name: str) -> None:
        super().__init__()
        self.stage = build_exit_model(model, exit_name).stages[0]  # type: ignore[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--target", type=float, default=0.5, help="the pruned model's MACs as a fraction of the dense")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=11, help="timed batches of each model, interleaved")
    ap.add_argument("--recalibrate-samples", type=int, default=2000,
                    help="training samples that re-estimate the batch-norm statistics after pruning")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's); on a machine busy with other work, 1 keeps "
                    "threads from waiting on each other, which flattens a smaller network's speed-up")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ck = load_checkpoint(args.checkpoint)
        test = load_dataset(args.data, "test")
        train = load_dataset(args.data, "train")
        pruned = {}
        for name, round_to in VARIANTS.items():
            started = time.perf_counter()
            pruned[name] = prune_channels(ck.model, ck.spec.input_shape, target_macs=args.target, round_to=round_to)
            pruned[name].seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    except EetoolError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    pre = Preprocess(ck.spec.input_shape, ck.spec.mean, ck.spec.std)
    dense = ck.model.eval()
    runs = {"dense": dense, **{name: p.model.eval() for name, p in pruned.items()}}
    first = next(iter(pruned))
    runs[f"{first}_to_{MIDDLE_EXIT}"] = UpToExit(pruned[first].model, MIDDLE_EXIT).eval()
    x = pre(test.images[:args.batch_size].repeat(-(-args.batch_size // len(test)), 1, 1, 1)[:args.batch_size])
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():  # warm-up: the CPU kernels are set up for each shape on first use
            run(x)
        for _ in range(args.repeats):  # interleaved, so the machine's drift touches every model alike
            for name, run in runs.items():
                times[name].append(batch_seconds(run, x))
    median = {name: statistics.median(t) for name, t in times.items()}
    cpu = torch.device("cpu")
    results: dict[str, object] = {
        "checkpoint": args.checkpoint, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "repeats": args.repeats, "target_macs": args.target, "dense_macs": pruned[first].dense_macs,
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "dense_samples_per_s": round(args.batch_size / median["dense"], 1),
        "dense_accuracy": round(accuracy(dense, test, pre, cpu), 4),
    }
    goals = []
    for name, p in pruned.items():
        mac_ratio = p.dense_macs / p.pruned_macs
        speed_up = median["dense"] / median[name]
        goals.append(speed_up >= 0.7 * mac_ratio)
        model = p.model
        row: dict[str, object] = {
            "round_to": VARIANTS[name], "prune_seconds": round(p.seconds, 2),  # type: ignore[attr-defined]
            "channel_ratio": round(p.channel_ratio, 4), "stage_widths": pruned_spec(ck.spec, model).arch_args[
                "stage_widths"], "pruned_macs": p.pruned_macs, "macs_fraction": round(p.macs_fraction, 4),
            "params": sum(t.numel() for t in model.parameters()),
            "samples_per_s": round(args.batch_size / median[name], 1), "mac_ratio": round(mac_ratio, 3),
            "speed_up": round(speed_up, 3), "speed_up_over_mac_ratio": round(speed_up / mac_ratio, 3),
            "accuracy": round(accuracy(model, test, pre, cpu), 4),
        }
        if args.recalibrate_samples:
            subset = train.subset(torch.arange(min(args.recalibrate_samples, len(train))))
            recalibrate_batch_norm(model, (pre(images) for images, _, _ in subset.batches(250)))
            row["recalibrated_accuracy"] = round(accuracy(model, test, pre, cpu), 4)
        if args.finetune_epochs:
            cfg = TrainConfig(epochs=args.finetune_epochs, batch_size=128, lr=0.01, warmup_epochs=0, seed=0)
            fit(model, train, pre, cfg)
            row["finetuned_accuracy"] = round(accuracy(model, test, pre, cpu), 4)
            row["finetune_epochs"] = args.finetune_epochs
        results[name] = row
    middle = measure(build_exit_model(pruned[first].model, MIDDLE_EXIT), ck.spec.input_shape)
    results[f"{first}_{MIDDLE_EXIT}_exit"] = {
        "macs_fraction": round(middle.stage_macs[0] / middle.model_macs, 3),
        "time_fraction": round(median[f"{first}_to_{MIDDLE_EXIT}"] / median[first], 3)}
    results["goal_met"] = all(goals)
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
