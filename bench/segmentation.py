"""Segmentation: CBT's calibration pass against plain inference, and pixel-level early exit's measured speed-up
against its analytic cost, in one run on the same scenes.

    python bench/segmentation.py --checkpoint eeseg.safetensors            # 300 Fashion-MNIST test scenes
    python bench/segmentation.py --checkpoint eeseg.safetensors --threads 1 # on a busy machine

The calibration pass runs every exit and adds each pixel's softmax to float64 sums per exit and class
(goal: at least 0.85 of the plain network's images/s). Its floor, ``every_head_over_plain``, is the trunk with
every exit's head on every position and nothing upsampled: the plain network runs only the final head. Times
are the process's CPU seconds (see ``best_of``). The early exits compute only active positions by
gathered matrix products; their measured speed-up is printed beside 1 / cost (the analytic speed-up).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from eetool.checkpoint import load_checkpoint
from eetool.datasets import Preprocess, load_dataset
from eetool.reporting import Reporter
from eetool.segmentation.commands import class_statistics
from eetool.segmentation.model import early_exit_forward, plain_macs


def best_of(repeat: int, run: object) -> float:
    """The least CPU time of this process over ``repeat`` runs: with --threads 1 it is robust to other processes
    sharing the cores (wall time is not, on a shared machine); with more threads it sums them."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()  # type: ignore[operator]
        times.append(time.process_time() - start)
    return min(times)  # the machine's noise only adds time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default="fashion-mnist-scenes")
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--thresholds", default="0.9,0.99,0.998", help="ADP-C thresholds to time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.checkpoint)
    model = ck.model.eval()
    ds = load_dataset(args.data, "test")
    ds = ds.subset(torch.arange(min(args.scenes, len(ds))))
    pre = Preprocess(ck.spec.input_shape, ck.spec.mean, ck.spec.std)
    batches = [pre(images) for images, _, _ in ds.batches(args.batch_size)]

    @torch.no_grad()
    def plain() -> None:
        for x in batches:
            model(x).max(1)

    @torch.no_grad()
    def heads() -> None:  # the floor: trunk and every exit's head on every position, nothing upsampled
        for x in batches:
            model.grid_exits(x)

    def calibrate() -> None:
        class_statistics(model, ds, pre, args.batch_size, torch.device("cpu"), Reporter())

    plain(), heads(), calibrate()  # warm-up
    t_plain = best_of(args.repeat, plain)
    t_heads = best_of(args.repeat, heads)
    t_cal = best_of(args.repeat, calibrate)
    results: dict[str, object] = {"scenes": len(ds), "threads": torch.get_num_threads(),
                                  "plain_images_per_s": round(len(ds) / t_plain, 1),
                                  "calibration_images_per_s": round(len(ds) / t_cal, 1),
                                  "calibration_over_plain": round(t_plain / t_cal, 3),
                                  "every_head_over_plain": round(t_plain / t_heads, 3), "points": []}
    dense = plain_macs(model, ck.spec.input_shape)
    for t in (float(v) for v in args.thresholds.split(",")):
        thresholds = torch.full((3, model.num_classes), t)
        macs = sum(early_exit_forward(model, x, thresholds).macs for x in batches) / len(ds)

        def early(th: torch.Tensor = thresholds) -> None:
            for x in batches:
                early_exit_forward(model, x, th)

        t_early = best_of(args.repeat, early)
        results["points"].append({"threshold": t, "cost": round(macs / dense, 4),  # type: ignore[union-attr]
                                  "analytic_speedup": round(dense / macs, 3),
                                  "measured_speedup": round(t_plain / t_early, 3)})
    results["calibration_goal_met"] = t_plain / t_cal >= 0.85
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
