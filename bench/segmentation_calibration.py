"""Where CBT's calibration pass spends its time, part by part, against the plain network, on eeseg.

    python bench/segmentation_calibration.py --checkpoint eeseg.safetensors        # 300 Fashion-MNIST test scenes

Every part runs once per round and the rounds are interleaved, so a change in the machine's load touches every
part alike; each part reports its least CPU time over the rounds (one thread by default: then CPU time is robust
to other processes sharing the cores). Parts, for all scenes:
  plain           the network's own output: trunk, final head, upsampling, argmax (bench/segmentation.py's baseline)
  trunk           stem and stages (of ``inference_net``: BatchNorm folded, as every inference path runs them)
  every_head      trunk and the four exits' heads on the half-resolution grid (the floor of any calibration)
  calibration     ``class_statistics``: every_head plus eq. 3.1's sums (phase by phase, eetool.segmentation.calibration)
  dense           the same sums from full-resolution probabilities (``ClassStats.update``, the general path)
and the statistics' own parts on grid logits computed beforehand, in the calibration's chunks:
  upsample        the four bilinear phases of every exit (``upsampled_phases``)
  softmax         their softmax over the classes in base 2 (``softmax_of_bounded``)
  sums            the probabilities summed per class, one image at a time, added in float64: one-hot products
                  (``class_sums_by_one_hot``) below ROWS_FROM_CLASSES classes, rows added to their class's row
                  from it (``class_sums_by_rows``)
The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
from segmentation import interleaved_best  # bench/ is on the path: this runs as a script in it

from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.reporting import Reporter
from eetool.segmentation import calibration
from eetool.segmentation.inputs import class_statistics
from eetool.segmentation.model import EESegNet
from eetool.segmentation.pixel_thresholds import ClassStats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default="fashion-mnist-scenes")
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    ck = load_checkpoint(args.checkpoint)
    model = ck.model.eval()
    if not isinstance(model, EESegNet):
        raise SystemExit("error: --checkpoint is not an eeseg network (hint: give one from `eetool train -d "
                         "fashion-mnist-scenes`)")
    ds = load_dataset(args.data, "test")
    ds = ds.subset(torch.arange(min(args.scenes, len(ds))))
    pre = Preprocess(ck.spec.input_shape, ck.spec.mean, ck.spec.std)
    batches = [(pre(images), masks) for images, masks, _ in ds.batches(args.batch_size)]
    k, exits = model.num_classes, len(model.heads)
    with torch.no_grad():
        grids = [model.grid_exits(x) for x, _ in batches]
    h, w = grids[0][0].shape[-2:]
    pixels = 4 * h * w
    step = max(1, calibration.CHUNK_ELEMENTS // (exits * k * pixels))
    rows = k >= calibration.ROWS_FROM_CLASSES
    # each chunk as add_grid_batch lays it out, in base 2: a row per grid position (b x h x w x exits K), or a map
    # per exit and class ((b exits K) x h x w x 1)
    layout = (lambda t: t.permute(0, 2, 3, 1)) if rows else (lambda t: t.reshape(-1, h, w, 1))
    chunks = [(layout(torch.cat([e[s:s + step] for e in g], 1).contiguous().mul(calibration.LOG2_E)).contiguous(),
               masks[s:s + step]) for g, (_, masks) in zip(grids, batches, strict=True)
              for s in range(0, len(masks), step)]
    phases = [calibration.upsampled_phases(g) for g, _ in chunks]

    def probabilities(p: torch.Tensor) -> torch.Tensor:  # in place
        if rows:
            return calibration.softmax_of_bounded(p.view(-1, exits, k), 0.0)
        return calibration.softmax_of_bounded(p.view(-1, exits, k, pixels), 0.0, dim=2)

    probs = [probabilities(p.clone()) for p in phases]
    labels = [calibration.pixel_phases(masks).reshape(-1).long().add_(1) for _, masks in chunks]
    # every part drops its results as it goes, as the calibration does (holding them would time fresh memory)
    def plain() -> None:
        for x, _ in batches:
            model(x).max(1)

    def every_head() -> None:
        for x, _ in batches:
            model.grid_exits(x)

    def upsample() -> None:
        for g, _ in chunks:
            calibration.upsampled_phases(g)

    with torch.no_grad():
        folded = model.inference_net()

    def trunk() -> None:
        for x, _ in batches:
            h = folded.stem(folded._layout(x))
            for stage in folded.stages:
                h = stage(h)

    def dense() -> None:
        stats = ClassStats.empty(exits, k)
        for x, masks in batches:
            stats.update(calibration.exit_probabilities(model, x), masks)

    def softmax() -> None:
        for p in phases:
            probabilities(p.clone())

    def copies() -> None:  # what ``softmax`` spends on cloning its input (it works in place)
        for p in phases:
            p.clone()

    def sums() -> None:
        totals = torch.zeros(k, exits * k, dtype=torch.float64)
        for r, p in zip(labels, probs, strict=True):
            images = len(r) // pixels
            if rows:
                totals += calibration.class_sums_by_rows(p.view(images, pixels, -1), r, k)
            else:
                totals += calibration.class_sums_by_one_hot(p.view(images, exits * k, pixels), r, k)

    parts: dict[str, Callable[[], object]] = {
        "plain": plain,
        "trunk": trunk,
        "every_head": every_head,
        "calibration": lambda: class_statistics(model, ds, pre, args.batch_size, torch.device("cpu"), Reporter()),
        "dense": dense,
        "upsample": upsample,
        "softmax_and_copy": softmax,
        "copy": copies,
        "sums": sums,
    }
    with torch.no_grad():
        for run in parts.values():  # warm-up
            run()
        best = interleaved_best(args.repeat, parts)
    best["softmax"] = max(0.0, best.pop("softmax_and_copy") - best.pop("copy"))
    plain = best["plain"]
    print(json.dumps({
        "scenes": len(ds), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "chunk_images": step, "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_seconds": {name: round(t, 4) for name, t in best.items()},
        "share_of_plain": {name: round(t / plain, 3) for name, t in best.items()},
        "calibration_over_plain": round(plain / best["calibration"], 3),
        "dense_over_plain": round(plain / best["dense"], 3),
        "every_head_over_plain": round(plain / best["every_head"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
