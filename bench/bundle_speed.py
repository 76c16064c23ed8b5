"""An exported bundle under onnxruntime against eetool predict's PyTorch pass, and the runtime's install size.

    python bench/bundle_speed.py                       # batch 1 and 256, budgets 0.25 and 0.5, one thread
    python bench/bundle_speed.py --install-size        # also pip install runtime/ into a fresh venv and measure it
    python bench/bundle_speed.py --int8                # also the int8 bundles (export --quantize int8) against float

On the shipped checkpoint and the demo test split (decoded once: decoding is not timed), with class means
calibrated on the demo training split and thresholds at budgets 0.25 and 0.5 (made once with the CLI and cached
under ``--cache``), the bundle exported from them and a plain bundle of the same checkpoint. In interleaved rounds
(one thread for both: torch.set_num_threads(1) and onnxruntime's intra-op threads 1), each round runs in turn:
eetool's plain model and each point (eetool.prediction.Predictor, the pass of `eetool predict`), then the bundles'
plain model and each point (eetool_runtime.bundle.Bundle, the pass of `eetool-runtime predict`). Reported per batch
size and point: images/s of each, the bundle's speed-up over eetool at the same point (median over rounds of the
ratio within a round), and speed-up x cost of each against its own plain model (1.0: the time tracks the MACs).
Goals (issue 23): bundle/eetool >= 3 at batch 1 and >= 1.5 at batch 256; the bundle's speed-up x cost >= 0.7 at
batch 1 and >= 0.8 at batch 256; the runtime's install under 150 MB.

At batch 1 the bundle runs each image through its single-image graph (schema 3: the stages nested in If branches,
one onnxruntime call); the same bundle driven stage graph by stage graph (a call per exit, as schema 2 ran an image)
joins the same rounds, and each point reports the single graph's speed over it (the median of the rounds' ratios,
with its range) and the stage calls' speed-up x cost.

With ``--int8``, int8 versions of both bundles (``--quantize int8``, calibrated on 512 samples of the demo training
split) join the same rounds, and each point (and the plain model) also reports the int8 bundle's speed over the
float bundle's: the median over rounds of the ratio within a round, with its range (ratios only: > 1 means int8 is
faster).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.25, 0.5)
GOALS = {1: (3.0, 0.7), 256: (1.5, 0.8)}  # batch -> (bundle/eetool, bundle speed-up x cost)


def _eetool(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "eetool", *args, "-q"], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(f"eetool {' '.join(args)} failed: {proc.stderr}")
        sys.exit(2)


def artifacts(cache: Path, int8: bool) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    made = {"means": cache / "means.safetensors", "thresholds": cache / "thresholds.yaml",
            "bundle": cache / "bundle", "plain": cache / "plain-bundle"}
    if int8:
        made.update({"bundle-int8": cache / "bundle-int8", "plain-int8": cache / "plain-bundle-int8"})
    if not made["means"].exists():
        _eetool("calibrate-means", "-c", "demo", "-d", "demo", "--split", "train", "-o", str(made["means"]))
    if not made["thresholds"].exists():
        _eetool("fit-thresholds", "--means", str(made["means"]), "-o", str(made["thresholds"]),
                *(a for b in BUDGETS for a in ("--budget", str(b))))
    if not made["bundle"].exists():
        _eetool("export", "-c", "demo", "--means", str(made["means"]), "--thresholds", str(made["thresholds"]),
                "-o", str(made["bundle"]))
    if not made["plain"].exists():
        _eetool("export", "-c", "demo", "-o", str(made["plain"]))
    quantize = ["--quantize", "int8", "--calibration-data", "demo"]
    if "bundle-int8" in made and not made["bundle-int8"].exists():
        _eetool("export", "-c", "demo", "--means", str(made["means"]), "--thresholds", str(made["thresholds"]),
                "-o", str(made["bundle-int8"]), *quantize)
    if "plain-int8" in made and not made["plain-int8"].exists():
        _eetool("export", "-c", "demo", "-o", str(made["plain-int8"]), *quantize)
    return made


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def speeds(made: dict[str, Path], batch: int, samples: int, rounds: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from eetool_runtime.bundle import Bundle

    from eetool.classification.early_exit_evaluation import early_exit_setup
    from eetool.classification.prediction import Predictor
    from eetool.core.checkpoint import load_checkpoint
    from eetool.core.datasets import Preprocess, load_dataset

    torch.set_num_threads(1)
    ckpt = load_checkpoint("demo")
    ckpt.model.eval()
    em, rule, (cost_model, _), chosen, _, _ = early_exit_setup(ckpt, str(made["means"]), None,
                                                                str(made["thresholds"]), "all", "cpu")
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    ds = load_dataset("demo", "test")
    assert ds.images is not None
    images = ds.images[:samples].expand(-1, 3, -1, -1).contiguous()  # as decoded from files: RGB
    batches = list(images.split(batch))
    np_batches = [b.numpy() for b in batches]
    bundle, plain_bundle = Bundle(made["bundle"], threads=1), Bundle(made["plain"], threads=1)
    thresholds = [list(p["thresholds"]) for _, p in chosen]
    ours = [Predictor(ckpt.model)] + [Predictor(ckpt.model, em, rule, t) for t in thresholds]

    def eetool_run(predictor: Predictor) -> Callable[[], Any]:
        def run() -> list[Any]:
            with torch.inference_mode():
                return [predictor(preprocess(b)) for b in batches]
        return run

    def bundle_run(b: Bundle, t: list[float]) -> Callable[[], Any]:
        return lambda: [b(x, t) for x in np_batches]

    runs = [eetool_run(p) for p in ours] + [bundle_run(plain_bundle, [])] + [bundle_run(bundle, t) for t in thresholds]
    int8 = "bundle-int8" in made
    if int8:  # after the float runs, so that the indices above hold; the same rounds time them
        bundle8, plain8 = Bundle(made["bundle-int8"], threads=1), Bundle(made["plain-int8"], threads=1)
        runs += [bundle_run(plain8, [])] + [bundle_run(bundle8, t) for t in thresholds]
    staged = batch == 1  # at batch 1, also the stage graphs a call each, as bundles before schema 3 ran an image
    if staged:
        stage_driver = Bundle(made["bundle"], threads=1)
        stage_driver.network = None
        first_staged = len(runs)
        runs += [bundle_run(stage_driver, t) for t in thresholds]
    # exit counts (costs) from one untimed pass of each point, which also warms both up
    costs = []
    for run in runs[len(ours) + 1:2 * len(ours)]:
        exits = np.concatenate([o.exit_index for o in run()])
        costs.append(float(np.mean(np.array(cost_model.normalised_exit_costs())[exits])))
    for run in runs[:len(ours) + 1] + runs[2 * len(ours):]:
        run()
    # the share of images whose exit the single-image graph and the stage calls agree on (1.0 but for rounding)
    same_exits = [float(np.mean([bundle(x, t).exit_index[0] == stage_driver(x, t).exit_index[0] for x in np_batches]))
                  for t in thresholds] if staged else []
    seconds = [[timed(run) for run in runs] for _ in range(rounds)]
    k = len(ours)
    out: dict[str, Any] = {"batch": batch, "samples": samples, "rounds": rounds, "points": []}
    for i, (budget, cost) in enumerate(zip(BUDGETS, costs, strict=True)):
        eet = [r[1 + i] for r in seconds]
        bun = [r[k + 1 + i] for r in seconds]
        ratio = [e / b for e, b in zip(eet, bun, strict=True)]
        eet_up = [r[0] / r[1 + i] for r in seconds]
        bun_up = [r[k] / r[k + 1 + i] for r in seconds]
        out["points"].append({
            "budget": budget, "cost": round(cost, 4),
            "eetool_images_per_s": round(samples / statistics.median(eet), 1),
            "bundle_images_per_s": round(samples / statistics.median(bun), 1),
            "bundle_over_eetool": round(statistics.median(ratio), 2),
            "bundle_over_eetool_range": [round(min(ratio), 2), round(max(ratio), 2)],
            "eetool_speedup_x_cost": round(statistics.median(eet_up) * cost, 2),
            "bundle_speedup_x_cost": round(statistics.median(bun_up) * cost, 2),
            "goals_met": (statistics.median(ratio) >= GOALS[batch][0]
                          and statistics.median(bun_up) * cost >= GOALS[batch][1]) if batch in GOALS else None,
        })
    out["plain"] = {"eetool_images_per_s": round(samples / statistics.median(r[0] for r in seconds), 1),
                    "bundle_images_per_s": round(samples / statistics.median(r[k] for r in seconds), 1)}
    if staged:
        for i, row in enumerate(out["points"]):
            ratio = [r[first_staged + i] / r[k + 1 + i] for r in seconds]  # stage driver seconds / bundle seconds
            row["single_graph_over_stage_calls"] = round(statistics.median(ratio), 2)
            row["single_graph_over_stage_calls_range"] = [round(min(ratio), 2), round(max(ratio), 2)]
            row["single_graph_same_exits"] = same_exits[i]
            row["stage_calls_speedup_x_cost"] = round(
                statistics.median(r[k] / r[first_staged + i] for r in seconds) * row["cost"], 2)
    if int8:
        for i, row in enumerate([out["plain"], *out["points"]]):
            ratio = [r[k + i] / r[2 * k + i] for r in seconds]  # float seconds / int8 seconds: int8's speed-up
            row["int8_over_float_bundle"] = round(statistics.median(ratio), 2)
            row["int8_over_float_bundle_range"] = [round(min(ratio), 2), round(max(ratio), 2)]
    return out


def _dist_size(name: str, seen: set[str]) -> int:
    """Bytes on disk of a distribution and everything it requires (no extras), each counted once."""
    from packaging.requirements import Requirement

    key = name.lower().replace("_", "-")
    if key in seen:
        return 0
    seen.add(key)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return 0
    size = 0
    for f in dist.files or []:
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            size += path.stat().st_size
    for req in dist.requires or []:
        r = Requirement(req)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            size += _dist_size(r.name, seen)
    return size


def install_size() -> dict[str, Any]:
    """The runtime installed into a fresh venv (its site-packages, pip and setuptools left out), beside the
    distributions eetool itself requires in this environment."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, str(ROOT / "runtime")], check=True)
        code = ("import importlib.metadata as m, json, pathlib\n"
                "def size(d):\n"
                "    paths = (pathlib.Path(str(d.locate_file(f))) for f in (d.files or []))\n"
                "    return sum(p.stat().st_size for p in paths if p.is_file())\n"
                "print(json.dumps({d.metadata['Name']: size(d) for d in m.distributions()\n"
                "                  if d.metadata['Name'].lower() not in ('pip', 'setuptools')}))")
        sizes = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True,
                                          capture_output=True, text=True).stdout)
    runtime_bytes = sum(sizes.values())
    eetool_bytes = _dist_size("eetool", set())
    return {"runtime_mb": round(runtime_bytes / 2**20, 1), "eetool_mb": round(eetool_bytes / 2**20, 1),
            "runtime_goal_met": runtime_bytes / 2**20 < 150,
            "runtime_by_distribution_mb": {k: round(v / 2**20, 1) for k, v in sorted(sizes.items(),
                                                                                     key=lambda kv: -kv[1])}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="results/bundle-speed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples-batch-1", type=int, default=300)
    parser.add_argument("--install-size", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also the int8 bundles, against the float ones")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], choices=[1, 256])
    args = parser.parse_args()
    made = artifacts(Path(args.cache), args.int8)
    load = os.getloadavg()[0]
    doc = {"load_average": round(load, 2),
           "runs": [speeds(made, batch, args.samples_batch_1 if batch == 1 else 2000, args.rounds)
                    for batch in args.batches]}
    if args.install_size:
        doc["install"] = install_size()
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
