"""`eetool predict`'s pass against `evaluate`'s early-exit pass at the same operating point, decoding apart.

    python bench/predict_throughput.py                  # budgets 0.25 and 0.5, batch 256, one thread
    python bench/predict_throughput.py --rounds 7

On the shipped checkpoint with class means calibrated on the demo training split and thresholds at budgets 0.25
and 0.5 (made once with the CLI and cached under ``--cache``), the 2,000 demo test images are written as PNG files
to a temporary folder and decoded once by predict's own decoder (eetool.core.prediction_io.file_batches, RGB as
from any file). In interleaved rounds (one thread: torch.set_num_threads(1); every other round in reverse order)
each round times, per point, both with their batch norms folded as they run by default:

- evaluate: eetool.core.inference.evaluate_exits over those decoded images, batch 256 (the pass whose time
  `eetool evaluate` reports as images/s), and over the demo split's own 1-channel images as `evaluate --data demo`
  reads them (``evaluate_1ch``: no RGB-to-luma conversion to do);
- predict: eetool.classification.prediction.predict_batches over the same decoded batches, batch 256, as `eetool
  predict` runs them (records made, JSON Lines written to os.devnull, flushed per batch, its tally kept);

and once per round the decoding of the PNG files (file_batches over the folder), reported apart. Every call is
timed by the process's CPU time (``cpu``: at one thread it leaves out the time the core spent on other work) and by
the wall clock (``wall``). Reported per clock and point: images/s of each (median over rounds), predict over
evaluate (the median over rounds of evaluate's seconds over predict's within a round, with its range; 1.0: as
fast, goal >= 0.9), predict's images/s with the decoding added; per point, whether predict's classes and exits
equal evaluate's on every image (from one untimed pass).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from demo_points import BUDGETS, demo_means_and_thresholds  # bench/, beside this script

BATCH = 256
GOAL = 0.9  # issue 23: predict's images/s within 10% of evaluate's


def timed(run: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and the process's CPU seconds of one call (at one thread the CPU time leaves out the time the
    core was given to other work, which the wall clock counts)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(cache: Path, rounds: int, folder: Path) -> dict[str, Any]:
    import torch
    from PIL import Image

    from eetool.classification.early_exit_evaluation import early_exit_setup
    from eetool.classification.prediction import Predictor, Tally, flat_record, predict_batches, record_columns
    from eetool.classification.rules import Thresholded
    from eetool.core.batch_norm_folding import folded_exit_model
    from eetool.core.checkpoint import load_checkpoint
    from eetool.core.datasets import Dataset, Preprocess, load_dataset
    from eetool.core.inference import evaluate_exits
    from eetool.core.loading import Geometry, default_resize
    from eetool.core.prediction_io import Batch, RecordWriter, file_batches, folder_images

    means, thresholds = demo_means_and_thresholds(cache)
    ckpt = load_checkpoint("demo")
    ckpt.model.eval()
    em, rule, (cost_model, _), chosen, _, _ = early_exit_setup(ckpt, str(means), None, str(thresholds), "all", "cpu")
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    ds = load_dataset("demo", "test")
    assert ds.images is not None
    for i, image in enumerate(ds.images[:, 0].numpy()):
        Image.fromarray(image, "L").save(folder / f"{i:05d}.png")
    files = folder_images(str(folder))
    crop = (ckpt.spec.input_shape[1], ckpt.spec.input_shape[2])
    geometry = Geometry(ckpt.spec.resize or default_resize(ckpt.spec.arch, crop), crop)  # as predict's default

    def skip(e: Exception) -> None:
        raise e

    def decode() -> list[Batch]:
        return list(file_batches(files, geometry, BATCH, skip))

    decoded = decode()
    rgb = torch.cat([b.images for b in decoded])
    as_files = Dataset("demo-png", "test", rgb, ds.labels, ds.classes, str(folder))
    costs = cost_model.normalised_exit_costs()
    class_names = ckpt.spec.classes or [str(k) for k in range(ckpt.spec.num_classes)]
    folded = folded_exit_model(em)

    def evaluate_run(data: Dataset, t: list[float]) -> Callable[[], Any]:
        return lambda: evaluate_exits(folded, data, preprocess, Thresholded(rule, t), batch_size=BATCH)

    def predict_run(predictor: Predictor) -> Callable[[], Any]:
        def run() -> Tally:
            tally = Tally(predictor.exits, costs)
            with open(os.devnull, "w", encoding="utf-8") as sink, torch.inference_mode():
                writer = RecordWriter(sink, "jsonl", record_columns(False, 0), flat_record)
                predict_batches(iter(decoded), predictor, preprocess, "cpu", writer, tally, class_names)
            return tally
        return run

    points = [list(p["thresholds"]) for _, p in chosen]
    runs: dict[str, Callable[[], Any]] = {"decode": decode}
    for budget, t in zip(BUDGETS, points, strict=True):
        runs[f"evaluate {budget:g}"] = evaluate_run(as_files, t)
        runs[f"evaluate_1ch {budget:g}"] = evaluate_run(ds, t)
        runs[f"predict {budget:g}"] = predict_run(Predictor(ckpt.model, em, rule, t).folded())
    # untimed: warms every pass up (compacted batch sizes set up their kernels on first use), and gives the
    # predictions compared
    agree = {}
    for budget, t in zip(BUDGETS, points, strict=True):
        runs[f"evaluate_1ch {budget:g}"]()
        reference = runs[f"evaluate {budget:g}"]()
        predictor = Predictor(ckpt.model, em, rule, t).folded()
        with torch.inference_mode():
            outs = [predictor(preprocess(b.images)) for b in decoded]
        agree[budget] = bool(torch.equal(torch.cat([o.classes for o in outs]), reference.predictions)
                             and torch.equal(torch.cat([o.exit_index for o in outs]), reference.exit_index))
        runs[f"predict {budget:g}"]()
    names = list(runs)
    timings: list[dict[str, tuple[float, float]]] = []
    for i in range(rounds):
        order = names[::-1] if i % 2 else names
        timings.append({name: timed(runs[name]) for name in order})
    n = len(files)
    out: dict[str, Any] = {"batch": BATCH, "images": n, "rounds": rounds}
    for clock, which in (("cpu", 1), ("wall", 0)):
        seconds = [{name: t[which] for name, t in r.items()} for r in timings]

        def rate(name: str, seconds: list[dict[str, float]] = seconds) -> float:
            return round(n / statistics.median(s[name] for s in seconds), 1)

        out[clock] = {"decode_images_per_s": rate("decode"), "points": []}
        for budget in BUDGETS:
            ev, ev1, pr = (f"{k} {budget:g}" for k in ("evaluate", "evaluate_1ch", "predict"))
            ratio = [s[ev] / s[pr] for s in seconds]
            ratio_1ch = [s[ev1] / s[pr] for s in seconds]
            out[clock]["points"].append({
                "budget": budget,
                "evaluate_images_per_s": rate(ev), "evaluate_1ch_images_per_s": rate(ev1),
                "predict_images_per_s": rate(pr),
                "predict_over_evaluate": round(statistics.median(ratio), 3),
                "predict_over_evaluate_range": [round(min(ratio), 3), round(max(ratio), 3)],
                "predict_over_evaluate_1ch": round(statistics.median(ratio_1ch), 3),
                "predict_over_evaluate_1ch_range": [round(min(ratio_1ch), 3), round(max(ratio_1ch), 3)],
                "predict_with_decoding_images_per_s": round(
                    n / statistics.median(s[pr] + s["decode"] for s in seconds), 1),
                "goal_met": statistics.median(ratio) >= GOAL,
            })
    out["points"] = [{"budget": budget, "thresholds": [round(x, 6) for x in t], "same_classes_and_exits": agree[budget]}
                     for budget, t in zip(BUDGETS, points, strict=True)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="results/predict-throughput")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    doc: dict[str, Any] = {"load_average_before": round(os.getloadavg()[0], 2), "threads": 1}
    with tempfile.TemporaryDirectory(prefix="predict-throughput-") as folder:
        doc.update(measure(Path(args.cache), args.rounds, Path(folder)))
    doc["load_average_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
