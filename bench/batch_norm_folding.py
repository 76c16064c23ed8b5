"""eetool predict's pass with the batch norms folded into the convolutions (the default) against the network as
saved (--no-fold-batch-norm), and whether their predictions agree.

    python bench/batch_norm_folding.py                  # batch 1 (300 images) and 256 (2,000), one thread
    python bench/batch_norm_folding.py --resnet18       # also a torchvision ResNet-18 (random weights, 3x64x64)

On the shipped checkpoint and the demo test split (decoded once: decoding is not timed), the plain model and the
E²CM points at budgets 0.25 and 0.5 (class means calibrated on the demo training split, thresholds fitted with the
CLI, cached under ``--cache``), each run by eetool.classification.prediction.Predictor as `eetool predict` runs it,
unfolded and folded (Predictor.folded). In interleaved rounds (one thread: torch.set_num_threads(1)), every round
runs each pass in turn (every other round in reverse order); reported per batch size and pass: images/s of each
(median over rounds) and folded over unfolded (median over rounds of the ratio within a round, with its range);
and, from one untimed pass of each, how many samples got another class or exit folded. ``--resnet18``: the plain
torchvision ResNet-18, its batch norms given non-trivial statistics, on 3x64x64 noise (256 images at batch 256, 64
at batch 1). ``--segmentation CKPT``: a torchvision segmentation checkpoint with exit heads (`eetool train-exits`),
its plain pass and its early exit at ADP-C 0.998 by both rules, on the channels-last inference copy with its batch
norms folded (the default since they are) against the same copy unfolded, on 200 Fashion-MNIST test scenes at
batch 100, timed by CPU time; reported as above, with the largest difference of the logits and the pixels whose
class or exit differs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from demo_points import demo_means_and_thresholds, timed  # bench/, beside this script


def compare(pairs: dict[str, tuple[Any, Any]], batches: list[Any], rounds: int) -> dict[str, Any]:
    """Each (unfolded, folded) predictor over ``batches`` in interleaved rounds: speeds and disagreements."""
    import torch

    def run(predictor: Any) -> Callable[[], list[Any]]:
        def go() -> list[Any]:
            with torch.inference_mode():
                return [predictor(b) for b in batches]
        return go

    runs = [run(p) for pair in pairs.values() for p in pair]
    outputs = [r() for r in runs]  # untimed: warms up, and gives the predictions compared
    seconds = interleaved_rounds(runs, rounds, timed)
    samples = sum(len(b) for b in batches)
    out = {}
    for i, name in enumerate(pairs):
        unfolded, folded = outputs[2 * i], outputs[2 * i + 1]
        classes = [torch.cat([o.classes for o in outs]) for outs in (unfolded, folded)]
        exits = [torch.cat([o.exit_index for o in outs]) for outs in (unfolded, folded)]
        out[name] = {**speeds([(r[2 * i], r[2 * i + 1]) for r in seconds], samples),
                     "samples_differing": int(((classes[0] != classes[1]) | (exits[0] != exits[1])).sum())}
    return out


def interleaved_rounds(runs: list[Callable[[], Any]], rounds: int, timer: Callable[[Callable[[], Any]], float]
                       ) -> list[list[float]]:
    """Each round's seconds of every run, by ``timer``; every other round in reverse order, so that neither of a
    pair always runs first."""
    seconds = []
    for i in range(rounds):
        order = list(range(len(runs)))[::-1 if i % 2 else 1]
        times = {k: timer(runs[k]) for k in order}
        seconds.append([times[k] for k in range(len(runs))])
    return seconds


def speeds(seconds: list[tuple[float, float]], samples: int) -> dict[str, Any]:
    """Images/s of the unfolded and the folded pass (median over rounds) and folded over unfolded (median of the
    ratio within a round, with its range), from each round's (unfolded, folded) seconds."""
    ratio = [unfolded / folded for unfolded, folded in seconds]
    return {"unfolded_images_per_s": round(samples / statistics.median(u for u, _ in seconds), 1),
            "folded_images_per_s": round(samples / statistics.median(f for _, f in seconds), 1),
            "folded_over_unfolded": round(statistics.median(ratio), 3),
            "folded_over_unfolded_range": [round(min(ratio), 3), round(max(ratio), 3)]}


def demo(cache: Path, batch: int, samples: int, rounds: int) -> dict[str, Any]:
    from eetool.classification.early_exit_evaluation import early_exit_setup
    from eetool.classification.prediction import Predictor
    from eetool.core.checkpoint import load_checkpoint
    from eetool.core.datasets import Preprocess, load_dataset

    means, thresholds = demo_means_and_thresholds(cache)
    ckpt = load_checkpoint("demo")
    ckpt.model.eval()
    em, rule, _, chosen, _, _ = early_exit_setup(ckpt, str(means), None, str(thresholds), "all", "cpu")
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    ds = load_dataset("demo", "test")
    assert ds.images is not None
    batches = [preprocess(b) for b in ds.images[:samples].split(batch)]
    predictors = {"plain": Predictor(ckpt.model),
                  **{f"budget {p['budget']:g}": Predictor(ckpt.model, em, rule, list(p["thresholds"]))
                     for _, p in chosen}}
    return {"batch": batch, "samples": samples, "rounds": rounds,
            "demo": compare({k: (p, p.folded()) for k, p in predictors.items()}, batches, rounds)}


def resnet18(batch: int, rounds: int) -> dict[str, Any]:
    import torch
    import torchvision

    from eetool.classification.prediction import Predictor

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    model.eval()
    x = torch.randn(256 if batch > 1 else 64, 3, 64, 64)
    p = Predictor(model)
    return compare({"resnet18 plain": (p, p.folded())}, list(x.split(batch)), rounds)


def cpu_seconds(run: Callable[[], Any]) -> float:
    """CPU seconds of this process for one call: with one thread, robust to other jobs on the cores (wall time is
    not, on a shared machine)."""
    start = time.process_time()
    run()
    return time.process_time() - start


def segmentation(checkpoint: str, rounds: int) -> dict[str, Any]:
    import copy

    import torch

    from eetool.core.batch_norm_folding import folded_pairs
    from eetool.core.checkpoint import load_checkpoint
    from eetool.core.datasets import Preprocess, load_dataset
    from eetool.segmentation import tv_masked
    from eetool.segmentation.tv import TorchvisionSegNet

    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model.eval()
    assert isinstance(model, TorchvisionSegNet), "--segmentation takes a torchvision segmentation checkpoint"
    with torch.no_grad():
        folded = model.inference_net()
    unfolded = copy.deepcopy(model)  # the inference copy as it was before the folding: channels last only
    unfolded.to(memory_format=torch.channels_last).requires_grad_(False)
    unfolded.channels_last = True  # its own inference copy
    ds = load_dataset("fashion-mnist-scenes", "test")
    assert ds.images is not None
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    batches = [preprocess(b).contiguous(memory_format=torch.channels_last) for b in ds.images[:200].split(100)]
    thresholds = torch.full((3, model.num_classes), 0.998)

    def runs(net: TorchvisionSegNet) -> dict[str, Callable[[], list[Any]]]:
        def plain() -> list[Any]:
            return [(net(b), None) for b in batches]

        def exits(rule: str) -> Callable[[], list[Any]]:
            return lambda: [(r.logits, r.exit_index) for r in
                            (tv_masked.early_exit_forward(net, b, thresholds, decide_at=rule) for b in batches)]
        return {"plain": plain, "ADP-C 0.998 per pixel": exits("pixel"), "ADP-C 0.998 per feature": exits("feature")}

    pairs = {name: (run, runs(folded)[name]) for name, run in runs(unfolded).items()}
    out: dict[str, Any] = {"checkpoint": checkpoint, "scenes": 200, "batch": 100, "rounds": rounds,
                           "folded_pairs": folded_pairs(folded)}
    with torch.inference_mode():
        for name, (before, after) in pairs.items():
            results = (before(), after())  # untimed: warms up, and gives the outputs compared
            logits = [torch.cat([r[0] for r in rs]) for rs in results]
            differing = logits[0].argmax(1) != logits[1].argmax(1)
            if results[0][0][1] is not None:
                differing |= torch.cat([r[1] for r in results[0]]) != torch.cat([r[1] for r in results[1]])
            seconds = interleaved_rounds([before, after], rounds, cpu_seconds)
            out[name] = {**speeds([(b, a) for b, a in seconds], 200),
                         "largest_logit_difference": float((logits[0] - logits[1]).abs().max()),
                         "pixels_differing": int(differing.sum())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="results/batch-norm-folding")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples-batch-1", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], choices=[1, 256])
    parser.add_argument("--resnet18", action="store_true")
    parser.add_argument("--segmentation", metavar="CKPT", help="a torchvision segmentation checkpoint with exit heads "
                        "instead of the demo")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    doc: dict[str, Any] = {"load_average_before": round(os.getloadavg()[0], 2), "threads": 1, "runs": []}
    for batch in [] if args.segmentation else args.batches:
        row = demo(Path(args.cache), batch, args.samples_batch_1 if batch == 1 else 2000, args.rounds)
        if args.resnet18:
            row["resnet18"] = resnet18(batch, args.rounds)
        doc["runs"].append(row)
    if args.segmentation:
        doc["runs"].append(segmentation(args.segmentation, args.rounds))
    doc["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
