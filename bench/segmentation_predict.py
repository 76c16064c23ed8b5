"""What `eetool predict` on a segmentation checkpoint adds to evaluate's early-exit pass, in interleaved rounds.

    python bench/segmentation_predict.py --checkpoint EESEG --thresholds CBT.yaml [--data fashion-mnist-scenes]

On the first --images test images (decoded and preprocessed once: decoding is not timed), batch --batch-size, one
thread, each round runs in turn: the plain network, evaluate's early-exit pass (the class map), predict's
``MaskPredictor`` (that pass and each image's cost) and the writing of the masks (PNG encoding and an atomic write
each, fsync included) into a temp folder. Reported: seconds per image of each (median over --rounds rounds) and
its ratio to the pass in the same round (median over rounds), with the load average before and after.

With --bundle (`eetool export` of the same checkpoint: its plain network) the rounds also run the bundle's graph
under onnxruntime (one thread) on the decoded uint8 images, as eetool-runtime does (its preprocessing is in the
graph, where the torch runs are given preprocessed images), and report the plain network's time over the
bundle's in the same round (``plain_over_bundle``, median over rounds: the bundle's images/s as a multiple of the
plain network's in PyTorch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from eetool.core.artifacts import atomic_write
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.segmentation.class_thresholds import SegmentationThresholds
from eetool.segmentation.mask_prediction import MaskPredictor, mask_png, voc_palette
from eetool.segmentation.networks import early_exit_forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="an eeseg (or torchvision segmentation) checkpoint")
    p.add_argument("--thresholds", required=True, help="its thresholds from fit-thresholds --method cbt|cbt-ns|adp-c")
    p.add_argument("--data", default="fashion-mnist-scenes", help="segmentation data of the checkpoint's input size")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bundle", default=None, help="the checkpoint's segmentation bundle (eetool export), timed too")
    a = p.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(a.checkpoint)
    model = ckpt.model.eval()
    fitted = SegmentationThresholds.load_for(a.thresholds, ckpt, model.num_classes)
    thresholds, decide_at = fitted.thresholds, fitted.record.get("decide_at", "pixel")
    ds = load_dataset(a.data, "test")
    assert ds.images is not None
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    xs = [preprocess(ds.images[i:min(i + a.batch_size, a.images)], torch.device("cpu"))
          for i in range(0, a.images, a.batch_size)]
    predictor = MaskPredictor(model, ckpt.spec.input_shape, thresholds, decide_at)
    palette = voc_palette()
    folder = tempfile.mkdtemp(prefix="segmentation-predict-")
    class_maps = [predictor(x).classes for x in xs]

    @torch.no_grad()
    def plain() -> None:
        for x in xs:
            model(x).max(1)

    @torch.no_grad()
    def early_exit_pass() -> None:
        for x in xs:
            early_exit_forward(model, x, thresholds, decide_at=decide_at).exit_predictions[-1]

    def mask_predictor() -> None:
        for x in xs:
            predictor(x)

    def mask_writing() -> None:
        k = 0
        for batch in class_maps:
            for classes in batch:
                atomic_write(os.path.join(folder, f"{k}.png"), mask_png(classes, palette))
                k += 1

    runs: dict[str, Callable[[], None]] = {"plain": plain, "pass": early_exit_pass, "predictor": mask_predictor,
                                           "mask_writing": mask_writing}
    if a.bundle:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(os.path.join(a.bundle, "stage_0.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        decoded = [ds.images[i:min(i + a.batch_size, a.images)].expand(-1, 3, -1, -1).contiguous().numpy()
                   for i in range(0, a.images, a.batch_size)]

        def bundle() -> None:
            for images in decoded:
                session.run(["classes"], {"images": images})

        runs["bundle"] = bundle
    load_before = os.getloadavg()[0]
    for run in runs.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    print(json.dumps({
        "images": a.images, "batch_size": a.batch_size, "rounds": a.rounds, "decide_at": decide_at,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "ms_per_image": {n: round(1000 * statistics.median(s) / a.images, 3) for n, s in seconds.items()},
        "ratio_to_pass": {n: round(statistics.median(t / p for t, p in zip(s, seconds["pass"], strict=True)), 3)
                          for n, s in seconds.items()},
        **({"plain_over_bundle": round(statistics.median(
            p / b for p, b in zip(seconds["plain"], seconds["bundle"], strict=True)), 3)} if a.bundle else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
